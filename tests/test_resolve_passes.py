"""What optimize(passes=...) accepts (fxopt.registry.resolve_passes, issue 10 item 9): a name, a
Pass, a Rule / NodeRule / RuleSet (run as a pass of its own), or an iterable of those; anything
else is a clear FxoptError naming what it got and what it takes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxopt
from fxopt.errors import FxoptError, UnknownPassError
from fxopt.passes.scan import ScanPass
from fxopt.registry import DEFAULT_PASSES, resolve_passes

aten = torch.ops.aten


def _silu_rule():
    return fxopt.Rule("silu", lambda x: x * torch.sigmoid(x), lambda x: F.silu(x), (torch.randn(4),))


@fxopt.node_rule("neg_neg", anchors=[aten.neg.default])
def _negneg(node):
    inner = node.args[0]
    if getattr(inner, "target", None) is not aten.neg.default:
        return fxopt.decline("the operand is not a neg")
    return fxopt.replace(node, inner.args[0], matched=[node, inner])


def test_one_name_is_one_pass_not_letters():
    (p,) = resolve_passes("scan")
    assert isinstance(p, ScanPass)


def test_one_pass_object_is_used_as_is():
    p = fxopt.get_pass("scan")
    assert resolve_passes(p) == [p]


def test_defaults():
    assert [p.name for p in resolve_passes(None)] == list(DEFAULT_PASSES)


def test_a_bare_rule_becomes_a_pass_named_after_it():
    rule = _silu_rule()
    (p,) = resolve_passes(rule)
    assert isinstance(p, fxopt.RewritePass) and p.name == "silu" and list(p.rules) == [rule]
    (q,) = resolve_passes(_negneg)
    assert q.name == "neg_neg" and list(q.rules) == [_negneg]


def test_a_ruleset_becomes_one_pass():
    rs = _silu_rule() + _negneg
    (p,) = resolve_passes(rs)
    assert isinstance(p, fxopt.RewritePass) and [r.name for r in p.rules] == ["silu", "neg_neg"]
    assert p.name == "silu+neg_neg"
    assert resolve_passes(fxopt.RuleSet([_negneg], name="tidy"))[0].name == "tidy"


def test_mixed_iterables_in_order():
    rule = _silu_rule()
    scan = fxopt.get_pass("scan")
    got = resolve_passes(["cleanup", scan, rule, fxopt.RuleSet([_negneg])])
    assert [p.name for p in got] == ["cleanup", "scan", "silu", "neg_neg"]
    assert got[1] is scan
    assert [p.name for p in resolve_passes(n for n in ("scan", "addcmul"))] == ["scan", "addcmul"]  # a generator
    assert [p.name for p in resolve_passes(("residual_add",))] == ["residual_add"]


def test_optimize_runs_a_list_with_a_bare_rule():
    class M(torch.nn.Module):
        def forward(self, x):
            return -(-(x * torch.sigmoid(x)))

    x = torch.randn(3, 5)
    opt = fxopt.optimize(M(), (x,), passes=[_silu_rule(), _negneg])
    assert opt.report().matches == {"silu": 1, "neg_neg": 1}
    torch.testing.assert_close(opt(x), M()(x))


@pytest.mark.parametrize("bad,words", [
    (42, ["int", "42", "registered pass name"]),
    (3.5, ["float"]),
    (b"scan", ["bytes"]),
    ({"scan": True}, ["dict"]),
    (["scan", None], ["NoneType", "list"]),
    (["scan", ["addcmul"]], ["list holding list"]),
    ([object()], ["object"]),
    (ScanPass, ["class ScanPass", "ScanPass()"]),
    ([ScanPass], ["class ScanPass"]),
    (lambda gm: gm, ["function"]),
])
def test_anything_else_is_a_clear_fxopt_error(bad, words):
    with pytest.raises(FxoptError) as info:
        resolve_passes(bad)
    msg = str(info.value)
    assert all(w in msg for w in words), msg


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownPassError, match="no pass named 'sacn'.*scan"):
        resolve_passes(["sacn"])


def test_get_pass_forwards_options_and_names_bad_ones():
    p = fxopt.get_pass("scan", fold_selective=False)
    assert isinstance(p, ScanPass) and not p.fold_selective
    with pytest.raises(FxoptError, match="does not take the options \\['rank'\\]"):
        fxopt.get_pass("scan", rank=3)
