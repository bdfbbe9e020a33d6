"""Layer-generic specialisation: optimize a 24-layer model without tracing 24 layers.

torch.export costs milliseconds per traced ATen op, so capture time grows with depth.
But a transformer / Mamba stack is ``n`` structurally identical layers in one
``nn.ModuleList``, and after the passes every layer's piece of the rewritten graph is
the same sub-graph, reading its own parameters. So we optimize *proxies* of the model
whose layer list holds 1, 2 and 3 of its layers (shallow copies that share every
parameter with the user's model and never modify it), split each rewritten graph into

    prefix (embeddings, masks, position embeddings) | block x k | suffix (norm, head)

by ``meta["nn_module_stack"]`` (a node belongs to layer ``i`` when some module on its
stack is ``<path>.<i>``; a node without a layer sits in the block it is placed in, or
in the prefix/suffix before the first/after the last layer node), and check:

* every block is the same sub-graph modulo the layer index in its parameter names;
* what flows into a block is, slot by slot, either the *same* prefix node for every
  layer (masks, rotary cos/sin) or a node of the previous block (the hidden state);
* the 2- and 3-layer graphs the template predicts equal the captured ones, node for
  node and literal for literal (names aside).

:meth:`LayerTemplate.instantiate` then builds the ``n``-layer graph (block ``i`` reads
``<path>.<i>.*``) and re-propagates fake-tensor metadata. Anything that does not fit
raises :class:`~fxopt.length_generic.TemplateMismatch` and the caller captures the whole
model instead; so does a probe graph a pass marked with :func:`refuse_template` (a pass
that cannot rewrite a proxy holding some of the layers as it rewrites the whole model).

Which layers the proxies hold: layer 0, then the *last* layer, then a middle one
(k = 2: ``[0, n-1]``, k = 3: ``[0, n//2, n-1]``), so code that branches on a layer index
(a special last layer, every m-th layer) is caught when a probed layer takes the branch.
Per-layer Python attributes are also compared up front (:func:`check_layer_attributes`):
anything but an integer equal to the layer's own index (HF's ``layer_idx``) must agree, callables
(an activation function stored on the layer), configs and tensor constants included.
A layer whose *code* branches on its index in a way no probed layer exercises would
still be missed; that is the price of not tracing every layer.

A peeled first layer: in some models layer 0 alone differs, e.g. HF Mamba with
``residual_in_fp32`` in bfloat16 (layer 0 receives the bf16 embeddings and casts its
residual to fp32; every later layer receives an fp32 residual). The plain template is
tried first (the 2-layer proxy goes first: if its two layers differ, no plain template can
fit and the 1-layer proxy is skipped). When it fails and the graphs show layer 0 alone
differing (layer 0 of the 1- or 2-layer graph is not the 2-layer graph's layer 1, while
every other layer of the 2- and 3-layer graphs is), layer 0 joins the prefix and the
block of layer 1 is repeated:

    prefix | layer 0 | block x (k - 1) | suffix

fitted to the proxies with 2, 3 and 4 layers (``[0, n-1]``, ``[0, n//2, n-1]``,
``[0, 1, n//2, n-1]``: the 2- and 3-layer ones are the plain form's, the 4-layer one
probes layer 1, the first repeated layer of the real model) and verified as strictly:
every repeated block equals the 2-layer graph's layer 1, and the predicted 3- and 4-layer
graphs equal the captured ones. The model then needs at least 5 layers.
"""
from __future__ import annotations

import copy
import logging
import re
import time
import types
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch.fx.node import Node, map_arg

from .graph_utils import PROVENANCE_KEY, make_graph_module
from .length_generic import TemplateMismatch, repropagate

log = logging.getLogger("fxopt.layer_generic")

MIN_LAYERS = 4
DEFAULT_KS: tuple[int, ...] = (1, 2, 3)
PEEL = 1  # the fewest leading layers a peeled template copies verbatim (layer 0)
# The most: HF Mamba in bf16 with the block passes (fused_regions) has two leading layers unlike
# the rest. Layer 0 casts the bf16 embeddings to the fp32 residual; the region fusing layer 0's
# residual add with layer 1's RMSNorm sits in layer 1 and reads the bf16 embeddings (a cast to
# fp32 in the region), while every later layer's region reads an fp32 residual. Each extra
# peeled layer makes every probe one layer deeper.
MAX_PEEL = 2

# A pass that cannot rewrite a probe (a proxy holding some of the layers) the way it would
# rewrite the whole model sets ``gm.meta[NO_TEMPLATE_KEY] = why`` on the probe's graph; the
# template is then refused and optimize captures the whole model. Without it such a pass could
# leave the probes unchanged (declining them) and the template, fitted to unchanged probes,
# would silently stand for a model the pass never rewrote.
NO_TEMPLATE_KEY = "fxopt_no_layer_template"


def refuse_template(gm: torch.fx.GraphModule, why: str) -> None:
    """Mark ``gm`` (a pass's output) as not to be used as a layer-template probe, saying why."""
    gm.meta[NO_TEMPLATE_KEY] = why


def _check_not_refused(gm: torch.fx.GraphModule, k: int) -> None:
    why = getattr(gm, "meta", {}).get(NO_TEMPLATE_KEY)
    if why:
        raise TemplateMismatch(f"a pass refused the {k}-layer probe as a layer template: {why}")


# ----------------------------------------------------------------- finding the stack

def _structure(m: torch.nn.Module) -> tuple:
    return (
        type(m),
        tuple((n, tuple(p.shape), p.dtype) for n, p in m.named_parameters(remove_duplicate=False)),
        tuple((n, tuple(b.shape), b.dtype) for n, b in m.named_buffers(remove_duplicate=False)),
        tuple((n, type(s)) for n, s in m.named_modules(remove_duplicate=False)),
    )


def find_layer_stack(model: torch.nn.Module) -> tuple[str, int] | None:
    """``(qualified name, n)`` of the ``nn.ModuleList`` with the most children (at least
    :data:`MIN_LAYERS`) whose children are structural twins, or None."""
    best: tuple[str, int] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) < MIN_LAYERS or not name:
            continue
        if best is not None and len(mod) <= best[1]:
            continue
        first = _structure(mod[0])
        if all(_structure(m) == first for m in list(mod)[1:]):
            best = (name, len(mod))
    return best


_SIMPLE = (bool, int, float, str, type(None), torch.dtype, torch.device)


def _simple(v) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_simple(x) for x in v)
    return isinstance(v, _SIMPLE)


def _plain_attrs(m: torch.nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(m).items() if not k.startswith("_")}


def _same_object_value(v, v0) -> bool:
    """Whether a non-simple attribute (a callable, a config, a tensor constant, ...) is the same
    in two layers. Identity, or equality the type defines (a config's ``__eq__``); plain
    functions and bound methods compare by identity of function and owner; tensors by dtype,
    shape and values. Anything that cannot be compared counts as different (the template is
    then not used, which is always sound)."""
    if v is v0:
        return True
    if type(v) is not type(v0):
        return False
    if isinstance(v, torch.Tensor):
        return v.dtype == v0.dtype and v.shape == v0.shape and bool(torch.equal(v, v0))
    if isinstance(v, types.MethodType):
        # A method bound to each layer's own object (``self.fn = self._impl``): the same code on
        # a twin; the objects' own state is compared where they are modules of the layers.
        return v.__func__ is v0.__func__ and type(v.__self__) is type(v0.__self__)
    if isinstance(v, (list, tuple)):
        return len(v) == len(v0) and all(_same_object_value(a, b) for a, b in zip(v, v0))
    if isinstance(v, dict):
        return v.keys() == v0.keys() and all(_same_object_value(v[k], v0[k]) for k in v)
    try:
        eq = v == v0
    except Exception:  # noqa: BLE001 - an __eq__ that fails means we cannot tell
        return False
    return eq is True


def check_layer_attributes(model: torch.nn.Module, path: str) -> None:
    """Raise :class:`TemplateMismatch` when the layers' own Python attributes (and their
    submodules') differ in anything but an integer equal to the layer index."""
    layers = list(model.get_submodule(path))
    # HF-style per-layer settings live in the config, read at run time by layer index
    # (e.g. config.layer_types = ["sliding_attention", ..., "full_attention"]): the
    # layers' own attributes are then identical but their graphs are not.
    config = getattr(model, "config", None)
    for key, value in (vars(config).items() if config is not None and hasattr(config, "__dict__") else ()):
        if isinstance(value, (list, tuple)) and len(value) == len(layers) and len(layers) > 1:
            if any(type(v) is not type(value[0]) or v != value[0] for v in value):
                raise TemplateMismatch(f"config.{key} varies per layer ({list(value)[:6]} ...): layers may differ")
    per_layer = [dict(layer.named_modules(remove_duplicate=False)) for layer in layers]
    for sub, m0 in per_layer[0].items():
        for key, v0 in _plain_attrs(m0).items():
            values = [_plain_attrs(mods[sub]).get(key, "<missing>") for mods in per_layer]
            if all(_simple(v) for v in values):
                if all(type(v) is type(v0) and v == v0 for v in values):
                    continue
                if all(type(v) is int for v in values) and values == list(range(len(values))):
                    continue  # a layer index (HF layer_idx): the probes cover index-dependent code
            elif all(_same_object_value(v, v0) for v in values):
                continue  # the same callable / config / constant in every layer
            where = f"{path}.<i>{'.' + sub if sub else ''}.{key}"
            raise TemplateMismatch(f"layers differ in attribute {where}: {values[:8]}{' ...' if len(values) > 8 else ''}")


def _probe_layers(n: int, k: int, peel: int = 0) -> list[int]:
    """Which layers the k-layer proxy holds. Plain form (``peel = 0``): first, last, middle, and
    as the witness of :func:`build_layer_template` (``k = 4``) also layer 1. With ``peel`` leading
    layers peeled: those layers themselves, in place (a peeled layer is copied verbatim into the
    instantiated graph, so the proxy's position j < peel must be the model's layer j), then last,
    middle, and for the deepest probe also layer ``peel`` (the first layer the repeated block
    stands for). Peel 1 gives ``[0, n-1], [0, n//2, n-1], [0, 1, n//2, n-1]``; peel 2
    ``[0, 1, n-1], [0, 1, n//2, n-1], [0, 1, 2, n//2, n-1]``: the 4-layer probe is shared."""
    if peel == 0:
        sel = {1: [0], 2: [0, n - 1], 3: [0, n // 2, n - 1], 4: [0, 1, n // 2, n - 1]}.get(k)
    else:
        tail = {1: [n - 1], 2: [n // 2, n - 1], 3: [peel, n // 2, n - 1]}.get(k - peel)
        sel = None if tail is None or min(tail) < peel else list(range(peel)) + tail
    return sel if sel is not None and len(set(sel)) == k else list(range(k))


def truncated_proxy(model: torch.nn.Module, path: str, layers: int | Sequence[int]) -> torch.nn.Module:
    """A shallow copy of ``model`` whose ModuleList at ``path`` holds only ``layers`` (the
    first ``k`` when an int). Every parameter, buffer and other submodule is the user's
    own object; only the modules on ``path`` are copied, each with a fresh ``_modules``
    dict, so the user's model is never modified."""
    sel = list(range(layers)) if isinstance(layers, int) else list(layers)
    parts = path.split(".")
    root = copy.copy(model)
    root._modules = type(model._modules)(model._modules)
    new_parent, old_parent = root, model
    for name in parts[:-1]:
        old = old_parent._modules[name]
        new = copy.copy(old)
        new._modules = type(old._modules)(old._modules)
        new_parent._modules[name] = new
        new_parent, old_parent = new, old
    old_list = old_parent._modules[parts[-1]]
    new_list = copy.copy(old_list)
    new_list._modules = type(old_list._modules)((str(j), old_list[i]) for j, i in enumerate(sel))
    new_parent._modules[parts[-1]] = new_list
    return root


# ----------------------------------------------------------------- splitting graphs

def _is_guard(n: Node) -> bool:
    return n.op == "call_module" and n.target == "_guards_fn"


def _canon(arg, ref: Callable[[Node], Any]):
    """A hashable picture of an argument: nodes through ``ref``, literals exactly."""
    if isinstance(arg, Node):
        return ref(arg)
    if isinstance(arg, (list, tuple)):
        return (type(arg).__name__, tuple(_canon(a, ref) for a in arg))
    if isinstance(arg, dict):
        return ("dict", tuple((k, _canon(v, ref)) for k, v in arg.items()))
    if isinstance(arg, slice):
        return ("slice", _canon(arg.start, ref), _canon(arg.stop, ref), _canon(arg.step, ref))
    return ("C", type(arg).__name__, repr(arg))


def _node_form(n: Node, ref) -> tuple:
    target = n.target if n.op == "call_function" else str(n.target)
    return (n.op, target, _canon(n.args, ref), _canon(n.kwargs, ref))


@dataclass
class _Split:
    """A rewritten k-layer graph cut into prefix / blocks / suffix."""

    gm: torch.fx.GraphModule
    prefix: list[Node]             # in graph order, get_attrs included
    attrs: list[list[Node]]        # per block: get_attr nodes of that layer's parameters
    blocks: list[list[Node]]       # per block: its other nodes, in graph order
    suffix: list[Node]             # in graph order, the output node last
    seg: dict[Node, int]           # -1 prefix, j block j, k suffix


class _Layers:
    def __init__(self, path: str):
        self.path = path
        self.pat = re.compile(re.escape(path) + r"\.(\d+)(?=\.|$)")

    def of(self, n: Node) -> int | None:
        if n.op == "get_attr":
            m = self.pat.match(str(n.target))
            return int(m.group(1)) if m else None
        for p, _ in (n.meta.get("nn_module_stack") or {}).values():
            m = self.pat.match(p)
            if m:
                return int(m.group(1))
        return None

    def norm(self, target: str, i: int) -> str:
        return f"{self.path}.#" + target[len(f"{self.path}.{i}"):]

    def at(self, normed: str, i: int) -> str:
        return f"{self.path}.{i}" + normed[len(self.path) + 2:]

    def remap_stack(self, stack: dict, i: int) -> dict:
        sub = lambda s: self.pat.sub(f"{self.path}.{i}", s, count=1)
        return {sub(k): (sub(p), t) for k, (p, t) in stack.items()}


def _split(gm: torch.fx.GraphModule, layers: _Layers, k: int) -> _Split:
    nodes = [n for n in gm.graph.nodes if not _is_guard(n)]
    seg: dict[Node, int] = {}
    attrs: list[list[Node]] = [[] for _ in range(k)]
    layer_of = {n: layers.of(n) for n in nodes}
    computed = [n for n in nodes if n.op not in ("get_attr", "placeholder", "output")]
    indexed = [i for i, n in enumerate(computed) if layer_of[n] is not None]
    if not indexed:
        raise TemplateMismatch(f"no node of the {k}-layer graph belongs to a layer of {layers.path}")
    last = indexed[-1]
    prefix, blocks, suffix = [], [[] for _ in range(k)], []
    for n in nodes:
        if n.op == "get_attr":
            j = layer_of[n]
            if j is not None:
                if j >= k:
                    raise TemplateMismatch(f"get_attr {n.target} names layer {j} of a {k}-layer graph")
                attrs[j].append(n)
                seg[n] = j
            else:
                prefix.append(n)
                seg[n] = -1
        elif n.op == "placeholder":
            prefix.append(n)
            seg[n] = -1
    current = -1
    for i, n in enumerate(computed):
        j = layer_of[n]
        if j is not None:
            if j < current or j >= k:
                raise TemplateMismatch(
                    f"node {n.format_node()} of layer {j} comes after nodes of layer {current} "
                    f"(layers interleave in the {k}-layer graph)")
            current = j
        if i > last:
            suffix.append(n)
            seg[n] = k
        elif current < 0:
            prefix.append(n)
            seg[n] = -1
        else:
            blocks[current].append(n)
            seg[n] = current
    out = next(n for n in nodes if n.op == "output")
    suffix.append(out)
    seg[out] = k
    if any(not b for b in blocks):
        raise TemplateMismatch(f"some layer of the {k}-layer graph has no nodes")
    return _Split(gm, prefix, attrs, blocks, suffix, seg)


def _block_form(sp: _Split, j: int, layers: _Layers):
    """(normalized attr targets, node forms, external inputs in first-use order)."""
    local = {n: i for i, n in enumerate(sp.blocks[j])}
    attr_set = set(sp.attrs[j])
    slots: dict[Node, int] = {}

    def ref(x: Node):
        if x in local:
            return ("L", local[x])
        if x in attr_set:
            return ("A", layers.norm(str(x.target), j))
        if x not in slots:
            slots[x] = len(slots)
        return ("X", slots[x])

    forms = [_node_form(n, ref) for n in sp.blocks[j]]
    attr_forms = tuple(sorted(layers.norm(str(a.target), j) for a in sp.attrs[j]))
    return attr_forms, forms, list(slots)


def _first_diff(a: list, b: list, nodes_b: list[Node]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"node {i} ({nodes_b[i].format_node() if i < len(nodes_b) else '?'})"
    return f"length ({len(a)} vs {len(b)} nodes)"


def _graph_form(graph: torch.fx.Graph):
    nodes = [n for n in graph.nodes if n.op != "get_attr" and not _is_guard(n)]
    idx = {n: i for i, n in enumerate(nodes)}
    ref = lambda x: ("A", str(x.target)) if x.op == "get_attr" else ("N", idx[x])
    attrs = sorted(str(n.target) for n in graph.nodes if n.op == "get_attr")
    return attrs, [_node_form(n, ref) for n in nodes], nodes


# ----------------------------------------------------------------- the template

def _attr(obj, qualname: str):
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _model_attr(model: torch.nn.Module, target: str):
    try:
        return _attr(model, target)
    except AttributeError as exc:
        raise TemplateMismatch(f"the model has no attribute {target} for a layer's get_attr") from exc


def _check_shared(sp: _Split, model: torch.nn.Module, layers: _Layers, sel: list[int]) -> None:
    """The probe's layer tensors are the model's own (so layer i's can be read from the
    model): identical objects, or, for export-lifted copies, equal values."""
    for j, attrs in enumerate(sp.attrs):
        for a in attrs:
            mine = _attr(sp.gm, str(a.target))
            theirs = _model_attr(model, layers.at(layers.norm(str(a.target), j), sel[j]))
            if mine is theirs:
                continue
            same = (isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor)
                    and mine.shape == theirs.shape and mine.dtype == theirs.dtype
                    and mine.device.type != "meta" and torch.equal(mine, theirs))
            if not same:
                raise TemplateMismatch(f"{a.target} of the probe is not the model's own tensor")


@dataclass
class LayerTemplate:
    """One rewritten layer, with the prefix and suffix around it and the wiring between
    consecutive layers; :meth:`instantiate` builds the graph for any depth."""

    model: torch.nn.Module
    layers: _Layers
    n: int                                   # the user's model's depth
    base: _Split                             # the shallowest probe's graph (peel + 1 layers), cut
    init: list[Node]                         # per input slot: its prefix node (block `peel`)
    carry: list[int | None]                  # per slot: local index in the previous block, None = same prefix node
    ks: tuple[int, ...] = DEFAULT_KS         # the layer counts of the probes fitted
    probe_seconds: float = 0.0
    peel: int = 0                            # leading layers copied verbatim from `base` (0 or PEEL)
    peel_reason: str = ""                    # why the plain form (and fewer peeled layers) did not fit

    @property
    def sels(self) -> list[tuple[int, ...]]:
        """The model's layers each fitted probe held (see :func:`_probe_layers`)."""
        return [tuple(_probe_layers(self.n, k, self.peel)) for k in self.ks]

    @property
    def path(self) -> str:
        return self.layers.path

    def _graph(self, n: int) -> torch.fx.Graph:
        base, layers, p = self.base, self.layers, self.peel
        if n <= p:
            raise TemplateMismatch(f"a template with {p} peeled layer(s) cannot build {n} layers")
        g = torch.fx.Graph()
        g._codegen = base.gm.graph._codegen  # pytree in/out specs; never mutated
        env: dict[Node, Node] = {}           # prefix, peeled layers, suffix
        benv: list[dict[Node, Node]] = [{} for _ in range(n)]
        block = base.blocks[p]
        slot_of = {x: s for s, x in enumerate(self.init)}

        def copy(x: Node, arg: Callable[[Node], Node], i: int | None) -> Node:
            # The prefix, peeled layers, suffix and the first repeated layer (layer p) keep
            # the base graph's names, layer i > p's nodes are "<name>_L<i>": deterministic,
            # so the instantiated captured and rewritten graphs name surviving nodes alike
            # (graph_diff matches nodes by name).
            name = x.name if i is None or i <= p else f"{x.name}_L{i}"
            new = g.create_node(x.op, x.target, map_arg(x.args, arg), map_arg(x.kwargs, arg), name, x.type)
            copy_meta(new, x, i)
            return new

        def copy_meta(new: Node, old: Node, i: int | None) -> None:
            # i: the layer a node of the repeated block is copied for; None: copied as is
            new.meta = dict(old.meta)
            new.meta.pop("val", None)
            if PROVENANCE_KEY in new.meta:
                prov = new.meta[PROVENANCE_KEY] = dict(new.meta[PROVENANCE_KEY])
                if i is not None and i > p and isinstance(prov.get("from"), list):  # the replaced nodes were layer i's
                    prov["from"] = [f"{x}_L{i}" for x in prov["from"]]
            if i is not None and "nn_module_stack" in new.meta:
                new.meta["nn_module_stack"] = layers.remap_stack(new.meta["nn_module_stack"], i)

        outer = lambda y: env[y] if y in env else benv[p][y]
        # get_attrs first, as export lays them out: prefix's, then every layer's
        for a in base.prefix:
            if a.op == "get_attr":
                env[a] = g.get_attr(str(a.target))
                copy_meta(env[a], a, None)
        for j in range(p):
            for a in base.attrs[j]:
                env[a] = g.get_attr(str(a.target))  # proxy layer j < p is the model's layer j
                copy_meta(env[a], a, None)
        for i in range(p, n):
            for a in base.attrs[p]:
                benv[i][a] = g.get_attr(layers.at(layers.norm(str(a.target), p), i))
                copy_meta(benv[i][a], a, i)
        for x in base.prefix:
            if x.op != "get_attr":
                env[x] = copy(x, outer, None)
        for j in range(p):
            for x in base.blocks[j]:
                env[x] = copy(x, outer, None)
        for i in range(p, n):
            def inner(y: Node, i=i) -> Node:
                if y in benv[i]:
                    return benv[i][y]
                s = slot_of[y]
                if i == p or self.carry[s] is None:
                    return env[y]
                return benv[i - 1][block[self.carry[s]]]
            for x in block:
                benv[i][x] = copy(x, inner, i)
        for x in base.suffix:
            env[x] = copy(x, lambda y: env[y] if y in env else benv[n - 1][y], None)
        return g

    def _root(self, graph: torch.fx.Graph) -> dict[str, Any]:
        """get_attr target -> object: layer parameters/buffers from the user's model,
        everything else (export-lifted constants, HOP submodules) from the probe."""
        root: dict[str, Any] = {}
        for node in graph.nodes:
            if node.op == "get_attr":
                t = str(node.target)
                root[t] = _model_attr(self.model, t) if self.layers.pat.match(t) else _attr(self.base.gm, t)
        return root

    def _safe_graph(self, n: int) -> torch.fx.Graph:
        try:
            return self._graph(n)
        except KeyError as exc:  # a node read outside the wiring the template knows
            raise TemplateMismatch(f"the template cannot wire node {exc} with {n} layers") from exc

    def instantiate(self, n: int, args: tuple, kwargs: dict, *, lazy: bool = False) -> torch.fx.GraphModule:
        """The ``n``-layer graph, its fake values re-propagated for (args, kwargs). ``lazy``: its
        code is generated on first use (see :func:`fxopt.graph_utils.make_graph_module`)."""
        graph = self._safe_graph(n)
        # One code generation (or none yet, lazy): re-propagating changes node meta, not code.
        gm = make_graph_module(self._root(graph), graph, lazy=lazy)
        gm.meta.update(self.base.gm.meta)
        repropagate(gm, args, kwargs, f"the layer template with {n} layers")
        return gm

    def check(self, sp: _Split, k: int) -> None:
        """The k-layer graph the template predicts equals the captured one."""
        pa, pf, _ = _graph_form(self._safe_graph(k))
        ca, cf, cnodes = _graph_form(sp.gm.graph)
        if pa != ca:
            raise TemplateMismatch(f"the {k}-layer graph reads parameters {sorted(set(ca) ^ set(pa))[:4]} the template does not predict")
        if pf != cf:
            raise TemplateMismatch(f"the {k}-layer graph differs from the template's prediction at {_first_diff(pf, cf, cnodes)}")


def build_layer_template(
    optimize_at: Callable[[torch.nn.Module, tuple, dict], torch.fx.GraphModule],
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    path: str,
    n: int,
    ks: Sequence[int] = DEFAULT_KS,
) -> LayerTemplate:
    """Optimize proxies of ``model`` with ``ks`` layers of the stack at ``path``
    (``optimize_at(module, args, kwargs)`` returns the rewritten graph), cut the graphs
    into prefix / blocks / suffix and fit the template; :class:`TemplateMismatch` if
    the layers are not interchangeable.

    The 2-layer proxy goes first: should its two layers differ, the plain template
    cannot fit and the 1-layer proxy is not captured. When the leading layer(s) alone
    differ (see :func:`_peel_evidence`), the peeled form with ``p`` leading layers
    (``p = 1 .. MAX_PEEL``, the fewest the graphs at hand allow) is fitted to the proxies with
    ``p`` layers more each (``ks`` + p: 2, 3, 4 layers for p = 1, 3, 4, 5 for p = 2). The
    template's ``ks`` are the layer counts it was fitted to, ``sels`` the layers each held."""
    ks = tuple(ks)
    if ks[:2] != (1, 2) or any(k >= n for k in ks):
        raise TemplateMismatch(f"layer probes {ks} need (1, 2, ...) layers, fewer than the model's {n}")
    check_layer_attributes(model, path)
    t0 = time.perf_counter()
    graphs: dict[tuple[int, ...], torch.fx.GraphModule] = {}  # by the layers the proxy holds

    def graph(sel: Sequence[int]) -> torch.fx.GraphModule:
        sel = tuple(sel)
        if sel not in graphs:
            graphs[sel] = optimize_at(truncated_proxy(model, path, list(sel)), args, kwargs)
            _check_not_refused(graphs[sel], len(sel))  # before any more probes are captured
        return graphs[sel]

    template = None
    reason = _layers_differ(graph(_probe_layers(n, 2)), path)
    if reason is None:
        try:
            template = fit_layer_template(model, path, n, [graph(_probe_layers(n, k)) for k in ks], ks)
        except TemplateMismatch as exc:
            reason = str(exc)
    if template is None:  # the leading layer(s) alone differ? peel them
        template = _build_peeled(graph, model, args, kwargs, path, n, ks, graphs, reason)
    template.probe_seconds = time.perf_counter() - t0
    return template


def _build_peeled(graph, model, args, kwargs, path: str, n: int, ks: tuple[int, ...],
                  graphs: dict, reason: str) -> LayerTemplate:
    """The peeled template with the fewest leading layers (1 .. MAX_PEEL) the probes allow, or
    TemplateMismatch saying why none fits. ``reason``: why the plain form did not fit."""
    # Probes that show whether the leading layers alone differ, cheapest first: the plain
    # 3-layer one (also the 3-layer probe of peel 1), then [0, 1, n//2, n-1] (the 4-layer probe
    # of peel 1 and peel 2 alike). Captured only while the graphs at hand are too few to tell.
    witnesses = [tuple(_probe_layers(n, k)) for k in (3, 4) if k < n]
    why: list[str] = [reason]
    for p in range(PEEL, MAX_PEEL + 1):
        what = "the first layer" if p == 1 else f"the first {p} layers"
        not_leading = _peel_evidence(graphs, path, p)
        while not_leading == _FEW_WITNESSES and any(w not in graphs for w in witnesses):
            graph(next(w for w in witnesses if w not in graphs))
            not_leading = _peel_evidence(graphs, path, p)
        if not_leading is not None:
            why.append(f"peeling {what} not tried: {not_leading}")
            continue
        pks = tuple(k + p for k in ks)
        if pks[-1] >= n:
            why.append(f"peeling {what} needs more than {pks[-1]} layers")
            break
        try:
            template = fit_layer_template(model, path, n, [graph(_probe_layers(n, k, p)) for k in pks], pks, peel=p)
        except TemplateMismatch as exc:
            why.append(f"with {what} peeled: {exc}")
            continue
        # the report's note: each step's reason clipped (a differing node prints its whole
        # fused-region expression); the log has them in full
        template.peel_reason = "; ".join(w if len(w) <= 240 else w[:240] + " ..." for w in why)
        log.info("layer template of %s: %s peeled: %s", path, what, "; ".join(why))
        return template
    raise TemplateMismatch("; ".join(why))


def _layers_differ(gm: torch.fx.GraphModule, path: str) -> str | None:
    """Why the 2-layer graph's two layers are not the same block (then no plain template
    fits), or None (also when the graph cannot be cut: the fit will say why)."""
    layers = _Layers(path)
    try:
        sp = _split(gm, layers, 2)
    except TemplateMismatch:
        return None
    a0, f0, _ = _block_form(sp, 0, layers)
    a1, f1, _ = _block_form(sp, 1, layers)
    if a1 != a0:
        return f"layer 1 of the 2-layer graph reads parameters {sorted(set(a1) ^ set(a0))[:4]} unlike its layer 0"
    if f1 != f0:
        return f"layer 1 of the 2-layer graph differs from its layer 0 at {_first_diff(f0, f1, sp.blocks[1])}"
    return None


_FEW_WITNESSES = "fewer than two layers after the leading ones in the probes at hand"


def _peel_evidence(graphs: dict[tuple[int, ...], torch.fx.GraphModule], path: str, p: int) -> str | None:
    """Do the probe graphs at hand show the first ``p`` positions alone differing? None when
    they do: every block at a position >= p (of every graph at hand) is one block, seen at
    least twice, and some block at a position < p is not that block. Else why not. A look at
    graphs already captured, before the peeled form's deeper probes: a heuristic that saves
    captures, never a proof (the fit is)."""
    layers = _Layers(path)
    try:
        sp = {sel: _split(gm, layers, len(sel)) for sel, gm in graphs.items()}
    except TemplateMismatch as exc:
        return str(exc)
    body = [(len(sel), j, _block_form(s, j, layers)[:2]) for sel, s in sp.items() for j in range(p, len(sel))]
    if len(body) < 2:
        return _FEW_WITNESSES
    k0, j0, rep = body[0]
    for k, j, form in body[1:]:
        if form != rep:
            return f"layer {j} of the {k}-layer graph differs from layer {j0} of the {k0}-layer graph"
    if all(_block_form(s, j, layers)[:2] == rep for sel, s in sp.items() for j in range(min(p, len(sel)))):
        return f"the first {p} layer(s) are like the others: the plain template failed for another reason"
    return None


def fit_layer_template(model: torch.nn.Module, path: str, n: int,
                       graphs: Sequence[torch.fx.GraphModule], ks: Sequence[int] = DEFAULT_KS,
                       peel: int = 0) -> LayerTemplate:
    """The template of ``graphs``, the graphs of the proxies with ``ks`` layers (see
    :func:`build_layer_template`); also fits the proxies' graphs as captured, before
    any pass. ``peel``: the first ``peel`` layers are copied as they are (their graphs
    being then ``ks = (peel + 1, peel + 2, ...)`` layers deep) and the block of layer
    ``peel`` is repeated."""
    ks = tuple(ks)
    if len(ks) < 2 or ks[0] != peel + 1 or any(b != a + 1 for a, b in zip(ks, ks[1:])):
        raise TemplateMismatch(f"layer probes {ks} do not fit a template with {peel} peeled layer(s)")
    layers = _Layers(path)
    splits = []
    for gm, k in zip(graphs, ks):
        _check_not_refused(gm, k)
        splits.append(_split(gm, layers, k))
        _check_shared(splits[-1], model, layers, _probe_layers(n, k, peel))

    # every repeated block is the base graph's (block `peel` of the first graph)
    a0, f0, s0 = _block_form(splits[0], peel, layers)
    ref = "the 1-layer graph's layer" if not peel else f"layer {peel} of the {ks[0]}-layer graph"
    for sp, k in zip(splits, ks):
        for j in range(peel, k):
            a, f, s = _block_form(sp, j, layers)
            if a != a0:
                raise TemplateMismatch(
                    f"layer {j} of the {k}-layer graph reads parameters {sorted(set(a) ^ set(a0))[:4]} unlike {ref}")
            if f != f0:
                raise TemplateMismatch(
                    f"layer {j} of the {k}-layer graph differs from {ref} at {_first_diff(f0, f, sp.blocks[j])}")
            if len(s) != len(s0):
                raise TemplateMismatch(f"layer {j} of the {k}-layer graph has {len(s)} inputs, {ref} has {len(s0)}")
    for x in s0:
        if splits[0].seg[x] >= peel:
            raise TemplateMismatch(f"the layer reads {x.name}, which is not computed before the layers")

    # wiring, from the second graph: each input of layer peel + 1 is the node layer peel
    # reads in that slot (the prefix's or a peeled layer's, shared by all layers) or a
    # node of layer peel (carried)
    sp2 = splits[1]
    _, _, first = _block_form(sp2, peel, layers)
    _, _, second = _block_form(sp2, peel + 1, layers)
    local0 = {x: i for i, x in enumerate(sp2.blocks[peel])}
    carry: list[int | None] = []
    for s, (x0, x1) in enumerate(zip(first, second)):
        if sp2.seg[x0] >= peel:
            raise TemplateMismatch(f"layer {peel} reads {x0.name}, which is not computed before the layers")
        if x1 is x0:
            carry.append(None)
        elif x1 in local0:
            carry.append(local0[x1])
        else:
            raise TemplateMismatch(
                f"layer {peel + 1}'s input {s} is {x1.name}, neither layer {peel}'s input {x0.name} "
                f"nor a node of layer {peel}")
    template = LayerTemplate(model, layers, n, splits[0], s0, carry, ks, peel=peel)
    for sp, k in zip(splits[1:], ks[1:]):
        template.check(sp, k)
    return template


# ----------------------------------------------------------------- reports

def extrapolate(values: Sequence[float], ks: Sequence[int], n: int, what: str):
    """``v(n)`` from the values at the first two (consecutive) depths ``ks`` (affine in
    the depth: ``v(1), v(2)``, or ``v(2), v(3)`` with a peeled first layer), checked
    against the others."""
    k1, v1, v2 = ks[0], values[0], values[1]
    step = v2 - v1
    for v, k in zip(values[2:], ks[2:]):
        if v != v1 + (k - k1) * step:
            raise TemplateMismatch(f"{what} is {list(values)} with {list(ks)} layers: not affine in the depth")
    return v1 + (n - k1) * step


def scale_report(reports: Sequence, ks: Sequence[int], n: int):
    """The report the full n-layer graph would have: per-pass matches, rule hits and node
    counts extrapolated from the probes; times are the probes' actual times, summed."""
    from .pass_manager import PassRecord, Report

    keys = [[(r.name, r.round) for r in rep.records] for rep in reports]
    if any(k != keys[0] for k in keys[1:]):
        raise TemplateMismatch(f"the passes ran differently with {list(ks)} layers: {keys}")
    records = []
    for i, r in enumerate(reports[0].records):
        rs = [rep.records[i] for rep in reports]
        stats = {}
        for key in set().union(*(x.stats for x in rs)):
            vals = [x.stats.get(key, 0) for x in rs]
            stats[key] = extrapolate(vals, ks, n, f"{r.name} {key}") if all(isinstance(v, int) for v in vals) else r.stats.get(key)
        records.append(PassRecord(
            r.name, r.round, extrapolate([x.matches for x in rs], ks, n, f"{r.name} matches"),
            extrapolate([x.nodes_before for x in rs], ks, n, f"{r.name} nodes"),
            extrapolate([x.nodes_after for x in rs], ks, n, f"{r.name} nodes"),
            sum(x.seconds for x in rs), any(x.modified for x in rs), stats))
    out = Report(records=records, capture_seconds=sum(r.capture_seconds for r in reports),
                 nodes_captured=extrapolate([r.nodes_captured for r in reports], ks, n, "captured nodes"),
                 nodes_final=extrapolate([r.nodes_final for r in reports], ks, n, "final nodes"),
                 model=reports[0].model)
    out.copy_seconds = sum(getattr(r, "copy_seconds", 0.0) for r in reports)  # type: ignore[attr-defined]
    return out
