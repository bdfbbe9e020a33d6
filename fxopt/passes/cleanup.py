"""The ``"cleanup"`` pass: calls that compute nothing at run time but cost a dispatch each.

torch.export leaves two kinds in an ATen graph, both from ``.to(dtype)`` in model code:

* ``aten._assert_tensor_metadata(x, dtype=, device=, layout=)``: a run-time check that ``x`` has
  the metadata the trace saw. When the graph itself computes ``x``, the trace fixed that
  metadata, so the check cannot fail: rule ``assert_on_computed_value`` drops it. A check on a
  graph *input* stays (the caller may pass anything; ``OptimizedModule`` re-specialises per
  dtype, but a graph run on its own keeps its guard).
* ``aten.to.dtype(x, dtype)`` without ``copy=True`` or a memory format, on an ``x`` already of
  that dtype: ATen returns ``x`` itself, so rule ``to_same_dtype`` points its users at ``x``.

And one kind that model code and other passes leave: chains of views that undo each other
(``x.transpose(1, 2).transpose(1, 2)``, ``w.squeeze(1).unsqueeze(1)`` on a size-1 dim): rule
``identity_view`` points the users of a view at the earliest tensor up its chain of pure views
that has the same shape, strides, storage offset and dtype (the same elements of the same
storage: the very same values), and rule ``dead_view`` drops pure views nothing uses any more.

Contract: ``bitwise`` (no value is computed differently; the rewritten graph returns the same
values, with the same strides). Why it matters: the optimized HF Mamba (130m shape) graph called
from Python is host-bound, and these are 512 of its 1 457 ATen calls (268 checks, 244 identity
casts) and 97 more (per layer, two view pairs that cancel: 945 -> 848 calls after the other rules).
"""
from __future__ import annotations

import torch
import torch.fx
from torch.fx.node import Node

from ..pass_base import Pass, PassResult
from ..registry import register_pass

aten = torch.ops.aten
_ASSERT = getattr(aten, "_assert_tensor_metadata", None)
_ASSERT = _ASSERT.default if _ASSERT is not None else None
_PRESERVE = (None, torch.preserve_format)


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


# rule: assert_metadata(x) -> (nothing)    when x is computed by the graph (its metadata is the trace's)
def _assert_on_computed_value(node: Node) -> bool:
    if _ASSERT is None or node.op != "call_function" or node.target is not _ASSERT or node.users:
        return False
    x = node.args[0] if node.args else node.kwargs.get("a")
    return isinstance(x, Node) and x.op != "placeholder"


# rule: to.dtype(x, dtype) -> x            when x.dtype == dtype, no copy, no memory format (ATen returns x)
def _to_same_dtype(node: Node) -> bool:
    if node.op != "call_function" or node.target is not aten.to.dtype:
        return False
    names = ("self", "dtype", "non_blocking", "copy", "memory_format")
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    x, v = bound.get("self"), _val(bound.get("self"))
    if not isinstance(x, Node) or not isinstance(v, torch.Tensor) or v.dtype != bound.get("dtype"):
        return False
    return not bound.get("copy", False) and bound.get("memory_format") in _PRESERVE


# ops whose result is always a view of their first argument (never a copy, no side effect)
_PURE_VIEWS = frozenset(op for op in (
    aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim,
    getattr(aten.squeeze, "dims", None), aten.squeeze.default, aten.view.default, aten.alias.default,
    aten.expand.default, aten.slice.Tensor, aten.t.default) if op is not None)


def _is_view(node) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in _PURE_VIEWS


def _layout(node):
    """(shape, strides, storage offset, dtype) of a node's value; None if unknown or symbolic."""
    v = _val(node)
    if not isinstance(v, torch.Tensor):
        return None
    try:
        lay = (tuple(v.shape), tuple(v.stride()), v.storage_offset(), v.dtype)
    except Exception:  # a layout the fake tensor cannot report (e.g. sparse)
        return None
    flat = lay[0] + lay[1] + (lay[2],)
    return lay if all(type(i) is int for i in flat) else None


def _identical_ancestor(node: Node):
    """The earliest tensor up ``node``'s chain of pure views laid out exactly like ``node``."""
    want = _layout(node)
    if want is None:
        return None
    found, cur = None, node.args[0] if node.args else None
    while isinstance(cur, Node):
        if _layout(cur) == want:
            found = cur
        if not _is_view(cur):
            break
        cur = cur.args[0] if cur.args else None
    return found


# rule: view_k(...view_1(x)) -> x          when the result has x's shape, strides, offset and dtype
def _identity_view(node: Node) -> bool:
    return _is_view(node) and _identical_ancestor(node) is not None


# rule: view(x) -> (nothing)               when nothing uses it (left behind by identity_view)
def _dead_view(node: Node) -> bool:
    return _is_view(node) and not node.users


# (name, predicate, source location): the rule set, in the order they are tried
RULES = tuple((fn.__name__.lstrip("_"), fn, f"{__file__}:{fn.__code__.co_firstlineno}")
              for fn in (_assert_on_computed_value, _to_same_dtype, _identity_view, _dead_view))


class CleanupPass(Pass):
    """Drop no-op calls: checks on computed values, identity casts, view chains that undo themselves.

    Bitwise; see the module docstring."""

    name = "cleanup"
    fixpoint = False  # two walks remove every instance; nothing they do creates another

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        hits = {name: 0 for name, _, _ in RULES}
        forward = [(n, f) for n, f, _ in RULES if n != "dead_view"]
        for node in list(graph_module.graph.nodes):
            for name, applies in forward:
                if applies(node):
                    if name == "to_same_dtype":
                        node.replace_all_uses_with(node.args[0] if node.args else node.kwargs["self"])
                    elif name == "identity_view":
                        node.replace_all_uses_with(_identical_ancestor(node))
                    graph_module.graph.erase_node(node)
                    hits[name] += 1
                    break
        # backwards, so that a chain of views left without users goes in one walk
        for node in reversed(list(graph_module.graph.nodes)):
            if _dead_view(node):
                graph_module.graph.erase_node(node)
                hits["dead_view"] += 1
        total = sum(hits.values())
        if total:
            graph_module.graph.lint()
            graph_module.recompile()
        stats = {"matches": total, **{f"rule:{k}": v for k, v in hits.items()}}
        return PassResult(graph_module, bool(total), stats)


register_pass("cleanup", CleanupPass)
