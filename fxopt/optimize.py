"""``fxopt.optimize``: capture, rewrite, and serve a model, re-specialising per input shape."""
from __future__ import annotations

import copy
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx
from torch.utils import _pytree as pytree

from . import length_generic as lg
from .capture import capture, normalize_call
from .config import get_config
from .errors import FxoptError
from .pass_manager import PassManager, Report
from .registry import PassSpec, resolve_passes


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with its own copy of the graph but the *same* parameter and buffer
    tensors (a 2.8B-parameter model must not be duplicated to keep a before-picture)."""
    graph = torch.fx.Graph()
    # The codegen object holds the pytree in/out specs; it is never mutated, so share it.
    graph._codegen = gm.graph._codegen
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    new = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta.update(gm.meta)
    return new


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
    return (str(spec), tuple(_leaf_key(x) for x in leaves))


@dataclass
class Specialization:
    original: torch.fx.GraphModule
    optimized: torch.fx.GraphModule
    report: Report


class OptimizedModule(torch.nn.Module):
    """A model rewritten by fxopt passes. Call it like the model.

    New input shapes trigger a new capture + rewrite, kept in a bounded LRU cache
    (``FXOPT_SHAPE_CACHE_SIZE``, default 8). The user's model is referenced, never
    modified; rewritten graphs share its parameter tensors.
    """

    def __init__(self, model: torch.nn.Module, args: Any = (), kwargs: dict | None = None,
                 passes: Iterable[PassSpec] | None = None, *, cache_size: int | None = None,
                 seq_dim: int | str | None = "auto"):
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise FxoptError(f"optimize needs a torch.nn.Module, got {type(model).__name__}")
        # Stored outside nn.Module registration so our state_dict()/parameters() do not
        # re-export the user's model under a new prefix.
        object.__setattr__(self, "_model", model)
        self._pass_specs = list(passes) if passes is not None else None
        resolve_passes(self._pass_specs)  # fail now, not at first call, on an unknown name
        self._cache: OrderedDict[tuple, Specialization] = OrderedDict()
        self._cache_size = cache_size or get_config().shape_cache_size
        self._last: Specialization | None = None
        self._templates: dict[tuple, lg.LengthTemplate | None] = {}
        args, kwargs = normalize_call(model, args, kwargs)
        self._seq_dim = _infer_seq_dim(args) if seq_dim == "auto" else seq_dim
        self._specialize(args, kwargs, call_signature(args, kwargs))

    # ------------------------------------------------------------------ internals
    def _specialize(self, args: tuple, kwargs: dict, key: tuple) -> Specialization:
        spec = self._from_template(args, kwargs) or self._capture_and_rewrite(args, kwargs)
        self._cache[key] = spec
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        self._last = spec
        return spec

    def _from_template(self, args: tuple, kwargs: dict) -> Specialization | None:
        """Long sequences: instantiate a length-generic template (see length_generic.py)
        instead of tracing every unrolled loop step. None when not applicable."""
        if self._seq_dim is None:
            return None
        length = lg.sequence_length(args, kwargs, self._seq_dim)
        if length is None or length < lg.MIN_TEMPLATE_LENGTH:
            return None
        probe0 = lg.DEFAULT_PROBES[0]
        tkey = call_signature(*lg.narrow_inputs(args, kwargs, self._seq_dim, length, probe0))
        if tkey not in self._templates:
            probes: list[Specialization] = []

            def optimize_at(a, k):
                probes.append(self._capture_and_rewrite(a, k))
                return probes[-1].optimized

            try:
                template = lg.build_template(optimize_at, args, kwargs, self._seq_dim)
                template.notes.append(f"probe report (L={probe0}) follows")
                template.probe_spec = probes[0]  # type: ignore[attr-defined]
            except lg.TemplateMismatch as exc:
                template = None
                self._template_failure = str(exc)
            self._templates[tkey] = template
        template = self._templates[tkey]
        if template is None:
            return None
        t0 = time.perf_counter()
        try:
            gm = template.instantiate(length, args, kwargs)
        except lg.TemplateMismatch as exc:
            self._template_failure = str(exc)
            return None
        probe = template.probe_spec  # type: ignore[attr-defined]
        report = copy.copy(probe.report)
        report.notes = list(probe.report.notes) + [
            f"length-generic: graph instantiated at L={length} from probes at L={template.lengths} "
            f"({template.varying} literals depend on L); probes took {template.probe_seconds:.2f} s, "
            f"instantiation {time.perf_counter() - t0:.2f} s; matches/nodes below are per probe graph"]
        report.instantiate_seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
        return Specialization(probe.original, gm, report)

    def _capture_and_rewrite(self, args: tuple, kwargs: dict) -> Specialization:
        model = self._model
        captured = capture(model, args, kwargs)
        report = Report(capture_seconds=captured.meta.get("fxopt_capture_seconds", 0.0),
                        nodes_captured=len(captured.graph.nodes), model=type(model).__name__)
        t0 = time.perf_counter()
        work = copy_graph_module(captured)
        report.copy_seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
        optimized, report = PassManager(resolve_passes(self._pass_specs)).run(work, report)
        if getattr(self, "_template_failure", None):
            report.notes.append(f"length-generic template not used: {self._template_failure}")
        return Specialization(captured, optimized, report)

    def forward(self, *args, **kwargs):
        args, kwargs = normalize_call(self._model, args, kwargs)
        key = call_signature(args, kwargs)
        spec = self._cache.get(key)
        if spec is None:
            spec = self._specialize(args, kwargs, key)
        else:
            self._cache.move_to_end(key)
            self._last = spec
        return spec.optimized(*args, **kwargs)

    # ------------------------------------------------------------------ inspection
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The rewritten graph of the most recently used specialisation."""
        return self._last.optimized

    @property
    def original_graph_module(self) -> torch.fx.GraphModule:
        """The graph as captured, before any pass (same specialisation as graph_module).

        When the specialisation came from a length-generic template (long sequences),
        this is the capture at the first probe length: the point of the template is that
        the unrolled graph at the real length is never built."""
        return self._last.original

    @property
    def specializations(self) -> int:
        return len(self._cache)

    def report(self) -> Report:
        return self._last.report

    def kernel_sources(self) -> dict[str, str]:
        """Generated kernel source for every fused node of the current graph."""
        from . import codegen

        fn = getattr(codegen, "kernel_sources", None)
        return fn(self.graph_module) if fn is not None else {}

    def extra_repr(self) -> str:
        return f"model={type(self._model).__name__}, specializations={len(self._cache)}"


def _infer_seq_dim(args: tuple) -> int | None:
    """Token-id inputs (an integer (b, l) tensor first) have their sequence on dim 1."""
    first = next((x for x in pytree.tree_leaves(args) if isinstance(x, torch.Tensor)), None)
    if first is not None and first.dim() == 2 and not first.is_floating_point() and not first.is_complex():
        return 1
    return None


def optimize(model: torch.nn.Module, args: Any = (), kwargs: dict | None = None,
             passes: Iterable[PassSpec] | None = None, *, cache_size: int | None = None,
             seq_dim: int | str | None = "auto") -> OptimizedModule:
    """Capture ``model(*args, **kwargs)``, run ``passes`` (names or Pass objects; None =
    the library defaults) and return a module that computes the same thing.

    ``seq_dim``: the sequence axis of the inputs. For sequences of
    ``length_generic.MIN_TEMPLATE_LENGTH`` or more, fxopt optimizes at three short probe
    lengths and instantiates the rewritten graph for the real length (unrolled loops
    make direct captures slow), falling back to a direct capture when the probes
    disagree. ``"auto"``: dim 1 when the first input is an integer (b, l) tensor of
    token ids; ``None`` turns this off.

    >>> opt = fxopt.optimize(model, (input_ids,))
    >>> logits = opt(input_ids).logits
    >>> print(opt.report())
    """
    return OptimizedModule(model, args, kwargs, passes, cache_size=cache_size, seq_dim=seq_dim)
