"""Plain-Triton kernels for the scan ops, beside their references (:mod:`fxopt.codegen.scan_ref`).

Glossary: ``b`` batch, ``d`` channels, ``l`` time steps, ``n`` state size (``NP`` its power of two),
``BD`` channels per program, ``K`` time steps per chunk, ``G`` groups the sequence is cut into.

Selective scan: :func:`selective_scan_kernel`. On CUDA devices with async copies (sm_80+) the
default is the Gluon kernel of :mod:`fxopt.codegen.scan_gluon` (explicit layouts; 2-6x faster);
this one runs under ``TRITON_INTERPRET=1`` (the CPU tests), on older GPUs, and for layouts the
Gluon kernel declines (16-bit inputs whose l is not a multiple of 16). Its launch choice is
:class:`fxopt.codegen.scan_config.TritonScanConfig`; the host side (shared with the Gluon kernel:
both take the same arguments) is :mod:`fxopt.codegen.scan_launch`.

One time step per iteration with the state ``[BD, NP]`` in registers (only the FMA
``h = a h + x`` is on the sequential path), the inputs in ``(BD, K)`` / ``(NP, K)`` register tiles
with the K time steps contiguous (16-byte loads, coalesced along l), prefetched one or two chunks
ahead (``PF2``), the K steps unrolled over the tile, y stored as one ``(BD, K)`` tile with the
D / silu(z) epilogue applied on the tile. With few (batch x channel block) programs the sequence
is cut into G groups: a pre-pass launch (``STATE_ONLY``) computes each group's end state from zero
and its delta sum, and the main launch folds those of the preceding groups into its carry-in
(``h = exp(A sum delta) h + S``). (Variants that lost on the H100 were removed: a scattered-load
kernel, ``tl.associative_scan`` over time chunks, an n-unrolled scan, and a single launch whose
main programs waited on flags set by the pre-pass programs; git has them.)

State and arithmetic in fp32 for fp32 / fp16 / bf16 inputs; ``exp(x)`` as ``exp2(x log2 e)`` by
:func:`fxopt.codegen.exp2.exp2_fma` (FMA pipe, unbiased; the SFU's exp2 is not accurate enough
for the op's contract on the GPU).

General linear scan (``fxopt::linear_scan``): :func:`linear_scan_triton`, a chunked associative
scan over a flattened ``(L, M)`` layout (broadcast inputs are materialised; readouts are
contracted by torch).
"""
from __future__ import annotations

import torch
from torch import Tensor

import triton
import triton.language as tl

from .exp2 import exp2_fma
from .scan_config import KernelChoice, TritonScanConfig, next_pow2
from .scan_ref import LinearScanArgs, SelectiveScanArgs, compute_dtype, linear_scan_ref, linear_scan_shapes


def _fix_interpreter_index() -> None:
    """Triton's interpreter turns runtime ints into 1-element numpy arrays and converts them with
    ``int(arr)``, which numpy >= 2.? refuses for 1-d arrays: loops with runtime bounds then fail
    under TRITON_INTERPRET=1. Patch its ``tensor.__index__`` to take the single element."""
    try:
        from triton.runtime import interpreter as _interp
    except Exception:  # pragma: no cover
        return
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_fxopt_fixed", False):
        return
    import numpy as np

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._fxopt_fixed = True
    _interp._patch_lang_tensor = patched


if triton.knobs.runtime.interpret:
    _fix_interpreter_index()


@triton.jit
def _combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit(do_not_specialize=["LGK", "G", "GM1"])
def selective_scan_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Dv_ptr, z_ptr, h0_ptr, y_ptr, hl_ptr, S_ptr, ds_ptr,
    D_, N_, L_, LGK, G, GM1,
    s_ub, s_ud, s_ul,
    s_tb, s_td, s_tl,
    s_ad, s_an,
    s_bb, s_bn, s_bl,
    s_cb, s_cn, s_cl,
    s_zb, s_zd, s_zl,
    s_yb, s_yd, s_yl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, STATE_ONLY: tl.constexpr,
    BD: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, PF2: tl.constexpr,
):
    """Grid ``(d blocks, groups, b)``; see the module docstring. STATE_ONLY: the group pre-pass
    (end state from zero and delta sum of group g -> ``S[b, g, d, n]``, ``ds[b, g, d]``). Groups
    are ``LGK * K`` steps long (passed in chunks so that the compiler sees tile starts aligned to
    K: 16-byte vector loads)."""
    pid_d = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, NP)
    offs_k = tl.arange(0, K)
    md = offs_d < D_
    mn = offs_n < N_
    mdn = md[:, None] & mn[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=mdn, other=0.0).to(tl.float32)
    A = A * 1.4426950408889634
    if HAS_H0 and not STATE_ONLY:
        h = tl.load(h0_ptr + ((b * D_ + offs_d[:, None]) * N_ + offs_n[None, :]), mask=mdn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BD, NP), dtype=tl.float32)
    if not STATE_ONLY:
        # fold the end states of the groups before this one, 4 groups per iteration so that their
        # (independent) loads are in flight together
        for gp0 in range(0, GM1, 4):
            for j in tl.static_range(4):
                gp = gp0 + j
                keep = gp < g
                Sg = tl.load(S_ptr + ((b * G + gp) * D_ + offs_d[:, None]) * NP + offs_n[None, :], mask=md[:, None] & keep, other=0.0, cache_modifier=".cg")
                dsg = tl.load(ds_ptr + (b * G + gp) * D_ + offs_d, mask=md & keep, other=0.0, cache_modifier=".cg")
                h = tl.where(keep, exp2_fma(A * dsg[:, None]) * h + Sg, h)
    if HAS_D:
        Dv = tl.load(Dv_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
    dsum = tl.zeros((BD,), dtype=tl.float32)
    LG = LGK * K
    l0 = g * LG
    u_base = u_ptr + b * s_ub + offs_d[:, None] * s_ud
    t_base = dt_ptr + b * s_tb + offs_d[:, None] * s_td
    B_base = B_ptr + b * s_bb + offs_n[:, None] * s_bn
    C_base = C_ptr + b * s_cb + offs_n[:, None] * s_cn
    z_base = z_ptr + b * s_zb + offs_d[:, None] * s_zd
    y_base = y_ptr + b * s_yb + offs_d[:, None] * s_yd
    # first chunk
    tt = l0 + offs_k
    mt = (tt < L_)[None, :]
    dt_n = tl.load(t_base + tt[None, :] * s_tl, mask=md[:, None] & mt, other=0.0)
    u_n = tl.load(u_base + tt[None, :] * s_ul, mask=md[:, None] & mt, other=0.0)
    B_n = tl.load(B_base + tt[None, :] * s_bl, mask=mn[:, None] & mt, other=0.0)
    if STATE_ONLY:
        C_n = B_n
    else:
        C_n = tl.load(C_base + tt[None, :] * s_cl, mask=mn[:, None] & mt, other=0.0)
    # PF2: a second chunk in flight (prefetch distance 2 chunks)
    tt = l0 + K + offs_k
    mt = (tt < L_)[None, :] & (K < LG)
    if PF2:
        dt_m = tl.load(t_base + tt[None, :] * s_tl, mask=md[:, None] & mt, other=0.0)
        u_m = tl.load(u_base + tt[None, :] * s_ul, mask=md[:, None] & mt, other=0.0)
        B_m = tl.load(B_base + tt[None, :] * s_bl, mask=mn[:, None] & mt, other=0.0)
        if STATE_ONLY:
            C_m = B_m
        else:
            C_m = tl.load(C_base + tt[None, :] * s_cl, mask=mn[:, None] & mt, other=0.0)
    else:
        dt_m = dt_n
        u_m = u_n
        B_m = B_n
        C_m = C_n
    for c in range(0, LG, K):
        tt = l0 + c + offs_k
        dtc = dt_n.to(tl.float32)
        uc = u_n.to(tl.float32)
        Bc = B_n.to(tl.float32)
        Cc = C_n.to(tl.float32)
        # prefetch (masked off past the group / sequence end; LG is a multiple of K)
        if PF2:
            dt_n = dt_m
            u_n = u_m
            B_n = B_m
            C_n = C_m
            tn = tt + 2 * K
            mtn = (tn < L_)[None, :] & (c + 2 * K < LG)
            dt_m = tl.load(t_base + tn[None, :] * s_tl, mask=md[:, None] & mtn, other=0.0)
            u_m = tl.load(u_base + tn[None, :] * s_ul, mask=md[:, None] & mtn, other=0.0)
            B_m = tl.load(B_base + tn[None, :] * s_bl, mask=mn[:, None] & mtn, other=0.0)
            if not STATE_ONLY:
                C_m = tl.load(C_base + tn[None, :] * s_cl, mask=mn[:, None] & mtn, other=0.0)
        else:
            tn = tt + K
            mtn = (tn < L_)[None, :] & (c + K < LG)
            dt_n = tl.load(t_base + tn[None, :] * s_tl, mask=md[:, None] & mtn, other=0.0)
            u_n = tl.load(u_base + tn[None, :] * s_ul, mask=md[:, None] & mtn, other=0.0)
            B_n = tl.load(B_base + tn[None, :] * s_bl, mask=mn[:, None] & mtn, other=0.0)
            if not STATE_ONLY:
                C_n = tl.load(C_base + tn[None, :] * s_cl, mask=mn[:, None] & mtn, other=0.0)
        dtu = dtc * uc
        yt = tl.zeros((BD, K), dtype=tl.float32)
        for k in tl.static_range(K):
            sel = offs_k[None, :] == k
            dtk = tl.sum(tl.where(sel, dtc, 0.0), axis=1)
            xk = tl.sum(tl.where(sel, dtu, 0.0), axis=1)
            Bk = tl.sum(tl.where(sel, Bc, 0.0), axis=1)
            h = exp2_fma(dtk[:, None] * A) * h + xk[:, None] * Bk[None, :]
            if not STATE_ONLY:
                Ck = tl.sum(tl.where(sel, Cc, 0.0), axis=1)
                yk = tl.sum(h * Ck[None, :], axis=1)
                yt = tl.where(sel, yk[:, None], yt)
        if STATE_ONLY:
            dsum += tl.sum(dtc, axis=1)
        else:
            m2 = md[:, None] & (tt < L_)[None, :]
            if HAS_D:
                yt += uc * Dv[:, None]
            if HAS_Z:
                zv = tl.load(z_base + tt[None, :] * s_zl, mask=m2, other=0.0).to(tl.float32)
                yt = tl.div_rn(yt * zv, 1.0 + exp2_fma(-zv * 1.4426950408889634))
            tl.store(y_base + tt[None, :] * s_yl, yt.to(y_ptr.dtype.element_ty), mask=m2)
    if STATE_ONLY:
        tl.store(S_ptr + ((b * G + g) * D_ + offs_d[:, None]) * NP + offs_n[None, :], h, mask=md[:, None])
        tl.store(ds_ptr + (b * G + g) * D_ + offs_d, dsum, mask=md)
    else:
        if g == G - 1:
            tl.store(hl_ptr + ((b * D_ + offs_d[:, None]) * N_ + offs_n[None, :]), h, mask=mdn)


def specialise(a: SelectiveScanArgs, cfg: TritonScanConfig) -> KernelChoice:
    """What :func:`selective_scan_kernel` needs of a launch: it reads any strides and dtypes."""
    NP = next_pow2(a.A.shape[-1])
    return KernelChoice(kernel=selective_scan_kernel, block_d=cfg.BD, chunk=cfg.K, groups=cfg.G,
                        constexprs=(cfg.BD, NP, cfg.K, cfg.PF2), num_warps=cfg.num_warps,
                        preps=(None,) * 8, fallible=False)


# ----------------------------------------------------------------------------------------------
# general linear scan over a flattened (L, M) layout
# ----------------------------------------------------------------------------------------------
@triton.jit
def _linear_scan_kernel(a_ptr, b_ptr, h0_ptr, y_ptr, hl_ptr, L_, M_, HAS_H0: tl.constexpr, BM: tl.constexpr, T: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = pid * BM + tl.arange(0, BM)
    offs_t = tl.arange(0, T)
    mm = offs_m < M_
    if HAS_H0:
        h = tl.load(h0_ptr + offs_m, mask=mm, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BM,), dtype=tl.float32)
    is_last = (offs_t == T - 1)[:, None]
    for c in range(0, L_, T):
        tt = c + offs_t
        m2 = (tt < L_)[:, None] & mm[None, :]
        off = tt[:, None] * M_ + offs_m[None, :]
        a = tl.load(a_ptr + off, mask=m2, other=1.0).to(tl.float32)
        x = tl.load(b_ptr + off, mask=m2, other=0.0).to(tl.float32)
        aa, bb = tl.associative_scan((a, x), 0, _combine)
        hs = aa * h[None, :] + bb
        tl.store(y_ptr + off, hs.to(y_ptr.dtype.element_ty), mask=m2)
        h = tl.sum(tl.where(is_last, hs, 0.0), axis=0)
    tl.store(hl_ptr + offs_m, h, mask=mm)



def linear_scan_triton(*args, **kwargs) -> tuple[Tensor, Tensor]:
    """``fxopt::linear_scan`` on the GPU (arguments as :class:`LinearScanArgs`): the kernel
    through Triton's JIT."""
    a, b, h0, C, out_dtype, state_dtype = LinearScanArgs(*args, **kwargs)
    if compute_dtype(a, b, h0, C) == torch.float64:
        return linear_scan_ref(a, b, h0, C, out_dtype, state_dtype)
    S = linear_scan_shapes(a, b, h0)
    L = a.shape[0]
    state_dtype = state_dtype or torch.promote_types(a.dtype, b.dtype)
    out_dtype = out_dtype or state_dtype
    M = 1
    for s in S:
        M *= s
    full = [L] + S
    a2 = a.expand(full).contiguous()
    b2 = b.expand(full).contiguous()
    states_dtype = torch.float32 if C is not None else out_dtype
    hs = torch.empty(full, dtype=states_dtype, device=a.device)
    hl = torch.empty(S, dtype=torch.float32, device=a.device)
    h0c = h0.to(torch.float32).expand(S).contiguous() if h0 is not None else None
    if M > 0 and L > 0:
        BM, T = 128, 16
        _linear_scan_kernel[(triton.cdiv(M, BM),)](
            a2, b2, h0c if h0c is not None else hl, hs, hl, L, M, HAS_H0=h0c is not None, BM=BM, T=T, num_warps=4
        )
    elif h0c is not None:
        hl.copy_(h0c)
    else:
        hl.zero_()
    if C is not None:
        y = (hs * C.to(torch.float32)).sum(-1).to(out_dtype)
    else:
        y = hs
    return y, hl.to(state_dtype)
