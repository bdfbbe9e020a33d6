"""The selective-scan GPU kernel written in Gluon (Triton's explicit-layout dialect).

Its reference is :func:`fxopt.codegen.scan_ref.selective_scan_ref`; its launch choice
:class:`fxopt.codegen.scan_config.GluonScanConfig`; its host side (shared with the plain-Triton
kernel: both take the same arguments) :mod:`fxopt.codegen.scan_launch`.

Glossary: ``b`` batch, ``d`` channels, ``l`` time steps, ``n`` state size (``NP`` its power of two),
``K`` time steps per chunk, ``G`` groups the sequence is cut into, ``TPC`` lanes per channel,
``SPL = NP / TPC`` states per lane, ``M`` channels per lane, ``W`` warps per program.

Why Gluon and not plain Triton (:mod:`fxopt.codegen.scan_triton`, which runs under the
interpreter and stays the fallback): plain Triton chose layouts that spread the K steps of a tile
and the n states of a channel over lanes (~570 warp shuffles per 8 steps). Here they are written down:

* a channel's ``n`` states live on ``TPC`` consecutive lanes, ``SPL`` each (``LS``): the readout
  ``sum_n h*C`` is ``SPL`` FMAs and ``log2(TPC)`` shuffles;
* the (channel, K steps) tiles of u / delta / z live in the same lanes with the K steps in one
  thread (``LT``): picking step k out of a tile is a register move; the D / silu(z) epilogue and the
  y store use ``LE`` (the K steps split over the channel's lanes: no redundant work);
* u / delta / z chunks reach shared memory by async copies (``cp.async``) into a ring of ``STAGES``
  chunks, so loads run ``STAGES - 1`` chunks ahead without holding registers;
* B and C chunks go through shared memory once per program (shared by its ``W`` warps): by
  16-byte loads into registers and a transposed store when they are unit-stride along l
  (``BC_REG``), else by async copies; each step reads its ``(n,)`` row as a broadcast.

What limits it (ncu, H100, b4 l2048 d5120 n16): with the SFU exp, the shared-memory / L1 pipe
(each lane reads 2 * SPL floats of B and C per step) and the exp unit (one MUFU.EX2 per state per
step), with ~10 warps per SM (the problem has 1280); with the FMA-pipe exp, mostly instruction
issue (12 instructions per exp: 1 307 per 16-step loop against 1 139). See BENCHMARKS.md. The
SASS tools that measured this are in :mod:`fxopt.tools.sass`.

The sequence may be cut into ``G`` groups (few b*d channels): a pre-pass launch (``STATE_ONLY``)
computes each group's end state from zero and its delta sum, the main launch folds those of the
groups before it into its carry-in (``h = exp(A sum delta) h + S``). (One launch whose main
programs waited on flags set by the pre-pass programs measured slower on the H100 and was removed.)

State and arithmetic in fp32 for fp32 / fp16 / bf16 inputs. Two ways to take ``exp(dt A)``
(``EXP_SFU``; ``FXOPT_SCAN_EXP``, resolved per GPU by :func:`fxopt.codegen.scan_config.resolve_exp`):

* ``fma``: ``2^(dt * A log2 e)`` by :func:`fxopt.codegen.exp2.exp2_mul_gluon`, a polynomial on the
  FMA pipe, <= 1 ulp of the exact product's power and unbiased: the contract holds by construction.
  Costs ~12 instructions per state and step; the loop is then issue-bound.
* ``sfu``: one MUFU.EX2 of ``fma(dt, A log2 e, bias)``. The SFU's exp2 is ~2 ulp and biased low;
  uncorrected, its bias adds up along a long memory and the error to an fp64 loop reached 5.7x the
  eager loop's (the contract allows 2x). The calibrated bias
  (:data:`fxopt.codegen.scan_config.SFU_EXP_BIAS`) centres it: within the contract as measured
  (<= 0.75 of the bound), not by construction; ~1.5x faster. ``auto`` (the default) takes it on
  the GPUs it was calibrated on (:data:`fxopt.codegen.scan_config.SFU_CALIBRATED`).

The group carry and the silu(z) epilogue use ``exp2_mul_gluon`` (and a correctly rounded division)
in both modes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from .exp2 import exp2_mul_gluon
from .scan_config import GluonScanConfig, KernelChoice, kernel_strides, next_pow2, sfu_bias
from .scan_ref import SelectiveScanArgs


@gluon.jit(do_not_specialize=["LGK", "G", "GM1"])
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
    HAS_D: gl.constexpr, HAS_Z: gl.constexpr, HAS_H0: gl.constexpr, STATE_ONLY: gl.constexpr,
    NP: gl.constexpr, TPC: gl.constexpr, M: gl.constexpr, W: gl.constexpr, K: gl.constexpr,
    BC_LMAJOR: gl.constexpr, STAGES: gl.constexpr, N_EVEN: gl.constexpr,
    BC_REG: gl.constexpr, EXP_SFU: gl.constexpr, SFU_BIAS: gl.constexpr,
):
    """Grid ``(d blocks, groups, b)``; see the module docstring. STATE_ONLY: the group pre-pass
    (end state from zero and delta sum of group g -> ``S[b, g, d, n]``, ``ds[b, g, d]``)."""
    pid_d = gl.program_id(0)
    g = gl.program_id(1)
    b = gl.program_id(2)
    SPL: gl.constexpr = NP // TPC          # states per lane
    CPW: gl.constexpr = 32 // TPC          # channel slots per warp
    BD: gl.constexpr = M * CPW * W         # channels per program
    # [BD, NP] state: M channels per lane; a channel's states on TPC consecutive lanes, SPL each
    LS: gl.constexpr = gl.BlockedLayout([M, SPL], [CPW, TPC], [W, 1], [1, 0])
    # [BD, K] tiles: the same lanes, the K steps in one thread (replicated over the TPC lanes)
    LT: gl.constexpr = gl.BlockedLayout([M, K], [CPW, TPC], [W, 1], [1, 0])
    LSD: gl.constexpr = gl.SliceLayout(1, LS)
    LSN: gl.constexpr = gl.SliceLayout(0, LS)
    LTD: gl.constexpr = gl.SliceLayout(1, LT)
    LTK: gl.constexpr = gl.SliceLayout(0, LT)
    # [K, NP] chunks of B / C as loaded from global memory (coalesced along whichever axis is unit-stride)
    # (warps split the K axis, so W warps copy a chunk once between them)
    if BC_REG:  # B / C through registers: 16-byte loads along l, lanes over n (stored transposed)
        TNR: gl.constexpr = NP if NP < 32 else 32
        TKR: gl.constexpr = 32 // TNR
        VKR0: gl.constexpr = 128 // B_ptr.dtype.element_ty.primitive_bitwidth
        VKR: gl.constexpr = VKR0 if VKR0 * TKR * W <= K else (K // (TKR * W) if K >= TKR * W else 1)
        LB: gl.constexpr = gl.BlockedLayout([VKR, 1], [TKR, TNR], [W, 1], [0, 1])
    elif BC_LMAJOR:
        TN: gl.constexpr = NP if NP < 32 else 32
        VK: gl.constexpr = K // ((32 // TN) * W) if K > (32 // TN) * W else 1
        LB: gl.constexpr = gl.BlockedLayout([VK, 1], [32 // TN, TN], [W, 1], [0, 1])
    else:
        VN: gl.constexpr = NP if NP < 4 else 4
        TNN: gl.constexpr = NP // VN if NP // VN < 32 else 32
        LB: gl.constexpr = gl.BlockedLayout([1, VN], [32 // TNN, TNN], [W, 1], [1, 0])
    LE: gl.constexpr = gl.BlockedLayout([M, K // TPC], [CPW, TPC], [W, 1], [1, 0])
    LED: gl.constexpr = gl.SliceLayout(1, LE)
    LEK: gl.constexpr = gl.SliceLayout(0, LE)
    LBK: gl.constexpr = gl.SliceLayout(1, LB)
    LBN: gl.constexpr = gl.SliceLayout(0, LB)
    SH: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])

    offs_d = pid_d * BD + gl.arange(0, BD, layout=LSD)
    offs_n = gl.arange(0, NP, layout=LSN)
    md = offs_d < D_
    mn = offs_n < N_
    mdn = md[:, None] & mn[None, :]
    A = gl.load(A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=mdn, other=0.0).to(gl.float32)
    A = A * 1.4426950408889634
    if HAS_H0 and not STATE_ONLY:
        h = gl.load(h0_ptr + ((b * D_ + offs_d[:, None]) * N_ + offs_n[None, :]), mask=mdn, other=0.0).to(gl.float32)
    else:
        h = gl.zeros([BD, NP], gl.float32, LS)
    if not STATE_ONLY:
        # fold the end states of the groups before this one, 4 per iteration so that their
        # independent loads are in flight together
        for gp0 in range(0, GM1, 4):
            for j in gl.static_range(4):
                gp = gp0 + j
                keep = gp < g
                Sg = gl.load(S_ptr + ((b * G + gp) * D_ + offs_d[:, None]) * NP + offs_n[None, :],
                             mask=md[:, None] & keep, other=0.0, cache_modifier=".cg")
                dsg = gl.load(ds_ptr + (b * G + gp) * D_ + offs_d, mask=md & keep, other=0.0, cache_modifier=".cg")
                h = gl.where(keep, exp2_mul_gluon(A, dsg[:, None]) * h + Sg, h)

    # ---- tiles: a ring of STAGES chunks in shared memory, filled by async copies ----------
    td = pid_d * BD + gl.arange(0, BD, layout=LTD)
    tk = gl.arange(0, K, layout=LTK)
    # copies and the epilogue use LE: the K steps of a channel split over its TPC lanes
    ed = pid_d * BD + gl.arange(0, BD, layout=LED)
    ek = gl.arange(0, K, layout=LEK)
    med = (ed < D_)[:, None]
    bk = gl.arange(0, K, layout=LBK)
    bn = gl.arange(0, NP, layout=LBN)
    if N_EVEN:
        mbn = (bn >= 0)[None, :]  # no mask along n: lets 16-bit B / C copy in 4-byte or wider pieces
    else:
        mbn = (bn < N_)[None, :]
    if HAS_D:
        Dv = gl.load(Dv_ptr + ed, mask=ed < D_, other=0.0).to(gl.float32)
    LG = LGK * K
    l0 = g * LG
    u_base = u_ptr + b * s_ub + ed[:, None] * s_ud
    t_base = dt_ptr + b * s_tb + ed[:, None] * s_td
    z_base = z_ptr + b * s_zb + ed[:, None] * s_zd
    y_base = y_ptr + b * s_yb + ed[:, None] * s_yd
    B_base = B_ptr + b * s_bb + bn[None, :] * s_bn
    C_base = C_ptr + b * s_cb + bn[None, :] * s_cn
    sT = gl.allocate_shared_memory(dt_ptr.dtype.element_ty, [STAGES, BD, K], SH)
    sU = gl.allocate_shared_memory(u_ptr.dtype.element_ty, [STAGES, BD, K], SH)
    sB = gl.allocate_shared_memory(B_ptr.dtype.element_ty, [STAGES, K, NP], SH)
    if HAS_Z and not STATE_ONLY:
        sZ = gl.allocate_shared_memory(z_ptr.dtype.element_ty, [STAGES, BD, K], SH)
    if not STATE_ONLY:
        sC = gl.allocate_shared_memory(C_ptr.dtype.element_ty, [STAGES, K, NP], SH)
    # prologue: chunks 0 .. STAGES-2 in flight (masked-off elements are zero-filled)
    for p in gl.static_range(STAGES - 1):
        tt = l0 + p * K + ek
        m = med & ((tt < L_) & (p * K < LG))[None, :]
        async_copy.async_copy_global_to_shared(sT.index(p), t_base + tt[None, :] * s_tl, mask=m)
        async_copy.async_copy_global_to_shared(sU.index(p), u_base + tt[None, :] * s_ul, mask=m)
        if HAS_Z and not STATE_ONLY:
            async_copy.async_copy_global_to_shared(sZ.index(p), z_base + tt[None, :] * s_zl, mask=m)
        bt = l0 + p * K + bk
        mb = ((bt < L_) & (p * K < LG))[:, None] & mbn
        if BC_REG:
            sB.index(p).store(gl.load(B_base + bt[:, None] * s_bl, mask=mb, other=0.0))
            if not STATE_ONLY:
                sC.index(p).store(gl.load(C_base + bt[:, None] * s_cl, mask=mb, other=0.0))
        else:
            async_copy.async_copy_global_to_shared(sB.index(p), B_base + bt[:, None] * s_bl, mask=mb)
            if not STATE_ONLY:
                async_copy.async_copy_global_to_shared(sC.index(p), C_base + bt[:, None] * s_cl, mask=mb)
        async_copy.commit_group()
    if BC_REG:  # the chunk after those, in registers until its stage is free
        bt = l0 + (STAGES - 1) * K + bk
        mb = ((bt < L_) & ((STAGES - 1) * K < LG))[:, None] & mbn
        rB = gl.load(B_base + bt[:, None] * s_bl, mask=mb, other=0.0)
        if not STATE_ONLY:
            rC = gl.load(C_base + bt[:, None] * s_cl, mask=mb, other=0.0)

    dsum = gl.zeros([BD], gl.float32, LTD)
    stage = 0
    for c in range(0, LG, K):
        # this chunk's copies are done (ours: wait_group; everyone's: the barrier), and every
        # lane has finished reading the stage the next copies overwrite
        async_copy.wait_group(STAGES - 2)
        gl.thread_barrier()
        nxt = c + (STAGES - 1) * K
        ns = (stage + STAGES - 1) % STAGES
        tn = l0 + nxt + ek
        m = med & ((tn < L_) & (nxt < LG))[None, :]
        async_copy.async_copy_global_to_shared(sT.index(ns), t_base + tn[None, :] * s_tl, mask=m)
        async_copy.async_copy_global_to_shared(sU.index(ns), u_base + tn[None, :] * s_ul, mask=m)
        if HAS_Z and not STATE_ONLY:
            async_copy.async_copy_global_to_shared(sZ.index(ns), z_base + tn[None, :] * s_zl, mask=m)
        if BC_REG:
            sB.index(ns).store(rB)
            if not STATE_ONLY:
                sC.index(ns).store(rC)
            bt = l0 + nxt + K + bk
            mb = ((bt < L_) & (nxt + K < LG))[:, None] & mbn
            rB = gl.load(B_base + bt[:, None] * s_bl, mask=mb, other=0.0)
            if not STATE_ONLY:
                rC = gl.load(C_base + bt[:, None] * s_cl, mask=mb, other=0.0)
        else:
            bt = l0 + nxt + bk
            mb = ((bt < L_) & (nxt < LG))[:, None] & mbn
            async_copy.async_copy_global_to_shared(sB.index(ns), B_base + bt[:, None] * s_bl, mask=mb)
            if not STATE_ONLY:
                async_copy.async_copy_global_to_shared(sC.index(ns), C_base + bt[:, None] * s_cl, mask=mb)
        async_copy.commit_group()

        dtc = sT.index(stage).load(LT).to(gl.float32)
        uc = sU.index(stage).load(LT).to(gl.float32)
        dtu = dtc * uc
        dtc_i = dtc.to(gl.int32, bitcast=True)
        dtu_i = dtu.to(gl.int32, bitcast=True)
        yt = gl.zeros([BD, K], gl.float32, LT)
        sBc = sB.index(stage)
        if not STATE_ONLY:
            sCc = sC.index(stage)
        for k in gl.static_range(K):
            sel = (tk == k)[None, :]
            # step k out of the tiles: in-thread
            # (as integers: x + 0 folds away where the float sum left one FADD per value)
            dtk = gl.convert_layout(gl.sum(gl.where(sel, dtc_i, 0), axis=1), LSD, assert_trivial=True).to(gl.float32, bitcast=True)
            xk = gl.convert_layout(gl.sum(gl.where(sel, dtu_i, 0), axis=1), LSD, assert_trivial=True).to(gl.float32, bitcast=True)
            Bk = sBc.slice(k, 1).load(LS).to(gl.float32)               # [1, NP], broadcast read
            if EXP_SFU:  # one MUFU.EX2 of the bias-corrected argument (see SFU_EXP_BIAS)
                dA = gl.exp2(gl.fma(dtk[:, None], A, SFU_BIAS))
            else:  # exp(dt A) = 2^(dt A log2 e) within 1 ulp, unbiased, on the FMA pipe
                dA = exp2_mul_gluon(dtk[:, None], A)
            h = dA * h + xk[:, None] * Bk
            if not STATE_ONLY:
                Ck = sCc.slice(k, 1).load(LS).to(gl.float32)
                yk = gl.convert_layout(gl.sum(h * Ck, axis=1), LTD, assert_trivial=True)
                yt = gl.where(sel, yk[:, None], yt)
        if STATE_ONLY:
            dsum += gl.sum(dtc, axis=1)
        else:
            # epilogue on LE: each lane its K / TPC steps
            ye = gl.convert_layout(yt, LE)
            tt = l0 + c + ek
            m2 = med & (tt < L_)[None, :]
            if HAS_D:
                ye += sU.index(stage).load(LE).to(gl.float32) * Dv[:, None]
            if HAS_Z:
                ze = sZ.index(stage).load(LE).to(gl.float32)
                ye = gl.div_rn(ye * ze, 1.0 + exp2_mul_gluon(ze, -1.4426950408889634))
            gl.store(y_base + tt[None, :] * s_yl, ye.to(y_ptr.dtype.element_ty), mask=m2)
        stage = (stage + 1) % STAGES
    async_copy.wait_group(0)
    if STATE_ONLY:
        gl.store(S_ptr + ((b * G + g) * D_ + offs_d[:, None]) * NP + offs_n[None, :], h, mask=md[:, None])
        gl.store(ds_ptr + (b * G + g) * D_ + td, dsum, mask=td < D_)
    else:
        if g == G - 1:
            gl.store(hl_ptr + ((b * D_ + offs_d[:, None]) * N_ + offs_n[None, :]), h, mask=mdn)


# ----------------------------------------------------------------------------------------------
# what a launch needs for one input signature
# ----------------------------------------------------------------------------------------------
def _aligned(t: Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def _div16(*xs: int) -> bool:
    # what Triton's specialisation tells the compiler about an integer argument: divisible by 16
    return all(x % 16 == 0 for x in xs)


def _contiguous_copy(t: Tensor) -> Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def _fp32_copy(t: Tensor) -> Tensor:
    return t.float()


def _tile_prep(t: Optional[Tensor]):
    """A 16-bit (b, d, l) tile source as the async copies need it: unit stride along l, the other
    strides divisible by 16 elements, 16-byte aligned; else a contiguous copy (the caller checked
    that l is a multiple of 16)."""
    if t is None or t.element_size() == 4 or (t.stride(2) == 1 and _div16(*kernel_strides(t)[:2]) and _aligned(t)):
        return None
    return _contiguous_copy


def _bc_prep(t: Tensor, wide_n: bool):
    """B / C as the kernel copies them: 16-bit only when unit-stride along n with >= 2 states per
    lane, the other strides divisible by 16 elements, aligned; else an fp32 copy (b*n*l: small)."""
    if t.element_size() == 4:
        return None
    sb, _, sl = kernel_strides(t)
    if t.stride(1) == 1 and wide_n and _div16(sb, sl) and _aligned(t):
        return None
    return _fp32_copy


def _l_major(B: Tensor, C: Tensor) -> bool:
    """B and C unit-stride along l (and not both along n too): the kernel's BC_LMAJOR layout."""
    return B.stride(2) == 1 and C.stride(2) == 1 and not (B.stride(1) == 1 and C.stride(1) == 1)


def specialise(a: SelectiveScanArgs, cfg: GluonScanConfig, cap: tuple) -> Optional[KernelChoice]:
    """What :func:`selective_scan_kernel` needs of the launches for inputs like ``a`` (a GPU of
    compute capability ``cap``), or None when it declines the layout. Async copies move 4, 8 or
    16 bytes per piece: 16-bit tiles must be unit-stride along l with K / TPC >= 2 and whole
    pieces inside the sequence; 16-bit B / C copied asynchronously must be unit-stride along n
    with >= 2 states per lane (else they are read as fp32 copies: b*n*l, small). B / C unit-stride
    along l with ``bc_reg`` go through registers (BC_REG: plain loads, any dtype) and are never
    copied: a copy there would be an extra allocation and kernel launch per call (the fp32 copies
    made bf16 calls ~20 us slower on the host than fp32 ones, benchmarks/host_cost.py on an H200)
    for values the kernel converts to fp32 exactly as the copy would."""
    n, L = a.A.shape[-1], a.u.shape[2]
    NP = next_pow2(n)
    TPC = min(cfg.TPC, NP)
    preps = [None] * 8
    if any(t is not None and t.element_size() < 4 for t in (a.u, a.delta, a.z)):
        if L % 16 or cfg.K < 2 * TPC:
            return None
        for i in (0, 1, 6):  # u, delta, z
            preps[i] = _tile_prep(a[i])
    n_even = n == NP
    wide = n_even and NP // TPC >= 2
    if not (cfg.bc_reg and _l_major(a.B, a.C)):
        preps[3], preps[4] = _bc_prep(a.B, wide), _bc_prep(a.C, wide)
    B, C = (a[i] if preps[i] is None else preps[i](a[i]) for i in (3, 4))
    lmajor = _l_major(B, C)
    constexprs = (NP, TPC, cfg.M, cfg.W, cfg.K, lmajor, cfg.STAGES, n_even, cfg.bc_reg and lmajor,
                  cfg.exp == "sfu", sfu_bias(cfg, cap))
    return KernelChoice(kernel=selective_scan_kernel, block_d=cfg.M * (32 // TPC) * cfg.W, chunk=cfg.K,
                        groups=cfg.G, constexprs=constexprs, num_warps=cfg.W, preps=tuple(preps), fallible=True)
