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

Discovery is the engine's reverse walk (one callable rule, :data:`TREE_RULE`, tried at every
add/sub from the last one back, so each tree is maximal: its intermediates are gone by the time
the walk reaches them); rewriting touches only the matched nodes. ``fxopt.explain(gm,
"residual_add")`` says for every add that was not fused why (a single add whose operands are not
fusable adds, an intermediate read before the root, mixed dtypes, too many leaves).
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx
from torch.fx.node import Node

from ..graph_utils import op_name
from ..rewrite import NodeRule, RewritePass, decline, emit
from ..testing.contracts import bitwise

aten = torch.ops.aten
_BINOPS = {aten.add.Tensor: "add", aten.sub.Tensor: "sub"}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_LEAVES = 16
MAX_STMTS = 32


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def _static(shape) -> bool:
    return all(isinstance(s, int) for s in shape)


def _binop_problem(node) -> str | None:
    """Why ``node`` is not a rounded two-tensor add/sub of one float dtype (None: it is one)."""
    if not isinstance(node, Node) or node.op != "call_function" or node.target not in _BINOPS:
        return "not an add/sub"
    if len(node.args) != 2 or any(k != "alpha" for k in node.kwargs):
        return "extra arguments"
    alpha = node.kwargs.get("alpha", 1)
    if isinstance(alpha, bool) or alpha != 1:
        return f"alpha={alpha!r} (a scaled operand is not a plain add)"
    out = _val(node)
    if not isinstance(out, torch.Tensor) or out.dtype not in _FLOATS:
        return "not a floating-point tensor"
    if not _static(out.shape):
        return "symbolic shape"
    for a in node.args:
        v = _val(a)
        if not isinstance(a, Node) or not isinstance(v, torch.Tensor):
            return f"operand {a!r} is not a tensor"
        if v.dtype != out.dtype or v.device != out.device:
            return f"operand {a.name} is {str(v.dtype).replace('torch.', '')} on {v.device}: type promotion"
        if not _static(v.shape):
            return f"operand {a.name} has a symbolic shape"
    return None


def _is_binop(node) -> bool:
    return _binop_problem(node) is None


class _Tree:
    def __init__(self, root: Node):
        self.root = root
        self.stmts: list[Node] = []  # post-order (topological)
        self.leaves: list[Node] = []
        self.extra: list[Node] = []  # intermediates written as extra outputs
        self.kept_as_leaf: dict[Node, str] = {}  # operand that is an add but stayed a leaf -> why

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


def _grow(root: Node, position: Callable[[Node], int], consumed=frozenset()) -> _Tree:
    """The maximal tree rooted at ``root`` (``root`` must be a binop)."""
    tree = _Tree(root)
    root_val = _val(root)
    in_tree: set[Node] = {root}
    as_leaf: set[Node] = set()  # once read as a leaf it stays one (keeps stmts topological)

    def why_not(a: Node, parent: Node) -> str | None:
        if a in consumed:
            return "part of another tree"
        if a in as_leaf:
            return "already read as a leaf"
        problem = _binop_problem(a)
        if problem is not None:
            return problem
        if _val(a).dtype != root_val.dtype:
            return "another dtype than the root"
        if len(in_tree) >= MAX_STMTS:
            return f"the tree has {MAX_STMTS} adds already"
        outside = [u for u in a.users if u is not parent and u not in in_tree]
        if not outside:
            return None
        # extra output: full shape, every outside user after the root
        if tuple(_val(a).shape) != tuple(root_val.shape):
            return f"also used by {outside[0].name}, and it is broadcast (shape {tuple(_val(a).shape)})"
        early = [u for u in outside if position(u) < position(root)]
        if early:
            return f"also used by {early[0].name} ({op_name(early[0])}), which runs before the root"
        return None

    def visit(n: Node) -> None:
        for a in dict.fromkeys(n.args):  # x + x visits x once
            if a in in_tree:
                continue
            why = why_not(a, n) if isinstance(a, Node) else "a literal"
            if why is None:
                in_tree.add(a)
                visit(a)
            else:
                as_leaf.add(a)
                if isinstance(a, Node) and a.target in _BINOPS:
                    tree.kept_as_leaf.setdefault(a, why)
        tree.stmts.append(n)

    visit(root)
    for n in tree.stmts:
        for a in n.args:
            if a not in in_tree and a not in tree.leaves:
                tree.leaves.append(a)
    tree.extra = [n for n in tree.stmts if n is not root and any(u not in in_tree for u in n.users)]
    return tree


def _fuse_tree(root: Node, ctx):
    """A maximal tree of adds rooted here -> one fused_add_tree call (bit-equal)."""
    problem = _binop_problem(root)
    if problem is not None:
        return decline(problem, kind="operands")
    tree = _grow(root, ctx.position)
    if len(tree.stmts) < 2:
        why = "; ".join(f"{a.name}: {w}" for a, w in tree.kept_as_leaf.items()) or "no operand is an add"
        # an add operand that had to stay a leaf is the interesting near miss: rank it first
        return decline(f"a single {_BINOPS[root.target]}, nothing to fuse ({why})", kind="single add",
                       progress=1 + len(tree.kept_as_leaf))
    if len(tree.leaves) > MAX_LEAVES:
        return decline(f"{len(tree.leaves)} leaves, more than {MAX_LEAVES}", kind="size", progress=len(tree.stmts))
    outputs = [tree.root, *tree.extra]
    text = tree.tree_string()

    def build(b):
        from ..ops.fused_add import fused_add_tree

        vals = [o.meta.get("val") for o in outputs]
        known = all(isinstance(v, torch.Tensor) for v in vals)
        # the outputs are exactly the replaced nodes' values (same shape, dtype, strides)
        fused = b.op(fused_add_tree, (list(tree.leaves), text), val=vals) if known else \
            b.op(fused_add_tree, (list(tree.leaves), text))
        fused.meta["fxopt_tree"] = text
        return [b.op(operator.getitem, (fused, k), val=vals[k]) if known else b.op(operator.getitem, (fused, k))
                for k in range(len(outputs))]

    return emit(outputs, build, matched=tree.stmts, before=tree.root, counts={"extra_outputs": len(tree.extra)},
                info={"tree": text})


TREE_RULE = NodeRule("residual_add.tree", _fuse_tree, anchors=list(_BINOPS), contract=bitwise)


def find_trees(gm: torch.fx.GraphModule) -> list[_Tree]:
    """The trees the pass would fuse, latest root first (read-only)."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    consumed: set[Node] = set()
    trees: list[_Tree] = []
    for root in reversed(nodes):
        if root in consumed or not _is_binop(root):
            continue
        tree = _grow(root, lambda n: pos.get(n, -1), consumed)
        if len(tree.stmts) < 2 or len(tree.leaves) > MAX_LEAVES:
            continue
        consumed.update(tree.stmts)
        trees.append(tree)
    return trees


class ResidualAddPass(RewritePass):
    """Fuse add trees into ``fxopt::fused_add_tree`` (bit-equal to eager)."""

    def __init__(self):
        super().__init__("residual_add", [TREE_RULE], order="reverse", max_iterations=1, counters=("extra_outputs",))
