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
from torch.fx.node import Node

from ..rewrite import NodeRule, Phase, RewritePass, RuleSet, decline, erase, replace
from ..testing.contracts import bitwise

aten = torch.ops.aten
_ASSERT = getattr(aten, "_assert_tensor_metadata", None)
_ASSERT = _ASSERT.default if _ASSERT is not None else None
_PRESERVE = (None, torch.preserve_format)


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def _assert_on_computed_value(node: Node):
    """assert_metadata(x) -> (nothing)    when x is computed by the graph (its metadata is the trace's)"""
    if node.users:
        return decline("its result is used")
    x = node.args[0] if node.args else node.kwargs.get("a")
    if not isinstance(x, Node):
        return decline("it checks a literal, not a graph value")
    if x.op == "placeholder":
        return decline(f"it checks the graph input {x.name}: the caller may pass anything", kind="graph input")
    return erase(node)


def _to_same_dtype(node: Node):
    """to.dtype(x, dtype) -> x            when x.dtype == dtype, no copy, no memory format (ATen returns x)"""
    names = ("self", "dtype", "non_blocking", "copy", "memory_format")
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    x, v = bound.get("self"), _val(bound.get("self"))
    if not isinstance(x, Node) or not isinstance(v, torch.Tensor):
        return decline("its input has no fake tensor value")
    if v.dtype != bound.get("dtype"):
        return decline(f"a real cast: {x.name} is {_short(v.dtype)}, the result {_short(bound.get('dtype'))}",
                       kind="dtype")
    if bound.get("copy", False):
        return decline("copy=True: the result is a new tensor", kind="copy")
    if bound.get("memory_format") not in _PRESERVE:
        return decline(f"memory_format={bound.get('memory_format')} may change the layout", kind="layout")
    return replace(node, x)


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


def _identity_view(node: Node):
    """view_k(...view_1(x)) -> x          when the result has x's shape, strides, offset and dtype"""
    if _layout(node) is None:
        return decline("its layout is unknown or symbolic")
    ancestor = _identical_ancestor(node)
    if ancestor is None:
        return decline("no tensor up its chain of views has its shape, strides, offset and dtype", kind="layout")
    return replace(node, ancestor)


def _dead_view(node: Node):
    """view(x) -> (nothing)               when nothing uses it (left behind by identity_view)"""
    if node.users:
        return decline(f"still used by {next(iter(node.users)).name}", kind="users")
    return erase(node)


def _short(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _rule(fn, anchors) -> NodeRule:
    return NodeRule(fn.__name__.lstrip("_"), fn, anchors=anchors, contract=bitwise, reach=0,
                    source=f"{__file__}:{fn.__code__.co_firstlineno}")


ASSERT_ON_COMPUTED_VALUE = _rule(_assert_on_computed_value, [_ASSERT] if _ASSERT is not None else [])
TO_SAME_DTYPE = _rule(_to_same_dtype, [aten.to.dtype])
IDENTITY_VIEW = _rule(_identity_view, _PURE_VIEWS)
DEAD_VIEW = _rule(_dead_view, _PURE_VIEWS)
# the rule set, in the order it runs: one forward walk with the first three, then one walk from
# the end dropping views left without users (backwards, so a whole dead chain goes in one walk)
RULES = RuleSet([ASSERT_ON_COMPUTED_VALUE, TO_SAME_DTYPE, IDENTITY_VIEW, DEAD_VIEW], name="cleanup")


class CleanupPass(RewritePass):
    """Drop no-op calls: checks on computed values, identity casts, view chains that undo themselves.

    Bitwise; see the module docstring."""

    fixpoint = False  # two walks remove every instance; nothing they do creates another

    def __init__(self):
        super().__init__("cleanup", phases=[
            Phase(RuleSet([ASSERT_ON_COMPUTED_VALUE, TO_SAME_DTYPE, IDENTITY_VIEW]), "forward", max_sweeps=1),
            Phase(RuleSet([DEAD_VIEW]), "reverse", max_sweeps=1),
        ], fixpoint=False)
