"""Small helpers over ``torch.fx`` graphs shared by capture, passes and inspection."""
from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import torch
import torch.fx
from torch.fx.node import Node, map_arg

PROVENANCE_KEY = "fxopt_provenance"
# graph_module.meta[ERASED_KEY]: {name of an erased node: {"rule", "pass", "source", "anchor"}} --
# which rewrite erased each node the rewrite engine removed (new nodes carry PROVENANCE_KEY; the
# nodes a rewrite consumed or left dead are gone, so their attribution lives on the module).
ERASED_KEY = "fxopt_erased_by"


def is_input_guard(node: Node) -> bool:
    """export's input-shape guard (a ``call_module _guards_fn`` node): a check of the call's
    inputs, not part of the computation; graphs instantiated from templates drop it."""
    return node.op == "call_module" and node.target == "_guards_fn"


def node_count(graph) -> int:
    """The nodes of a graph (or GraphModule) that report and inspection count: all but export's
    input-shape guard, so a captured graph and one instantiated from a template (which has no
    guard) are counted alike."""
    graph = graph.graph if isinstance(graph, torch.fx.GraphModule) else graph
    return len(graph.nodes) - sum(1 for n in graph.find_nodes(op="call_module") if is_input_guard(n))


def op_name(node: Node) -> str:
    """A short, stable name for what a node computes: ``aten.add.Tensor``, ``placeholder``..."""
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            ns, name = target.namespace, target._schema.name.split("::")[-1]
            overload = target._overloadname
            return f"{ns}.{name}.{overload}" if overload else f"{ns}.{name}"
        return getattr(target, "__qualname__", None) or getattr(target, "__name__", str(target))
    if node.op == "call_method":
        return f"method.{node.target}"
    if node.op == "call_module":
        return f"module.{node.target}"
    return node.op


def node_val(node: object):
    """The fake tensor (or value) recorded by capture for ``node``; the value itself for literals."""
    if isinstance(node, Node):
        return node.meta.get("val")
    return node


def fake_mode_of(graph_module: torch.fx.GraphModule):
    """The FakeTensorMode that produced the graph's ``meta['val']`` entries (None if absent)."""
    from torch._subclasses.fake_tensor import FakeTensor

    for node in graph_module.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, FakeTensor):
            return val.fake_mode
        if isinstance(val, (list, tuple)):
            for v in val:
                if isinstance(v, FakeTensor):
                    return v.fake_mode
    return None


def _attr(graph_module: torch.nn.Module, qualname: str):
    obj = graph_module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def propagate_meta(graph_module: torch.fx.GraphModule, nodes: Iterable[Node], mode=None) -> None:
    """Fill ``meta['val']`` for ``nodes`` (in the order given, which must be topological)
    by running their targets on the fake values of their inputs.

    Passes call this for the nodes they create so later passes, the linter and
    inspection see shapes and dtypes on every node, without re-propagating the
    whole graph (which costs seconds on unrolled loops). ``mode``: the FakeTensorMode
    to run in (default: the one that made the graph's existing values).
    """
    mode = mode if mode is not None else fake_mode_of(graph_module)
    ctx = mode if mode is not None else contextlib.nullcontext()
    with ctx:
        for node in nodes:
            if node.op == "get_attr":
                real = _attr(graph_module, str(node.target))
                node.meta["val"] = mode.from_tensor(real) if (mode is not None and isinstance(real, torch.Tensor)) else real
                continue
            if node.op != "call_function":
                continue
            args = map_arg(node.args, lambda n: n.meta.get("val"))
            kwargs = map_arg(node.kwargs, lambda n: n.meta.get("val"))
            node.meta["val"] = node.target(*args, **kwargs)


def mark_provenance(
    new_nodes: Sequence[Node],
    *,
    rule: str,
    pass_name: str,
    replaced: Sequence[Node],
    source: str | None = None,
) -> None:
    """Record on each new node which rule made it and from which original nodes.

    Module-stack and stack-trace metadata are copied from the last replaced node, so
    inspection can still group rewritten nodes by model layer.
    """
    anchor = replaced[-1] if replaced else None
    info = {
        "rule": rule,
        "pass": pass_name,
        "from": [n.name for n in replaced],
        "source": source,
    }
    for node in new_nodes:
        node.meta[PROVENANCE_KEY] = dict(info)
        if anchor is not None:
            for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
                if key in anchor.meta and key not in node.meta:
                    node.meta[key] = anchor.meta[key]


def erase_dead_code(graph_module: torch.fx.GraphModule) -> int:
    """Remove pure nodes without users. Returns how many were removed."""
    before = len(graph_module.graph.nodes)
    graph_module.graph.eliminate_dead_code()
    return before - len(graph_module.graph.nodes)


def count_nodes(graph_module: torch.fx.GraphModule, op: str | None = None) -> int:
    if op is None:
        return len(graph_module.graph.nodes)
    return sum(1 for n in graph_module.graph.nodes if op_name(n) == op or n.target == op)


def to_networkx(graph_module: torch.fx.GraphModule):
    """The data-flow graph as a ``networkx.DiGraph`` (node name -> user names)."""
    import networkx as nx

    g = nx.DiGraph()
    for node in graph_module.graph.nodes:
        g.add_node(node.name, op=op_name(node))
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def copy_graph_module(gm: torch.fx.GraphModule, *, lazy: bool = False) -> torch.fx.GraphModule:
    """A GraphModule with its own copy of the graph but the *same* parameter and buffer
    tensors (a 2.8B-parameter model must not be duplicated to keep a before-picture).
    ``lazy``: see :func:`make_graph_module`."""
    graph = torch.fx.Graph()
    # The codegen object holds the pytree in/out specs; it is never mutated, so share it.
    graph._codegen = gm.graph._codegen
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    new = make_graph_module(gm, graph, lazy=lazy, class_name=type(gm).__name__)
    new.meta.update(gm.meta)
    return new


def _lazy_class():
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:  # pragma: no cover - torch without lazy graph modules: generate code now
        return None
    return _LazyGraphModule


def make_graph_module(root, graph: torch.fx.Graph, *, lazy: bool = False, class_name: str = "GraphModule"):
    """``torch.fx.GraphModule(root, graph)``. ``lazy=True``: its Python code is generated when
    first needed (a call, ``.code``, ``str``) rather than now and again after every change (torch's
    ``_LazyGraphModule``). For the intermediate graphs of ``optimize()`` -- a pass pipeline's work
    copy, the probes' graphs of the length and layer templates -- which are rewritten, compared
    and copied but never run: each eager code generation of a 24-layer graph costs ~0.1 s. What
    ``optimize()`` hands out goes through :func:`finalize`."""
    cls = _lazy_class() if lazy else None
    return (cls or torch.fx.GraphModule)(root, graph, class_name=class_name)


def finalize(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A plain (eager) GraphModule for a graph built lazily (:func:`make_graph_module`): same
    graph object, attributes and meta, its code generated now; other modules as they are."""
    lazy = _lazy_class()
    if lazy is None or not isinstance(gm, lazy):
        return gm
    new = torch.fx.GraphModule(gm, gm.graph, class_name="GraphModule")
    new.meta.update(gm.meta)
    return new
