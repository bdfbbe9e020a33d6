"""fxopt.explain: ranked near misses and divergence reasons (fxopt.explain)."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.capture import capture
from fxopt.rewrite import ExplainReport, explain
from fxopt.rewrite import Rule, RewritePass

aten = torch.ops.aten


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def cap(fn, *args):
    return capture(Fn(fn), args)


def silu_rule(**kw):
    return Rule("silu", lambda x: x * torch.sigmoid(x), lambda x: F.silu(x), (torch.randn(4),), **kw)


def _lookalikes(x, y):
    a = x * torch.sigmoid(y)  # binding: 3/3 reached
    s = torch.sigmoid(x)
    b = x * s + s  # users: sigmoid has another user
    c = x * torch.tanh(x)  # op
    d = x * 2.0  # literal where a node was expected
    return a + b + c + d


def test_no_candidates_says_so():
    gm = cap(lambda x: x + 1, torch.randn(3))
    rep = explain(gm, silu_rule())
    assert isinstance(rep, ExplainReport) and not rep.matched
    text = str(rep)
    assert "no candidates: the graph has no aten.mul.Tensor" in text
    assert rep["silu"].candidates == 0


def test_no_candidates_points_at_another_overload():
    # a hand-made graph with aten.mul.Scalar only: the pattern's aten.mul.Tensor is absent
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(aten.mul.Scalar, (x, 2.0)))
    gm = fx.GraphModule(torch.nn.Module(), g)
    text = str(explain(gm, Rule("x2", lambda x: x * 2.0, lambda x: x + x, (torch.randn(2),))))
    assert "no aten.mul.Tensor" in text and "aten.mul.Scalar x1" in text and "another IR" in text


def test_ranking_and_divergence_reasons():
    gm = cap(_lookalikes, torch.randn(3), torch.randn(3))
    code = gm.code
    rep = explain(gm, silu_rule(), top=10)
    assert gm.code == code  # read-only
    r = rep["silu"]
    assert r.candidates == 4 and r.matches == []
    kinds = [nm.divergence.kind for nm in r.near_misses]
    # the binding conflict got furthest (all 3 pattern nodes reached), then the rest
    assert kinds[0] == "binding"
    assert r.near_misses[0].progress == r.near_misses[0].total == 3
    assert all(a.progress >= b.progress for a, b in zip(r.near_misses, r.near_misses[1:]))
    assert sorted(kinds) == ["binding", "literal", "op", "users"]
    by_kind = {nm.divergence.kind: nm for nm in r.near_misses}
    op = by_kind["op"].divergence
    assert op.pattern_op == "aten.sigmoid.default" and op.graph_op == "aten.tanh.default"
    assert "2 users" in str(by_kind["users"].divergence)
    assert "literal 2.0" in str(by_kind["literal"].divergence)
    text = str(rep)
    assert "near misses" in text and "reached 3/3" in text and "[users]" in text


def test_literal_and_dtype_divergences():
    rule = Rule("x3", lambda x: x * 3.0, lambda x: x + x + x, (torch.randn(2),))
    text = str(explain(cap(lambda x: x * 2.0, torch.randn(2)), rule))
    assert "literal 3.0 in the pattern, 2.0 in the graph" in text
    # dtype: a rule restricted to its example dtype
    text = str(explain(cap(lambda x: x * torch.sigmoid(x), torch.randn(2).half()), silu_rule(match_dtypes=True)))
    assert "[dtype]" in text and "float16 vs pattern float32" in text
    # dtype: a replacement that would change the output dtype
    bad = Rule("up", lambda x: x * 2.0, lambda x: (x * 2.0).float(), (torch.randn(2),))
    text = str(explain(cap(lambda x: x * 2.0, torch.randn(2).half()), bad))
    assert "[dtype]" in text and "from float16 to float32" in text


def test_extra_check_rejection_is_reported():
    rule = silu_rule(extra_check=lambda m: False)
    rep = explain(cap(lambda x: x * torch.sigmoid(x), torch.randn(2)), rule)
    (nm,) = rep["silu"].near_misses
    assert nm.divergence.kind == "extra_check" and nm.progress == nm.total


def test_matches_are_listed_and_ruleset_explained_per_rule():
    gm = cap(lambda x: x * torch.sigmoid(x) + x * 2.0, torch.randn(2))
    rs = silu_rule() + Rule("gelu", lambda x: F.gelu(x), lambda x: F.gelu(x), (torch.randn(2),))
    rep = explain(gm, rs)
    assert rep.matched
    assert rep["silu"].matches == ["mul"]
    assert "no aten.gelu.default" in str(rep["gelu"])
    # a RewritePass works as well, and explain agrees with what the pass then does
    p = RewritePass("p", rs)
    assert [r.rule for r in explain(gm, p).rules] == ["silu", "gelu"]
    assert p(gm).matches == 1


def test_near_misses_name_the_module():
    class Block(torch.nn.Module):
        def forward(self, x):
            return x * torch.tanh(x)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    gm = capture(M(), (torch.randn(3),))
    text = str(explain(gm, silu_rule()))
    assert "in blocks.0" in text and "in blocks.1" in text
