"""What every pass run is checked for, whoever wrote the pass: the graph is well formed, a pass
that says it changed nothing changed nothing, and the fake values of what it changed are the
ones its inputs give.

A pass that lies about ``modified`` or writes a wrong-shape ``meta["val"]`` otherwise shows up
far away -- at the first call of the optimized module, as a shape error or an
``UnboundLocalError`` in stale generated code. Here it is a :class:`~fxopt.errors.PassError`
naming the pass and the node.

Cost: the snapshot is one tuple per node (the node's target, args, kwargs and fake-value
objects, compared by identity: fx replaces those tuples whenever a node is re-wired); the meta
check re-runs, on fake tensors, only the nodes the pass added or re-wired.
"""
from __future__ import annotations

import torch
import torch.fx
from torch.fx.node import Node, map_arg

from ..errors import FxoptError
from ..graph_utils import fake_mode_of, op_name

__all__ = ["GraphSnapshot", "Changes", "lint", "check_meta", "MetaMismatch"]


class MetaMismatch(FxoptError):
    """A node's ``meta["val"]`` disagrees with what its inputs' fake values give."""


class Changes:
    """What differs between a snapshot and the graph now."""

    def __init__(self, added: list[Node], rewired: list[Node], removed: int, reordered: bool):
        self.added = added
        self.rewired = rewired
        self.removed = removed
        self.reordered = reordered

    @property
    def touched(self) -> list[Node]:
        """Added and re-wired nodes, in graph order."""
        return self.added + self.rewired if not self.added or not self.rewired else _in_order(self.added + self.rewired)

    def __bool__(self) -> bool:
        return bool(self.added or self.rewired or self.removed or self.reordered)

    def summary(self) -> str:
        parts = []
        if self.added:
            parts.append(f"{len(self.added)} node(s) added (e.g. {', '.join(n.name for n in self.added[:3])})")
        if self.removed:
            parts.append(f"{self.removed} removed")
        if self.rewired:
            parts.append(f"{len(self.rewired)} changed (e.g. {', '.join(n.name for n in self.rewired[:3])})")
        if self.reordered and not parts:
            parts.append("nodes reordered")
        return ", ".join(parts) or "no change"


def _in_order(nodes: list[Node]) -> list[Node]:
    want = set(nodes)
    graph = nodes[0].graph
    return [n for n in graph.nodes if n in want]


def _state(n: Node) -> tuple:
    return (n.target, n.args, n.kwargs, n.meta.get("val"))


class GraphSnapshot:
    """A cheap fingerprint of a graph, to tell later whether (and where) it changed."""

    def __init__(self, graph_module: torch.fx.GraphModule):
        self.graph_module = graph_module
        self.graph = graph_module.graph
        self.nodes = list(self.graph.nodes)
        self.states = [_state(n) for n in self.nodes]

    def changes(self, graph_module: torch.fx.GraphModule) -> Changes:
        now = list(graph_module.graph.nodes)
        if graph_module.graph is not self.graph:
            old = set(self.nodes)
            return Changes([n for n in now if n not in old], [], sum(1 for n in self.nodes if n not in set(now)), True)
        if len(now) == len(self.nodes) and all(a is b for a, b in zip(now, self.nodes)):
            rewired = [n for n, st in zip(now, self.states) if not _same_state(_state(n), st)]
            return Changes([], rewired, 0, False)
        before = dict(zip(self.nodes, self.states))
        added, rewired = [], []
        for n in now:
            st = before.get(n)
            if st is None:
                added.append(n)
            elif not _same_state(_state(n), st):
                rewired.append(n)
        present = set(now)
        removed = sum(1 for n in self.nodes if n not in present)
        kept_order = [n for n in now if n in before]
        reordered = kept_order != [n for n in self.nodes if n in present]
        return Changes(added, rewired, removed, reordered)


def _same_state(a: tuple, b: tuple) -> bool:
    return all(x is y for x, y in zip(a, b))


def lint(graph_module: torch.fx.GraphModule) -> None:
    """Structural checks every pass must leave intact: fx's own lint (topological order, unique
    names, well-formed args, which also rules out cycles) and, in a graph with fake values (every
    captured one), a fake value on every computed node, which later passes and inspection rely on."""
    graph_module.graph.lint()
    if fake_mode_of(graph_module) is None:
        return  # a hand-built graph without fake values: nothing to keep consistent
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and "val" not in node.meta:
            raise FxoptError(f"node {node.name} ({node.target}) has no meta['val']: call "
                             "fxopt.graph_utils.propagate_meta on new nodes (or build them with fxopt.rewrite's Builder)")


def _fake_limits() -> tuple:
    """Exceptions that say "fake tensors cannot evaluate this op", not "the node is wrong"."""
    from torch._subclasses import fake_tensor

    names = ("UnsupportedOperatorException", "DataDependentOutputException", "DynamicOutputShapeException",
             "UnsupportedFakeTensorException")
    out = [getattr(fake_tensor, n) for n in names if hasattr(fake_tensor, n)]
    try:
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

        out.append(GuardOnDataDependentSymNode)
    except ImportError:  # pragma: no cover - older torch
        pass
    return tuple(out)


def _skip(node: Node) -> bool:
    """Nodes the meta check leaves alone: higher-order ops (their bodies are submodules) and ops
    whose output shape depends on data (re-running them would mint new symbols)."""
    target = node.target
    if isinstance(target, torch._ops.HigherOrderOperator):
        return True
    tags = getattr(target, "tags", ())
    return torch.Tag.dynamic_output_shape in tags or torch.Tag.data_dependent_output in tags


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).replace('torch.', '')}{list(v.shape)} on {v.device}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_describe(x) for x in v) + ")"
    return repr(v)


def _mismatch(have, got) -> bool:
    if isinstance(have, torch.Tensor) or isinstance(got, torch.Tensor):
        if not (isinstance(have, torch.Tensor) and isinstance(got, torch.Tensor)):
            return True
        if have.dtype != got.dtype or have.device != got.device or have.dim() != got.dim():
            return True
        # symbolic sizes are compared where both are plain ints only (expressions may be spelled differently)
        return any(type(a) is int and type(b) is int and a != b for a, b in zip(have.shape, got.shape))
    if isinstance(have, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(have) != len(got) or any(_mismatch(a, b) for a, b in zip(have, got))
    if type(have) in (int, float, bool) and type(got) is type(have):
        return have != got
    return False


def check_meta(graph_module: torch.fx.GraphModule, nodes: list[Node]) -> None:
    """Re-run each of ``nodes`` on its inputs' fake values and compare with its ``meta["val"]``;
    raise :class:`MetaMismatch` naming the first node that disagrees or cannot run on its
    inputs (the graph would fail at its first call)."""
    mode = fake_mode_of(graph_module)
    if mode is None:
        return
    limits = _fake_limits()
    for node in nodes:
        if node.op != "call_function" or _skip(node) or "val" not in node.meta:
            continue
        if any("val" not in i.meta for i in node.all_input_nodes):
            continue
        args = map_arg(node.args, lambda n: n.meta["val"])
        kwargs = map_arg(node.kwargs, lambda n: n.meta["val"])
        try:
            with mode:
                got = node.target(*args, **kwargs)
        except limits:
            continue
        except Exception as exc:  # noqa: BLE001 - this is the finding
            first = (str(exc).splitlines() or [""])[0]
            raise MetaMismatch(
                f"node {node.name} ({op_name(node)}) does not fit its inputs: re-running it on their fake values "
                f"raises {type(exc).__name__}: {first}"
            ) from exc
        have = node.meta["val"]
        if _mismatch(have, got):
            raise MetaMismatch(
                f"node {node.name} ({op_name(node)}) has meta['val'] {_describe(have)}, but its inputs give "
                f"{_describe(got)}: set meta['val'] from the inputs (fxopt.graph_utils.propagate_meta)"
            )
