"""Is a length template sound at this L? Compare the model's ATen op stream there.

A length template (``length_generic.py``) is *fitted* at the probe lengths 5, 7, 11
and *instantiated* at the real L. That is only right if the model's Python behaves at
L the way it did at the probes: ``if ids.shape[1] > 20``, ``min(L, 16)``, ``L % 8``, a
``if t == 40`` inside a loop over time, all take one branch at every probe and another
at L, and nothing in the three probe graphs can tell. So before a template's graph is
used at L we look at what the model *does* at L, cheaply:

* :func:`record_stream` runs the model on data-free tensors (no data, no FLOPs, no
  export) under a recording dispatch mode and keeps, for every ATen op, a *token*: the
  overload, a skeleton of its arguments (tensors as dtype and rank plus which earlier op
  produced them, non-integer literals exactly) and its integer literals (the inputs'
  sizes first). The stream is a complete description of the computation: two runs with
  equal streams (and equal inputs) run the same ops on the same values; any Python branch
  that changes what the model computes changes its stream. It records the path export
  traces (``torch.compiler.is_compiling()`` / ``is_exporting()`` set, as export does).
* Data-free how: FakeTensorMode is faithful (tensors report their real device) but
  costs ~100 us of Python per op, 3-4 s for the ~27k ops of mamba-130m's 1-layer proxy
  at L = 2048. Meta tensors run the shape functions directly (~0.35 s for the same stream;
  a pointwise op's Python meta kernel runs once per argument metadata, see ``_cacheable``) but
  report device "meta", so code that branches on the device (SDPA's backend choice, a
  CUDA-only fast path) could take another path than export does. So at the probes the
  model is recorded both ways; the check at the real L records on meta tensors only when
  the two recordings agree op for op (devices recorded as the call's device; a
  convolution, whose output layout the device's kernels decide, runs in a FakeTensorMode
  for that device), and with FakeTensorMode otherwise (GPTNeoX: SDPA picks a CPU/CUDA
  kernel; its stream is short, it has no loop over L).
* :func:`fit_streams` learns from the probe streams how the stream depends on L: fixed
  segments and loop regions (a body repeated ``a*L + b`` times), every integer literal
  affine in L, and inside a loop affine in (L, iteration index), the first or last
  iteration or two being allowed to differ (a loop's first step reads the initial
  state). It is fitted on two probes and must predict the third exactly.
* :meth:`StreamModel.check` records the stream at the real L and compares it token by
  token with the prediction; the first divergence is a :class:`StreamDivergence`
  (a :class:`~fxopt.length_generic.TemplateMismatch`) naming the op, the literals and,
  found by a second recording, the model's source line.

Why this is enough: the template's graph is the probe graphs' affine extension. The
model's Python is the untrusted part, and the check proves that *at this L* the model
does exactly what the affine extension of the probes' behaviour predicts: same ops, same
data flow, literals on the fitted lines. What is left to trust is our own passes treating
a loop of L steps the same at every L, which their tests cover. Anything the fit cannot
express (literals not affine, a loop inside a loop over L, data-dependent control flow,
which fake tensors refuse) is a mismatch, and the caller captures at the real length.

Why not simply capture at L: export costs milliseconds per traced op; the 1-layer proxy
of mamba-130m at L = 2048 is ~27k ops (tens of seconds to export, under a second to
record on meta tensors). Why the stream and not the graphs: comparing the rewritten
graphs at L would need that very capture.

Recorded under ``torch.no_grad()`` (autograd bookkeeping would double the cost; the ops
below autograd do not change, and decompositions that look at ``requires_grad`` see the
parameters' own flags); Python that branches on ``torch.is_grad_enabled()`` is the
one thing this records differently from export.

Not covered here: the verification proxy of a layer stack holds layer 0 (layers 0 and 1
when the layer template peeled layer 0); that every other layer behaves like it is the
layer template's claim (``layer_generic.py``), made at the probe lengths. A branch on
L *and* the layer index in a layer the proxy does not hold is not seen; nor, on the meta
path, a branch on L *and* the device that the probes do not take (the meta/fake
comparison happens at the probes).
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .capture import normalize_call
from .errors import TemplateMismatch  # the class fxopt.length_generic exports

log = logging.getLogger("fxopt")

# Leading / trailing iterations of a loop region whose literals may leave the loop's
# affine pattern (the first step reads the initial state instead of the last step).
_MAX_PEEL = 2


class StreamDivergence(TemplateMismatch):
    """The op stream at the real length is not the one the probes predict."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


# ----------------------------------------------------------------- recording

@dataclass
class OpStream:
    """The ATen ops of one run: ``keys[i]`` indexes ``vocab`` (the op and its argument
    skeleton), ``ints[i]`` are op i's integer literals (refs to earlier ops included)."""

    keys: list[int]
    ints: list[tuple[int, ...]]
    vocab: list[tuple]
    seconds: float = 0.0
    how: str = "meta"

    def __len__(self) -> int:
        return len(self.keys)

    def token(self, i: int) -> tuple[tuple, tuple[int, ...]]:
        return self.vocab[self.keys[i]], self.ints[i]


class _Located(Exception):
    def __init__(self, where: str):
        self.where = where


_INT = "i"
_QUERIES = (torch.ops.prim.device.default,)
# Ops whose output strides depend on the device's kernels (CPU mkldnn / cuDNN pick the
# memory format): a meta recording runs them in FakeTensorMode for the real device.
_DEVICE_RULED = (torch.ops.aten.convolution.default,)  # an integer slot in a skeleton (its value goes to the literals)

# ----------------------------------------------------------------- meta results, computed once
# Meta kernels of pointwise ops (aten.mul.Tensor, aten.add.Tensor, ...) are Python in torch
# (``torch/_meta_registrations.py``: broadcasting, type promotion and stride rules in
# ``torch._refs``), ~180 us per call against ~15 us for a C++ view kernel: two thirds of a meta
# recording at L = 2048, whose loop issues the same op on the same shapes once per step. An op
# that returns a *fresh* tensor (no aliasing, no mutation, no data-dependent output) computes its
# result's metadata from its arguments' metadata alone (a meta tensor has no data), so a
# recording computes it once per (op, argument metadata) and then builds an equal empty meta
# tensor. What is recorded (the token) is computed from the arguments before the op runs and does
# not change; what later ops see (shape, strides, dtype, a fresh storage) is what the kernel
# returned for arguments of the same metadata (see _meta_key for storage offsets).
_NOT_CACHED_TAGS = tuple(getattr(torch.Tag, t) for t in (
    "dynamic_output_shape", "data_dependent_output", "inplace_view", "nondeterministic_seeded")
    if hasattr(torch.Tag, t))
_CACHEABLE: dict = {}   # OpOverload -> whether its meta result may be reused (decided from its schema)
_SIMPLE_ARG = (int, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)
# A longer list (``stack`` of one tensor per loop step) is issued once: keying it costs more than
# it could save.
_MAX_KEYED_LIST = 64


def _cacheable(func) -> bool:
    known = _CACHEABLE.get(func)
    if known is None:
        schema = getattr(func, "_schema", None)
        known = (schema is not None and not schema.is_mutable and len(schema.returns) == 1
                 and schema.returns[0].alias_info is None and str(schema.returns[0].type) == "Tensor"
                 and not any(t in func.tags for t in _NOT_CACHED_TAGS) and func not in _DEVICE_RULED)
        _CACHEABLE[func] = known
    return known


def _meta_key(items, out: list) -> bool:
    """Append the metadata of ``items`` (an op's arguments) to ``out``; False when one is
    something the key cannot hold exactly (a tensor subclass, a symbolic size, an object): then
    the op just runs. Iterative (nested lists go on a stack): this runs for every pointwise op."""
    stack = [iter(items)]
    while stack:
        for a in stack[-1]:
            t = type(a)
            if t is torch.Tensor:
                if not a.is_meta or a.layout is not torch.strided:
                    return False
                # Where a tensor starts in its storage (a loop's ``x[:, i]`` starts one step further
                # each time) enters as its alignment class: an offset moves no result's shape or
                # strides, and a kernel that checks alignment sees the same class as the cached run.
                off = a.storage_offset()
                out.append((a.shape, a.stride(), off == 0, off * a.element_size() % 64, a.dtype, a.requires_grad,
                            a.is_conj(), a.is_neg()))
            elif t is float:
                out.append(("f", repr(a)))  # repr: 0.0 / -0.0 / nan stay apart
            elif t is bool or t in _SIMPLE_ARG:
                out.append((t, a))  # with the type: True and 1 are equal keys otherwise
            elif t is list or t is tuple:
                if len(a) > _MAX_KEYED_LIST:
                    return False
                out.append((t, len(a)))
                stack.append(iter(a))
                break
            else:
                return False
        else:
            stack.pop()
    return True


def _fresh_result(out: Any, args: tuple, kwargs: dict) -> bool:
    """Whether ``out`` is a plain new meta tensor, in a storage of its own, that an
    ``empty_strided`` of its shape, strides and dtype reproduces exactly (checked on the kernel's
    real result, once per key; otherwise the op runs every time)."""
    if type(out) is not torch.Tensor or not out.is_meta or out.layout is not torch.strided:
        return False
    if out.storage_offset() != 0 or out.requires_grad or out.is_conj() or out.is_neg() or out._is_view():
        return False
    # No storage shared with an argument: ``_unsafe_view`` declares no alias yet returns its input's
    # storage, and what shares storage (overlap checks of later in-place ops) is not metadata.
    storage = out.untyped_storage()._cdata
    if any(isinstance(x, torch.Tensor) and (x is out or x.untyped_storage()._cdata == storage)
           for x in pytree.tree_leaves((args, kwargs))):
        return False
    twin = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device="meta")
    return twin.untyped_storage().nbytes() == out.untyped_storage().nbytes()


class _Recorder(TorchDispatchMode):
    """Sits above the fake mode: sees every ATen op with fake arguments, records its token,
    lets the fake mode compute the (metadata-only) result."""

    def __init__(self, names: dict[int, str], stop_at: int | None = None, home: torch.device | None = None,
                 indexed: dict[int, int] | None = None):
        super().__init__()
        self.indexed = indexed or {}        # id(fake param) -> its layer's index (layer streams)
        self.home = home                    # meta recording: the device "meta" stands for
        self.fake_mode = None
        self.names = names                  # id(fake param / input) -> stable name
        self.refs: dict[int, tuple[int, int]] = {}  # id(tensor) -> (producing op, output slot)
        self.alive: list = []               # keep outputs alive: ids must not be reused
        self.externals: dict[int, str] = {}
        self.vocab: dict[tuple, int] = {}
        self.keys: list[int] = []
        self.ints: list[tuple[int, ...]] = []
        self.stop_at = stop_at
        self.meta_results: dict[tuple, tuple] = {}  # see _cacheable: (op, argument metadata) -> result's
        self.not_fresh: set = set()         # ops whose result shared storage with an argument: run always
        self.op_names: dict = {}            # OpOverload -> str(op), formatted once

    def add(self, key: tuple, ints: Sequence[int]) -> None:
        k = self.vocab.get(key)
        if k is None:
            k = self.vocab[key] = len(self.vocab)
        self.keys.append(k)
        self.ints.append(tuple(ints))

    def _tensor(self, t: torch.Tensor, skel: list, ints: list) -> None:
        ref = self.refs.get(id(t))
        if ref is not None:
            skel.append(("T", t.dtype, t.dim()))
            ints.extend(ref)
            return
        name = self.names.get(id(t))
        if name is None:  # a tensor the model holds outside its parameters and buffers
            name = self.externals.get(id(t))
            if name is None:
                name = self.externals[id(t)] = f"X{len(self.externals)}"
                self.alive.append(t)
            skel.append(("E", name, t.dtype, tuple(t.shape)))
        else:
            skel.append(("E", name, t.dtype, t.dim()))
            if id(t) in self.indexed:
                ints.append(self.indexed[id(t)])

    def _walk(self, a: Any, skel: list, ints: list) -> None:
        # Fast paths for what loops issue most (exact ints, computed tensors, int lists), each
        # recording what the general branches below record for it.
        t = type(a)
        if t is int:
            skel.append(_INT)
            ints.append(a)
            return
        if t is list or t is tuple:
            if all(type(x) is int for x in a):
                skel.append((t.__name__, len(a)))
                skel.extend([_INT] * len(a))
                ints.extend(a)
                return
        elif isinstance(a, torch.Tensor):
            ref = self.refs.get(id(a))
            if ref is not None:
                skel.append(("T", a.dtype, a.dim()))
                ints.extend(ref)
                return
        if isinstance(a, torch.Tensor):
            self._tensor(a, skel, ints)
        elif isinstance(a, bool) or a is None:
            skel.append(("b", a))
        elif isinstance(a, int):
            skel.append(_INT)
            ints.append(a)
        elif isinstance(a, float):
            skel.append(("f", repr(a)))  # repr: -0.0 and nan compare as themselves
        elif isinstance(a, (list, tuple)):
            if len(a) >= 2 and all(isinstance(x, torch.Tensor) and id(x) in self.refs for x in a):
                if self._progression(a, skel, ints):
                    return
            skel.append((type(a).__name__, len(a)))
            for x in a:
                self._walk(x, skel, ints)
        elif isinstance(a, torch.device):
            skel.append(("c", self.home if self.home is not None and a.type == "meta" else a))
        elif isinstance(a, (str, torch.dtype, torch.layout, torch.memory_format)):
            skel.append(("c", a))
        else:
            skel.append(("o", type(a).__name__, repr(a)))

    def _progression(self, a, skel: list, ints: list) -> bool:
        """A list of computed tensors whose producers are evenly spaced (``stack(ys)`` of
        one ``y`` per loop step): recorded as (length, first ref, ref step), so its
        skeleton does not grow with L."""
        refs = [self.refs[id(x)] for x in a]
        (i0, s0), (i1, s1) = refs[0], refs[1]
        di, ds = i1 - i0, s1 - s0
        if any(r != (i0 + k * di, s0 + k * ds) for k, r in enumerate(refs)):
            return False
        meta = {(x.dtype, x.dim()) for x in a}
        if len(meta) != 1:
            return False
        skel.append(("TL", type(a).__name__) + meta.pop())
        ints.extend((len(a), i0, s0, di, ds))
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _QUERIES:  # FakeTensor's .device: a question, not a computation
            return func(*args, **kwargs)
        if self.stop_at is not None and len(self.keys) == self.stop_at:
            raise _Located(_user_frame())
        skel: list = []
        ints: list = []
        for a in args:
            self._walk(a, skel, ints)
        for k, v in kwargs.items():
            skel.append(("k", k))
            self._walk(v, skel, ints)
        if self.home is None:
            out = func(*args, **kwargs)
        elif func in _DEVICE_RULED:
            out = self._fake(func, args, kwargs)
        else:
            out = self._meta(func, args, kwargs)
        i = len(self.keys)
        name = self.op_names.get(func)
        if name is None:
            name = self.op_names[func] = str(func)
        self.add((name, tuple(skel)), ints)
        if isinstance(out, torch.Tensor):
            self.refs[id(out)] = (i, 0)
            self.alive.append(out)
        elif isinstance(out, (tuple, list)):
            for j, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    self.refs[id(o)] = (i, j)
                    self.alive.append(o)
        return out


    def _meta(self, func, args, kwargs):
        """``func`` on meta tensors; a fresh-result op's metadata computed once per argument
        metadata (see :func:`_cacheable`)."""
        if not _cacheable(func) or func in self.not_fresh:
            return func(*args, **kwargs)
        # What a kernel may read besides its arguments (FakeTensorMode's cache keys on the same):
        # the default dtype (a factory without dtype=), the default device, inference mode.
        parts: list = [func, torch.get_default_dtype(), torch._C._get_default_device(), torch.is_inference_mode_enabled()]
        if not (_meta_key(args, parts) and _meta_key(kwargs.items(), parts)):
            return func(*args, **kwargs)
        key = tuple(parts)
        known = self.meta_results.get(key)
        if known is not None:
            return torch.empty_strided(known[0], known[1], dtype=known[2], device="meta")
        out = func(*args, **kwargs)
        if _fresh_result(out, args, kwargs):
            self.meta_results[key] = (tuple(out.shape), out.stride(), out.dtype)
        else:
            self.not_fresh.add(func)  # e.g. _unsafe_view: not worth keying again
        return out

    def _fake(self, func, args, kwargs):
        """A meta recording's op whose output layout the device decides (a convolution's
        memory format): run by FakeTensorMode for the call's device, result back on meta."""
        from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

        if self.fake_mode is None:
            self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        mode, home = self.fake_mode, self.home
        to_fake = lambda t: FakeTensor(mode, t, home) if isinstance(t, torch.Tensor) and t.is_meta else t
        with mode:
            out = func(*pytree.tree_map(to_fake, args), **pytree.tree_map(to_fake, kwargs))
        to_meta = lambda t: (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                             if isinstance(t, torch.Tensor) else t)
        return pytree.tree_map(to_meta, out)


def _user_frame() -> str:
    """The innermost frame outside torch and fxopt: the model's line that issued the op."""
    for fr in reversed(traceback.extract_stack()):
        f = fr.filename.replace("\\", "/")
        if "/torch/" in f or "/fxopt/" in f or f.startswith("<"):
            continue
        return f"{fr.filename}:{fr.lineno} ({fr.line})"
    return "?"


def _home_device(args: tuple, kwargs: dict, module: torch.nn.Module) -> torch.device:
    for x in pytree.tree_leaves((args, kwargs)):
        if isinstance(x, torch.Tensor):
            return x.device
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _layer_name(name: str, layer_path: str | None) -> tuple[str, int | None]:
    """``layers.3.lin.weight`` -> (``layers.<i>.lin.weight``, 3) under ``layer_path="layers"``:
    in a layer stream the layer index is a literal (affine in the layer), not part of the key."""
    if layer_path and name.startswith(layer_path + "."):
        idx, _, tail = name[len(layer_path) + 1:].partition(".")
        if idx.isdigit():
            return f"{layer_path}.<i>.{tail}", int(idx)
    return name, None


def _run(module: torch.nn.Module, args: tuple, kwargs: dict, stop_at: int | None, how: str,
         layer_path: str | None = None) -> _Recorder:
    """Run ``module`` on data-free tensors under the recorder. ``how``: ``"meta"`` (meta
    tensors, C++ shape functions: fast; devices read "meta", recorded as the call's
    device) or ``"fake"`` (FakeTensorMode: every op through Python, ~4x slower, but
    tensors report their real device, so device-dependent code takes its real path)."""
    home = _home_device(args, kwargs, module)
    names: dict[int, str] = {}
    if how == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        convert, factories = mode.from_tensor, mode
    else:
        convert, factories = _to_meta, torch.device("meta")
    # Data-free copies of the module's tensors: functional_call swaps them in for the call
    # and puts the module's own back; the user's tensors are never read or written.
    state = {}
    indexed: dict[int, int] = {}
    for kind, named in (("P", module.named_parameters()), ("B", module.named_buffers())):
        for n, t in named:
            state[n] = convert(t)
            shown, idx = _layer_name(n, layer_path)
            names[id(state[n])] = f"{kind}:{shown}"
            if idx is not None:
                indexed[id(state[n])] = idx
    leaves, spec = pytree.tree_flatten((args, kwargs))
    fake_leaves = [convert(x) if isinstance(x, torch.Tensor) else x for x in leaves]
    rec = _Recorder(names, stop_at, home if how == "meta" else None, indexed)
    for k, x in enumerate(fake_leaves):  # the call's sizes are the stream's first literals
        if isinstance(x, torch.Tensor):
            names[id(x)] = f"I:{k}"
            rec.add(("input", k, x.dtype, x.dim()), tuple(x.shape))
        elif isinstance(x, int) and not isinstance(x, bool):
            rec.add(("input", k, _INT), (x,))
        else:
            rec.add(("input", k, type(x).__name__, repr(x)), ())
    fa, fk = pytree.tree_unflatten(fake_leaves, spec)
    # export traces with torch.compiler.is_compiling() / is_exporting() true, and models
    # branch on it (HF: "no fast kernels while compiling"): record the path export takes.
    with torch.no_grad(), _export_flags(), factories, rec:
        torch.func.functional_call(module, state, tuple(fa), dict(fk))
    return rec


def _to_meta(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor like ``t``: same strides (``.to("meta")`` would compact a strided
    view) and same requires_grad (matmul decomposes differently for tensors that do)."""
    m = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    return m.requires_grad_() if t.requires_grad else m


def _export_flags():
    try:
        from torch._export.utils import _compiling_state_context
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return _compiling_state_context()


def record_stream(module: torch.nn.Module, args: tuple, kwargs: dict | None = None, *,
                  how: str = "meta", layer_path: str | None = None) -> OpStream:
    """The ATen op stream of ``module(*args, **kwargs)`` on data-free tensors (see
    :func:`_run` for ``how``). Any failure (data-dependent control flow, a shape error,
    a tensor the meta device cannot mix with) is a :class:`TemplateMismatch`.
    ``layer_path``: the layer stack's path, whose layer index becomes a literal
    (``layer_check.py`` fits streams over depth)."""
    t0 = time.perf_counter()
    args, kwargs = normalize_call(module, args, kwargs)  # what capture runs (HF: use_cache=False)
    try:
        rec = _run(module, tuple(args), dict(kwargs or {}), None, how, layer_path)
    except Exception as exc:  # noqa: BLE001 - any failure means: cannot verify
        raise TemplateMismatch(f"recording the op stream ({how}) failed: {type(exc).__name__}: {_clip(str(exc))}") from exc
    vocab = [None] * len(rec.vocab)
    for key, k in rec.vocab.items():
        vocab[k] = key
    return OpStream(rec.keys, rec.ints, vocab, time.perf_counter() - t0, how)


def source_line(module: torch.nn.Module, args: tuple, kwargs: dict, index: int, how: str = "meta") -> str | None:
    """The model's source line that issues op ``index`` of its stream (a second recording,
    stopped at that op), or None."""
    args, kwargs = normalize_call(module, args, kwargs)
    try:
        _run(module, tuple(args), dict(kwargs or {}), index, how)
    except _Located as loc:
        return loc.where
    except Exception:  # noqa: BLE001
        return None
    return None


def _clip(s: str, n: int = 300) -> str:
    return s if len(s) <= n else s[:n] + " ..."


# ----------------------------------------------------------------- the fitted model

def _affine(points: Sequence[tuple[int, int]], what: Callable[[], str]) -> tuple[int, int]:
    """Integer (a, b) with v = a*L + b through every (L, v): fitted on the first two,
    checked on the rest."""
    (l0, v0), (l1, v1) = points[0], points[1]
    a, rem = divmod(v1 - v0, l1 - l0)
    if rem:
        raise TemplateMismatch(f"{what()} is {[v for _, v in points]} at L={[l for l, _ in points]}: not affine in L")
    b = v0 - a * l0
    for l, v in points[2:]:
        if a * l + b != v:
            raise TemplateMismatch(f"{what()} is {[v for _, v in points]} at L={[l for l, _ in points]}: not affine in L")
    return a, b


@dataclass
class _Seg:
    keys: list[int]
    coeffs: list[list[tuple[int, int]]]        # per token, per literal: v = a*L + b


@dataclass
class _Loop:
    body: list[int]
    count: tuple[int, int]                       # iterations = a*L + b
    lo: int = 0                                  # leading iterations fitted on their own
    hi: int = 0                                  # trailing iterations fitted on their own
    head: list = field(default_factory=list)     # lo x body x literals: (a, b)
    tail: list = field(default_factory=list)     # hi x body x literals: (a, b)
    core: list = field(default_factory=list)     # body x literals: v = c0 + cL*L + ct*t

    def iterations(self, length: int) -> int:
        return self.count[0] * length + self.count[1]


@dataclass
class StreamModel:
    """How the op stream depends on L: fixed segments and loops, literals affine."""

    vocab: dict[tuple, int]
    pieces: list                                 # _Seg | _Loop, in stream order
    lengths: tuple[int, ...]
    loops: int = 0
    how: str = "meta"                            # how streams are recorded for this model

    def predict(self, length: int) -> Iterator[tuple[int, tuple[int, ...]]]:
        L = length
        for piece in self.pieces:
            if isinstance(piece, _Seg):
                for key, cs in zip(piece.keys, piece.coeffs):
                    yield key, tuple(a * L + b for a, b in cs)
                continue
            n = piece.iterations(L)
            if n < piece.lo + piece.hi:
                raise TemplateMismatch(f"a loop of the op stream would run {n} times at L={L}, "
                                       f"fewer than its {piece.lo + piece.hi} separately fitted steps")
            for t in range(n):
                if t < piece.lo:
                    rows = piece.head[t]
                    for key, cs in zip(piece.body, rows):
                        yield key, tuple(a * L + b for a, b in cs)
                elif t >= n - piece.hi:
                    rows = piece.tail[t - (n - piece.hi)]
                    for key, cs in zip(piece.body, rows):
                        yield key, tuple(a * L + b for a, b in cs)
                else:
                    for key, cs in zip(piece.body, piece.core):
                        yield key, tuple(c0 + cl * L + ct * t for c0, cl, ct in cs)

    def locate(self, index: int, length: int) -> str:
        """Where op ``index`` of the predicted stream at ``length`` sits: "loop k, repetition
        t of n" (repetitions start where the fit put the loop's phase, which may be an op or
        two off the model's own step boundary) or "outside the loops"."""
        pos, k = 0, 0
        for piece in self.pieces:
            if isinstance(piece, _Seg):
                pos += len(piece.keys)
                if index < pos:
                    return "outside the loops"
                continue
            size = len(piece.body) * piece.iterations(length)
            if index < pos + size:
                return f"loop {k}, repetition {(index - pos) // len(piece.body)} of {piece.iterations(length)}"
            pos, k = pos + size, k + 1
        return "after the predicted end"

    def predicted_length(self, length: int) -> int:
        return sum(len(p.keys) if isinstance(p, _Seg) else len(p.body) * p.iterations(length) for p in self.pieces)

    def check(self, length: int, stream: OpStream) -> None:
        """:class:`StreamDivergence` at the first op where ``stream`` (recorded at
        ``length``) leaves the prediction."""
        inv = {k: key for key, k in self.vocab.items()}
        remap = [self.vocab.get(key, -1) for key in stream.vocab]
        keys, ints = stream.keys, stream.ints
        n = len(keys)
        i = -1
        for i, (key, lits) in enumerate(self.predict(length)):
            if i >= n:
                raise StreamDivergence(
                    f"the op stream at L={length} ends after {n} ops; the probes predict "
                    f"{self.predicted_length(length)} (next: {_show(inv[key], lits)})", n)
            if remap[keys[i]] != key or ints[i] != lits:
                raise StreamDivergence(
                    f"the op stream at L={length} diverges from the probes' (L={self.lengths}) at op #{i} "
                    f"({self.locate(i, length)}): "
                    f"expected {_show(inv[key], lits)}, got {_show(stream.vocab[keys[i]], ints[i])}", i)
        if n != i + 1:
            raise StreamDivergence(
                f"the op stream at L={length} has {n} ops; the probes predict {i + 1} "
                f"(op #{i + 1} is {_show(stream.vocab[keys[i + 1]], ints[i + 1])})", i + 1)


def _show(key: tuple, lits: tuple[int, ...]) -> str:
    if key[0] == "input":
        return f"input {key[1]} of sizes {list(lits)}"
    return f"{key[0]} with literals {list(lits)}"


# ----------------------------------------------------------------- fitting

def _periods(block: list[int]) -> list[int]:
    """Every period P of ``block`` that tiles it whole (len % P == 0), ascending."""
    m = len(block)
    return [p for p in range(1, m + 1) if m % p == 0 and all(block[j] == block[j + p] for j in range(m - p))]


def _regions(short: list[int], long: list[int], ls: int, ll: int) -> list[list[tuple[int, int]]]:
    """Loop regions of ``long`` (the stream at the longest probe): for each block of
    extra ops the matcher finds, its candidate (start, period) pairs, smallest first."""
    ops = difflib.SequenceMatcher(None, short, long, autojunk=False).get_opcodes()
    found: list[list[tuple[int, int]]] = []
    for tag, i1, i2, j1, j2 in ops:
        if tag == "equal":
            continue
        if tag != "insert":
            raise TemplateMismatch(
                f"the op streams at L={ls} and L={ll} differ other than by repeated ops "
                f"(ops #{i1}-{i2} at L={ls} vs #{j1}-{j2} at L={ll})")
        block = long[j1:j2]
        cands = []
        for p in _periods(block):
            s, e = j1, j2  # extend to the maximal run with period p
            while s > 0 and long[s - 1] == long[s - 1 + p]:
                s -= 1
            while e < len(long) and long[e] == long[e - p]:
                e += 1
            cands.append((s, p, (e - s) // p))
        found.append(cands)
    # one loop may show up as several blocks: keep each run once
    out, seen = [], set()
    for cands in found:
        if cands[0] not in seen:
            seen.add(cands[0])
            out.append(cands)
    return out


def _pieces(long: list[int], regions: list[tuple[int, int, int]]) -> list:
    """Segments and loop bodies of ``long`` for the chosen (start, period, reps)."""
    pieces, pos = [], 0
    for s, p, k in sorted(regions):
        if s < pos:
            raise TemplateMismatch("two loop regions of the op stream overlap")
        pieces.append(("seg", long[pos:s]))
        pieces.append(("loop", long[s:s + p]))
        pos = s + p * k
    pieces.append(("seg", long[pos:]))
    return pieces


def _parse(seq: list[int], pieces: list, length: int) -> list[tuple[int, int]]:
    """(start, repetitions) of each piece in ``seq``; TemplateMismatch if it does not fit."""
    pos, out = 0, []
    for kind, toks in pieces:
        if kind == "seg":
            if seq[pos:pos + len(toks)] != toks:
                raise TemplateMismatch(f"the op stream at L={length} does not follow the probes' structure near op #{pos}")
            out.append((pos, 1))
            pos += len(toks)
        else:
            p, k = len(toks), 0
            while seq[pos + k * p: pos + (k + 1) * p] == toks:
                k += 1
            out.append((pos, k))
            pos += k * p
    if pos != len(seq):
        raise TemplateMismatch(f"the op stream at L={length} has ops the probes' structure does not explain from #{pos}")
    return out


class _LoopFit(TemplateMismatch):
    def __init__(self, msg: str, region: int):
        super().__init__(msg)
        self.region = region


def _fit_loop(body: list[int], where: list[tuple[int, int]], streams: list[OpStream], lengths, idx: int,
              max_lo: int = _MAX_PEEL, max_hi: int = _MAX_PEEL) -> _Loop:
    counts = [k for _, k in where]
    loop = _Loop(list(body), _affine(list(zip(lengths, counts)), lambda: f"the iteration count of loop {idx}"))
    P = len(body)
    last = None
    for lo in range(max_lo + 1):
        for hi in range(max_hi + 1):
            cores = [k - lo - hi for k in counts]
            if min(cores) < 1 or max(cores) < 2:
                continue
            try:
                return _fit_loop_peeled(loop, P, where, streams, lengths, lo, hi, idx)
            except TemplateMismatch as exc:
                last = exc
    raise _LoopFit(f"loop {idx} of the op stream ({P} ops a step): {last or 'too few steps at the probes'}", idx)


def _fit_loop_peeled(loop: _Loop, P: int, where, streams, lengths, lo: int, hi: int, idx: int) -> _Loop:
    def lits(pi: int, t: int, j: int) -> tuple[int, ...]:
        start, _ = where[pi]
        return streams[pi].ints[start + t * P + j]

    head = [[[_affine([(L, lits(pi, t, j)[m]) for pi, L in enumerate(lengths)],
                      lambda: f"literal {m} of op {j} in step {t}")
              for m in range(len(lits(0, t, j)))] for j in range(P)] for t in range(lo)]
    tail = []
    for e in range(hi):
        rows = []
        for j in range(P):
            width = len(lits(0, where[0][1] - hi + e, j))
            rows.append([_affine([(L, lits(pi, where[pi][1] - hi + e, j)[m]) for pi, L in enumerate(lengths)],
                                 lambda: f"literal {m} of op {j} in the last steps") for m in range(width)])
        tail.append(rows)
    best = max(range(len(lengths)), key=lambda pi: where[pi][1])
    core = []
    for j in range(P):
        row = []
        for m in range(len(lits(0, lo, j))):
            ct = lits(best, lo + 1, j)[m] - lits(best, lo, j)[m]
            base = [(L, lits(pi, lo, j)[m] - ct * lo) for pi, L in enumerate(lengths)]
            cl, c0 = _affine(base, lambda: f"literal {m} of op {j} at step {lo}")
            for pi, L in enumerate(lengths):
                for t in range(lo, where[pi][1] - hi):
                    if lits(pi, t, j)[m] != c0 + cl * L + ct * t:
                        raise TemplateMismatch(
                            f"literal {m} of op {j} is {lits(pi, t, j)[m]} at step {t} (L={L}), "
                            f"off its line {c0} + {cl}*L + {ct}*t")
            row.append((c0, cl, ct))
        core.append(row)
    loop.lo, loop.hi, loop.head, loop.tail, loop.core = lo, hi, head, tail, core
    return loop


def fit_streams(streams: Sequence[OpStream], lengths: Sequence[int], *, max_lo: int = _MAX_PEEL,
                max_hi: int = _MAX_PEEL) -> StreamModel:
    """The :class:`StreamModel` of the op streams recorded at the probe ``lengths``
    (ascending; three of them: the structure and every literal are fitted on two and
    must predict the third). ``max_lo`` / ``max_hi``: how many leading / trailing
    iterations of a loop may have literals off its line (``layer_check.py`` allows
    fewer)."""
    lengths = tuple(lengths)
    if len(lengths) < 3 or list(lengths) != sorted(set(lengths)):
        raise TemplateMismatch(f"fitting an op stream needs three or more ascending probe lengths, got {lengths}")
    vocab: dict[tuple, int] = {}
    seqs = [[vocab.setdefault(s.vocab[k], len(vocab)) for k in s.keys] for s in streams]
    streams = list(streams)
    cands = _regions(seqs[0], seqs[-1], lengths[0], lengths[-1])
    choice = [0] * len(cands)
    while True:
        regions = [c[i] for c, i in zip(cands, choice)]
        try:
            return _fit(vocab, seqs, streams, lengths, regions, max_lo, max_hi)
        except _LoopFit as exc:
            # a period that tiles the ops but not the literals (a body [A, A] whose two
            # A's read different tensors): try that loop's next longer period
            r = sorted(range(len(regions)), key=lambda i: regions[i])[exc.region]
            if choice[r] + 1 >= len(cands[r]):
                raise
            choice[r] += 1


def _fit(vocab, seqs, streams, lengths, regions, max_lo: int = _MAX_PEEL, max_hi: int = _MAX_PEEL) -> StreamModel:
    pieces = _pieces(seqs[-1], regions)
    parses = [_parse(seq, pieces, L) for seq, L in zip(seqs, lengths)]
    out, loops = [], 0
    for n, (kind, toks) in enumerate(pieces):
        where = [p[n] for p in parses]
        if kind == "loop":
            out.append(_fit_loop(toks, where, streams, lengths, loops, max_lo, max_hi))
            loops += 1
            continue
        coeffs = []
        for j in range(len(toks)):
            rows = [streams[pi].ints[where[pi][0] + j] for pi in range(len(lengths))]
            coeffs.append([_affine([(L, r[m]) for L, r in zip(lengths, rows)],
                                   lambda: f"literal {m} of op #{where[-1][0] + j} ({_show(streams[-1].token(where[-1][0] + j)[0], rows[-1])})")
                           for m in range(len(rows[0]))])
        out.append(_Seg(list(toks), coeffs))
    return StreamModel(vocab, out, tuple(lengths), loops)


# ----------------------------------------------------------------- verifying a call

def _same_modulo_device(a: OpStream, b: OpStream) -> int | None:
    """Index of the first op where two recordings of one call differ, or None."""
    n = min(len(a), len(b))
    for i in range(n):
        if a.token(i) != b.token(i):
            return i
    return None if len(a) == len(b) else n


def fit_module(module: torch.nn.Module, calls: Sequence[tuple[tuple, dict]], lengths: Sequence[int]) -> StreamModel:
    """Record ``module`` at each probe call and fit the :class:`StreamModel` (see :func:`fit_runs`)."""
    return fit_runs([(module, a, k) for a, k in calls], lengths)


def fit_runs(runs: Sequence[tuple[torch.nn.Module, tuple, dict]], lengths: Sequence[int], *,
             layer_path: str | None = None, **fit: int) -> StreamModel:
    """Record each ``(module, args, kwargs)`` run (one per probe length, or per depth for
    ``layer_check.py``) and fit the :class:`StreamModel`; ``fit`` goes to :func:`fit_streams`.

    The check at the real length should be cheap, so it records on meta tensors; at the
    probes each run is recorded both ways, and the meta recording is used only when
    both agree (the model's code does not branch on the device): otherwise the model
    records with FakeTensorMode (real devices) at every length."""
    metas, fakes = [], []
    how = "meta"
    for module, a, k in runs:
        fakes.append(record_stream(module, a, k, how="fake", layer_path=layer_path))
        if how == "meta":
            try:
                metas.append(record_stream(module, a, k, how="meta", layer_path=layer_path))
            except TemplateMismatch as exc:
                log.debug("meta recording refused (%s): recording with fake tensors", exc)
                how = "fake"
                continue
            if _same_modulo_device(metas[-1], fakes[-1]) is not None:
                log.debug("meta and fake recordings differ at op #%d: recording with fake tensors",
                          _same_modulo_device(metas[-1], fakes[-1]))
                how = "fake"
    model = fit_streams(metas if how == "meta" else fakes, lengths, **fit)
    model.how = how
    return model


def verify(model: StreamModel, module: torch.nn.Module, args: tuple, kwargs: dict, length: int, *,
           layer_path: str | None = None) -> OpStream:
    """Record ``module`` at ``length`` and check the stream against ``model``; on a
    divergence the error also names the model's source line that issued the op."""
    stream = record_stream(module, args, kwargs, how=model.how, layer_path=layer_path)
    try:
        model.check(length, stream)
    except StreamDivergence as exc:
        where = source_line(module, args, kwargs, exc.index, model.how)
        if where:
            raise StreamDivergence(f"{exc} [issued at {where}]", exc.index) from exc
        raise
    log.debug("op stream verified at L=%d: %d ops in %.2f s", length, len(stream), stream.seconds)
    return stream
