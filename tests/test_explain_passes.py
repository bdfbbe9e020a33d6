"""fxopt.explain for every registered pass and rule (issue 11): on GPTNeoX and Mamba graphs it
reports exactly what the pass does (the same matches and stats, the graph untouched), and on
look-alikes the near miss and the reason the pass's own checks give, callable rules included."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.errors import FxoptError, UnknownPassError
from fxopt.models.hf import tiny_gpt_neox, tiny_hf_mamba
from fxopt.models.seed_mamba import seed_mamba
from fxopt.passes.scan import explain_scan
from fxopt.rewrite.explain import copy_graph_module

aten = torch.ops.aten
LIBRARY = ("addcmul", "cleanup", "residual_add", "scan")


def _ids(n=8):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def graphs():
    return {
        "gpt_neox": fxopt.capture(tiny_gpt_neox(True), (_ids(),)),
        "gpt_neox_serial": fxopt.capture(tiny_gpt_neox(False), (_ids(),)),
        "hf_mamba": fxopt.capture(tiny_hf_mamba(), (_ids(),)),
        "seed_mamba": fxopt.capture(seed_mamba(n_layer=2), (_ids(),)),
    }


def test_every_registered_pass_is_explained_exactly_as_it_runs(graphs):
    names = fxopt.available_passes()
    assert set(LIBRARY) <= set(names)
    for model, gm in graphs.items():
        for name in names:
            code, n_nodes = gm.code, len(gm.graph.nodes)
            rep = fxopt.explain(gm, name)
            assert gm.code == code and len(gm.graph.nodes) == n_nodes, (model, name)  # read-only
            res = fxopt.get_pass(name)(copy_graph_module(gm))
            assert rep.matches == res.matches and rep.stats == res.stats, (model, name, rep.stats, res.stats)
            # rule tables report every rule; a user's hand-written pass (other tests register some) its count
            assert [r.rule for r in rep.rules] == [r.name for r in getattr(fxopt.get_pass(name), "rules", [])]
            assert str(rep)  # renders


def test_model_level_numbers(graphs):
    assert fxopt.explain(graphs["gpt_neox"], "residual_add").matches == 2  # one tree per layer
    assert fxopt.explain(graphs["gpt_neox"], "addcmul")["add(c,mul(a,b))"].matches  # rotary
    assert fxopt.explain(graphs["hf_mamba"], "scan").matches == 2
    assert fxopt.explain(graphs["seed_mamba"], "scan").matches == 2
    neox_scan = fxopt.explain(graphs["gpt_neox"], "scan")["scan"]
    assert neox_scan.matches == [] and neox_scan.near_misses == [] and neox_scan.silent > 0


# ----------------------------------------------------------------------------- near misses


def test_residual_add_serial_gpt_neox_names_the_early_reader(graphs):
    r = fxopt.explain(graphs["gpt_neox_serial"], "residual_add")["residual_add.tree"]
    assert r.matches == []
    top = r.near_misses[0]
    assert top.divergence.kind == "single add" and top.module.startswith("gpt_neox.layers.")
    assert "also used by layer_norm" in top.reason and "runs before the root" in top.reason


class MixedAddcmul(nn.Module):
    """Look-alikes of c + a*b: type promotion (fp16 product, fp32 c), a scaling alpha."""

    def forward(self, a, b, c):
        return c + a * b, torch.add(c.half(), a * b, alpha=0.3)


def test_addcmul_lookalikes_and_gpt_neox(graphs):
    a, b, c = torch.randn(4).half(), torch.randn(4).half(), torch.randn(4)
    r = fxopt.explain(fxopt.capture(MixedAddcmul(), (a, b, c)), "addcmul")["add(c,mul(a,b))"]
    assert r.matches == []
    kinds = {nm.divergence.kind: nm.reason for nm in r.near_misses}
    assert "type promotion" in kinds["dtype"] and "float16" in kinds["dtype"] and "float32" in kinds["dtype"]
    assert "alpha=0.3" in kinds["alpha"]
    # on GPTNeoX the residual adds are near misses of the rotary rule: no product to fold
    neox = fxopt.explain(graphs["gpt_neox"], "addcmul")["add(c,mul(a,b))"]
    assert any(nm.divergence.kind == "no product" and nm.module for nm in neox.near_misses)


class RealCasts(nn.Module):
    def forward(self, x):
        a = x.to(torch.float16)
        return a.to(torch.float16, copy=True), a


def test_cleanup_lookalikes_and_mamba(graphs):
    r = fxopt.explain(fxopt.capture(RealCasts(), (torch.randn(3),)), "cleanup")
    reasons = [nm.reason for nm in r["to_same_dtype"].near_misses]
    assert any("a real cast" in x and "float16" in x for x in reasons)
    assert any("copy=True" in x for x in reasons)
    assert any("graph input" in nm.reason for nm in r["assert_on_computed_value"].near_misses)
    m = fxopt.explain(graphs["hf_mamba"], "cleanup")
    assert m["to_same_dtype"].matches and m["assert_on_computed_value"].matches
    assert m["dead_view"].near_misses[0].divergence.kind == "users"


B, L, D, N = 2, 7, 3, 4


def _scan_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.rand(B, L, D, N, generator=g), torch.randn(B, L, D, N, generator=g), torch.randn(B, L, N, generator=g))


class EscapingState(nn.Module):
    """A recurrence whose step-3 state is also read after the loop."""

    def forward(self, a, b, C):
        h = torch.zeros(B, D, N)
        ys, mid = [], None
        for t in range(a.shape[1]):
            h = a[:, t] * h + b[:, t]
            if t == 3:
                mid = h * 1.0
            ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
        return torch.stack(ys, 1) + mid.sum(-1)[:, None]


class ShortLoop(nn.Module):
    """Consecutive steps 0..4 over an axis of length 7: the pass refuses, because the op runs
    over the whole axis; the old explain_scan said nothing (it skipped that check)."""

    def forward(self, a, b, C):
        h = torch.zeros(B, D, N)
        ys = []
        for t in range(5):
            h = a[:, t] * h + b[:, t]
            ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
        return torch.stack(ys, 1)


def test_scan_lookalikes_report_the_pass_s_own_reasons():
    esc = fxopt.explain(fxopt.capture(EscapingState(), _scan_inputs()), "scan")["scan"]
    assert esc.matches == [] and "used outside the loop" in esc.near_misses[0].reason
    assert esc.near_misses[0].progress == L  # ranked by steps
    short_gm = fxopt.capture(ShortLoop(), _scan_inputs())
    short = explain_scan(short_gm)
    assert short and "runs 5 steps over an axis of length 7" in short[0].reason
    assert fxopt.get_pass("scan")(short_gm).matches == 0


# ----------------------------------------------------------------------------- checks applied


@fxopt.node_rule("to_double", anchors=[aten.mul.Tensor])
def _to_double(node):
    """A broken callable rule: its replacement would change the output dtype."""
    return fxopt.replace_call(node, aten._to_copy.default, (node.args[0],), {"dtype": torch.float64})


def test_the_replacement_checks_are_the_rewrite_s():
    gm = fxopt.capture_function(lambda x: x * 2.0 + 1, (torch.randn(3),))
    r = fxopt.explain(gm, _to_double)["to_double"]
    assert r.matches == []
    (nm,) = r.near_misses
    assert nm.divergence.kind == "dtype" and "from float32 to float64" in nm.reason
    assert fxopt.RewritePass("p", [_to_double])(gm).matches == 0


def test_names_rules_and_errors(graphs):
    gm = graphs["hf_mamba"]
    by_rule = fxopt.explain(gm, "dead_view")
    assert [r.rule for r in by_rule.rules] == ["dead_view"]
    assert by_rule["dead_view"].matches == fxopt.explain(gm, "cleanup")["dead_view"].matches  # run in its pass
    assert [r.rule for r in fxopt.explain(gm, "cleanup.to_same_dtype").rules] == ["to_same_dtype"]
    assert [r.rule for r in fxopt.explain(gm, "residual_add.tree").rules] == ["residual_add.tree"]  # a dotted name
    with pytest.raises(UnknownPassError, match="no pass or rule named 'nope'.*cleanup: assert_on_computed_value"):
        fxopt.explain(gm, "nope")

    class HandWritten(fxopt.Pass):
        name = "hand"

        def call(self, g):
            return fxopt.PassResult(g, False)

    hand = fxopt.explain(gm, HandWritten())
    assert hand.rules == [] and hand.matches == 0 and "hand-written, not a rule table" in str(hand)
    with pytest.raises(FxoptError, match="got int"):
        fxopt.explain(gm, 3)
