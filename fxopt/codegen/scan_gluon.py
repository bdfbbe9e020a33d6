"""The selective-scan GPU kernel written in Gluon (Triton's explicit-layout dialect), beside its ``_ref``.

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
issue (12 instructions per exp: 1 307 per 16-step loop against 1 139). See BENCHMARKS.md.

The sequence may be cut into ``G`` groups (few b*d channels): a pre-pass computes each group's end
state from zero and its delta sum, the main pass folds those of the groups before it into its
carry-in (``h = exp(A sum delta) h + S``). The pre-pass is a separate launch by default; with
``FUSED`` both passes are one launch whose program ids come from an atomic ticket (see
``_ssm_kernel``; measured slower than two launches on the H100).

State and arithmetic in fp32 for fp32 / fp16 / bf16 inputs. Two ways to take ``exp(dt A)``
(``EXP_SFU``; ``FXOPT_SCAN_EXP``, resolved per GPU by :func:`resolve_exp`):

* ``fma``: ``2^(dt * A log2 e)`` by :func:`fxopt.codegen.exp2.exp2_mul_gluon`, a polynomial on the
  FMA pipe, <= 1 ulp of the exact product's power and unbiased: the contract holds by construction.
  Costs ~12 instructions per state and step; the loop is then issue-bound.
* ``sfu``: one MUFU.EX2 of ``fma(dt, A log2 e, bias)``. The SFU's exp2 is ~2 ulp and biased low;
  uncorrected, its bias adds up along a long memory and the error to an fp64 loop reached 5.7x the
  eager loop's (the contract allows 2x). The calibrated bias (:data:`SFU_EXP_BIAS`) centres it:
  within the contract as measured (<= 0.75 of the bound), not by construction; ~1.5x faster.
  ``auto`` (the default) takes it on the GPUs it was calibrated on (:data:`SFU_CALIBRATED`).

The group carry and the silu(z) epilogue use ``exp2_mul_gluon`` (and a correctly rounded division)
in both modes.
"""
from __future__ import annotations

import functools
import warnings

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from ..ops.scan import selective_scan_ref
from .exp2 import exp2_mul_gluon
from .launch import compiled_kernel, run_compiled

selective_scan_gluon_ref = selective_scan_ref

LOG2E = 1.4426950408889634

# FXOPT_SCAN_EXP=sfu: exp(dt A) as one MUFU.EX2 of ``fma(dt, A log2 e, SFU_EXP_BIAS)``. The SFU's
# exp2 is ~2 ulp and biased low (mean relative error -0.1 to -0.85 x 2^-24 depending on the
# argument, benchmarks/scan_numerics.py --exp-profile, H100); a recurrence adds a bias up along
# the sequence. Adding 2e-8 to the argument (a relative +1.4e-8 on the result, folded into the
# FMA that forms the argument: no extra instruction) centres the error where long memories live
# (decays near 1). Calibrated on the H100 over five regimes of exp(dt A) x 7 shapes x 3 dtypes
# (benchmarks/scan.py --contract --contract-dists ...): uses at most 0.75 of the fp64_relative(2)
# bound, where 0 and 3e-8 fail it. A measurement, not a proof: the default (fma) is exact to 1 ulp
# by construction.
SFU_EXP_BIAS = 2e-8

# GPUs (compute capability) whose MUFU.EX2 bias the correction above was calibrated on. There
# FXOPT_SCAN_EXP=auto (the default) picks the SFU exp: the speed targets need it (the
# FMA-pipe exp makes the loop issue-bound, ~1.5x slower at b4 l2048 d5120) and the contract holds
# with a margin (<= 0.75 of the bound over 420 GPU checks). Elsewhere auto picks the FMA-pipe exp,
# whose accuracy does not depend on the hardware's exp unit; add an entry after running
# ``benchmarks/scan.py --contract --contract-dists test mamba-init slow still fast --contract-cfg
# '{"exp": "sfu"}'`` on that GPU.
SFU_CALIBRATED = {(9, 0): SFU_EXP_BIAS}


def resolve_exp(mode: str, capability: tuple) -> str:
    """The exp mode a launch on a GPU of this compute capability uses: ``auto`` is ``sfu`` where
    the SFU's bias correction was calibrated (:data:`SFU_CALIBRATED`), else ``fma``; explicit
    ``fma`` / ``sfu`` are kept (``sfu`` then uses the sm_90 correction)."""
    if mode != "auto":
        return mode
    return "sfu" if tuple(capability) in SFU_CALIBRATED else "fma"


@gluon.jit
def _body(
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
    HAS_D: gl.constexpr, HAS_Z: gl.constexpr, HAS_H0: gl.constexpr, STATE_ONLY: gl.constexpr,
    NP: gl.constexpr, TPC: gl.constexpr, M: gl.constexpr, W: gl.constexpr, K: gl.constexpr, FUSED: gl.constexpr,
    BC_LMAJOR: gl.constexpr, STAGES: gl.constexpr, N_EVEN: gl.constexpr,
    BC_REG: gl.constexpr, EXP_SFU: gl.constexpr, SFU_BIAS: gl.constexpr,
):
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

    nblk = gl.num_programs(0)
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
                if FUSED:
                    # wait for group gp's pre-pass program (it holds a lower ticket, so it runs)
                    fp = flag_ptr + (b * GM1 + gp) * nblk + pid_d
                    if keep:
                        f = gl.atomic_add(fp, 0, sem="acquire")
                        while f == 0:
                            f = gl.atomic_add(fp, 0, sem="acquire")
                Sg = gl.load(S_ptr + ((b * G + gp) * D_ + offs_d[:, None]) * NP + offs_n[None, :],
                             mask=md[:, None] & keep, other=0.0, cache_modifier=".cg")
                dsg = gl.load(ds_ptr + (b * G + gp) * D_ + offs_d, mask=md & keep, other=0.0, cache_modifier=".cg")
                h = gl.where(keep, exp2_mul_gluon(A, dsg[:, None]) * h + Sg, h)
        if FUSED:
            # the last reader of each flag resets it (and its reader count) for the next launch
            for gp in range(0, GM1):
                if gp < g:
                    old = gl.atomic_add(cnt_ptr + (b * GM1 + gp) * nblk + pid_d, 1, sem="relaxed")
                    if old == GM1 - 1 - gp:
                        gl.atomic_xchg(cnt_ptr + (b * GM1 + gp) * nblk + pid_d, 0, sem="relaxed")
                        gl.atomic_xchg(flag_ptr + (b * GM1 + gp) * nblk + pid_d, 0, sem="relaxed")

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
        if FUSED:
            gl.thread_barrier()
            gl.atomic_xchg(flag_ptr + (b * GM1 + g) * nblk + pid_d, 1, sem="release")
    else:
        if g == G - 1:
            gl.store(hl_ptr + ((b * D_ + offs_d[:, None]) * N_ + offs_n[None, :]), h, mask=mdn)


@gluon.jit(do_not_specialize=["LGK", "G", "GM1"])
def _ssm_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Dv_ptr, z_ptr, h0_ptr, y_ptr, hl_ptr, S_ptr, ds_ptr, flag_ptr, cnt_ptr,
    D_, N_, L_, LGK, G, GM1,
    s_ub, s_ud, s_ul,
    s_tb, s_td, s_tl,
    s_ad, s_an,
    s_bb, s_bn, s_bl,
    s_cb, s_cn, s_cl,
    s_zb, s_zd, s_zl,
    s_yb, s_yd, s_yl,
    HAS_D: gl.constexpr, HAS_Z: gl.constexpr, HAS_H0: gl.constexpr, STATE_ONLY: gl.constexpr,
    NP: gl.constexpr, TPC: gl.constexpr, M: gl.constexpr, W: gl.constexpr, K: gl.constexpr, FUSED: gl.constexpr,
    BC_LMAJOR: gl.constexpr, STAGES: gl.constexpr, N_EVEN: gl.constexpr,
    BC_REG: gl.constexpr, EXP_SFU: gl.constexpr, SFU_BIAS: gl.constexpr,
):
    """Grid ``(d blocks, groups, b)``. FUSED: one launch for the pre-pass and the main pass: rows
    ``0 .. G-2`` of axis 1 are the pre-pass of groups 0 .. G-2, rows ``G-1 .. 2G-2`` the main pass
    of groups 0 .. G-1; a main program waits on a flag per preceding group.

    Deadlock freedom must not rest on the hardware dispatching programs in id order (CUDA does not
    promise it), so FUSED programs take their ids from an atomic ticket: a program holding ticket
    t knows every ticket below t went to a program already running, and the programs it waits for
    (pre-pass rows, which wait on nothing) hold lower tickets. The last holder resets the counter."""
    if FUSED:
        nx = gl.num_programs(0)
        ny = gl.num_programs(1)
        total = nx * ny * gl.num_programs(2)
        ticket_ptr = cnt_ptr + gl.num_programs(2) * GM1 * nx  # one int32 past the reader counts
        t = gl.atomic_add(ticket_ptr, 1)
        if t == total - 1:
            gl.atomic_xchg(ticket_ptr, 0)
        pid_d = t % nx
        gy = (t // nx) % ny
        b = t // (nx * ny)
        if gy < GM1:
            _body(pid_d, gy, b, flag_ptr, cnt_ptr, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Dv_ptr, z_ptr, h0_ptr, y_ptr,
                  hl_ptr, S_ptr, ds_ptr, D_, N_, L_, LGK, G, GM1, s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_ad, s_an,
                  s_bb, s_bn, s_bl, s_cb, s_cn, s_cl, s_zb, s_zd, s_zl, s_yb, s_yd, s_yl,
                  HAS_D, HAS_Z, HAS_H0, True, NP, TPC, M, W, K, True, BC_LMAJOR, STAGES, N_EVEN, BC_REG, EXP_SFU, SFU_BIAS)
        else:
            _body(pid_d, gy - GM1, b, flag_ptr, cnt_ptr, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Dv_ptr, z_ptr, h0_ptr,
                  y_ptr, hl_ptr, S_ptr, ds_ptr, D_, N_, L_, LGK, G, GM1, s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_ad,
                  s_an, s_bb, s_bn, s_bl, s_cb, s_cn, s_cl, s_zb, s_zd, s_zl, s_yb, s_yd, s_yl,
                  HAS_D, HAS_Z, HAS_H0, False, NP, TPC, M, W, K, True, BC_LMAJOR, STAGES, N_EVEN, BC_REG, EXP_SFU, SFU_BIAS)
    else:
        _body(gl.program_id(0), gl.program_id(1), gl.program_id(2), flag_ptr, cnt_ptr, u_ptr, dt_ptr, A_ptr, B_ptr,
              C_ptr, Dv_ptr, z_ptr, h0_ptr, y_ptr, hl_ptr, S_ptr, ds_ptr, D_, N_, L_, LGK, G, GM1,
              s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_ad, s_an, s_bb, s_bn, s_bl, s_cb, s_cn, s_cl,
              s_zb, s_zd, s_zl, s_yb, s_yd, s_yl,
              HAS_D, HAS_Z, HAS_H0, STATE_ONLY, NP, TPC, M, W, K, False, BC_LMAJOR, STAGES, N_EVEN, BC_REG, EXP_SFU, SFU_BIAS)


# ----------------------------------------------------------------------------------------------
# launch
# ----------------------------------------------------------------------------------------------
def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple:
    return tuple(torch.cuda.get_device_capability(device_index))


def supported(device: torch.device) -> bool:
    """Gluon kernels need a CUDA device with async copies (sm_80+) and a compiler, not the interpreter."""
    import os

    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def lanes_per_channel(n: int) -> int:
    """Lanes sharing a channel's n states: 8 states per lane (n=16: 2 lanes)."""
    NP = _next_pow2(max(n, 1))
    return max(1, min(NP // 8, 32))


def choose_config(bsz: int, d: int, L: int, n: int, sms: int, exp: str = "fma") -> dict:
    """Launch choice for a scan of this size on a GPU with ``sms`` SMs, ``exp`` resolved (fma / sfu)."""
    if exp not in ("fma", "sfu"):
        raise ValueError(f"exp must be resolved to 'fma' or 'sfu' (resolve_exp), got {exp!r}")
    return dict(_choose_config(bsz, d, L, n, sms, exp))


@functools.lru_cache(maxsize=256)
def _choose_config(bsz: int, d: int, L: int, n: int, sms: int, exp: str) -> dict:
    """Launch choice, from benchmarks/scan.py --tune / --compare on an H100 (2026-11-22): 16 steps
    per chunk, 3 stages, one channel per lane slot. With enough (batch x channel) warps the
    sequence is not split and two warps share a program (one copy of each B / C chunk for both);
    otherwise it is cut into groups of >= 128 steps until there are ~8 warps per SM, with the
    pre-pass as its own launch (measured faster than the fused, ticketed launch). States per lane:
    8 with the SFU exp; 4 with the FMA-pipe exp (``exp="fma"``: 12 instructions per exp, so more
    lanes share the work: b4 l2048 d5120 0.65 -> 0.52 ms, b1 d1536 0.094 -> 0.087 ms). Short and
    narrow: 8 lanes per channel in both modes (b1 l512 d1536 sfu: 0.0286 against 0.0309 ms with 4)."""
    NP = _next_pow2(max(n, 1))
    tpc = lanes_per_channel(n)
    if exp == "fma":
        tpc = min(2 * tpc, NP, 8)
    warps = bsz * -(-d // (32 // tpc))
    K = 16 if L >= 64 else 8
    if warps < 8 * sms and L < 1024:
        # short and narrow: one launch (host time dominates), 8 lanes per channel for more warps
        # (b1 l512 d1536, sfu: 0.0292 ms against 0.0313 with 4 lanes)
        return dict(kind="gluon", TPC=min(NP, 8), M=1, W=1, K=K, STAGES=3, G=1, fused=False, exp=exp)
    G = 1
    while warps * G < 8 * sms and G * 2 <= min(32, L // 128):
        G *= 2
    W = 2 if G == 1 and warps >= 4 * sms else 1
    return dict(kind="gluon", TPC=tpc, M=1, W=W, K=K, STAGES=3, G=G, fused=False, exp=exp)


_COMPILED: dict = {}
_MAX_COMPILED = 256
_FAILED = object()


def _aligned(t) -> bool:
    return t.data_ptr() % 16 == 0


def _strides(t) -> tuple:
    """Strides as the kernel takes them: 0 along size-1 dims (never stepped; 0 tells the compiler
    the most about alignment), (0, 0, 0) for an absent tensor."""
    if t is None:
        return (0, 0, 0)
    return tuple(0 if n == 1 else st for n, st in zip(t.shape, t.stride()))


def _div16(*xs: int) -> bool:
    # what Triton's specialisation tells the compiler about an integer argument: divisible by 16
    return all(x % 16 == 0 for x in xs)


def _unit_l(t):
    """A 16-bit (b, d, l) tile source as the copies need it: unit stride along l, the other strides
    divisible by 16 elements, 16-byte aligned (a contiguous copy otherwise; the caller checked
    that l is a multiple of 16)."""
    if t is None or t.element_size() == 4 or (t.stride(2) == 1 and _div16(*_strides(t)[:2]) and _aligned(t)):
        return t
    return t.contiguous() if not t.is_contiguous() else t.clone()


def _bc_ok(t, wide_n: bool):
    """B / C as the kernel copies them: 16-bit only when unit-stride along n with >= 2 states per
    lane, the other strides divisible by 16 elements, aligned; else an fp32 copy (b*n*l: small)."""
    if t.element_size() == 4:
        return t
    sb, _, sl = _strides(t)
    if t.stride(1) == 1 and wide_n and _div16(sb, sl) and _aligned(t):
        return t
    return t.float()


def selective_scan_gluon(u, delta, A, B, C, D, z, h0, y, hl, cfg: dict, flag_buffer, plan_sink=None):
    """Launch ``_ssm_kernel`` (see the module docstring) writing ``y`` (b, d, l) and ``hl`` (b, d, n),
    with ``h0`` None or fp32 (b, d, n) contiguous. The compiled kernel is cached per exact
    (shapes, strides, dtypes, 16-byte alignment, config), a superset of what Triton specialises on,
    and launched directly: the JIT's argument binding costs tens of microseconds per call.

    ``plan_sink``: called with a :class:`LaunchPlan` that repeats this call for inputs of the same
    signature (the caller keys it; see ``scan_triton.selective_scan_triton``). None when the
    kernel declines the layout (the caller falls back)."""
    bsz, d, L = u.shape
    n = A.shape[-1]
    NP = _next_pow2(max(n, 1))
    TPC, M, W, K, STAGES = cfg["TPC"], cfg.get("M", 1), cfg.get("W", 1), cfg["K"], cfg.get("STAGES", 3)
    TPC = min(TPC, NP)
    # async copies move 4, 8 or 16 bytes per piece: 16-bit tiles must be unit-stride along l with
    # K / TPC >= 2 and whole pieces inside the sequence; 16-bit B / C unit-stride along n with >= 2
    # states per lane (else they are read as fp32 copies: b*n*l, small)
    tiles16 = any(t is not None and t.element_size() < 4 for t in (u, delta, z))
    if tiles16:
        if L % 16 or K < 2 * TPC:
            return None
        u, delta, z = (_unit_l(t) for t in (u, delta, z))
    n_even = n == NP
    wide = n_even and NP // TPC >= 2
    B, C = (_bc_ok(t, wide) for t in (B, C))
    BD = M * (32 // TPC) * W
    LG = -(-(-(-L // cfg["G"])) // K) * K
    G = -(-L // LG)
    nblk = -(-d // BD)
    fused = bool(cfg.get("fused", False)) and G > 1
    strides = tuple(st for t in (u, delta, A, B, C, z, y) for st in _strides(t))
    lmajor = B.stride(2) == 1 and C.stride(2) == 1 and not (B.stride(1) == 1 and C.stride(1) == 1)
    bc_reg = bool(cfg.get("bc_reg", True)) and lmajor
    exp_sfu = cfg.get("exp", "fma") == "sfu"
    default_bias = SFU_CALIBRATED.get(_capability(u.device.index), SFU_EXP_BIAS)
    sfu_bias = float(cfg.get("sfu_bias", default_bias)) if exp_sfu else 0.0
    launches = []
    if G > 1 and not fused:
        launches.append(((nblk, G - 1, bsz), (False, False, False, True, False)))
    launches.append(((nblk, 2 * G - 1 if fused else G, bsz), (D is not None, z is not None, h0 is not None, False, fused)))
    # what the specialisation depends on beyond shapes and strides: the caller's tensors' dtypes and
    # alignment (y, hl and the scratch buffers are fresh allocations whose offsets follow the shapes)
    inputs = (u, delta, A, B, C, D, z, h0)
    spec = (u.device.index, y.dtype, tuple(None if t is None else (t.dtype, _aligned(t)) for t in inputs),
            (bsz, d, n, L), strides, LG, G)
    plan = LaunchPlan(bsz, d, n, L, NP, G, nblk, fused, tiles16, wide, flag_buffer)
    ptrs = plan.pointers(u, delta, A, B, C, D, z, h0, y, hl)
    stream = torch._C._cuda_getCurrentRawStream(u.device.index)
    for grid, (has_d, has_z, has_h0, state_only, fz) in launches:
        consts = (has_d, has_z, has_h0, state_only, NP, TPC, M, W, K, fz, lmajor, STAGES, n_even, bc_reg, exp_sfu, sfu_bias)
        tail = (d, n, L, LG // K, G, G - 1, *strides, *consts)
        key = (spec, consts)
        k = _COMPILED.get(key)
        if k is _FAILED:
            return None
        if k is None or k is False:
            try:
                res = _ssm_kernel[grid](*ptrs, *tail, num_warps=W, num_stages=1)
            except Exception as exc:  # a compiler limit this layout hits: the caller falls back
                warnings.warn(f"fxopt: the Gluon selective-scan kernel did not compile for {key} "
                              f"({type(exc).__name__}: {str(exc)[:200]}); using the Triton kernel", RuntimeWarning)
                _COMPILED[key] = _FAILED
                return None
            if k is None:
                if len(_COMPILED) >= _MAX_COMPILED:
                    _COMPILED.clear()
                k = _COMPILED[key] = compiled_kernel(res) or False
            if k is False:
                plan = None  # this Triton launches through the JIT only: nothing to replay
        else:
            run_compiled(k, grid, stream, (*ptrs, *tail))
        if plan is not None:
            plan.launches.append((k, grid, tail))
    if plan is not None and plan_sink is not None:
        plan_sink(plan)
    return y, hl


class LaunchPlan:
    """One signature's launches, replayed without re-deriving them: what a call does after its
    inputs' shapes, strides, dtypes and alignment are known (the conversions of 16-bit tiles and
    B / C, the allocations, the launches of already-compiled kernels). Halves the host time of a
    call (b1 shapes are host-bound from Python)."""

    __slots__ = ("bsz", "d", "n", "L", "NP", "G", "nblk", "fused", "tiles16", "wide", "flag_buffer", "launches")

    def __init__(self, bsz, d, n, L, NP, G, nblk, fused, tiles16, wide, flag_buffer):
        self.bsz, self.d, self.n, self.L, self.NP, self.G = bsz, d, n, L, NP, G
        self.nblk, self.fused, self.tiles16, self.wide, self.flag_buffer = nblk, fused, tiles16, wide, flag_buffer
        self.launches: list = []

    def pointers(self, u, delta, A, B, C, D, z, h0, y, hl) -> tuple:
        """The kernel's 14 pointer arguments (scratch for the group carries allocated here)."""
        bsz, d, G, NP = self.bsz, self.d, self.G, self.NP
        if G > 1:
            buf = torch.empty(bsz * G * d * (NP + 1), dtype=torch.float32, device=u.device)  # one allocation
            S, ds = buf[: bsz * G * d * NP], buf[bsz * G * d * NP:]
        else:
            S = ds = hl
        flags = cnts = hl
        if self.fused:
            flags = self.flag_buffer(u.device, 2 * bsz * (G - 1) * self.nblk + 1)  # flags, reader counts, ticket
            cnts = flags[bsz * (G - 1) * self.nblk:]
        return (u, delta, A, B, C, y if D is None else D, y if z is None else z, y if h0 is None else h0,
                y, hl, S, ds, flags, cnts)

    def __call__(self, u, delta, A, B, C, D, z, h0, out_dtype):
        dev = u.device
        y = torch.empty((self.bsz, self.d, self.L), dtype=out_dtype, device=dev)
        hl = torch.empty((self.bsz, self.d, self.n), dtype=torch.float32, device=dev)
        if h0 is not None:
            h0 = h0.to(torch.float32).expand(self.bsz, self.d, self.n).contiguous()
        if self.tiles16:
            u, delta, z = (_unit_l(t) for t in (u, delta, z))
        if B.element_size() < 4 or C.element_size() < 4:
            B, C = _bc_ok(B, self.wide), _bc_ok(C, self.wide)
        ptrs = self.pointers(u, delta, A, B, C, D, z, h0, y, hl)
        stream = torch._C._cuda_getCurrentRawStream(dev.index)
        for k, grid, tail in self.launches:
            run_compiled(k, grid, stream, (*ptrs, *tail))
        return y, hl


# ----------------------------------------------------------------------------------------------
# offline compilation (no GPU needed: Triton ships ptxas): for tests and for reading the SASS
# ----------------------------------------------------------------------------------------------
_CONSTEXPRS = ("HAS_D", "HAS_Z", "HAS_H0", "STATE_ONLY", "NP", "TPC", "M", "W", "K", "FUSED", "BC_LMAJOR", "STAGES", "N_EVEN",
               "BC_REG", "EXP_SFU", "SFU_BIAS")
_TILE_PTRS = ("u_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr")


def compile_for_target(arch: int = 90, *, dtype: str = "*fp32", HAS_D=True, HAS_Z=True, HAS_H0=False,
                       STATE_ONLY=False, NP=16, TPC=4, M=1, W=1, K=16, FUSED=False, BC_LMAJOR=True, STAGES=3,
                       N_EVEN=True, BC_REG=False, EXP_SFU=False, SFU_BIAS=0.0):
    """Compile ``_ssm_kernel`` for ``sm_<arch>`` as a launch with contiguous, 16-byte aligned
    (b, d, l) tensors would specialise it (unit strides along l, sizes divisible by 16)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = _ssm_kernel.arg_names
    consts = dict(HAS_D=HAS_D, HAS_Z=HAS_Z, HAS_H0=HAS_H0, STATE_ONLY=STATE_ONLY, NP=NP, TPC=TPC, M=M, W=W, K=K,
                  FUSED=FUSED, BC_LMAJOR=BC_LMAJOR, STAGES=STAGES, N_EVEN=N_EVEN, BC_REG=BC_REG, EXP_SFU=EXP_SFU, SFU_BIAS=SFU_BIAS)
    unit = ("s_ul", "s_tl", "s_zl", "s_yl", "s_an") + (("s_bl", "s_cl") if BC_LMAJOR else ("s_bn", "s_cn"))
    sig, div16 = {}, []
    for i, nm in enumerate(names):
        if nm in consts or nm in unit:
            sig[nm] = "constexpr"
            consts.setdefault(nm, 1)
            continue
        if nm.endswith("_ptr"):
            sig[nm] = dtype if nm in _TILE_PTRS else ("*i32" if nm in ("flag_ptr", "cnt_ptr") else "*fp32")
        else:
            sig[nm] = "i32"
        if nm.endswith("_ptr") or nm in ("D_", "L_") or (nm.startswith("s_") and nm not in ("s_ad",)):
            div16.append(i)
    src = GluonASTSource(fn=_ssm_kernel, signature=sig,
                         constexprs={(names.index(k),): v for k, v in consts.items()},
                         attrs={(i,): [["tt.divisibility", 16]] for i in div16})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=W, num_stages=1))


def _cuobjdump(kernel, flag: str) -> str:
    import os
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def disassemble(kernel) -> str:
    """SASS of a compiled kernel (``cuobjdump -sass``)."""
    return _cuobjdump(kernel, "-sass")


def longest_loop(sass: str) -> list:
    """The instructions between the target and the source of the longest backward branch in
    ``sass``: for the scan kernel, the time loop (one chunk of K steps per iteration)."""
    import re

    addr = {}
    lines = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if m:
            addr[int(m.group(1), 16)] = len(lines)
            lines.append(m.group(2))
    best = None
    for i, ins in enumerate(lines):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) in addr and addr[int(m.group(1), 16)] < i:
            span = (addr[int(m.group(1), 16)], i)
            if best is None or span[1] - span[0] > best[1] - best[0]:
                best = span
    return [] if best is None else lines[best[0]:best[1] + 1]


def local_accesses_in_longest_loop(sass: str) -> int:
    """Local-memory (spill) instructions in the time loop (:func:`longest_loop`). (ptxas may park a
    value that is only needed after the loop on the stack; that costs nothing per step.)"""
    import re

    return sum(bool(re.match(r"(@!?U?P\d+\s+)?(LDL|STL)\b", ins)) for ins in longest_loop(sass))


def polynomial_exps_in_longest_loop(sass: str) -> int:
    """How many FMA-pipe exps (:func:`fxopt.codegen.exp2.exp2_mul_gluon`) the time loop evaluates:
    the FFMAs whose immediate is the polynomial's second-highest coefficient (one per exp)."""
    import struct

    q4 = repr(struct.unpack("f", struct.pack("f", 0.0013398875016719103))[0])[:10]  # '0.00133988'
    return sum(ins.startswith("FFMA") and q4 in ins for ins in longest_loop(sass))


def resource_usage(kernel) -> dict:
    """Registers, stack, local and shared bytes ptxas assigned (``cuobjdump -res-usage``)."""
    import re

    out = _cuobjdump(kernel, "-res-usage")
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}
