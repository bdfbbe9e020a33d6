"""Math for region kernels under ``TRITON_INTERPRET=1``.

On the GPU the generated region kernels call CUDA's libdevice (``__nv_expf``, ``__nv_tanhf``,
``__nv_erff``, ``__nv_rsqrtf``, ``__nv_fdiv_rn``, ...), the same functions ATen's CUDA kernels
compile to. The interpreter cannot call libdevice, so the interpreted kernel calls these
stand-ins instead: plain Python functions that run on the interpreter's numpy arrays and
compute in float64 before rounding once to the operand's precision (fp32 results are then
correctly rounded but for double-rounding ties, i.e. within 1 ulp of CPU eager's own libm).

This module relies on the interpreter's tensor representation (``tensor.handle.data`` a numpy
array, ``TensorHandle(data, dtype)``); it is imported only by interpreted kernels.
"""
from __future__ import annotations

import numpy as np
import triton.language as tl
from triton.runtime.interpreter import TensorHandle


def _apply(fn, *xs):
    # the result has the broadcast shape of the operands: take its type from the largest
    ref = max(xs, key=lambda x: np.asarray(x.handle.data).size)
    dt = xs[0].handle.data.dtype
    with np.errstate(all="ignore"):
        data = fn(*[np.asarray(x.handle.data, dtype=np.float64) for x in xs]).astype(dt)
    return tl.core.tensor(TensorHandle(data, xs[0].handle.dtype.scalar), ref.type)


def _erf64(x):
    import math

    return np.vectorize(math.erf, otypes=[np.float64])(x) if x.size else x


def exp(x):
    return _apply(np.exp, x)


def tanh(x):
    return _apply(np.tanh, x)


def erf(x):
    return _apply(_erf64, x)


def rsqrt(x):
    return _apply(lambda v: 1.0 / np.sqrt(v), x)


def sqrt(x):
    # correctly rounded in the operand's own precision, like sqrt.rn
    dt = x.handle.data.dtype
    with np.errstate(all="ignore"):
        data = np.sqrt(x.handle.data.astype(dt))
    return tl.core.tensor(TensorHandle(data, x.handle.dtype.scalar), x.type)


def div(a, b):
    # IEEE division in the operands' own precision, like div.rn
    ref = a if np.asarray(a.handle.data).size >= np.asarray(b.handle.data).size else b
    dt = a.handle.data.dtype
    with np.errstate(all="ignore"):
        data = np.divide(np.asarray(a.handle.data, dtype=dt), np.asarray(b.handle.data, dtype=dt))
    return tl.core.tensor(TensorHandle(np.asarray(data, dtype=dt), a.handle.dtype.scalar), ref.type)


def fma(a, b, c):
    # exact product in float64 for fp32 operands, one rounding of the sum to fp32 (a double
    # rounding only on ties); for fp64 operands two roundings (the interpreter has no fma)
    return _apply(lambda x, y, z: x * y + z, a, b, c)
