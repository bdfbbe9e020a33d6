"""The ``"residual_add"`` pass: trees of adds -> one order-preserving fused op.

Any tree of two or more ``aten.add.Tensor`` / ``aten.sub.Tensor`` nodes (alpha 1, all
operands and results of one floating dtype) whose intermediate results are used only
inside the tree becomes one ``fxopt::fused_add_tree`` call (through its graph entry point
:func:`fxopt.ops.fused_add.fused_add_tree`) whose tree string spells
exactly that tree: same association, one rounding to the storage dtype after every add,
so the result is bit-equal to eager (fp32/fp16/bf16/fp64, inf/nan/-0.0/subnormals,
broadcast and non-contiguous operands). GPTNeoX's parallel residual
``(mlp + attn) + hidden`` is the headline case (one match per layer).

Legality:

* leaves may broadcast; the root's shape is the iteration space; an intermediate may
  have a smaller (broadcast) shape only if it has no user outside the tree;
* an intermediate with users outside the tree is fused as an *extra output* only when
  it has the root's shape and all those users come after the root in the graph (then no
  leaf can depend on it, so the fused node creates no cycle). Otherwise it stays a leaf:
  a serial residual block ``h = mlp(ln(a)) + a`` with ``a = attn + x`` is never fused,
  because ``a``'s other user (the LayerNorm) runs before the root.
* at most :data:`MAX_LEAVES` distinct leaves and :data:`MAX_STMTS` adds per tree.

Discovery is one reverse walk over the graph (roots are taken greedily from the end, so
each tree is maximal); rewriting touches only the matched nodes.
"""
from __future__ import annotations

import inspect
import operator

import torch
import torch.fx
from torch.fx.node import Node

from ..graph_utils import mark_provenance, propagate_meta
from ..pass_base import Pass, PassResult
from ..registry import register_pass

aten = torch.ops.aten
_BINOPS = {aten.add.Tensor: "add", aten.sub.Tensor: "sub"}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_LEAVES = 16
MAX_STMTS = 32
_SOURCE = f"{__file__}:{inspect.currentframe().f_lineno}"  # provenance "source" of the rule


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def _static(shape) -> bool:
    return all(isinstance(s, int) for s in shape)


def _is_binop(node) -> bool:
    """A rounded two-tensor add/sub of one float dtype (no alpha, no type promotion)."""
    if not isinstance(node, Node) or node.op != "call_function" or node.target not in _BINOPS:
        return False
    if len(node.args) != 2 or any(k != "alpha" for k in node.kwargs):
        return False
    alpha = node.kwargs.get("alpha", 1)
    if isinstance(alpha, bool) or alpha != 1:
        return False
    out = _val(node)
    if not isinstance(out, torch.Tensor) or out.dtype not in _FLOATS or not _static(out.shape):
        return False
    for a in node.args:
        v = _val(a)
        if not isinstance(a, Node) or not isinstance(v, torch.Tensor):
            return False
        if v.dtype != out.dtype or v.device != out.device or not _static(v.shape):
            return False
    return True


class _Tree:
    def __init__(self, root: Node):
        self.root = root
        self.stmts: list[Node] = []  # post-order (topological)
        self.leaves: list[Node] = []
        self.extra: list[Node] = []  # intermediates written as extra outputs

    def tree_string(self) -> str:
        name: dict[Node, str] = {}
        for i, leaf in enumerate(self.leaves):
            name[leaf] = f"x{i}"
        parts = []
        for k, n in enumerate(self.stmts):
            a, b = n.args
            parts.append(f"t{k}={_BINOPS[n.target]}({name[a]},{name[b]})")
            name[n] = f"t{k}"
        outs = [name[self.root]] + [name[e] for e in self.extra]
        return ";".join(parts) + "->" + ",".join(outs)


def find_trees(gm: torch.fx.GraphModule) -> list[_Tree]:
    """Maximal fusable add trees, latest root first."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    consumed: set[Node] = set()
    trees: list[_Tree] = []
    for root in reversed(nodes):
        if root in consumed or not _is_binop(root):
            continue
        tree = _Tree(root)
        root_val = _val(root)
        in_tree: set[Node] = {root}
        as_leaf: set[Node] = set()  # once read as a leaf it stays one (keeps stmts topological)

        def absorbable(a: Node, parent: Node) -> bool:
            if a in consumed or a in as_leaf or not _is_binop(a):
                return False
            if _val(a).dtype != root_val.dtype:
                return False
            if len(in_tree) >= MAX_STMTS:
                return False
            outside = [u for u in a.users if u is not parent and u not in in_tree]
            if not outside:
                return True
            # extra output: full shape, every outside user after the root
            if tuple(_val(a).shape) != tuple(root_val.shape):
                return False
            return all(pos.get(u, -1) > pos[root] for u in outside)

        def visit(n: Node) -> None:
            for a in dict.fromkeys(n.args):  # x + x visits x once
                if a in in_tree:
                    continue
                if absorbable(a, n):
                    in_tree.add(a)
                    visit(a)
                else:
                    as_leaf.add(a)
            tree.stmts.append(n)

        visit(root)
        if len(tree.stmts) < 2:
            continue
        for n in tree.stmts:
            for a in n.args:
                if a not in in_tree and a not in tree.leaves:
                    tree.leaves.append(a)
        if len(tree.leaves) > MAX_LEAVES:
            continue
        tree.extra = [n for n in tree.stmts if n is not root and any(u not in in_tree for u in n.users)]
        consumed.update(in_tree)
        trees.append(tree)
    return trees


class ResidualAddPass(Pass):
    """Fuse add trees into ``fxopt::fused_add_tree`` (bit-equal to eager)."""

    name = "residual_add"

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        from ..ops.fused_add import fused_add_tree

        trees = find_trees(graph_module)
        graph = graph_module.graph
        n_extra = 0
        for tree in trees:  # latest root first: a leaf that is another tree's root is replaced later
            text = tree.tree_string()
            outputs = [tree.root, *tree.extra]
            with graph.inserting_before(tree.root):
                fused = graph.call_function(fused_add_tree, (list(tree.leaves), text))
                items = [graph.call_function(operator.getitem, (fused, k)) for k in range(len(outputs))]
            # the outputs are exactly the replaced nodes' values (same shape, dtype, strides)
            vals = [o.meta.get("val") for o in outputs]
            if all(isinstance(v, torch.Tensor) for v in vals):
                fused.meta["val"] = vals
                for item, v in zip(items, vals):
                    item.meta["val"] = v
            else:
                propagate_meta(graph_module, [fused, *items])
            mark_provenance([fused, *items], rule="residual_add.tree", pass_name=self.name,
                            replaced=tree.stmts, source=_SOURCE)
            fused.meta["fxopt_tree"] = text
            for out, item in zip(outputs, items):
                out.replace_all_uses_with(item)
            for n in reversed(tree.stmts):
                graph.erase_node(n)
            n_extra += len(tree.extra)
        if trees:
            graph.lint()
            graph_module.recompile()
        stats = {"matches": len(trees), "rule:residual_add.tree": len(trees), "extra_outputs": n_extra}
        return PassResult(graph_module, bool(trees), stats)


register_pass("residual_add", ResidualAddPass)
