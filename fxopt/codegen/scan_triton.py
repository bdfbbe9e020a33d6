"""Triton kernels for the scan custom ops (:mod:`fxopt.ops.scan`), each beside its ``_ref``.

Selective scan (``fxopt::selective_scan``); the launch choice per shape is :func:`choose_config`.
On CUDA devices with async copies (sm_80+) the default is the Gluon kernel of
:mod:`fxopt.codegen.scan_gluon` (explicit layouts; 2-6x faster); the kernels here run under
``TRITON_INTERPRET=1`` (the CPU tests), on older GPUs, and for layouts the Gluon kernel declines
(16-bit inputs whose l is not a multiple of 16).

* ``seqk`` (the default): one time step per iteration with the state ``[BD, NP]`` in registers
  (only the FMA ``h = a h + x`` is on the sequential path), but the inputs come in ``(BD, K)`` /
  ``(NP, K)`` register tiles with the K time steps contiguous (16-byte loads, coalesced along l),
  prefetched one or two chunks ahead, the K steps unrolled over the tile, y stored as one
  ``(BD, K)`` tile with the D / silu(z) epilogue applied on the tile. With few (batch x channel
  block) programs the sequence is cut into G groups: a pre-pass computes each group's end state
  from zero and its delta sum, and the main pass folds those of the preceding groups into its
  carry-in (``h = exp(A sum delta) h + S``). ``fused``: pre-pass and main pass in one launch (the
  main programs wait on per-group flags; flags are reset by their last reader).
* ``seq``: the previous default (one scattered 4-byte load per channel per step).
* ``chunk``: ``tl.associative_scan`` over the time axis of a ``[BD, N, T]`` tile (slower).
  (An n-unrolled variant scanning ``(BD, T)`` tiles per state index measured 5-8x slower still
  on the H100 and was removed.)

State and arithmetic in fp32 for fp32 / fp16 / bf16 inputs; ``exp(x)`` as ``exp2(x log2 e)`` by
:func:`fxopt.codegen.exp2.exp2_fma` (FMA pipe, unbiased; the SFU's exp2 is not accurate enough
for the op's contract on the GPU).

General linear scan (``fxopt::linear_scan``): a chunked associative scan over a flattened
``(L, M)`` layout (broadcast inputs are materialised; readouts are contracted by torch).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

from ..ops.scan import linear_scan_ref, selective_scan_ref  # noqa: F401  (the references)
from ..config import scan_exp_raw
from .exp2 import exp2_fma


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


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_index()

selective_scan_triton_ref = selective_scan_ref
linear_scan_triton_ref = linear_scan_ref


@triton.jit
def _combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _ssm_group_state_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, S_ptr, ds_ptr,
    D_, N_, L_, LG, G,
    s_ub, s_ud, s_ul,
    s_tb, s_td, s_tl,
    s_ad, s_an,
    s_bb, s_bn, s_bl,
    BD: tl.constexpr, NP: tl.constexpr, T: tl.constexpr,
):
    """End state (from zero) and delta sum of group ``g`` -> S[b, g, d, n], ds[b, g, d]."""
    pid_d = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, NP)
    offs_t = tl.arange(0, T)
    md = offs_d < D_
    mn = offs_n < N_
    A = tl.load(A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=md[:, None] & mn[None, :], other=0.0).to(tl.float32)
    A = A * 1.4426950408889634  # exp(x) = exp2(x * log2 e)
    S = tl.zeros((BD, NP), dtype=tl.float32)
    dsum = tl.zeros((BD,), dtype=tl.float32)
    l0 = g * LG
    for c in range(0, LG, T):
        tt = l0 + c + offs_t
        mt = tt < L_
        m2 = md[:, None] & mt[None, :]
        dt = tl.load(dt_ptr + b * s_tb + offs_d[:, None] * s_td + tt[None, :] * s_tl, mask=m2, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + b * s_ub + offs_d[:, None] * s_ud + tt[None, :] * s_ul, mask=m2, other=0.0).to(tl.float32)
        Bv = tl.load(B_ptr + b * s_bb + offs_n[:, None] * s_bn + tt[None, :] * s_bl, mask=mn[:, None] & mt[None, :], other=0.0).to(tl.float32)
        cum = tl.cumsum(dt, axis=1)
        tot = tl.sum(dt, axis=1)
        w = exp2_fma((tot[:, None] - cum)[:, None, :] * A[:, :, None])           # [BD, NP, T]
        contrib = tl.sum(w * (dt * u)[:, None, :] * Bv[None, :, :], axis=2)     # [BD, NP]
        S = exp2_fma(A * tot[:, None]) * S + contrib
        dsum += tot
    sp = S_ptr + ((b * G + g) * D_ + offs_d[:, None]) * NP + offs_n[None, :]
    tl.store(sp, S, mask=md[:, None])
    tl.store(ds_ptr + (b * G + g) * D_ + offs_d, dsum, mask=md)


@triton.jit
def _ssm_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Dv_ptr, z_ptr, h0_ptr, y_ptr, hl_ptr, S_ptr, ds_ptr,
    D_, N_, L_, LG, G, GM1,
    s_ub, s_ud, s_ul,
    s_tb, s_td, s_tl,
    s_ad, s_an,
    s_bb, s_bn, s_bl,
    s_cb, s_cn, s_cl,
    s_zb, s_zd, s_zl,
    s_yb, s_yd, s_yl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_H0: tl.constexpr,
    BD: tl.constexpr, NP: tl.constexpr, T: tl.constexpr,
):
    pid_d = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, NP)
    offs_t = tl.arange(0, T)
    md = offs_d < D_
    mn = offs_n < N_
    mdn = md[:, None] & mn[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=mdn, other=0.0).to(tl.float32)
    A = A * 1.4426950408889634
    if HAS_H0:
        h = tl.load(h0_ptr + ((b * D_ + offs_d[:, None]) * N_ + offs_n[None, :]), mask=mdn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BD, NP), dtype=tl.float32)
    # carry-in: fold the aggregates of the groups before this one
    # (a fixed trip count with a predicate: loops bounded by program ids upset the interpreter)
    for gp in range(0, GM1):
        keep = gp < g
        Sg = tl.load(S_ptr + ((b * G + gp) * D_ + offs_d[:, None]) * NP + offs_n[None, :], mask=md[:, None] & keep, other=0.0)
        dsg = tl.load(ds_ptr + (b * G + gp) * D_ + offs_d, mask=md & keep, other=0.0)
        h = tl.where(keep, exp2_fma(A * dsg[:, None]) * h + Sg, h)
    if HAS_D:
        Dv = tl.load(Dv_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
    is_last = (offs_t == T - 1)[None, None, :]
    l0 = g * LG
    for c in range(0, LG, T):
        tt = l0 + c + offs_t
        mt = tt < L_
        m2 = md[:, None] & mt[None, :]
        mnt = mn[:, None] & mt[None, :]
        dt = tl.load(dt_ptr + b * s_tb + offs_d[:, None] * s_td + tt[None, :] * s_tl, mask=m2, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + b * s_ub + offs_d[:, None] * s_ud + tt[None, :] * s_ul, mask=m2, other=0.0).to(tl.float32)
        Bv = tl.load(B_ptr + b * s_bb + offs_n[:, None] * s_bn + tt[None, :] * s_bl, mask=mnt, other=0.0).to(tl.float32)
        Cv = tl.load(C_ptr + b * s_cb + offs_n[:, None] * s_cn + tt[None, :] * s_cl, mask=mnt, other=0.0).to(tl.float32)
        a = exp2_fma(dt[:, None, :] * A[:, :, None])                  # [BD, NP, T]; 1 where masked (dt = 0)
        x = (dt * u)[:, None, :] * Bv[None, :, :]                    # 0 where masked
        aa, bb = tl.associative_scan((a, x), 2, _combine)
        hs = aa * h[:, :, None] + bb
        yv = tl.sum(hs * Cv[None, :, :], axis=1)                     # [BD, T]
        h = tl.sum(tl.where(is_last, hs, 0.0), axis=2)
        if HAS_D:
            yv += u * Dv[:, None]
        if HAS_Z:
            zv = tl.load(z_ptr + b * s_zb + offs_d[:, None] * s_zd + tt[None, :] * s_zl, mask=m2, other=0.0).to(tl.float32)
            yv = tl.div_rn(yv * zv, 1.0 + exp2_fma(-zv * 1.4426950408889634))
        tl.store(y_ptr + b * s_yb + offs_d[:, None] * s_yd + tt[None, :] * s_yl, yv.to(y_ptr.dtype.element_ty), mask=m2)
    if g == G - 1:
        tl.store(hl_ptr + ((b * D_ + offs_d[:, None]) * N_ + offs_n[None, :]), h, mask=mdn)


@triton.jit
def _ssm_seq_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Dv_ptr, z_ptr, h0_ptr, y_ptr, hl_ptr, S_ptr, ds_ptr,
    D_, N_, L_, LG, G, GM1,
    s_ub, s_ud, s_ul,
    s_tb, s_td, s_tl,
    s_ad, s_an,
    s_bb, s_bn, s_bl,
    s_cb, s_cn, s_cl,
    s_zb, s_zd, s_zl,
    s_yb, s_yd, s_yl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, STATE_ONLY: tl.constexpr,
    BD: tl.constexpr, NP: tl.constexpr,
):
    """One step per iteration, state [BD, NP] in registers; only the FMA ``h = a h + x`` is on
    the sequential path (exp, loads and the readout of step t overlap step t+1).
    STATE_ONLY: the group pre-pass (end state from zero and delta sum of group g)."""
    pid_d = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, NP)
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
        for gp in range(0, GM1):
            keep = gp < g
            Sg = tl.load(S_ptr + ((b * G + gp) * D_ + offs_d[:, None]) * NP + offs_n[None, :], mask=md[:, None] & keep, other=0.0)
            dsg = tl.load(ds_ptr + (b * G + gp) * D_ + offs_d, mask=md & keep, other=0.0)
            h = tl.where(keep, exp2_fma(A * dsg[:, None]) * h + Sg, h)
    if HAS_D:
        Dv = tl.load(Dv_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
    dsum = tl.zeros((BD,), dtype=tl.float32)
    l0 = g * LG
    u_base = u_ptr + b * s_ub + offs_d * s_ud
    t_base = dt_ptr + b * s_tb + offs_d * s_td
    B_base = B_ptr + b * s_bb + offs_n * s_bn
    C_base = C_ptr + b * s_cb + offs_n * s_cn
    z_base = z_ptr + b * s_zb + offs_d * s_zd
    y_base = y_ptr + b * s_yb + offs_d * s_yd
    for i in range(0, LG):
        t = l0 + i
        ok = t < L_
        dt = tl.load(t_base + t * s_tl, mask=md & ok, other=0.0).to(tl.float32)
        u = tl.load(u_base + t * s_ul, mask=md & ok, other=0.0).to(tl.float32)
        Bt = tl.load(B_base + t * s_bl, mask=mn & ok, other=0.0).to(tl.float32)
        a = exp2_fma(dt[:, None] * A)
        h = a * h + (dt * u)[:, None] * Bt[None, :]
        if STATE_ONLY:
            dsum += dt
        else:
            Ct = tl.load(C_base + t * s_cl, mask=mn & ok, other=0.0).to(tl.float32)
            yv = tl.sum(h * Ct[None, :], axis=1)
            if HAS_D:
                yv += u * Dv
            if HAS_Z:
                zv = tl.load(z_base + t * s_zl, mask=md & ok, other=0.0).to(tl.float32)
                yv = tl.div_rn(yv * zv, 1.0 + exp2_fma(-zv * 1.4426950408889634))
            tl.store(y_base + t * s_yl, yv.to(y_ptr.dtype.element_ty), mask=md & ok)
    if STATE_ONLY:
        tl.store(S_ptr + ((b * G + g) * D_ + offs_d[:, None]) * NP + offs_n[None, :], h, mask=md[:, None])
        tl.store(ds_ptr + (b * G + g) * D_ + offs_d, dsum, mask=md)
    else:
        if g == G - 1:
            tl.store(hl_ptr + ((b * D_ + offs_d[:, None]) * N_ + offs_n[None, :]), h, mask=mdn)


@triton.jit
def _seqk_body(
    pid_d, g, b, flag_ptr, cnt_ptr,
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
    BD: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, PF2: tl.constexpr, FUSED: tl.constexpr,
):
    """One step per iteration like ``_ssm_seq_kernel``, but the inputs come in (BD, K) / (NP, K)
    tiles with the K time steps contiguous (one 16-byte load per row for K=4 fp32 instead of K
    scattered 4-byte loads), prefetched one chunk ahead (loop-carried registers), the K steps
    unrolled over the in-register tile, and y written as one (BD, K) tile; the D and silu(z)
    epilogue runs on the tile. STATE_ONLY: the group pre-pass (end state from zero, delta sum).
    Groups are ``LGK * K`` steps long (passed in chunks so that the compiler sees tile starts
    aligned to K: 16-byte vector loads)."""
    nblk = tl.num_programs(0)
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
                if FUSED:
                    # wait for group gp's pre-pass program (launched in the same grid, lower ids)
                    fp = flag_ptr + (b * GM1 + gp) * nblk + pid_d
                    if keep:
                        f = tl.atomic_add(fp, 0, sem="acquire")
                        while f == 0:
                            f = tl.atomic_add(fp, 0, sem="acquire")
                Sg = tl.load(S_ptr + ((b * G + gp) * D_ + offs_d[:, None]) * NP + offs_n[None, :], mask=md[:, None] & keep, other=0.0, cache_modifier=".cg")
                dsg = tl.load(ds_ptr + (b * G + gp) * D_ + offs_d, mask=md & keep, other=0.0, cache_modifier=".cg")
                h = tl.where(keep, exp2_fma(A * dsg[:, None]) * h + Sg, h)
        if FUSED:
            # the last reader of each flag resets it (and its reader count) for the next launch
            for gp in range(0, GM1):
                if gp < g:
                    old = tl.atomic_add(cnt_ptr + (b * GM1 + gp) * nblk + pid_d, 1, sem="relaxed")
                    if old == GM1 - 1 - gp:
                        tl.atomic_xchg(cnt_ptr + (b * GM1 + gp) * nblk + pid_d, 0, sem="relaxed")
                        tl.atomic_xchg(flag_ptr + (b * GM1 + gp) * nblk + pid_d, 0, sem="relaxed")
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
        if FUSED:
            tl.debug_barrier()
            tl.atomic_xchg(flag_ptr + (b * GM1 + g) * nblk + pid_d, 1, sem="release")
    else:
        if g == G - 1:
            tl.store(hl_ptr + ((b * D_ + offs_d[:, None]) * N_ + offs_n[None, :]), h, mask=mdn)


@triton.jit(do_not_specialize=["LGK", "G", "GM1"])
def _ssm_seqk_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Dv_ptr, z_ptr, h0_ptr, y_ptr, hl_ptr, S_ptr, ds_ptr, flag_ptr, cnt_ptr,
    D_, N_, L_, LGK, G, GM1,
    s_ub, s_ud, s_ul,
    s_tb, s_td, s_tl,
    s_ad, s_an,
    s_bb, s_bn, s_bl,
    s_cb, s_cn, s_cl,
    s_zb, s_zd, s_zl,
    s_yb, s_yd, s_yl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, STATE_ONLY: tl.constexpr,
    BD: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, PF2: tl.constexpr, FUSED: tl.constexpr,
):
    """See ``_seqk_body``. FUSED: one launch for the pre-pass and the main pass: program rows
    ``0 .. G-2`` of axis 1 are the pre-pass of groups 0 .. G-2, rows ``G-1 .. 2G-2`` the main
    pass of groups 0 .. G-1; a main program waits on a flag per preceding group.

    Deadlock freedom must not rest on the hardware dispatching programs in id order (CUDA
    does not promise it). So FUSED programs take their ids from an atomic ticket: a program
    holding ticket t knows every ticket below t was taken by a program already running, and
    the programs it waits for (pre-pass rows, which wait on nothing) hold lower tickets. The
    last ticket holder resets the counter for the next launch."""
    if FUSED:
        nx = tl.num_programs(0)
        ny = tl.num_programs(1)
        total = nx * ny * tl.num_programs(2)
        ticket_ptr = cnt_ptr + tl.num_programs(2) * GM1 * nx  # one int32 past the reader counts
        t = tl.atomic_add(ticket_ptr, 1)
        if t == total - 1:
            tl.atomic_xchg(ticket_ptr, 0)
        pid_d = t % nx
        gy = (t // nx) % ny
        b = t // (nx * ny)
    else:
        pid_d = tl.program_id(0)
        gy = tl.program_id(1)
        b = tl.program_id(2)
    if FUSED:
        if gy < GM1:
            _seqk_body(pid_d, gy, b, flag_ptr, cnt_ptr, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Dv_ptr, z_ptr, h0_ptr, y_ptr, hl_ptr, S_ptr, ds_ptr,
            D_, N_, L_, LGK, G, GM1, s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_ad, s_an, s_bb, s_bn, s_bl,
            s_cb, s_cn, s_cl, s_zb, s_zd, s_zl, s_yb, s_yd, s_yl, HAS_D, HAS_Z, HAS_H0, True, BD, NP, K, PF2, True)
        else:
            _seqk_body(pid_d, gy - GM1, b, flag_ptr, cnt_ptr, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Dv_ptr, z_ptr, h0_ptr, y_ptr, hl_ptr, S_ptr, ds_ptr,
            D_, N_, L_, LGK, G, GM1, s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_ad, s_an, s_bb, s_bn, s_bl,
            s_cb, s_cn, s_cl, s_zb, s_zd, s_zl, s_yb, s_yd, s_yl, HAS_D, HAS_Z, HAS_H0, False, BD, NP, K, PF2, True)
    else:
        _seqk_body(pid_d, gy, b, flag_ptr, cnt_ptr, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Dv_ptr, z_ptr, h0_ptr, y_ptr, hl_ptr, S_ptr, ds_ptr,
            D_, N_, L_, LGK, G, GM1, s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_ad, s_an, s_bb, s_bn, s_bl,
            s_cb, s_cn, s_cl, s_zb, s_zd, s_zl, s_yb, s_yd, s_yl, HAS_D, HAS_Z, HAS_H0, STATE_ONLY, BD, NP, K, PF2, False)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Per-shape launch choices (filled by tuning; overridable for experiments).
_CONFIG_OVERRIDE: dict = {}


def choose_config(bsz: int, d: int, L: int, n: int, device_index: int = 0) -> dict:
    """Launch choice for a selective scan of this size. Measured on an H100 (benchmarks/scan.py
    --tune / --compare, 2026-11-22): the tiled one-step-per-iteration kernel (``seqk``: (BD, 8)
    input tiles, one warp per 16 or 32 channels) beats the scattered-load ``seq`` kernel and the
    chunked associative-scan kernels (``chunk``; an n-unrolled variant) at every measured shape. With enough
    (batch x channel block) programs (b4 d5120) the sequence is not split (a split measured
    slower); otherwise it is split into groups of ~64 steps (G=32 at b1 d1536 L2048, 8 at L512)
    with the group pre-pass in the same launch (``fused``: one launch instead of two; the host
    time of a launch was ~50-100 us on the measuring machine, more than the GPU time at b1)."""
    if _CONFIG_OVERRIDE:
        return dict(_CONFIG_OVERRIDE)
    if _gluon_ok(device_index):
        from . import scan_gluon

        from ..config import scan_exp

        exp = scan_gluon.resolve_exp(scan_exp(), scan_gluon._capability(device_index))
        return scan_gluon.choose_config(bsz, d, L, n, _sm_count(device_index), exp)
    return dict(_choose_config(bsz, d, L, n, device_index))


@functools.lru_cache(maxsize=None)
def _gluon_ok(device_index: int) -> bool:
    """The Gluon kernel (:mod:`fxopt.codegen.scan_gluon`) is the default on CUDA devices that have
    async copies (sm_80+); the plain-Triton kernels below stay for the interpreter and older GPUs."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return False
    try:
        from . import scan_gluon
    except Exception:  # pragma: no cover - a Triton without Gluon
        return False
    return scan_gluon.supported(torch.device("cuda", device_index))


@functools.lru_cache(maxsize=256)
def _choose_config(bsz: int, d: int, L: int, n: int, device_index: int) -> dict:
    NP = _next_pow2(max(n, 1))
    cap = max(4, _next_pow2(d))
    sms = _sm_count(device_index)
    if NP > 16:
        BD = min(max(4, 256 // NP), cap)
    else:
        BD = min(16, cap)
    if bsz * triton.cdiv(d, BD) >= 4 * sms or L < 128:
        # enough programs without splitting the sequence: one launch, long walks, 2 chunks in flight
        return dict(kind="seqk", BD=BD, K=8, G=1, PF2=True, num_warps=1, num_stages=1)
    # split L into groups of ~64 steps (at most 32 groups), pre-pass fused into the same launch
    G = 1
    while G * 2 <= min(32, L // 64):
        G *= 2
    if NP <= 16 and d >= 32 and bsz * triton.cdiv(d, 32) * G >= 6 * sms:
        BD = 32
    return dict(kind="seqk", BD=BD, K=8, G=G, PF2=BD == 32, fused=True, num_warps=1, num_stages=1)


_FLAGS: dict = {}


def _flag_buffer(device, numel: int) -> Tensor:
    """Zeroed int32 flags for the fused launch, kept per (device, stream): every launch leaves them
    zero again, and launches on one stream never overlap."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (device.type, device.index, stream)
    buf = _FLAGS.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.zeros(max(numel, 4096), dtype=torch.int32, device=device)
        _FLAGS[key] = buf
    return buf


# Launch plans of the Gluon path by call signature (see scan_gluon.LaunchPlan).
_PLANS: dict = {}
_MAX_PLANS = 256


def _keep_plan(key, plan) -> None:
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = plan


def _sig(t: Optional[Tensor]):
    """What a launch depends on of one input: shape, strides, dtype, 16-byte alignment."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0)


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    h0: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    config: Optional[dict] = None,
) -> tuple[Tensor, Tensor]:
    plan_key = None
    if u.is_cuda and not _CONFIG_OVERRIDE:
        # the fast path: a call with the signature of an earlier one replays its launch plan
        # (plans exist only for the Gluon kernel: no key is built for the interpreter)
        plan_key = (scan_exp_raw(), out_dtype, u.get_device(), _sig(u), _sig(delta), _sig(A), _sig(B), _sig(C),
                    _sig(D), _sig(z), _sig(h0), None if config is None else tuple(sorted(config.items())))
        plan = _PLANS.get(plan_key)
        if plan is not None:
            return plan(u, delta, A, B, C, D, z, h0, out_dtype or u.dtype)
    if any(t is not None and t.dtype == torch.float64 for t in (u, delta, A, B, C, D, z, h0)):
        return selective_scan_ref(u, delta, A, B, C, D, z, h0, out_dtype)
    bsz, d, L = u.shape
    n = A.shape[-1]
    out_dtype = out_dtype or u.dtype
    y = torch.empty((bsz, d, L), dtype=out_dtype, device=u.device)
    hl = torch.empty((bsz, d, n), dtype=torch.float32, device=u.device)
    if L == 0 or bsz == 0 or d == 0:
        if h0 is not None:
            hl.copy_(h0.expand(bsz, d, n))
        else:
            hl.zero_()
        return y, hl
    cfg = dict(config) if config else choose_config(bsz, d, L, n, u.device.index or 0)
    if h0 is not None:
        h0 = h0.to(torch.float32).expand(bsz, d, n).contiguous()
    if cfg.get("kind") == "gluon":
        from . import scan_gluon

        out = scan_gluon.selective_scan_gluon(u, delta, A, B, C, D, z, h0, y, hl, cfg, _flag_buffer,
                                              None if plan_key is None else functools.partial(_keep_plan, plan_key))
        if out is not None:
            return out
        cfg = dict(_choose_config(bsz, d, L, n, u.device.index or 0))  # a layout the Gluon kernel does not take
    BD, T, G = cfg.get("BD", 16), cfg.get("T", 16), cfg["G"]
    NP = _next_pow2(max(n, 1))
    LG = triton.cdiv(triton.cdiv(L, G), T) * T
    G = triton.cdiv(L, LG)
    dummy = y
    grid = (triton.cdiv(d, BD), G, bsz)
    seq = cfg.get("kind", "chunk") == "seq"
    if cfg.get("kind") == "seqk":
        K = cfg.get("K", 4)
        LG = triton.cdiv(triton.cdiv(L, cfg["G"]), K) * K
        G = triton.cdiv(L, LG)
        nblk = triton.cdiv(d, BD)
        fused = bool(cfg.get("fused", False)) and G > 1
        if G > 1:
            buf = torch.empty(bsz * G * d * (NP + 1), dtype=torch.float32, device=u.device)  # one allocation
            S = buf[: bsz * G * d * NP]
            ds = buf[bsz * G * d * NP:]
        else:
            S = ds = hl
        flags = cnts = hl
        if fused:
            flags = _flag_buffer(u.device, 2 * bsz * (G - 1) * nblk + 1)  # flags, reader counts, ticket
            cnts = flags[bsz * (G - 1) * nblk:]
        zz = z if z is not None else dummy
        zs = z.stride() if z is not None else (0, 0, 0)
        common = dict(BD=BD, NP=NP, K=K, PF2=bool(cfg.get("PF2", False)), num_warps=cfg.get("num_warps", 1),
                      num_stages=cfg.get("num_stages", 1))
        strides = (*u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *zs, *y.stride())
        if G > 1 and not fused:
            _ssm_seqk_kernel[(nblk, G - 1, bsz)](
                u, delta, A, B, C, dummy, zz, dummy, y, hl, S, ds, flags, cnts, d, n, L, LG // K, G, G - 1, *strides,
                HAS_D=False, HAS_Z=False, HAS_H0=False, STATE_ONLY=True, FUSED=False, **common)
        _ssm_seqk_kernel[(nblk, 2 * G - 1 if fused else G, bsz)](
            u, delta, A, B, C, D if D is not None else dummy, zz, h0 if h0 is not None else dummy, y, hl, S, ds,
            flags, cnts, d, n, L, LG // K, G, G - 1, *strides,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=h0 is not None, STATE_ONLY=False, FUSED=fused, **common)
        return y, hl
    if seq:
        LG = triton.cdiv(L, cfg["G"])
        G = triton.cdiv(L, LG)
    if G > 1:
        S = torch.empty((bsz, G, d, NP), dtype=torch.float32, device=u.device)
        ds = torch.empty((bsz, G, d), dtype=torch.float32, device=u.device)
    else:
        S = ds = hl
    zz = z if z is not None else dummy
    zs = z.stride() if z is not None else (0, 0, 0)
    if seq:
        common = dict(BD=BD, NP=NP, num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
        if G > 1:
            _ssm_seq_kernel[(triton.cdiv(d, BD), G - 1, bsz)](
                u, delta, A, B, C, dummy, zz, dummy, y, hl, S, ds, d, n, L, LG, G, G - 1,
                *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *zs, *y.stride(),
                HAS_D=False, HAS_Z=False, HAS_H0=False, STATE_ONLY=True, **common)
        _ssm_seq_kernel[grid if G == grid[1] else (grid[0], G, bsz)](
            u, delta, A, B, C, D if D is not None else dummy, zz, h0 if h0 is not None else dummy, y, hl, S, ds,
            d, n, L, LG, G, G - 1,
            *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *zs, *y.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=h0 is not None, STATE_ONLY=False, **common)
        return y, hl
    if G > 1:
        _ssm_group_state_kernel[(triton.cdiv(d, BD), G - 1, bsz)](
            u, delta, A, B, S, ds, d, n, L, LG, G,
            *u.stride(), *delta.stride(), *A.stride(), *B.stride(),
            BD=BD, NP=NP, T=T, num_warps=cfg.get("num_warps", 4),
        )
    _ssm_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        h0 if h0 is not None else dummy, y, hl, S, ds,
        d, n, L, LG, G, G - 1,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(),
        *(z.stride() if z is not None else (0, 0, 0)), *y.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=h0 is not None,
        BD=BD, NP=NP, T=T, num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )
    return y, hl


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


def linear_scan_triton(
    a: Tensor,
    b: Tensor,
    h0: Optional[Tensor] = None,
    C: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    state_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    if any(t is not None and t.dtype == torch.float64 for t in (a, b, h0, C)):
        return linear_scan_ref(a, b, h0, C, out_dtype, state_dtype)
    from ..ops.scan import _linear_scan_shapes

    S = _linear_scan_shapes(a, b, h0)
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


def kernel_source() -> str:
    """The Triton source of these kernels and of the Gluon kernel (for ``fxopt.codegen.kernel_sources``)."""
    import inspect

    src = inspect.getsource(inspect.getmodule(_ssm_fwd_kernel))
    try:
        from . import scan_gluon
    except Exception:  # pragma: no cover - a Triton without Gluon
        return src
    return src + "\n\n# " + "-" * 94 + "\n# fxopt/codegen/scan_gluon.py\n" + inspect.getsource(scan_gluon)
