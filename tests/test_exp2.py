"""``exp2_fma`` (fxopt/codegen/exp2.py): the scan kernels' exp, on the FMA pipe.

The reference (PyTorch) against fp64 exhaustively over the ranges a scan visits, its special
values, and a Hypothesis property over all floats; the Triton copy (under the interpreter here)
against the reference. The Gluon copy is compiled in tests/test_scan_kernel.py and checked on the
GPU through the op's contract there."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import triton
import triton.language as tl

from fxopt.codegen.exp2 import exp2_fma, exp2_fma_ref


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
    """FXOPT_SCAN_EXP picks the GPU scan's exp (fxopt/config.py): fma by default, a clear error
    naming the variable for anything else."""
    from fxopt.config import get_config, scan_exp
    from fxopt.errors import FxoptError

    monkeypatch.delenv("FXOPT_SCAN_EXP", raising=False)
    assert scan_exp() == "fma" and get_config().scan_exp == "fma"
    monkeypatch.setenv("FXOPT_SCAN_EXP", " SFU ")
    assert scan_exp() == "sfu"
    monkeypatch.setenv("FXOPT_SCAN_EXP", "fast")
    with pytest.raises(FxoptError, match="FXOPT_SCAN_EXP='fast' must be one of fma, sfu"):
        scan_exp()
