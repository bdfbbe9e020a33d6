"""Triton kernels for the single-step Mamba ops (:mod:`fxopt.ops.ssm_update`), beside their refs.

Glossary: ``b`` batch, ``d`` channels (intermediate size), ``s`` state size, ``k`` conv width.

``selective_state_update``: one program per (block of ``BD`` channels, batch row) holds the
``(BD, SP)`` state tile in registers (``SP`` = s rounded up to a power of two): one read and one
write of the state, the softplus / discretisation / readout / ``D`` skip / ``silu(z)`` gate on
the tile. Arithmetic in fp32; every intermediate the reference rounds to a narrower dtype
(``dt`` after the bias add and the softplus in the model's dtype, the state cast to ``C``'s dtype
for the readout, the ``x D`` product, the sums) is rounded to that dtype here too, so 16-bit
models see the reference's roundings. ``exp`` is :func:`fxopt.codegen.exp2.exp2_fma` (FMA pipe,
unbiased: the decode recurrence multiplies the state by ``exp(dt A)`` at every token, as the scan
does along the sequence).

``conv_state_update``: one program per (block of channels, batch row): shift the ``(BD, KP)``
window by one, append ``x``, store it, dot with the weights, add the bias, silu.

Host side: a call builds a key of what Triton specialises on (shapes, strides, dtypes, flags),
finds the compiled kernel with its launch arguments, and launches it directly
(:func:`fxopt.codegen.launch.run_compiled`): nothing per call depends only on the
specialisation. Under ``TRITON_INTERPRET=1`` (the CPU tests) every call goes through the JIT.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .ssm_update_ref import conv_state_update_ref, selective_state_update_ref  # noqa: F401  (the references)
from .exp2 import exp2_fma
from .launch import compiled_kernel, run_compiled

selective_state_update_triton_ref = selective_state_update_ref
conv_state_update_triton_ref = conv_state_update_ref

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _exp(x):
    return exp2_fma(x * LOG2E)


@triton.jit
def _rnd(x, DT: tl.constexpr):
    """Round fp32 ``x`` to ``DT`` (nearest, ties to even) and back: what storing an intermediate
    in DT does. bf16 by bit arithmetic: the interpreter's fp32 -> bf16 conversion truncates."""
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    elif DT == tl.float32:
        return x
    else:
        return x.to(DT).to(tl.float32)


@triton.jit
def _silu(x):
    return x / (1.0 + _exp(-x))


@triton.jit
def _softplus(x):
    # torch: x if x > 20 else log1p(exp(x)); log1p(e) = log(1 + e) * e / ((1 + e) - 1), exact for tiny e
    e = _exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    lp = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    D_, S_,
    s_hb, s_hd, s_hs,
    s_xb, s_xd, s_tb, s_td, s_zb, s_zd,
    s_ad, s_as, s_bb, s_bs, s_cb, s_cs,
    s_Dd, s_biasd, s_ob, s_od,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, A_IS_LOG: tl.constexpr,
    R_DT: tl.constexpr, R_C: tl.constexpr, R_XD: tl.constexpr, R_SUM: tl.constexpr, R_Z: tl.constexpr,
    R_MUL: tl.constexpr, R_STATE: tl.constexpr, R_OUT: tl.constexpr,
    BD: tl.constexpr, SP: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_s = tl.arange(0, SP)
    md = offs_d < D_
    ms = offs_s < S_
    m2 = md[:, None] & ms[None, :]
    x = tl.load(x_ptr + b * s_xb + offs_d * s_xd, mask=md, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * s_tb + offs_d * s_td, mask=md, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = _rnd(tl.load(bias_ptr + offs_d * s_biasd, mask=md, other=0.0).to(tl.float32), R_DT)
        dt = _rnd(dt + bias, R_DT)
    if SOFTPLUS:
        dt = _rnd(_softplus(dt), R_DT)
    A = tl.load(A_ptr + offs_d[:, None] * s_ad + offs_s[None, :] * s_as, mask=m2, other=0.0).to(tl.float32)
    if A_IS_LOG:
        A = -_exp(A)
    Bv = tl.load(B_ptr + b * s_bb + offs_s * s_bs, mask=ms, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_cb + offs_s * s_cs, mask=ms, other=0.0).to(tl.float32)
    hp = state_ptr + b * s_hb + offs_d[:, None] * s_hd + offs_s[None, :] * s_hs
    h = tl.load(hp, mask=m2, other=0.0).to(tl.float32)
    dA = _exp(dt[:, None] * A)
    dBx = (dt[:, None] * Bv[None, :]) * x[:, None]
    h = h * dA + dBx
    tl.store(hp, _rnd(h, R_STATE).to(R_STATE), mask=m2)
    y = tl.sum(_rnd(h, R_C) * Cv[None, :], axis=1)
    y = _rnd(y, R_C)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d * s_Dd, mask=md, other=0.0).to(tl.float32)
        y = _rnd(y + _rnd(x * Dv, R_XD), R_SUM)
    if HAS_Z:
        z = tl.load(z_ptr + b * s_zb + offs_d * s_zd, mask=md, other=0.0).to(tl.float32)
        y = _rnd(y * _rnd(_silu(z), R_Z), R_MUL)
    tl.store(out_ptr + b * s_ob + offs_d * s_od, _rnd(y, R_OUT).to(R_OUT), mask=md)


@triton.jit
def _conv_update_kernel(
    state_ptr, x_ptr, w_ptr, bias_ptr, out_ptr,
    D_, K_,
    s_hb, s_hd, s_hk, s_xb, s_xd, s_wd, s_wk, s_biasd, s_ob, s_od,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, R_W: tl.constexpr, R_S: tl.constexpr, R_OUT: tl.constexpr,
    BD: tl.constexpr, KP: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_k = tl.arange(0, KP)
    md = offs_d < D_
    mk = offs_k < K_
    # the new window: old entries 1..k-1, then x (the reference casts the window to the weights' dtype)
    src = offs_k + 1
    old = tl.load(state_ptr + b * s_hb + offs_d[:, None] * s_hd + src[None, :] * s_hk,
                  mask=md[:, None] & (src < K_)[None, :], other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * s_xb + offs_d * s_xd, mask=md, other=0.0).to(tl.float32)
    win = tl.where((offs_k == K_ - 1)[None, :], x[:, None], old)
    win = _rnd(win, R_W)
    tl.store(state_ptr + b * s_hb + offs_d[:, None] * s_hd + offs_k[None, :] * s_hk,
             _rnd(win, R_S).to(R_S), mask=md[:, None] & mk[None, :])
    w = tl.load(w_ptr + offs_d[:, None] * s_wd + offs_k[None, :] * s_wk, mask=md[:, None] & mk[None, :],
                other=0.0).to(tl.float32)
    y = tl.sum(win * w, axis=1)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_d * s_biasd, mask=md, other=0.0).to(tl.float32)
    y = _rnd(y, R_W)
    if SILU:
        y = _rnd(_silu(y), R_W)
    tl.store(out_ptr + b * s_ob + offs_d * s_od, _rnd(y, R_OUT).to(R_OUT), mask=md)


# ----------------------------------------------------------------------------------------------
# host wrappers
# ----------------------------------------------------------------------------------------------
class _Plan:
    """One signature's launch: grid, every non-pointer argument, and (on CUDA, after the first
    launch) the compiled kernel, launched directly. Everything that depends only on the signature
    is computed once, here."""

    __slots__ = ("kernel", "grid", "tail", "num_warps", "compiled")

    def __init__(self, kernel, grid, tail, num_warps=4):
        self.kernel, self.grid, self.tail, self.num_warps, self.compiled = kernel, grid, tail, num_warps, None

    def launch(self, ptrs) -> None:
        k = self.compiled
        if k:
            run_compiled(k, self.grid, torch._C._cuda_getCurrentRawStream(ptrs[0].device.index), (*ptrs, *self.tail))
            return
        res = self.kernel[self.grid](*ptrs, *self.tail, num_warps=self.num_warps)
        if k is None and ptrs[0].is_cuda:
            self.compiled = compiled_kernel(res) or False


_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 256


def _sig(t: Optional[Tensor]):
    # what Triton specialises a pointer on besides its dtype: 16-byte alignment (a kernel compiled
    # for aligned inputs must not be replayed on misaligned ones); strides are launch arguments
    return None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0)


def _plan(key, build) -> _Plan:
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = build()
    return plan


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _block_d(d: int) -> int:
    return min(128, _next_pow2(max(d, 16)))


def _promote(*dtypes) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _tl(dtype: torch.dtype):
    try:
        return _TL[dtype]
    except KeyError:
        raise TypeError(f"ssm_update kernels take fp32/fp16/bf16 tensors, got {dtype}") from None


def _state_update_plan(state, x, dt, A, B, C, D, z, dt_bias, out, dt_softplus, A_is_log) -> _Plan:
    bsz, d = x.shape
    s = state.shape[-1]
    # the dtypes the reference rounds its intermediates to
    xd = _promote(x.dtype, D.dtype) if D is not None else x.dtype
    summed = _promote(C.dtype, xd) if D is not None else C.dtype
    zt = z.dtype if z is not None else summed
    mul = _promote(summed, zt) if z is not None else summed
    consts = (D is not None, z is not None, dt_bias is not None, bool(dt_softplus), bool(A_is_log),
              _tl(dt.dtype), _tl(C.dtype), _tl(xd), _tl(summed), _tl(zt), _tl(mul), _tl(state.dtype), _tl(x.dtype))
    BD = _block_d(d)
    strides = (*state.stride(), *x.stride(), *dt.stride(), *(z.stride() if z is not None else (0, 0)),
               *A.stride(), *B.stride(), *C.stride(), D.stride(0) if D is not None else 0,
               dt_bias.stride(0) if dt_bias is not None else 0, *out.stride())
    return _Plan(_state_update_kernel, (triton.cdiv(d, BD), bsz), (d, s, *strides, *consts, BD, _next_pow2(s)))


def selective_state_update_triton(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                  D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                                  dt_bias: Optional[Tensor] = None, dt_softplus: bool = True,
                                  A_is_log: bool = False) -> Tensor:
    """``fxopt::selective_state_update`` on the GPU (or under TRITON_INTERPRET=1)."""
    if any(t is not None and t.dtype == torch.float64 for t in (state, x, dt, A, B, C, D, z, dt_bias)):
        return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, A_is_log)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    key = ("ssu", x.device.index, _sig(state), _sig(x), _sig(dt), _sig(A), _sig(B), _sig(C), _sig(D), _sig(z),
           _sig(dt_bias), _sig(out), dt_softplus, A_is_log)
    plan = _plan(key, lambda: _state_update_plan(state, x, dt, A, B, C, D, z, dt_bias, out, dt_softplus, A_is_log))
    dummy = x
    plan.launch((state, x, dt, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
                 dt_bias if dt_bias is not None else dummy, out))
    return out


def _conv_update_plan(x, conv_state, w, bias, out, silu) -> _Plan:
    bsz, d, _ = x.shape
    k = conv_state.shape[-1]
    BD = _block_d(d)
    tail = (d, k, *conv_state.stride(), x.stride(0), x.stride(1), *w.stride(),
            bias.stride(0) if bias is not None else 0, out.stride(0), out.stride(1),
            bias is not None, bool(silu), _tl(w.dtype), _tl(conv_state.dtype), _tl(x.dtype), BD, _next_pow2(k))
    return _Plan(_conv_update_kernel, (triton.cdiv(d, BD), bsz), tail)


def conv_state_update_triton(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                             silu: bool = True) -> Tensor:
    """``fxopt::conv_state_update`` on the GPU (or under TRITON_INTERPRET=1); x (b, d, 1)."""
    if x.shape[-1] != 1 or any(t is not None and t.dtype == torch.float64 for t in (x, conv_state, weight, bias)):
        return conv_state_update_ref(x, conv_state, weight, bias, silu)
    w = weight if weight.dim() == 2 else weight[:, 0, :]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    key = ("csu", x.device.index, _sig(x), _sig(conv_state), _sig(w), _sig(bias), _sig(out), silu)
    plan = _plan(key, lambda: _conv_update_plan(x, conv_state, w, bias, out, silu))
    plan.launch((conv_state, x, w, bias if bias is not None else w, out))
    return out
