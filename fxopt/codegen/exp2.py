"""``2^t`` in fp32 on the FMA pipe, within one ulp and without bias, beside its ``_ref``.

Why not the GPU's ``exp2`` (one MUFU.EX2 on the special-function unit): its error is ~2 ulp and,
worse for a recurrence, not centred: the scan multiplies ``h`` by ``exp(delta A)`` at every step,
so a per-step bias adds up linearly along the sequence where unbiased rounding errors add up as a
square root. Measured on the H100 (benchmarks/scan_numerics.py) the MUFU kernel's error against an
fp64 loop reached 5.7x the eager loop's (which uses CUDA's accurate ``expf``); the contract of
``fxopt::selective_scan`` allows 2x.

The algorithm (``t`` already clamped, see below)::

    j = t + 1.5 * 2^23        # round to nearest integer: j's low mantissa bits hold k = round(t)
    k = j - 1.5 * 2^23
    f = t - k                 # exact, f in [-1/2, 1/2]
    p = 1 + f q(f)            # 2^f, q of degree 5 (fitted below: 2e-9 relative in exact arithmetic)
    s = bits((k + 127) << 23) # 2^k built from j's bits:  (bits(j) << 23) + bits(1.0)
    2^t = p * s

Error (fp32 Horner with FMAs, every f in [-1/2, 1/2] on a 2M grid): max 0.93 ulp, mean +0.017 ulp
(correct rounding: max 0.5, mean 0). Cost: ~11 FMA-pipe and 3 ALU instructions instead of one
MUFU (whose pipe runs at 1/8 of the FMA rate).

Special values, by the clamp ``t in [-127, 128]`` (NaN-propagating): ``k = -127`` gives
``s = +0.0`` (so ``t <= -126.5`` flushes to zero, as ``ex2.approx.ftz`` does), ``k = 128`` gives
``s = +inf``; NaN stays NaN (``NaN * s``).

Two copies of the same arithmetic: :func:`exp2_fma` (plain Triton) and :func:`exp2_fma_gluon`
(a Gluon kernel cannot call a Triton function); :func:`exp2_fma_ref` (PyTorch) is what both are
tested against, and is itself tested against fp64 (tests/test_exp2.py).

Coefficients of ``q`` (fp32, relative-minimax fit of ``(2^f - 1) / f`` on [-1/2, 1/2]).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

Q0 = tl.constexpr(0.6931471824645996)
Q1 = tl.constexpr(0.24022647738456726)
Q2 = tl.constexpr(0.055503323674201965)
Q3 = tl.constexpr(0.00961843691766262)
Q4 = tl.constexpr(0.0013398875016719103)
Q5 = tl.constexpr(0.00015353361959569156)
ROUND = tl.constexpr(12582912.0)  # 1.5 * 2^23
ONE_BITS = tl.constexpr(0x3F800000)
LO = tl.constexpr(-127.0)
HI = tl.constexpr(128.0)

_Q = (0.6931471824645996, 0.24022647738456726, 0.055503323674201965, 0.00961843691766262,
      0.0013398875016719103, 0.00015353361959569156)


def exp2_fma_ref(t: Tensor) -> Tensor:
    """The kernels' arithmetic in PyTorch (fp32; ``torch.addcmul`` stands for the FMA)."""
    t = t.float().clamp(-127.0, 128.0)  # clamp keeps NaN
    j = t + 12582912.0
    k = j - 12582912.0
    f = t - k
    p = torch.full_like(f, _Q[5])
    for c in _Q[4::-1] + (1.0,):
        p = _fma(p, f, c)
    s = ((j.view(torch.int32) << 23) + 0x3F800000).view(torch.float32)
    return p * s


def _fma(a: Tensor, b: Tensor, c: float) -> Tensor:
    # one rounding, like the hardware FMA (fp64 holds the fp32 product exactly)
    return (a.double() * b.double() + c).float()


@triton.jit
def exp2_fma(t):
    """2^t (fp32) on the FMA pipe; see the module docstring."""
    t = tl.minimum(tl.maximum(t, LO, propagate_nan=tl.PropagateNan.ALL), HI, propagate_nan=tl.PropagateNan.ALL)
    j = t + ROUND
    k = j - ROUND
    f = t - k
    p = tl.fma(f, Q5, Q4)
    p = tl.fma(p, f, Q3)
    p = tl.fma(p, f, Q2)
    p = tl.fma(p, f, Q1)
    p = tl.fma(p, f, Q0)
    p = tl.fma(p, f, 1.0)
    s = ((j.to(tl.int32, bitcast=True) << 23) + ONE_BITS).to(tl.float32, bitcast=True)
    return p * s


@gluon.jit
def exp2_fma_gluon(t):
    """2^t (fp32) on the FMA pipe; the same arithmetic as :func:`exp2_fma`."""
    t = gl.minimum(gl.maximum(t, LO, propagate_nan=tl.PropagateNan.ALL), HI, propagate_nan=tl.PropagateNan.ALL)
    j = t + ROUND
    k = j - ROUND
    f = t - k
    p = gl.fma(f, Q5, Q4)
    p = gl.fma(p, f, Q3)
    p = gl.fma(p, f, Q2)
    p = gl.fma(p, f, Q1)
    p = gl.fma(p, f, Q0)
    p = gl.fma(p, f, 1.0)
    s = ((j.to(gl.int32, bitcast=True) << 23) + ONE_BITS).to(gl.float32, bitcast=True)
    return p * s
