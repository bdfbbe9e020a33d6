"""``exp2_fma`` / ``exp2_mul`` (fxopt/codegen/exp2.py): the scan kernels' exp, on the FMA pipe.

The references (PyTorch) against fp64 exhaustively over the ranges a scan visits, their special
values, and Hypothesis properties over all floats; the Triton copy (under the interpreter here)
and the Gluon copy (on a GPU) against their references, the latter bit for bit. The Gluon kernel
that uses it is compiled in tests/test_scan_kernel.py and checked on the GPU through the op's
contract there."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import triton
import triton.language as tl

from fxopt.codegen.exp2 import exp2_fma, exp2_fma_ref, exp2_mul_ref


def _ulp_err(t: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """Signed error of ``got`` in ulps of the fp32 nearest to the exact 2^t (normal results only)."""
    exact = torch.exp2(t.double())
    ulp = torch.from_numpy(np.spacing(exact.float().numpy())).double()
    keep = (exact >= 2.0 ** -126) & (exact < 2.0 ** 127.5)
    return ((got.double() - exact) / ulp)[keep]


@pytest.mark.parametrize("lo, hi", [(-1e-3, 0.0), (-0.5, 0.5), (-2.0, 0.0), (-126.0, 127.0)])
def test_ref_within_one_ulp_and_unbiased(lo, hi):
    t = torch.linspace(lo, hi, 1_000_003, dtype=torch.float32)
    e = _ulp_err(t, exp2_fma_ref(t))
    assert e.numel() > 0.9 * t.numel()
    assert e.abs().max() <= 1.0, e.abs().max()
    # the bias a recurrence accumulates: a small fraction of an ulp (MUFU.EX2's is not)
    assert abs(e.mean()) <= 0.05, e.mean()


def test_ref_floats_near_one():
    """fp32 t in [-2^-10, 2^-10] (the arguments of decays close to 1, which a long recurrence
    multiplies most often), every 499th bit pattern (~4M values, all binades): within one ulp."""
    lo = torch.tensor(-(2.0 ** -10)).view(torch.int32).item()
    hi = torch.tensor(2.0 ** -10).view(torch.int32).item()
    pos = torch.arange(0, hi + 1, 499, dtype=torch.int32).view(torch.float32)
    neg = torch.arange(0x80000000 - 2**32, lo + 1, 499, dtype=torch.int64).to(torch.int32).view(torch.float32)
    t = torch.cat([neg, pos])
    assert (t.abs() <= 2.0 ** -10).all()
    e = _ulp_err(t, exp2_fma_ref(t))
    assert e.abs().max() <= 1.0


def test_ref_special_values():
    t = torch.tensor([float("nan"), float("-inf"), float("inf"), -0.0, 0.0, -127.0, -200.0, 128.0, 1e30, -1e30,
                      1.0, -1.0, 10.0, -126.0, 127.0, 1e-45])
    r = exp2_fma_ref(t)
    assert math.isnan(r[0])
    assert r[1] == 0 and r[2] == math.inf
    assert r[3] == 1 and r[4] == 1
    assert r[5] == 0 and r[6] == 0  # below 2^-126.5: flushed to zero, as ex2.approx.ftz does
    assert r[7] == math.inf and r[8] == math.inf and r[9] == 0
    assert r[10] == 2 and r[11] == 0.5 and r[12] == 1024  # exact at integers
    assert r[13] == 2.0 ** -126 and r[14] == 2.0 ** 127 and r[15] == 1


@settings(max_examples=300, deadline=None)
@given(st.floats(width=32, allow_nan=True, allow_infinity=True))
def test_ref_property_all_floats(x):
    t = torch.tensor([x], dtype=torch.float32)
    r = exp2_fma_ref(t)[0].item()
    exact = 2.0 ** x if not math.isnan(x) and x < 1024 else (math.nan if math.isnan(x) else math.inf)
    if math.isnan(x):
        assert math.isnan(r)
    elif x >= 128.0:
        assert r == math.inf
    elif x <= -127.0:
        assert r == 0.0
    elif exact < 2.0 ** -126:  # between flush-to-zero and the smallest normal: tiny, never negative
        assert 0.0 <= r <= 2.0 ** -126
    elif x >= 127.5:  # rounds up to k = 128: 2^f * inf
        assert r == math.inf
    else:
        ulp = float(np.spacing(np.float32(exact)))
        assert abs(r - exact) <= ulp, (x, r, exact)


@triton.jit
def _exp2_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    tl.store(y_ptr + o, exp2_fma(tl.load(x_ptr + o, mask=m)), mask=m)


def test_triton_copy_matches_ref():
    """The plain-Triton copy against the reference (on the GPU where there is one and the
    interpreter is off, else interpreted): within one ulp of it and of the exact value (the
    interpreter evaluates ``tl.fma`` in numpy, not always with one rounding: ~0.1 ulp more), with
    the same special values."""
    import os

    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    t = torch.cat([torch.linspace(-130.0, 130.0, 20011), torch.linspace(-1e-3, 1e-3, 2001),
                   torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0])])
    y = torch.empty_like(t, device=dev)
    _exp2_kernel[(triton.cdiv(t.numel(), 1024),)](t.to(dev), y, t.numel(), BLOCK=1024)
    y = y.cpu()
    r = exp2_fma_ref(t)
    assert torch.equal(y.isnan(), r.isnan())
    fin = ~r.isnan()
    close = (y[fin] == r[fin]) | ((y[fin].double() - r[fin].double()).abs()
                                  <= torch.from_numpy(np.spacing(r[fin].abs().numpy())).double())
    assert close.all()
    assert _ulp_err(t, y).abs().max() <= (1.25 if dev == "cpu" else 1.0)


def test_scan_exp_knob(monkeypatch):
    """FXOPT_SCAN_EXP picks the GPU scan's exp (fxopt/config.py): auto by default, a clear error
    naming the variable for anything else; auto resolves per GPU (sfu where calibrated: sm_90)."""
    from fxopt.codegen.scan_config import SFU_CALIBRATED, choose_gluon_config, resolve_exp
    from fxopt.config import get_config, scan_exp
    from fxopt.errors import CodegenError, FxoptError

    monkeypatch.delenv("FXOPT_SCAN_EXP", raising=False)
    assert scan_exp() == "auto" and get_config().scan_exp == "auto"
    monkeypatch.setenv("FXOPT_SCAN_EXP", " SFU ")
    assert scan_exp() == "sfu"
    monkeypatch.setenv("FXOPT_SCAN_EXP", "fast")
    with pytest.raises(FxoptError, match="FXOPT_SCAN_EXP='fast' must be one of auto, fma, sfu"):
        scan_exp()
    assert (9, 0) in SFU_CALIBRATED
    assert resolve_exp("auto", (9, 0)) == "sfu"
    assert resolve_exp("auto", (8, 0)) == "fma" and resolve_exp("auto", (10, 0)) == "fma"
    assert resolve_exp("fma", (9, 0)) == "fma" and resolve_exp("sfu", (8, 6)) == "sfu"
    assert choose_gluon_config(4, 5120, 2048, 16, 132, "sfu").exp == "sfu"
    with pytest.raises(CodegenError, match="resolved"):
        choose_gluon_config(4, 5120, 2048, 16, 132, "auto")


# ----------------------------------------------------------------------------------------------
# exp2_mul: 2^(x y) with one rounding of the product's reduction, 2^k from the SFU (the Gluon kernel)
# ----------------------------------------------------------------------------------------------
def _ulp_err_mul(x: torch.Tensor, y: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """Signed error of ``got`` in ulps of the fp32 nearest to the exact 2^(x y) (normal results)."""
    exact = torch.exp2(x.double() * y.double())
    ulp = torch.from_numpy(np.spacing(exact.float().numpy())).double()
    keep = (exact >= 2.0 ** -126) & (exact < 2.0 ** 127.5)
    return ((got.double() - exact) / ulp)[keep]


@pytest.mark.parametrize("dt_hi, a_sigma", [(0.01, 0.5), (0.3, 1.0), (3.0, 2.0), (50.0, 1.5)])
def test_mul_ref_within_one_ulp_of_the_exact_product_and_unbiased(dt_hi, a_sigma):
    """Scan-shaped arguments (x = delta > 0, y = A log2 e < 0): within 1.1 ulp of 2^(x y) of the
    exact product (1.06 the largest seen over 64M pairs: the rounding of f adds up to ln2 / 2 ulp
    in the worst case; rounding x y first, as ``exp2_fma(x * y)`` must, costs up to |x y| / 2 ulp)."""
    g = torch.Generator().manual_seed(int(dt_hi * 100))
    x = torch.rand(1_000_000, generator=g) * dt_hi
    y = (-torch.exp(torch.randn(1_000_000, generator=g) * a_sigma) * 1.4426950408889634).float()
    e = _ulp_err_mul(x, y, exp2_mul_ref(x, y))
    assert e.numel() > 0.5 * x.numel()
    assert e.abs().max() <= 1.1, e.abs().max()
    assert abs(e.mean()) <= 0.05, e.mean()


def test_mul_ref_equals_exp2_fma_ref_when_the_product_is_exact():
    """With y = 1 the two algorithms take the same steps: bit-equal over every argument class."""
    t = torch.cat([torch.linspace(-140.0, 140.0, 400_001), torch.linspace(-1e-3, 1e-3, 20_001),
                   torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 1e30, -1e30, -127.0, -126.5,
                                 127.5, 128.0, 5e6, -5e6, 1e-45])])
    a, b = exp2_mul_ref(t, 1.0), exp2_fma_ref(t)
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a[~a.isnan()], b[~b.isnan()])


def test_mul_ref_special_values():
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([nan, 1.0, 1.0, 0.0, 2.0, 1e20, 1e20, 3.0, 1.0, 1.0, -0.0, 1.0, 7.0, 1.0, 1.0,
                      153154658238464.0, 153154658238464.0])
    y = torch.tensor([1.0, -inf, inf, inf, nan, -1e20, 1e20, 2.0, -126.0, -127.0, 5.0, 127.0, -18.5, -126.75, 128.0,
                      -9.0, 9.0])
    r = exp2_mul_ref(x, y)
    assert math.isnan(r[0]) and r[1] == 0 and r[2] == inf and math.isnan(r[3]) and math.isnan(r[4])
    assert r[5] == 0 and r[6] == inf
    assert r[7] == 64 and r[8] == 2.0 ** -126 and r[10] == 1 and r[11] == 2.0 ** 127  # exact at integers
    # 2^k flushed below 2^-126 (ex2.approx.ftz), as the GPU does (7 * -18.5 = -129.5: k = -130)
    assert r[9] == 0 and r[12] == 0 and r[13] == 0
    assert r[14] == inf
    # |x y| ~ 2^50: f (the rounding error of k) ~ 1e8 and the polynomial overflows; min(p, 2) keeps
    # inf * 0 from making a NaN (found by the property below)
    assert r[15] == 0 and r[16] == inf
    # without the flush the powers below 2^-126 stay (subnormal), and results are never negative
    r2 = exp2_mul_ref(x, y, ftz=False)
    assert r2[9] == 2.0 ** -127 and 0 < r2[12] < 2.0 ** -126 and 0 < r2[13] < 2.0 ** -126


@settings(max_examples=1000, deadline=None)
@given(st.floats(width=32, allow_nan=True, allow_infinity=True), st.floats(width=32, allow_nan=True, allow_infinity=True))
def test_mul_ref_property_all_float_pairs(x, y):
    r = exp2_mul_ref(torch.tensor([x]), torch.tensor([y]))[0].item()
    with np.errstate(all="ignore"):
        prod = float(np.float64(x) * np.float64(y))
    if math.isnan(prod):
        assert math.isnan(r)
    elif prod >= 127.5:
        assert r == math.inf
    elif prod < -126.5:
        assert r == 0.0  # k <= -127: 2^k flushed
    else:
        exact = 2.0 ** prod
        if exact < 2.0 ** -126:  # k = -126 and 2^f < 1: a subnormal product, never negative
            assert 0.0 <= r <= 2.0 ** -126
        else:
            ulp = float(np.spacing(np.float32(exact)))
            assert abs(r - exact) <= 1.1 * ulp, (x, y, r, exact)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI is CPU-only; run on the device tool)")
def test_gluon_copy_is_bit_equal_to_ref():
    """``exp2_mul_gluon`` on the GPU against ``exp2_mul_ref``, bit for bit: checks that the SFU's
    exp2 is exact at integers and flushes below 2^-126, and that the GPU's min returns the
    number next to a NaN, which the reference assumes."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    from fxopt.codegen.exp2 import exp2_mul_gluon

    @gluon.jit
    def _kernel(x_ptr, y_ptr, o_ptr, n, BLOCK: gl.constexpr):
        lay: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        o = gl.program_id(0) * BLOCK + gl.arange(0, BLOCK, layout=lay)
        m = o < n
        gl.store(o_ptr + o, exp2_mul_gluon(gl.load(x_ptr + o, mask=m), gl.load(y_ptr + o, mask=m)), mask=m)

    g = torch.Generator().manual_seed(0)
    big = 153154658238464.0
    x = torch.cat([torch.rand(1_000_000, generator=g) * 3, torch.linspace(-140.0, 140.0, 560_001),
                   torch.tensor([float("nan"), 1.0, 1.0, 0.0, 2.0, 1e20, 1e20, -0.0, 7.0, big, big])])
    y = torch.cat([-torch.exp(torch.randn(1_000_000, generator=g)) * 1.4426950408889634, torch.ones(560_001),
                   torch.tensor([1.0, -float("inf"), float("inf"), float("inf"), float("nan"), -1e20, 1e20, 5.0, -18.5,
                                 -9.0, 9.0])])
    xd, yd = x.float().cuda(), y.float().cuda()
    out = torch.empty_like(xd)
    _kernel[(triton.cdiv(x.numel(), 512),)](xd, yd, out, x.numel(), BLOCK=512, num_warps=4)
    ref = exp2_mul_ref(x.float(), y.float())
    out = out.cpu()
    assert torch.equal(out.isnan(), ref.isnan())
    bad = (out != ref) & ~ref.isnan()
    assert not bad.any(), (x[bad][:8], y[bad][:8], out[bad][:8], ref[bad][:8])
