"""The scan pass on spellings of the recurrence it has not been written for one by one, and on
look-alikes it must leave alone."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fxopt.passes.scan import ScanPass, explain_scan

L, B, D, N = 7, 2, 5, 3


def _export(mod, args):
    return torch.export.export(mod, args, strict=False).module()


def _run(mod, args, expect, op=None):
    gm = _export(mod, args)
    ref = mod(*args)
    p = ScanPass()
    res = p(gm)
    assert res.matches == expect, (p.last_rejections, p.last_matches)
    if op is not None:
        assert any(m["op"] == op for m in p.last_matches), p.last_matches
    out = gm(*args)
    for r, o in zip(torch.utils._pytree.tree_leaves(ref), torch.utils._pytree.tree_leaves(out)):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    if expect == 0:
        names = {str(n.target) for n in gm.graph.nodes}
        assert not any("scan" in n for n in names)
    return p, gm


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(B, L, D, N, generator=g) * 0.9
    b = torch.randn(B, L, D, N, generator=g)
    C = torch.randn(B, L, N, generator=g)
    return a, b, C


class AddcmulLoop(nn.Module):
    def forward(self, a, b, C):
        h = torch.zeros(B, D, N)
        ys = []
        for t in range(a.shape[1]):
            h = torch.addcmul(b[:, t], a[:, t], h)
            ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
        return torch.stack(ys, 1)


class UnbindZipLoop(nn.Module):
    def forward(self, a, b, C):
        h = torch.zeros(B, D, N)
        ys = []
        for at, bt, ct in zip(a.unbind(1), b.unbind(1), C.unbind(1)):
            h = bt + h * at
            ys.append((h * ct[:, None, :]).sum(-1))
        return torch.stack(ys, dim=-1)


class StatesStackedLoop(nn.Module):
    def forward(self, a, b, C):
        h = torch.zeros(B, D, N)
        hs = []
        for t in range(a.shape[1]):
            h = a[:, t] * h + b[:, t]
            hs.append(h)
        H = torch.stack(hs, 1)  # b l d n
        return torch.einsum("bldn,bln->bld", H, C)


class MatmulReadoutH0(nn.Module):
    def forward(self, a, b, C, h0):
        h = h0
        ys = []
        for t in range(a.shape[1]):
            h = a[:, t] * h + b[:, t]
            ys.append(torch.matmul(h, C[:, t].unsqueeze(-1)).squeeze(-1))
        return torch.stack(ys, 1), h


class BmmReadoutCast(nn.Module):
    def forward(self, a, b, C):
        h = torch.zeros(B, D, N)
        ys = []
        for t in range(a.shape[1]):
            h = a[:, t] * h + b[:, t]
            ys.append(torch.bmm(h.to(torch.float64), C[:, t, :, None].double())[..., 0])
        return torch.stack(ys, 1)


class SliceSpelling(nn.Module):
    def forward(self, a, b, C):
        h = torch.zeros(B, D, N)
        ys = []
        for t in range(a.shape[1]):
            h = a[:, t:t + 1].squeeze(1) * h + b[:, t:t + 1].squeeze(1)
            ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
        return torch.stack(ys, 1)


class FinalStateOnly(nn.Module):
    def forward(self, a, b, C):
        h = torch.zeros(B, D, N)
        for t in range(a.shape[1]):
            h = a[:, t] * h + b[:, t]
        return h * 2


class SelectiveSpelled(nn.Module):
    """Mamba's discretisation written with broadcasting instead of einsum, time on axis 2."""

    def forward(self, u, delta, A, Bm, Cm, Dv):  # u, delta: b d l; A: d n; Bm, Cm: b n l
        dA = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # b d l n
        dBu = delta.unsqueeze(-1) * Bm.transpose(1, 2)[:, None] * u.unsqueeze(-1)
        h = torch.zeros(u.shape[0], u.shape[1], A.shape[1])
        ys = []
        for t in range(u.shape[2]):
            h = dA[:, :, t] * h + dBu[:, :, t]
            ys.append((h * Cm[:, :, t][:, None, :]).sum(-1))
        return torch.stack(ys, -1) + u * Dv[:, None]


@pytest.mark.parametrize("mod", [AddcmulLoop(), UnbindZipLoop(), StatesStackedLoop(), BmmReadoutCast(), SliceSpelling(), FinalStateOnly()],
                         ids=lambda m: type(m).__name__)
def test_spellings_match(mod):
    _run(mod, _inputs(), 1, "linear_scan")


def test_matmul_readout_with_h0_and_final_state():
    a, b, C = _inputs()
    h0 = torch.randn(B, D, N)
    p, gm = _run(MatmulReadoutH0(), (a, b, C, h0), 1, "linear_scan")


def test_selective_form_folds_prologue_and_D():
    g = torch.Generator().manual_seed(1)
    u, delta = torch.randn(B, D, L, generator=g), torch.rand(B, D, L, generator=g)
    A = -torch.rand(D, N, generator=g)
    Bm, Cm, Dv = torch.randn(B, N, L, generator=g), torch.randn(B, N, L, generator=g), torch.randn(D, generator=g)
    p, gm = _run(SelectiveSpelled(), (u, delta, A, Bm, Cm, Dv), 1, "selective_scan")
    assert p.last_matches[0]["folded"], p.last_matches


# ---------------------------------------------------------------------------------------------
# look-alikes
# ---------------------------------------------------------------------------------------------
class Nonlinear(nn.Module):
    def forward(self, a, b, C):
        h = torch.zeros(B, D, N)
        ys = []
        for t in range(a.shape[1]):
            h = torch.tanh(a[:, t] * h + b[:, t])
            ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
        return torch.stack(ys, 1)


class Reordered(nn.Module):
    def forward(self, a, b, C):
        h = torch.zeros(B, D, N)
        ys = []
        for t in [0, 2, 1, 3, 4, 5, 6]:
            h = a[:, t] * h + b[:, t]
            ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
        return torch.stack(ys, 1)


class Skipping(nn.Module):
    def forward(self, a, b, C):
        h = torch.zeros(B, D, N)
        ys = []
        for t in range(0, a.shape[1], 2):
            h = a[:, t] * h + b[:, t]
            ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
        return torch.stack(ys, 1)


class MixedSources(nn.Module):
    def forward(self, a, b, C):
        a2 = a * 0.5
        h = torch.zeros(B, D, N)
        ys = []
        for t in range(a.shape[1]):
            at = a2[:, t] if t == 3 else a[:, t]
            h = at * h + b[:, t]
            ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
        return torch.stack(ys, 1)


class EscapingState(nn.Module):
    def forward(self, a, b, C):
        h = torch.zeros(B, D, N)
        ys = []
        mid = None
        for t in range(a.shape[1]):
            h = a[:, t] * h + b[:, t]
            if t == 3:
                mid = h * 1.0
            ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
        return torch.stack(ys, 1), mid


class WrongCIndex(nn.Module):
    def forward(self, a, b, C):
        h = torch.zeros(B, D, N)
        ys = []
        for t in range(a.shape[1]):
            h = a[:, t] * h + b[:, t]
            ys.append(torch.einsum("bdn,bn->bd", h, C[:, (t + 1) % a.shape[1]]))
        return torch.stack(ys, 1)


class NonlinearReadout(nn.Module):
    def forward(self, a, b, C):
        h = torch.zeros(B, D, N)
        ys = []
        for t in range(a.shape[1]):
            h = a[:, t] * h + b[:, t]
            ys.append(torch.einsum("bdn,bn->bd", h * h, C[:, t]))
        return torch.stack(ys, 1)


@pytest.mark.parametrize("mod", [Nonlinear(), Reordered(), Skipping(), MixedSources(), EscapingState(), WrongCIndex(), NonlinearReadout()],
                         ids=lambda m: type(m).__name__)
def test_lookalikes_untouched(mod):
    gm_before = _export(mod, _inputs())
    p, gm = _run(mod, _inputs(), 0)
    assert len(gm.graph.nodes) == len(gm_before.graph.nodes)


@pytest.mark.parametrize("mod", [Reordered(), MixedSources(), EscapingState(), WrongCIndex()], ids=lambda m: type(m).__name__)
def test_explain_says_why(mod):
    gm = _export(mod, _inputs())
    reasons = explain_scan(gm)
    assert reasons, "explain_scan found no candidate"
    assert all(r.reason for r in reasons)
    p = ScanPass()
    p(gm)
    assert p.last_rejections



def test_fxopt_explain_by_pass_name_reports_scan_rejections():
    """The public entry point: fxopt.explain(gm, "scan") gives the scan pass's own report."""
    import fxopt

    gm = _export(Reordered(), _inputs())
    report = fxopt.explain(gm, "scan")
    text = str(report)
    assert not report.matched
    assert "rejected" in text and "furthest first" in text
    assert str(explain_scan(gm)[0]) in text
    assert fxopt.explain(_export(AddcmulLoop(), _inputs()), "scan").matched
