"""``fxopt.optimize``: capture, rewrite, and serve a model, re-specialising per input shape."""
from __future__ import annotations

import contextlib
import copy
import gc
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx
from torch.utils import _pytree as pytree

from . import layer_check
from . import layer_generic as lyr
from . import length_check as lc
from . import length_generic as lg
from .capture import CAPTURE_LOCK, capture, prepare_call
from .config import get_config
from .errors import FxoptError
from .graph_utils import copy_graph_module  # (also re-exported: fxopt.optimize.copy_graph_module)
from .graph_utils import finalize
from .guards import ModelState
from .pass_manager import PassManager, Report
from .registry import PassSpec, resolve_passes
from .rewrite.pass_base import Pass
from .rewrite.rule import RuleBase, RuleSet
from .runtime.sampling import UNSET

log = logging.getLogger("fxopt")


def _leaf_key(x: Any):
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, x.device.type, x.device.index, x.requires_grad)
    if isinstance(x, (int, float, bool, str, type(None))):
        return ("V", type(x).__name__, x)
    return ("O", type(x).__qualname__, repr(x))


def call_signature(args: tuple, kwargs: dict) -> tuple:
    """What a captured graph is specialised on: the pytree structure, every tensor's
    shape/dtype/device, and every non-tensor value."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    return (spec, tuple(_leaf_key(x) for x in leaves))  # TreeSpec hashes and compares by structure


@dataclass
class Specialization:
    original: Any  # the captured GraphModule, or a function that builds it on first use
    optimized: torch.fx.GraphModule
    report: Report
    layer_template: bool = False  # built from a layer-generic template (layer_generic.py)
    replay: Any = None  # a runtime.cuda_graphs.GraphReplay of ``optimized`` (CUDA), or None

    def __call__(self, args: tuple, kwargs: dict):
        fn = self.replay if self.replay is not None else self.optimized
        return fn(*args, **kwargs)

    def original_graph_module(self) -> torch.fx.GraphModule:
        if not isinstance(self.original, torch.nn.Module):
            self.original = self.original()
        return self.original


class OptimizedModule(torch.nn.Module):
    """A model rewritten by fxopt passes. Call it like the model.

    Each call runs the specialisation for its key: the call signature (pytree structure, every
    tensor's shape/dtype/device/requires_grad, every plain value) and every module's train/eval
    flag. New keys trigger a capture + rewrite, kept in a bounded LRU cache
    (``FXOPT_SHAPE_CACHE_SIZE``, default 8). Before every call the model's state is checked
    against what the graphs were captured from (:class:`fxopt.guards.ModelState`: modules,
    parameter/buffer objects, dtypes, devices, storages, hooks); a change drops every
    specialisation, with a note in the report. A model with forward hooks runs eagerly (a
    captured graph would skip them). The user's model is referenced, never modified; rewritten
    graphs share its parameter tensors. Attribute reads the module does not have (``config``,
    ``generation_config``, ...) go to the model; ``train()/eval()/to()`` act on the model.
    """

    def __init__(self, model: torch.nn.Module, args: Any = (), kwargs: dict | None = None,
                 passes: Iterable[PassSpec] | PassSpec | None = None, *, cache_size: int | None = None,
                 seq_dim: int | str | None = "auto", layer_templates: bool = True,
                 cuda_graphs: bool | str = "auto"):
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise FxoptError(f"optimize needs a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, OptimizedModule):
            raise FxoptError("optimize got an fxopt.OptimizedModule: optimize the model it wraps (opt.model) instead")
        # Stored outside nn.Module registration so our state_dict()/parameters() do not
        # re-export the user's model under a new prefix.
        object.__setattr__(self, "_model", model)
        # Kept as given (one name stays one name); an iterator is read once, here.
        if not (passes is None or isinstance(passes, (str, Pass, RuleBase, RuleSet, type, bytes, dict))) \
                and isinstance(passes, Iterable):
            passes = list(passes)
        resolve_passes(passes)  # fail now, not at first call, on an unknown name or a bad spec
        self._pass_specs = passes
        self._cache_size = _check_cache_size(cache_size)
        if seq_dim not in ("auto", None) and (isinstance(seq_dim, bool) or not isinstance(seq_dim, int) or seq_dim < 0):
            raise FxoptError(f"seq_dim must be 'auto', None or a non-negative int (the inputs' sequence axis), got {seq_dim!r}")
        if cuda_graphs not in ("auto", True, False):
            raise FxoptError(f"cuda_graphs must be 'auto', True or False, got {cuda_graphs!r}")
        self._cuda_graphs = cuda_graphs
        self._layer_templates_on = bool(layer_templates)
        self._seq_dim_arg = seq_dim
        self._init_state()
        args, kwargs = prepare_call(model, args, kwargs)
        self._seq_dim = _infer_seq_dim(args) if seq_dim == "auto" else seq_dim
        self.training = model.training
        self._select(args, kwargs)  # the first specialisation is built now (not run)

    def _init_state(self) -> None:
        """Everything derived from the model's current state: built at construction, after a
        change of the model, and after unpickling."""
        model = self._model
        self._lock = threading.RLock()
        self._state = ModelState(model)
        self._cache: OrderedDict[tuple, Specialization] = OrderedDict()
        self._last: Specialization | None = None
        self._eager_reason: str | None = None
        self._state_notes: list[str] = []
        self._template_failure = None
        self._layer_failure = None
        # Length templates and their op-stream checks (see _from_template), LRU like _cache.
        self._templates: OrderedDict[tuple, tuple] = OrderedDict()
        self._stream_checks: OrderedDict[tuple, tuple[bool, str]] = OrderedDict()
        # Deep models: optimize proxies with 1-3 of the stack's layers and instantiate the
        # rewritten graph for all of them (see layer_generic.py). (path, n) or None.
        self._layer_stack = lyr.find_layer_stack(model) if self._layer_templates_on else None
        self._layer_templates: OrderedDict[tuple, tuple | None] = OrderedDict()
        self._mode: tuple = self._state.mode()

    # ------------------------------------------------------------------ calling
    def forward(self, *args, **kwargs):
        args, kwargs = prepare_call(self._model, args, kwargs)
        return self._run(args, kwargs)

    def _run(self, args: tuple, kwargs: dict):
        spec = self._select(args, kwargs)
        if spec is None:
            return self._model(*args, **kwargs)
        return spec(args, kwargs)

    def _select(self, args: tuple, kwargs: dict) -> "Specialization | None":
        """The specialisation for this call (built if new), or None: run the model eagerly."""
        with self._lock:
            why = self._state.check()
            if why is not None:
                notes = self._state_notes + [f"specialisations dropped and rebuilt: {why}"]
                log.info("fxopt: %s: %s", type(self._model).__name__, notes[-1])
                self._init_state()
                self._state_notes = notes[-8:]
            if self._state.hooks:
                self._eager_reason = (f"forward hooks on {', '.join(self._state.hooks[:3])}: the model runs eagerly "
                                      "(a captured graph would not run them); remove the hooks to use fxopt's graphs")
                return None
            self._eager_reason = None
            mode = self._state.mode()
            key = (call_signature(args, kwargs), mode)
            spec = self._cache.get(key)
            if spec is not None:
                self._cache.move_to_end(key)
                self._last = spec
                return spec
        # Capture is serialised process-wide (torch.export is not re-entrant across threads).
        with CAPTURE_LOCK, self._lock:
            spec = self._cache.get(key)
            if spec is None:
                self._mode = mode
                spec = self._specialize(args, kwargs, key)
                if self._state_notes:
                    spec.report.notes.extend(self._state_notes)
                self._setup_replay(spec)
            self._last = spec
            return spec

    def _setup_replay(self, spec: "Specialization") -> None:
        if self._cuda_graphs is False or not _on_cuda(self._model):
            if self._cuda_graphs is True:
                spec.report.notes.append("cuda_graphs=True: not replayed, the model is not on a CUDA device")
            return
        from .runtime.cuda_graphs import GraphReplay

        spec.replay = GraphReplay(spec.optimized, name=f"{type(self._model).__name__} specialisation")

    # ------------------------------------------------------------------ nn.Module behaviour
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            model = self.__dict__.get("_model")
            if model is None:
                raise
            return getattr(model, name)

    def train(self, mode: bool = True) -> "OptimizedModule":
        """Switch the *model* (and this wrapper's flag): the next call uses (or builds) the
        specialisation of that mode."""
        self._model.train(mode)
        object.__setattr__(self, "training", bool(mode))
        return self

    def _apply(self, fn, recurse: bool = True):
        """``to()``, ``cuda()``, ``half()``, ...: applied to the model; the next call sees the
        changed tensors and re-specialises."""
        self._model._apply(fn)
        return self

    def __getstate__(self):
        # Specialisations hold export-produced GraphModules (not picklable) and locks: pickle
        # the model and the options; the next call after unpickling specialises again.
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("_lock", "_state", "_cache", "_last", "_templates", "_layer_templates", "_stream_checks")}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_state()

    # ------------------------------------------------------------------ internals
    def _specialize(self, args: tuple, kwargs: dict, key: tuple) -> Specialization:
        spec = self._from_template(args, kwargs) or self._capture_and_rewrite(args, kwargs)
        # Graphs built on the way are lazy (their code generated on first use: most are compared
        # and copied, never run); the one handed out is a plain GraphModule with its code.
        spec.optimized = finalize(spec.optimized)
        self._cache[key] = spec
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        self._last = spec
        return spec

    def _from_template(self, args: tuple, kwargs: dict) -> Specialization | None:
        """Long sequences: instantiate a length-generic template (see length_generic.py)
        instead of tracing every unrolled loop step, once the model's op stream at this
        length has been checked against the probes' (see length_check.py). None when not
        applicable; a direct capture with a note saying why when the template or the
        check fails."""
        if self._seq_dim is None:
            return None
        length = lg.sequence_length(args, kwargs, self._seq_dim)
        if length is None or length < lg.MIN_TEMPLATE_LENGTH:
            return None
        try:
            tkey = (call_signature(*lg.narrow_inputs(args, kwargs, self._seq_dim, length, lg.DEFAULT_PROBES[0])),
                    self._mode)
        except Exception as exc:  # noqa: BLE001 - inputs that cannot be cut: not a sequence
            return self._direct(args, kwargs, f"length-generic template not used: narrowing the inputs failed: {exc}")
        # One pause for the whole template path (a collection after each step would walk all
        # it allocated); a fallback's direct capture runs after it, with the collector on.
        with _gc_paused():
            spec, why = self._instantiate_length_template(tkey, args, kwargs, length)
        return spec if spec is not None else self._direct(args, kwargs, f"length-generic template not used: {why}")

    def _instantiate_length_template(self, tkey: tuple, args: tuple, kwargs: dict,
                                     length: int) -> tuple["Specialization | None", str]:
        """(the specialisation, "") from the template of ``tkey`` (built if new) once this call's op
        stream is verified, or (None, why not)."""
        if tkey not in self._templates:
            self._templates[tkey] = self._build_length_template(args, kwargs, length)
            while len(self._templates) > self._cache_size:
                self._templates.popitem(last=False)
        self._templates.move_to_end(tkey)
        template, reason = self._templates[tkey]
        if template is None:
            return None, reason
        verified, verdict = self._check_stream(template, args, kwargs, length)
        if not verified:
            return None, verdict
        t0 = time.perf_counter()
        try:
            gm = template.instantiate(length, args, kwargs)
        except lg.TemplateMismatch as exc:
            return None, str(exc)
        probe = template.probe_spec  # type: ignore[attr-defined]
        report = copy.copy(probe.report)
        report.notes = list(probe.report.notes) + [
            f"length-generic: graph instantiated at L={length} from probes at L={template.lengths} "
            f"({template.varying} literals depend on L); {verdict}; probes took {template.probe_seconds:.2f} s, "
            f"instantiation {time.perf_counter() - t0:.2f} s; matches/nodes below are per probe graph"]
        report.instantiate_seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
        return Specialization(probe.original, gm, report), ""

    def _direct(self, args: tuple, kwargs: dict, note: str) -> Specialization:
        """A capture at the real length, where a length template cannot be trusted."""
        spec = self._capture_and_rewrite(args, kwargs)
        spec.report.notes.append(note)
        return spec

    def _build_length_template(self, args: tuple, kwargs: dict, length: int) -> tuple:
        """(template, None), or (None, why not): the rewritten graphs of the probes
        (length_generic.py) and the op-stream model of the verification proxy
        (length_check.py), fitted at the same probe lengths."""
        probes: list[Specialization] = []

        def optimize_at(a, k):
            # Layer templates compose: each probe length is optimized from 1-3 layer
            # proxies. Only the first length verifies with 3 layers: the layers proved
            # interchangeable there, the later lengths still check their 1- and 2-layer
            # graphs against the template, and build_template then demands that the
            # three n-layer graphs agree node for node up to affine literals.
            ks = lyr.DEFAULT_KS if not probes else (1, 2) if probes[0].layer_template else None
            probes.append(self._capture_and_rewrite(a, k, layer_ks=ks))
            return probes[-1].optimized

        try:
            template = lg.build_template(optimize_at, args, kwargs, self._seq_dim)
            template.notes.append(f"probe report (L={template.lengths[0]}) follows")
            template.probe_spec = probes[0]  # type: ignore[attr-defined]
            calls = [lg.narrow_inputs(args, kwargs, self._seq_dim, length, p) for p in template.lengths]
            proxy, what = self._verification_proxy(probes[0], *calls[0])
            t0 = time.perf_counter()
            template.stream_model = lc.fit_module(proxy, calls, template.lengths)  # type: ignore[attr-defined]
            template.stream_proxy = (proxy, what)  # type: ignore[attr-defined]
            template.probe_seconds += time.perf_counter() - t0
        except lg.TemplateMismatch as exc:
            return None, str(exc)
        except Exception as exc:  # noqa: BLE001 - e.g. a model that only runs at one length
            return None, f"the probes at L={lg.DEFAULT_PROBES} failed ({type(exc).__name__}: {_clip(str(exc))})"
        return template, None

    def _verification_proxy(self, probe: Specialization, args: tuple, kwargs: dict) -> tuple:
        """(module, description) whose op stream stands for the model's: with a layer
        template, the 1-layer proxy (layers 0..p when p leading layers were peeled; every other
        layer's likeness to these is the layer template's check); else the whole model."""
        if self._layer_stack is None or not probe.layer_template:
            return self._model, f"the whole {type(self._model).__name__}"
        path, _ = self._layer_stack
        sig = call_signature(args, kwargs)  # layer templates are keyed (signature, mode, ks)
        entry = next((e for k, e in self._layer_templates.items() if k[0] == sig and k[1] == self._mode and e), None)
        layers = list(range(entry[0].peel + 1)) if entry is not None else [0]
        return lyr.truncated_proxy(self._model, path, layers), f"the proxy with layers {layers} of {path}"

    def _check_stream(self, template, args: tuple, kwargs: dict, length: int) -> tuple[bool, str]:
        """(verified, what was checked or why not), cached per call signature and mode."""
        key = (call_signature(args, kwargs), self._mode)
        if key not in self._stream_checks:
            proxy, what = template.stream_proxy
            try:
                stream = lc.verify(template.stream_model, proxy, args, kwargs, length)
                result = (True, f"op stream of {what} verified at L={length} ({len(stream)} ops, "
                                f"{stream.seconds:.2f} s)")
            except lg.TemplateMismatch as exc:
                result = (False, f"op stream of {what}: {exc}")
            self._stream_checks[key] = result
            while len(self._stream_checks) > self._cache_size:
                self._stream_checks.popitem(last=False)
        self._stream_checks.move_to_end(key)
        return self._stream_checks[key]

    def _from_layer_template(self, args: tuple, kwargs: dict, ks: tuple[int, ...]) -> Specialization | None:
        """Deep models: the rewritten graph instantiated from a layer-generic template
        (see layer_generic.py). None when not applicable or the template does not fit.
        ``ks``: the plain template's probe depths; a template with its first layer peeled
        is fitted to proxies one layer deeper each."""
        path, n = self._layer_stack
        key = (call_signature(args, kwargs), self._mode, ks)
        if key not in self._layer_templates:
            # by the model's layers the proxy holds: a peeled template's probes and the plain
            # form's can have the same depth (peel 2's [0, 1, n-1] and the plain [0, n//2, n-1])
            probes: dict[tuple[int, ...], Specialization] = {}
            index = {id(m): i for i, m in enumerate(self._model.get_submodule(path))}

            def optimize_at(module, a, k):
                sel = tuple(index[id(m)] for m in module.get_submodule(path))
                spec = probes[sel] = self._rewrite(module, a, k)
                return spec.optimized

            try:
                template = lyr.build_layer_template(optimize_at, self._model, args, kwargs, path, n, ks)
                # Every layer's op stream, once per template family: the later probe lengths of
                # a length template build theirs with fewer proxies (ks) against this one.
                template.stream_note = (layer_check.check_all_layers(  # type: ignore[attr-defined]
                    self._model, path, n, template.peel, args, kwargs)
                    if tuple(ks) == lyr.DEFAULT_KS else "all layers' op streams verified at the first probe length")
                used = [probes[sel] for sel in template.sels]
                entry = (template, lyr.scale_report([p.report for p in used], template.ks, n),
                         [p.original for p in used])
            except lg.TemplateMismatch as exc:
                entry, self._layer_failure = None, str(exc)
            self._layer_templates[key] = entry
            while len(self._layer_templates) > 2 * self._cache_size:
                self._layer_templates.popitem(last=False)
        if self._layer_templates[key] is None:
            return None
        template, base_report, captured = self._layer_templates[key]
        t0 = time.perf_counter()
        try:
            gm = template.instantiate(n, args, kwargs, lazy=True)  # a length probe's graph is never run
        except lg.TemplateMismatch as exc:
            self._layer_failure = str(exc)
            return None
        report = copy.copy(base_report)
        report.nodes_final = len(gm.graph.nodes)
        p = template.peel
        lead = "layer 0" if p == 1 else f"layers 0-{p - 1}"
        peeled = (f"; {'first layer' if p == 1 else f'first {p} layers'} peeled ({lead} as captured, layers "
                  f"{p}-{n - 1} repeat one block; {lead} {'differs' if p == 1 else 'differ'}: "
                  f"{template.peel_reason})" if p else "")
        report.notes = [
            f"layer-generic: graph for the {n} layers of {path} instantiated from captures with "
            f"{list(template.ks)} of them{peeled}; {template.stream_note}; probes took {template.probe_seconds:.2f} s, instantiation "
            f"{time.perf_counter() - t0:.2f} s; matches and node counts are extrapolated to {n} layers, "
            "times are the probes'"]

        def original() -> torch.fx.GraphModule:
            # The graph as captured, at full depth: the same template fitted to the probes'
            # captures, built only when asked for (inspection). If the captures do not fit
            # (a pass made the layers alike), the shallowest proxy's capture stands in.
            try:
                return lyr.fit_layer_template(self._model, path, n, captured, template.ks,
                                              peel=template.peel).instantiate(n, args, kwargs)
            except lg.TemplateMismatch:
                return captured[0]

        return Specialization(original, gm, report, layer_template=True)

    def _capture_and_rewrite(self, args: tuple, kwargs: dict,
                             layer_ks: tuple[int, ...] | None = lyr.DEFAULT_KS) -> Specialization:
        spec = None
        if self._layer_stack is not None and layer_ks:
            with _gc_paused():  # proxies, checks and instantiation: see _gc_paused
                spec = self._from_layer_template(args, kwargs, layer_ks)
        spec = spec or self._rewrite(self._model, args, kwargs)
        if getattr(self, "_layer_failure", None) and not spec.layer_template:
            spec.report.notes.append(f"layer-generic template not used: {self._layer_failure}")
        if getattr(self, "_template_failure", None):
            spec.report.notes.append(f"length-generic template not used: {self._template_failure}")
        return spec

    def _rewrite(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> Specialization:
        """Capture ``model`` (the user's, or a layer proxy) and run the passes."""
        captured = capture(model, args, kwargs)
        report = Report(capture_seconds=captured.meta.get("fxopt_capture_seconds", 0.0),
                        nodes_captured=len(captured.graph.nodes), model=type(model).__name__)
        t0 = time.perf_counter()
        work = copy_graph_module(captured, lazy=True)  # the passes edit it: code generated once, when used
        report.copy_seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
        optimized, report = PassManager(resolve_passes(self._pass_specs)).run(work, report)
        return Specialization(captured, optimized, report)

    # ------------------------------------------------------------------ inspection
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def pass_specs(self):
        """The ``passes=`` this module was built with, as given (None: the library defaults)."""
        return self._pass_specs

    def _current(self) -> Specialization:
        if self._last is None:
            raise FxoptError(f"no graph was built for {type(self._model).__name__}: "
                             f"{self._eager_reason or 'it has not been called yet'}")
        return self._last

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The rewritten graph of the most recently used specialisation. It takes the call
        the user wrote (``opt.graph_module(ids)``; no ``use_cache`` for HF models)."""
        return self._current().optimized

    @property
    def original_graph_module(self) -> torch.fx.GraphModule:
        """The graph as captured, before any pass (same specialisation as graph_module).

        When the specialisation came from a length-generic template (long sequences),
        this is the capture at the first probe length: the point of the template is that
        the unrolled graph at the real length is never built.

        When it came from a layer-generic template (deep models, see layer_generic.py),
        the full model is never captured: this is the layer template fitted to the
        proxies' captures (before passes), instantiated at full depth on first access;
        node names match graph_module's. Should those captures not fit a template, it is
        the capture of the shallowest proxy (1 layer; 2 when the first layer is peeled)."""
        return self._current().original_graph_module()

    @property
    def specializations(self) -> int:
        return len(self._cache)

    def report(self) -> Report:
        """The report of the most recently used specialisation (with a note when the last
        call ran the model eagerly, and why)."""
        if self._last is None:
            return Report(model=type(self._model).__name__, notes=[self._eager_reason or "not called yet"])
        if self._eager_reason is None:
            return self._last.report
        report = copy.copy(self._last.report)
        report.notes = list(report.notes) + [f"last call: {self._eager_reason}"]
        return report

    # ------------------------------------------------------------------ generation (fxopt.runtime)
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature=UNSET, top_k=UNSET, top_p=UNSET, eos_token_id=UNSET, pad_token_id=UNSET,
                 streamer=None, generator: "torch.Generator | None" = None) -> torch.Tensor:
        """Prompt + up to ``max_new_tokens`` new tokens, as HF's ``generate`` returns them:
        prefill and decode-step graphs with static caches, rewritten by this module's passes,
        the decode step replayed as a CUDA graph on CUDA (see :func:`fxopt.runtime.generate`).
        Greedy output is HF's token for token; HF GPTNeoX and HF Mamba are supported, other
        families raise :class:`fxopt.runtime.UnsupportedModelError`."""
        from . import runtime

        return runtime.generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                                pad_token_id=pad_token_id, streamer=streamer, generator=generator)

    def cache_bytes(self, batch_size: int, max_length: int) -> int:
        """Bytes of every cache tensor :meth:`generate` allocates for ``batch_size`` rows of at
        most ``max_length`` tokens (from the rewritten decode graph's own cache description)."""
        from . import runtime

        return runtime.cache_bytes(self, batch_size, max_length)

    def kernel_sources(self) -> dict[str, str]:
        """Generated kernel source for every fused node of the current graph."""
        from . import codegen

        fn = getattr(codegen, "kernel_sources", None)
        return fn(self.graph_module) if fn is not None else {}

    def extra_repr(self) -> str:
        return f"model={type(self._model).__name__}, specializations={len(self._cache)}"


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic collector off while templates are built and checked. Their short captures,
    recordings and graph copies allocate millions of objects, so the collector keeps running
    full collections, each re-walking every object of the process (torch, transformers, the
    model): 0.4-0.7 s of a mamba-130m optimize() on a CPU. Nothing in these steps needs a cycle
    collected; what they leave is collected once the collector is back on (+25-50 MB peak
    there). Not around a direct capture at the real length, whose garbage is unbounded."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + " ..."


def _check_cache_size(cache_size) -> int:
    if cache_size is None:
        return get_config().shape_cache_size
    if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
        raise FxoptError(f"cache_size must be a positive int (specialisations kept, LRU), got {cache_size!r}; "
                         "leave it None for FXOPT_SHAPE_CACHE_SIZE (default 8)")
    return cache_size


def _on_cuda(model: torch.nn.Module) -> bool:
    for t in model.parameters():
        return t.is_cuda
    for t in model.buffers():
        return t.is_cuda
    return False


def _infer_seq_dim(args: tuple) -> int | None:
    """Token-id inputs (an integer (b, l) tensor first) have their sequence on dim 1."""
    first = next((x for x in pytree.tree_leaves(args) if isinstance(x, torch.Tensor)), None)
    if first is not None and first.dim() == 2 and not first.is_floating_point() and not first.is_complex():
        return 1
    return None


def optimize(model: torch.nn.Module, args: Any = (), kwargs: dict | None = None,
             passes: Iterable[PassSpec] | PassSpec | None = None, *, cache_size: int | None = None,
             seq_dim: int | str | None = "auto", layer_templates: bool = True,
             cuda_graphs: bool | str = "auto") -> OptimizedModule:
    """Capture ``model(*args, **kwargs)``, run ``passes`` (names or Pass objects; None =
    the library defaults) and return a module that computes the same thing.

    ``seq_dim``: the sequence axis of the inputs. For sequences of
    ``length_generic.MIN_TEMPLATE_LENGTH`` or more, fxopt optimizes at three short probe
    lengths and instantiates the rewritten graph for the real length (unrolled loops
    make direct captures slow), falling back to a direct capture when the probes
    disagree. ``"auto"``: dim 1 when the first input is an integer (b, l) tensor of
    token ids; ``None`` turns this off.

    ``layer_templates``: for a model with a stack of at least 4 structurally identical
    layers (an ``nn.ModuleList``), capture proxies holding 1-3 of them and instantiate the
    rewritten graph for all layers (see ``fxopt/layer_generic.py``), falling back to a
    full capture when the layers' graphs differ. ``False`` always captures the whole model.

    ``cuda_graphs``: ``"auto"`` (default) replays each specialisation of a model on CUDA as a
    CUDA graph after its first (warm-up) call, copying inputs in and outputs out (outputs stay
    valid after the next call); calls that cannot be captured (gradients recorded, host syncs,
    CPU tensors) run the graph directly, with a note. ``False`` never replays.

    >>> opt = fxopt.optimize(model, (input_ids,))
    >>> logits = opt(input_ids).logits
    >>> print(opt.report())
    """
    return OptimizedModule(model, args, kwargs, passes, cache_size=cache_size, seq_dim=seq_dim,
                           layer_templates=layer_templates, cuda_graphs=cuda_graphs)
