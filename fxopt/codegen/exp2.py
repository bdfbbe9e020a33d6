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

:func:`exp2_fma` (plain Triton: the interpreter and pre-sm_80 kernels) is tested against
:func:`exp2_fma_ref` (PyTorch), itself tested against fp64 (tests/test_exp2.py).

Coefficients of ``q`` (fp32, relative-minimax fit of ``(2^f - 1) / f`` on [-1/2, 1/2]).

``2^(x y)`` for the Gluon kernel (:func:`exp2_mul_gluon`, beside :func:`exp2_mul_ref`), every
exp the scan takes being of a product (``delta * A log2 e``, ``-z log2 e``): the same polynomial
(a second copy of it: a Gluon kernel cannot call a Triton function) in 12 instructions instead of 14 plus the product's multiply, within 1.06 ulp of 2^(x y) of the
exact product (64M scan-shaped pairs; ``exp2_fma`` of the rounded product is off by up to
``|x y| / 2`` ulp more), mean +0.03 ulp::

    j = fma(x, y, 1.5 * 2^23)   # k = round(x y) of the exact product, one rounding
    k = j - 1.5 * 2^23
    f = fma(x, y, -k)           # x y - k, one rounding (no rounding of x y first: more accurate)
    p = min(1 + f q(f), 2)      # see below
    2^(x y) = p * ex2(k)        # MUFU.EX2 at an integer is exact (2^k), flushes k <= -127 to
                                # zero and gives inf from k = 128: no clamp of the argument

For |x y| < 2^22, f is in [-1/2, 1/2] and p in [0.70, 1.42]: the ``min`` changes nothing. Beyond,
2^k is 0 or inf and only p's sign matters, but f (the rounding error of a huge k) can be large:
the polynomial is positive on the whole real line (its minimum is 0.147, at f = -3.17) and may
overflow to +inf, and a NaN f comes from x y = +-inf; ``min(p, 2)`` maps both to 2, so the
product is 0, inf or (x y NaN) NaN, never inf * 0. That ``min`` relies on the GPU's ``min.f32``
returning the number next to a NaN; the Triton interpreter's ``minimum`` propagates NaN, so the
plain-Triton kernels (which the interpreter runs) keep :func:`exp2_fma`.
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


def exp2_mul_ref(x: Tensor, y: Tensor | float, ftz: bool = True) -> Tensor:
    """``2^(x y)`` as :func:`exp2_mul_gluon` computes it (fp32 inputs; fp64 holds every fp32
    product exactly, so each FMA is emulated with one rounding). ``ftz=False``: ``ex2(k)`` keeps
    subnormal powers (2^-149 .. 2^-127), as a non-flushing exp2 would."""
    x = x.float()
    y = torch.as_tensor(y, dtype=torch.float32)
    prod = x.double() * y.double()  # exact
    small = prod.abs() < 2.0 ** 22
    # j = RN(prod + 1.5 * 2^23): for |prod| < 2^22 that is round-half-even(prod) + 1.5 * 2^23 exactly
    j = torch.where(small, torch.round(prod) + 12582912.0, prod + 12582912.0).float()
    k = j - 12582912.0
    f = (prod - k.double()).float()
    p = torch.full_like(f, _Q[5])
    for c in _Q[4::-1] + (1.0,):
        p = _fma(p, f, c)
    p = torch.fmin(p, torch.tensor(2.0))
    s = torch.exp2(k)
    if ftz:
        s = torch.where(k < -126.0, torch.zeros_like(s), s)
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
def exp2_mul_gluon(x, y):
    """2^(x y) (fp32) in 12 instructions, 1 of them on the SFU (exact there); see the module docstring."""
    j = gl.fma(x, y, ROUND)
    k = j - ROUND
    f = gl.fma(x, y, k * -1.0)  # (`-k` would be `0 - k`: an FADD)
    p = gl.fma(f, Q5, Q4)
    p = gl.fma(p, f, Q3)
    p = gl.fma(p, f, Q2)
    p = gl.fma(p, f, Q1)
    p = gl.fma(p, f, Q0)
    p = gl.minimum(gl.fma(p, f, 1.0), 2.0)
    return p * gl.exp2(k)
