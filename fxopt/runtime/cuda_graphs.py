"""CUDA-graph replay of a callable's specialisations: :class:`GraphReplay`.

    step = GraphReplay(fn, static_args=(4,), check=guard.check)
    out = step(ids, pos, slot, mask, cache)      # 1st call per signature: eager (the warm-up)
    out = step(ids, pos, slot, mask, cache)      # 2nd: captured into a CUDA graph, then replayed
    out = step(...)                              # later: copy inputs in, replay, copy outputs out

What is specialised on (the key): every tensor argument's shape, stride, dtype, device and
``requires_grad``; for *static* arguments also the storage address; every non-tensor argument's
value. A new key is warmed up (``warmup`` eager calls) and then captured.

Contract:

* **Inputs.** Positional and keyword arguments, each a tensor, a pytree of tensors or a plain
  value. Non-static tensors are copied into the graph's own buffers before each replay, so
  callers may pass fresh tensors every call. Static arguments (``static_args``: positions or
  keyword names of arguments, e.g. weights or a cache, passed at the same address every call) are
  used in place: the graph reads and writes them directly. ``fn`` must not write into a
  non-static argument in place (its writes would land in the graph's buffer, not the caller's
  tensor): a warm-up call that bumps such an argument's version counter makes the key
  uncapturable.
* **Outputs.** By default every output tensor is copied out after the replay, so what the caller
  holds stays valid after later calls. ``alias_outputs=True`` returns the graph's own output
  buffers instead (no copy): they are valid only until the next call of *this* GraphReplay (any
  key: all graphs share one memory pool, so replaying one may overwrite another's buffers).
  Non-tensor outputs are those of the capture call.
* **Fallback.** A key whose call cannot be captured runs eagerly every time, with a note in
  :attr:`notes`: CPU (non-CUDA) tensors, gradients being recorded, an in-place write to a
  non-static input, or a capture that fails (host synchronisation such as ``.item()`` or a
  data-dependent shape, which CUDA refuses while capturing). A failed CUDA capture is retried
  after a new warm-up, up to :data:`MAX_CAPTURE_ATTEMPTS` times (another thread's device-wide
  sync can invalidate a capture of a perfectly capturable call); after a failure the default
  generator's state is restored (torch leaves it in capture mode) and a fresh memory pool is used.
* **Soundness hook.** ``check() -> reason | None`` runs before every replay; a reason (e.g. the
  model's parameters were replaced, its mode changed) drops every captured graph and runs the call
  eagerly, with the reason noted. Keys are captured again (after a warm-up) once ``check`` passes.
* **Threads.** Calls are serialised by a lock; replays on different streams are ordered by an
  event recorded after each one (the shared pool makes concurrent replays unsafe). A capture is
  exclusive against every GraphReplay call in the process (:class:`_CaptureGate`), so fxopt's own
  work on other threads cannot invalidate it. CUDA work of the caller's that does not go through
  fxopt and runs on another thread during a capture (which happens on the first calls of a new
  shape only) is subject to CUDA's rules: a device-wide sync or an implicit sync with the
  capturing stream fails there and makes the capture fail (it is then retried, and falls back to
  eager). Callers that run unrelated CUDA work concurrently can pass ``cuda_graphs=False``.

``backend="emulate"`` (tests on machines without a GPU) keeps all the bookkeeping (keys, static
buffers, copy in / copy out, aliasing, fallbacks, the check hook) and stands in for the graph:
the capture calls ``fn`` on copies of the inputs (a CUDA capture executes nothing), a replay calls
it on the static buffers and writes the results into the static output buffers.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger("fxopt")

_NONTENSOR_OUT = (int, float, bool, str, type(None))

# A CUDA capture can be invalidated by what other threads do meanwhile (a device-wide sync, a
# synchronous copy on the legacy stream): such a failure says nothing about the function, so a
# key is warmed up and captured again, up to this many attempts, before it runs eagerly for good.
MAX_CAPTURE_ATTEMPTS = 3


class _CaptureGate:
    """Captures exclusive against every GraphReplay call of the process.

    One capture at a time (two captures from two threads would interleave their allocations into
    each other's pools), and no GraphReplay's CUDA work on another thread while one runs: CUDA
    invalidates a capture when another thread synchronises with its stream or the device, which a
    warm-up or eager call of another GraphReplay may do (and that thread gets the error too).

    ``shared()`` is held around a call's work, ``exclusive()`` around a capture. A thread that
    holds ``shared()`` and asks for ``exclusive()`` gives its shared holds back while it waits (it
    does no CUDA work then) and takes them again afterwards, so two threads that both start a
    capture from inside their calls cannot deadlock. Both nest within one thread. CUDA work that
    does not go through fxopt cannot be held back: see the module docstring (threads)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers: dict[int, int] = {}
        self._writer: Optional[int] = None
        self._depth = 0

    def shared(self):
        return _GateHold(self, exclusive=False)

    def exclusive(self):
        return _GateHold(self, exclusive=True)

    def _acquire(self, exclusive: bool) -> int:
        me = threading.get_ident()
        with self._cond:
            if not exclusive:
                self._cond.wait_for(lambda: self._writer in (None, me))
                self._readers[me] = self._readers.get(me, 0) + 1
                return 0
            if self._writer == me:  # nested capture in one thread: CUDA refuses it; the caller reports it
                self._depth += 1
                return 0
            saved = self._readers.pop(me, 0)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._writer is None and not self._readers)
            self._writer, self._depth = me, 1
            return saved

    def _release(self, exclusive: bool, saved: int) -> None:
        me = threading.get_ident()
        with self._cond:
            if not exclusive:
                left = self._readers[me] - 1
                if left:
                    self._readers[me] = left
                else:
                    del self._readers[me]
            else:
                self._depth -= 1
                if self._depth:
                    return
                self._writer = None
                if saved:
                    self._readers[me] = saved
            self._cond.notify_all()


class _GateHold:
    __slots__ = ("gate", "exclusive", "saved")

    def __init__(self, gate: _CaptureGate, exclusive: bool):
        self.gate, self.exclusive, self.saved = gate, exclusive, 0

    def __enter__(self):
        self.saved = self.gate._acquire(self.exclusive)
        return self

    def __exit__(self, *exc):
        self.gate._release(self.exclusive, self.saved)
        return False


_GATE = _CaptureGate()


@dataclass
class _Entry:
    calls: int = 0
    reason: Optional[str] = None
    failures: int = 0
    graph: Any = None
    static_in: list = field(default_factory=list)     # per input leaf: buffer, the static tensor, or the value
    static_out: list = field(default_factory=list)    # flat outputs of the capture call
    out_spec: Any = None


def _leaf_key(a: Any, static: bool):
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad, a.data_ptr() if static else None)
    try:
        hash(a)
        return ("V", type(a).__name__, a)
    except TypeError:
        return ("R", type(a).__qualname__, repr(a))


def _flatten(args: tuple, kwargs: dict, static_args: frozenset) -> tuple[list, list[bool], Any]:
    """The call's input leaves (arguments may be pytrees: a cache tuple), which of them belong
    to a static argument (by position, or keyword name), and the structure to rebuild
    ``(args, kwargs)`` from leaves."""
    leaves: list = []
    static: list[bool] = []
    for key, a in [*enumerate(args), *sorted(kwargs.items())]:
        sub = pytree.tree_leaves(a)
        leaves += sub
        static += [key in static_args] * len(sub)
    return leaves, static, pytree.tree_structure((args, dict(sorted(kwargs.items()))))


def _call(fn, leaves, spec):
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    return fn(*args, **kwargs)


class _RngGuard:
    """Keeps the default CUDA generator usable after a failed capture.

    ``torch.cuda.graph`` puts the default generator's state into capture mode when a capture
    begins and takes it out when the capture ends; a capture that CUDA invalidated (a host sync,
    a forbidden call) makes ``capture_end`` raise before that second step, and from then on
    every random op in the process fails with "Offset increment outside graph capture". So a
    copy of the state is taken before the capture and swapped back in if it fails (a failed
    capture produced nothing that used its random numbers)."""

    def __init__(self):
        self._gen = self._saved = None
        try:
            self._gen = torch.cuda.default_generators[torch.cuda.current_device()]
            self._saved = self._gen.clone_state()
        except (AttributeError, RuntimeError, IndexError):  # a torch without graph-safe generator states
            self._gen = None

    def restore(self) -> None:
        if self._gen is not None:
            try:
                self._gen.graphsafe_set_state(self._saved)
            except RuntimeError as exc:
                log.warning("fxopt graph replay: could not restore the CUDA generator after a failed capture: %s", exc)


class GraphReplay:
    def __init__(self, fn: Callable, *, static_args: Sequence[int | str] = (), alias_outputs: bool = False,
                 check: Optional[Callable[[], Optional[str]]] = None, warmup: int = 1, max_graphs: int = 16,
                 name: str | None = None, backend: str = "cuda"):
        if backend not in ("cuda", "emulate"):
            raise ValueError(f"backend must be 'cuda' or 'emulate', got {backend!r}")
        self.fn = fn
        self.static_args = frozenset(i if isinstance(i, str) else int(i) for i in static_args)
        self.alias_outputs = bool(alias_outputs)
        self.check = check
        self.warmup = max(1, int(warmup))
        self.max_graphs = max(1, int(max_graphs))
        self.name = name or getattr(fn, "__name__", "fn")
        self.backend = backend
        self.notes: list[str] = []
        self.stats = {"eager": 0, "captures": 0, "replays": 0}
        self._entries: "OrderedDict[tuple, _Entry]" = OrderedDict()
        self._lock = threading.RLock()
        self._pool = None
        self._last_event = None

    # ------------------------------------------------------------------ public
    def __call__(self, *args, **kwargs):
        # the instance lock first, then the gate: a thread waiting for this instance holds no
        # shared gate, so a capture here never waits on it (see _CaptureGate)
        with self._lock, _GATE.shared():
            leaves, static, spec = _flatten(args, kwargs, self.static_args)
            reason = self._not_replayable(leaves)
            if reason is not None:
                return self._eager(leaves, spec, reason)
            if self.check is not None:
                why = self.check()
                if why is not None:
                    if self._entries:
                        self._note(f"{self.name}: dropped {len(self._entries)} captured graph(s): {why}")
                    self._entries.clear()
                    return self._eager(leaves, spec, f"not replayed: {why}")
            key = (spec, tuple(_leaf_key(a, st) for a, st in zip(leaves, static)))
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry()
                while len(self._entries) > self.max_graphs:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(key)
            if entry.reason is not None:
                return self._eager(leaves, spec, None)
            if entry.calls < self.warmup:
                return self._warm(leaves, static, spec, entry)
            if entry.graph is None and not self._capture(leaves, static, spec, entry):
                return self._eager(leaves, spec, None)
            return self._replay(leaves, static, spec, entry)

    def invalidate(self) -> None:
        """Drop every captured graph (the next calls warm up and capture again)."""
        with self._lock:
            self._entries.clear()

    @property
    def graphs(self) -> int:
        return sum(e.graph is not None for e in self._entries.values())

    # ------------------------------------------------------------------ internals
    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            log.info("fxopt graph replay: %s", text)

    def _not_replayable(self, leaves) -> Optional[str]:
        tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
        if self.backend == "cuda":
            if not torch.cuda.is_available() or any(t.device.type != "cuda" for t in tensors):
                return "CPU tensors: runs eagerly"
            if torch.cuda.is_current_stream_capturing():
                # A replay nested in another capture (a GraphReplay around an OptimizedModule that
                # replays its own specialisations): run the function, so the outer graph records
                # its kernels. Capturing here would nest captures, which CUDA refuses, and leave
                # the RNG's capture state broken for every later capture in the process.
                return "inside another CUDA-graph capture: runs directly (the outer graph records it)"
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return "gradients are recorded: runs eagerly"
        return None

    def _eager(self, leaves, spec, reason: Optional[str]):
        if reason is not None:
            self._note(f"{self.name}: {reason}")
        self.stats["eager"] += 1
        return _call(self.fn, leaves, spec)

    def _warm(self, leaves, static, spec, entry: _Entry):
        versions = [(i, a._version) for i, (a, st) in enumerate(zip(leaves, static))
                    if isinstance(a, torch.Tensor) and not st]
        out = self._eager(leaves, spec, None)
        entry.calls += 1
        for i, v in versions:
            if leaves[i]._version != v:
                entry.reason = f"input tensor {i} is written in place by the call (make its argument static)"
                self._note(f"{self.name}: not captured: {entry.reason}")
        if torch.is_grad_enabled() and any(isinstance(o, torch.Tensor) and o.requires_grad for o in pytree.tree_leaves(out)):
            entry.reason = "outputs require grad (autograd is not replayed)"
            self._note(f"{self.name}: not captured: {entry.reason}")
        return out

    def _capture(self, leaves, static, spec, entry: _Entry) -> bool:
        static_in = [a.clone() if isinstance(a, torch.Tensor) and not st else a for a, st in zip(leaves, static)]
        try:
            if self.backend == "cuda":
                with _GATE.exclusive():
                    graph, out = self._cuda_capture(static_in, spec)
            else:
                # a CUDA capture records without executing: run on copies of everything, static
                # arguments included, so the emulated capture has no side effect either
                graph = "emulated"
                probe = [a.clone() if isinstance(a, torch.Tensor) else a for a in static_in]
                out = _call(self.fn, probe, spec)
            flat, spec = pytree.tree_flatten(out)
            bad = [type(o).__name__ for o in flat if not isinstance(o, (torch.Tensor,) + _NONTENSOR_OUT)]
            if bad:
                entry.failures = MAX_CAPTURE_ATTEMPTS  # a property of the function: never retried
                raise TypeError(f"outputs of type {bad[0]} cannot be replayed")
        except Exception as exc:  # noqa: BLE001 - an uncapturable call runs eagerly, with the reason noted
            why = f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            entry.failures += 1
            if self.backend == "cuda" and entry.failures < MAX_CAPTURE_ATTEMPTS:
                entry.calls = 0  # warm up and try again (the failure may come from another thread's work)
                self._note(f"{self.name}: {why} (attempt {entry.failures} of {MAX_CAPTURE_ATTEMPTS}; "
                           "runs eagerly, retried after a warm-up)")
            else:
                entry.reason = why
                self._note(f"{self.name}: not captured: {entry.reason}")
            return False
        entry.graph, entry.static_in, entry.static_out, entry.out_spec = graph, static_in, flat, spec
        self.stats["captures"] += 1
        return True

    def _cuda_capture(self, static_in, spec):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        rng = _RngGuard()
        try:
            # thread_local: CUDA work of other threads during the capture is not an error
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = _call(self.fn, static_in, spec)
        except BaseException:
            rng.restore()
            self._abandon_pool()
            try:
                torch.cuda.synchronize()
            except RuntimeError:  # the failed capture's error surfaces here too; it was reported
                pass
            raise
        return graph, out

    def _abandon_pool(self) -> None:
        """After a failed capture: stop routing allocations to its pool (torch may leave it marked
        as being recorded into) and take a fresh pool for the next capture."""
        end = getattr(torch._C, "_cuda_endAllocateToPool", None)
        if end is not None and self._pool is not None:
            try:
                end(torch.cuda.current_device(), self._pool)
            except (RuntimeError, TypeError):
                pass
        self._pool = None

    def _replay(self, leaves, static, spec, entry: _Entry):
        if self.backend == "cuda":
            # the previous replay (maybe on another thread's stream) must be done with the shared
            # buffers before this one's inputs are copied in
            stream = torch.cuda.current_stream()
            if self._last_event is not None:
                stream.wait_event(self._last_event)
        for dst, src, st in zip(entry.static_in, leaves, static):
            if isinstance(src, torch.Tensor) and not st and dst is not src:
                dst.copy_(src)
        if self.backend == "cuda":
            entry.graph.replay()
        else:
            fresh = pytree.tree_leaves(_call(self.fn, entry.static_in, spec))
            for dst, src in zip(entry.static_out, fresh):
                if isinstance(dst, torch.Tensor):
                    dst.copy_(src)
        outs = entry.static_out if self.alias_outputs else [
            o.clone() if isinstance(o, torch.Tensor) else o for o in entry.static_out]
        if self.backend == "cuda":
            event = torch.cuda.Event()
            event.record(stream)
            self._last_event = event
        self.stats["replays"] += 1
        return pytree.tree_unflatten(list(outs), entry.out_spec)
