"""The rewrite driver's own contract (fxopt/rewrite/driver.py): walk order, per-sweep analyses,
declines and rollback, Replacement forms, and the bookkeeping helpers it relies on."""
from __future__ import annotations

import operator

import pytest
import torch

import fxopt
from fxopt.errors import PatternError
from fxopt.graph_utils import PROVENANCE_KEY
from fxopt.rewrite import Declined, Divergence, Phase, RewritePass, emit
from fxopt.rewrite.graph_ops import Positions, erase_dead
from fxopt.rewrite.verify import GraphSnapshot

aten = torch.ops.aten


def _chain(n=3):
    """x -> neg -> neg -> ... (n negs) -> relu"""
    def f(x):
        for _ in range(n):
            x = -x
        return torch.relu(x)

    return fxopt.capture_function(f, (torch.randn(4),))


def test_walk_order_forward_and_reverse():
    seen = {}

    def visit(key):
        def fn(node):
            seen.setdefault(key, []).append(node.name)
            return None
        return fn

    for order in ("forward", "reverse"):
        gm = _chain()
        rule = fxopt.NodeRule(f"look_{order}", visit(order), anchors=[aten.neg.default])
        RewritePass("p", phases=[Phase([rule], order, max_sweeps=1)])(gm)
    assert seen["forward"] == ["neg", "neg_1", "neg_2"]
    assert seen["reverse"] == ["neg_2", "neg_1", "neg"]


def test_memo_is_computed_once_per_sweep_and_cache_lives_for_the_run():
    calls = {"memo": 0}
    caches = []

    def fn(node, ctx):
        ctx.memo("negs", lambda: calls.__setitem__("memo", calls["memo"] + 1) or [])
        caches.append(id(ctx.cache("c")))
        return None

    RewritePass("p", [fxopt.NodeRule("look", fn, anchors=[aten.neg.default])])(_chain())
    assert calls["memo"] == 1 and len(set(caches)) == 1


@fxopt.node_rule("negneg", anchors=[aten.neg.default], reach=1)
def _negneg(node):
    inner = node.args[0]
    if getattr(inner, "target", None) is not aten.neg.default:
        return fxopt.decline("the operand is not a neg", kind="operand")
    if len(inner.users) != 1:
        return fxopt.decline("the inner neg has other users", kind="users")
    return fxopt.replace(node, inner.args[0], matched=[node, inner])


def test_replace_erases_the_matched_nodes_and_sweeps_to_a_fixpoint():
    gm = _chain(4)
    x = torch.randn(4)
    res = RewritePass("p", [_negneg])(gm)
    assert res.stats == {"matches": 2, "rule:negneg": 2}
    assert not any(n.target is aten.neg.default for n in gm.graph.nodes)
    assert torch.equal(gm(x), torch.relu(x))
    assert [r.anchor for r in res.rewrites] == ["neg_1", "neg_3"]


def test_bad_return_and_undeclared_label_are_pattern_errors():
    junk = fxopt.NodeRule("junk", lambda node: 42, anchors=[aten.neg.default])
    with pytest.raises(fxopt.PassError, match="returned int; a callable rule returns a Replacement"):
        fxopt.PassManager([RewritePass("p", [junk])]).run(_chain())

    def labelled(node):
        return emit([node], [node.args[0]], matched=[node], label="other")

    with pytest.raises(PatternError, match="reported variant 'other'"):
        RewritePass("p", [fxopt.NodeRule("lab", labelled, anchors=[aten.neg.default])]).call(_chain())


def test_declined_inside_build_rolls_back_and_is_kept():
    def half_built(node):
        def build(b):
            b.call(aten.abs.default, node.args[0])  # inserted, then undone
            raise Declined(Divergence("late", "changed my mind"))
        return emit([node], build, matched=[node])

    gm = _chain(1)
    code = gm.code
    rule = fxopt.NodeRule("late", half_built, anchors=[aten.neg.default], keep_declines=True)
    res = RewritePass("p", [rule])(gm)
    assert res.matches == 0 and gm.code == code
    assert not any(n.target is aten.abs.default for n in gm.graph.nodes)
    (d,) = res.declines
    assert d.rule == "late" and d.anchor == "neg" and d.divergence.kind == "late"


def test_a_replacement_op_failing_on_the_inputs_declines():
    def bad(node):
        return fxopt.replace_call(node, aten.mm.default, (node.args[0], node.args[0]))

    gm = _chain(1)
    rep = fxopt.explain(gm, fxopt.NodeRule("bad", bad, anchors=[aten.neg.default]))["bad"]
    assert rep.matches == [] and rep.near_misses[0].divergence.kind == "replacement"
    assert "aten.mm.default fails on these inputs" in rep.near_misses[0].reason


def test_emit_general_form_provenance_only_users_and_unused_inputs():
    # relu(neg(neg(x))) -> abs-free rewrite of the relu: build relu(x) directly, erase the negs
    def fold(node):
        a = node.args[0]
        if getattr(a, "target", None) is not aten.neg.default:
            return fxopt.decline("not relu(neg(.))")
        inner = a.args[0]
        if getattr(inner, "target", None) is not aten.neg.default:
            return fxopt.decline("not relu(neg(neg(.)))")
        x = inner.args[0]
        return emit([node], lambda b: [b.call(aten.relu.default, x)], matched=[node], sources=[node, a, inner],
                    erase_unused_inputs=True, info={"x": x.name})

    gm = _chain(2)
    x = torch.randn(4)
    res = RewritePass("p", [fxopt.NodeRule("fold", fold, anchors=[aten.relu.default])])(gm)
    assert res.matches == 1 and res.rewrites[0].info == {"x": "args_0"}  # capture_function names inputs args_N
    assert sorted(res.rewrites[0].erased) == ["neg", "neg_1", "relu"]  # the negs went with it (unused inputs)
    (new,) = [n for n in gm.graph.nodes if PROVENANCE_KEY in n.meta]
    assert new.meta[PROVENANCE_KEY]["from"] == ["relu", "neg_1", "neg"] and new.meta[PROVENANCE_KEY]["rule"] == "fold"
    assert torch.equal(gm(x), torch.relu(x))


def test_only_users_moves_just_those_users():
    def f(x):
        n = torch.neg(x)
        return n + 1, n * 2

    gm = fxopt.capture_function(f, (torch.randn(3),))
    add = next(n for n in gm.graph.nodes if n.target is aten.add.Tensor)
    neg = add.args[0]

    def rule(node):
        if node is not neg:
            return None
        return emit([node], lambda b: [b.call(aten.mul.Tensor, node.args[0], -1.0)], matched=[node],
                    only_users={node: [add]})

    # one sweep: the neg stays (its other user), so a second sweep would fire again
    res = RewritePass("p", [fxopt.NodeRule("partial", rule, anchors=[aten.neg.default])], max_iterations=1)(gm)
    assert res.matches == 1
    assert add.args[0].target is aten.mul.Tensor  # moved
    assert any(n is neg for n in gm.graph.nodes)  # still used by the other user: not erased
    x = torch.randn(3)
    assert all(torch.equal(a, b) for a, b in zip(gm(x), f(x)))


def test_positions_stay_ordered_under_insertions():
    gm = _chain(2)
    g = gm.graph
    pos = Positions(g)
    anchor = next(n for n in g.nodes if n.target is aten.relu.default)
    inserted = []
    for _ in range(40):  # more than the gap allows: forces one renumbering
        with g.inserting_before(anchor):
            inserted.append(g.call_function(aten.abs.default, (anchor.args[0],)))
        assert pos[inserted[-1]] < pos[anchor]
    order = list(g.nodes)
    keys = [pos[n] for n in order]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


def test_erase_dead_bulk_and_small_paths_agree():
    for n in (3, 200):  # below and above the bulk threshold
        gm = _chain(n)
        relu = next(x for x in gm.graph.nodes if x.target is aten.relu.default)
        out = next(x for x in gm.graph.nodes if x.op == "output")
        first = next(x for x in gm.graph.nodes if x.target is aten.neg.default)
        out.replace_input_with(relu, first.args[0])
        erased = erase_dead(gm, [relu], upstream=True)
        assert len(erased) == n + 1
        gm.graph.lint()
        assert [x.op for x in gm.graph.nodes] == ["placeholder", "output"] or all(
            x.target is not aten.neg.default for x in gm.graph.nodes)


def test_snapshot_sees_additions_rewiring_removals_and_reordering():
    gm = _chain(2)
    snap = GraphSnapshot(gm)
    assert not snap.changes(gm)
    g = gm.graph
    relu = next(n for n in g.nodes if n.target is aten.relu.default)
    relu.meta["val"] = relu.meta["val"].clone()  # a new fake value object counts as a change
    ch = snap.changes(gm)
    assert ch.rewired == [relu] and not ch.added
    neg1 = next(n for n in g.nodes if n.name == "neg_1")
    with g.inserting_before(relu):
        extra = g.call_function(operator.neg, (neg1,))
    ch = snap.changes(gm)
    assert ch.added == [extra] and "1 node(s) added" in ch.summary()


def test_builder_constants_live_on_the_graph_module_and_roll_back():
    holder = torch.nn.Module()
    holder.w = torch.nn.Parameter(torch.randn(3, 4))
    w_before = holder.w.detach().clone()

    def hand_graph():
        g = torch.fx.Graph()
        x = g.placeholder("x")
        g.output(g.call_function(aten.linear.default, (x, g.get_attr("w"), None)))
        return torch.fx.GraphModule(holder, g)

    def prescale(node, ctx):
        x, w, bias = node.args
        doubled = (getattr(ctx.graph_module, w.target) * 2).detach()

        def build(b):
            return [b.call(aten.linear.default, x, b.constant(doubled, "doubled_weight"), bias)]
        return emit([node], build, matched=[node])

    gm = hand_graph()
    res = RewritePass("p", [fxopt.NodeRule("prescale", prescale, anchors=[aten.linear.default])],
                      max_iterations=1)(gm)
    assert res.matches == 1 and isinstance(gm.doubled_weight, torch.Tensor)
    xx = torch.randn(2, 4)
    torch.testing.assert_close(gm(xx), xx @ (holder.w * 2).T)
    assert torch.equal(holder.w, w_before) and not hasattr(holder, "doubled_weight")  # the model is untouched

    def declines_late(node):
        def build(b):
            b.constant(torch.ones(2), "scratch")
            raise Declined(Divergence("late", "no"))
        return emit([node], build, matched=[node])

    gm2 = hand_graph()
    RewritePass("p", [fxopt.NodeRule("late", declines_late, anchors=[aten.linear.default])])(gm2)
    assert not hasattr(gm2, "scratch") and not any(n.op == "get_attr" and n.target == "scratch"
                                                   for n in gm2.graph.nodes)
