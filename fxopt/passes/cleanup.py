"""The ``"cleanup"`` pass: calls that compute nothing at run time but cost a dispatch each.

torch.export leaves two kinds in an ATen graph, both from ``.to(dtype)`` in model code:

* ``aten._assert_tensor_metadata(x, dtype=, device=, layout=)``: a run-time check that ``x`` has
  the metadata the trace saw. When the graph itself computes ``x``, the trace fixed that
  metadata, so the check cannot fail: rule ``assert_on_computed_value`` drops it. A check on a
  graph *input* stays (the caller may pass anything; ``OptimizedModule`` re-specialises per
  dtype, but a graph run on its own keeps its guard).
* ``aten.to.dtype(x, dtype)`` without ``copy=True`` or a memory format, on an ``x`` already of
  that dtype: ATen returns ``x`` itself, so rule ``to_same_dtype`` points its users at ``x``.

Contract: ``bitwise`` (no value is computed differently; the rewritten graph returns the very
same tensors). Why it matters: the optimized HF Mamba (130m shape) graph called from Python is
host-bound, and these are 512 of its 1 457 ATen calls (268 checks, 244 identity casts).
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


# (name, predicate, source location): the rule set, in the order they are tried
RULES = tuple((fn.__name__.lstrip("_"), fn, f"{__file__}:{fn.__code__.co_firstlineno}")
              for fn in (_assert_on_computed_value, _to_same_dtype))


class CleanupPass(Pass):
    """Drop export's metadata checks on computed values and identity dtype casts (bitwise)."""

    name = "cleanup"
    fixpoint = False  # one walk removes every instance; nothing it does creates another

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        hits = {name: 0 for name, _, _ in RULES}
        for node in list(graph_module.graph.nodes):
            for name, applies, _ in RULES:
                if applies(node):
                    if name == "to_same_dtype":
                        node.replace_all_uses_with(node.args[0] if node.args else node.kwargs["self"])
                    graph_module.graph.erase_node(node)
                    hits[name] += 1
                    break
        total = sum(hits.values())
        if total:
            graph_module.graph.lint()
            graph_module.recompile()
        stats = {"matches": total, **{f"rule:{k}": v for k, v in hits.items()}}
        return PassResult(graph_module, bool(total), stats)


register_pass("cleanup", CleanupPass)
