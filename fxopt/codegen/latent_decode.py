"""Triton decode attention over a latent K/V cache (``fxopt::latent_decode_attention``'s CUDA impl).

Letters and semantics: :mod:`fxopt.ops.latent_attention` (``b H r R T``); the plain-PyTorch
reference is :func:`latent_decode_attention_ref` there (re-exported here).

Why it is shaped this way: the latent ``c`` is shared by all heads (multi-query-like), so one
program takes a *block of heads* of one row and scores them together with a tensor-core dot
``Q_lat (BLOCK_H x r) @ C^T (r x BLOCK_T)``: each latent tile is read once for BLOCK_H heads. The
rotary part is per head; it joins the same dot as a block-diagonal query: row ``h`` of ``Q_bd``
holds ``q_rot[h]`` in columns ``h R .. h R + R - 1`` and zeros elsewhere, against the
``(BLOCK_T, BLOCK_H * R)`` slab of ``k_rot`` (contiguous per token in the (b, T, H, R) layout).
The zeros cost flops the tensor cores have to spare; the kernel is bound by reading the cache.

* ``r`` up to 512 (``SINGLE``): the whole latent row of a tile is one ``(BLOCK_T, r)`` block,
  used for the scores and for ``acc += P @ C`` from one load;
* larger ``r``: the output's ``r`` is split over programs (``BLOCK_RO`` each); every program
  scores with the full ``r`` in ``BLOCK_RC`` chunks; the programs of one (row, context split)
  are launched next to each other so the repeated tile reads hit L2.
* Split-K over the context (flash-decoding): with few rows, ``n_splits`` programs per row take
  contiguous slices of its valid keys and write a partial ``(out, log2-sum-exp)``; a second
  kernel combines them. One split writes the result directly.

Online softmax in base 2 (``exp2``, with ``log2(e)`` folded into the scale); fp32 accumulators;
``P`` is rounded to the cache dtype for the ``P @ C`` dot (as flash attention does). fp32 caches
use IEEE fp32 dots (no TF32).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config import current, get_config
from ..errors import FxoptError
from .latent_decode_ref import check_decode_inputs, latent_decode_attention_ref  # noqa: F401  (the reference)

if get_config().triton_interpret:  # runtime loop bounds under the interpreter (see scan_triton)
    from .scan_triton import _fix_interpreter_index

    _fix_interpreter_index()

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: Triton's interpreter computes bf16 dots wrongly (numpy has no bf16), so there the
    # (already bf16-rounded) operands are widened to fp32, which is exact
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _to_storage(x, dt: tl.constexpr, UPCAST: tl.constexpr):
    """``x`` (fp32) rounded to the cache dtype. UPCAST (the interpreter with bf16): Triton's
    interpreter truncates fp32 -> bf16 (a bias that would inflate the error several-fold), so round
    to nearest even by bit manipulation, as the GPU's cvt.rn does, and keep the exact value in fp32."""
    if UPCAST:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    return x.to(dt)


@triton.jit
def _block_diag_query(qr_row, h0, H, R, k0, s_ph, s_pe, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_H, BLOCK_K): columns k0.. of the block-diagonal rotary query: row h holds q_rot[h0 + h]
    in the columns h R .. h R + R - 1 of the flattened (head, rotary dim) axis, zeros elsewhere."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    kh = offs_k // R
    ke = offs_k - kh * R
    hh = h0 + kh
    own = (tl.arange(0, BLOCK_H)[:, None] == kh[None, :]) & ((kh < BLOCK_H) & (hh < H))[None, :]
    return tl.load(qr_row + hh[None, :] * s_ph + ke[None, :] * s_pe, mask=own, other=0.0)


@triton.jit
def _rot_slab(kr_row, offs_t, mask_t, h0, H, R, k0, s_kt, s_kh, s_ke, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
              FLAT: tl.constexpr):
    """(BLOCK_T, BLOCK_K): columns k0.. of the k_rot slab of heads h0 .. h0 + BLOCK_H - 1. FLAT: the
    (head, rotary dim) axes are one contiguous run per token (s_kh == R s_ke): plain offsets the
    compiler can vectorise and pipeline instead of a gather."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if FLAT:
        mask_k = (offs_k < BLOCK_H * R) & (h0 * R + offs_k < H * R)
        ptrs = kr_row + offs_t[:, None] * s_kt + (h0 * R + offs_k)[None, :] * s_ke
    else:
        kh = offs_k // R
        hh = h0 + kh
        mask_k = (kh < BLOCK_H) & (hh < H)
        ptrs = kr_row + offs_t[:, None] * s_kt + hh[None, :] * s_kh + (offs_k - kh * R)[None, :] * s_ke
    return tl.load(ptrs, mask=mask_t[:, None] & mask_k[None, :], other=0.0)


@triton.jit
def _latent_decode_kernel(
    q_ptr, qr_ptr, c_ptr, kr_ptr, len_ptr, start_ptr, km_ptr, out_ptr, part_ptr, lse_ptr,
    H, r, R, T, scale_log2, n_rb, n_splits, s_mb,
    s_qb, s_qh, s_qr,
    s_pb, s_ph, s_pe,
    s_cb, s_ct, s_cr,
    s_kb, s_kt, s_kh, s_ke,
    s_ob, s_oh, s_or,
    HAS_STARTS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ROT: tl.constexpr, SINGLE: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_RC: tl.constexpr, NUM_RC: tl.constexpr,
    BLOCK_RO: tl.constexpr, BLOCK_K: tl.constexpr, NUM_KC: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, KR_FLAT: tl.constexpr, RC_LOOP: tl.constexpr = False,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.program_id(2).to(tl.int64)
    hb = pid // n_rb
    rb = pid % n_rb
    h0 = hb * BLOCK_H
    offs_h = h0 + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    ro = rb * BLOCK_RO + tl.arange(0, BLOCK_RO)
    mask_ro = ro < r

    end = tl.minimum(tl.load(len_ptr + row).to(tl.int32), T)
    if HAS_STARTS:
        start = tl.maximum(tl.load(start_ptr + row).to(tl.int32), 0)
    else:
        start = 0
    span = tl.maximum(end - start, 0)
    per = tl.cdiv(tl.cdiv(span, n_splits), BLOCK_T) * BLOCK_T
    lo = start + split * per
    hi = tl.minimum(lo + per, end)
    n_it = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_T)

    q_row = q_ptr + row * s_qb
    c_row = c_ptr + row * s_cb
    kr_row = kr_ptr + row * s_kb
    cdt = c_ptr.dtype.element_ty
    if SINGLE:  # the whole query fits one block: load it once
        q_all = tl.load(q_row + offs_h[:, None] * s_qh + ro[None, :] * s_qr,
                        mask=mask_h[:, None] & mask_ro[None, :], other=0.0).to(cdt)

    if HAS_ROT:
        if NUM_KC == 1:  # the block-diagonal rotary query fits one block: build it once
            q_bd0 = _block_diag_query(qr_ptr + row * s_pb, h0, H, R, 0, s_ph, s_pe, BLOCK_H, BLOCK_K).to(cdt)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_RO], tl.float32)
    for it in range(0, n_it):
        offs_t = lo + it * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = offs_t < hi
        if HAS_MASK:  # one byte per key (uint8 view of the bool mask): noise next to the cache row
            mask_t = mask_t & (tl.load(km_ptr + row * s_mb + offs_t, mask=mask_t, other=0) != 0)
        s = tl.zeros([BLOCK_H, BLOCK_T], tl.float32)
        if SINGLE:
            c_tile = tl.load(c_row + offs_t[:, None] * s_ct + ro[None, :] * s_cr,
                             mask=mask_t[:, None] & mask_ro[None, :], other=0.0)
            s += _dot(q_all, tl.trans(c_tile), PRECISION, UPCAST)
        elif RC_LOOP:
            # the output block's tile is issued first: its latency hides behind the scoring loop,
            # which is a loop of its own so the software pipeline keeps num_stages chunks in flight
            # (unrolled, a stage would hold every chunk of the tile: too big for r > 1024, so one
            # stage and every chunk's load latency exposed in turn)
            c_tile = tl.load(c_row + offs_t[:, None] * s_ct + ro[None, :] * s_cr,
                             mask=mask_t[:, None] & mask_ro[None, :], other=0.0)
            for kc in range(0, NUM_RC):
                rc = kc * BLOCK_RC + tl.arange(0, BLOCK_RC)
                mask_rc = rc < r
                q_c = tl.load(q_row + offs_h[:, None] * s_qh + rc[None, :] * s_qr,
                              mask=mask_h[:, None] & mask_rc[None, :], other=0.0).to(cdt)
                c_c = tl.load(c_row + offs_t[:, None] * s_ct + rc[None, :] * s_cr,
                              mask=mask_t[:, None] & mask_rc[None, :], other=0.0)
                s += _dot(q_c, tl.trans(c_c), PRECISION, UPCAST)
        else:
            for kc in tl.static_range(NUM_RC):
                rc = kc * BLOCK_RC + tl.arange(0, BLOCK_RC)
                mask_rc = rc < r
                q_c = tl.load(q_row + offs_h[:, None] * s_qh + rc[None, :] * s_qr,
                              mask=mask_h[:, None] & mask_rc[None, :], other=0.0).to(cdt)
                c_c = tl.load(c_row + offs_t[:, None] * s_ct + rc[None, :] * s_cr,
                              mask=mask_t[:, None] & mask_rc[None, :], other=0.0)
                s += _dot(q_c, tl.trans(c_c), PRECISION, UPCAST)
            c_tile = tl.load(c_row + offs_t[:, None] * s_ct + ro[None, :] * s_cr,
                             mask=mask_t[:, None] & mask_ro[None, :], other=0.0)
        if HAS_ROT:
            if NUM_KC == 1:
                k_slab = _rot_slab(kr_row, offs_t, mask_t, h0, H, R, 0, s_kt, s_kh, s_ke, BLOCK_H, BLOCK_K, KR_FLAT)
                s += _dot(q_bd0, tl.trans(k_slab), PRECISION, UPCAST)
            else:
                for kc in tl.static_range(NUM_KC):
                    q_bd = _block_diag_query(qr_ptr + row * s_pb, h0, H, R, kc * BLOCK_K, s_ph, s_pe, BLOCK_H, BLOCK_K).to(cdt)
                    k_slab = _rot_slab(kr_row, offs_t, mask_t, h0, H, R, kc * BLOCK_K, s_kt, s_kh, s_ke, BLOCK_H, BLOCK_K,
                                       KR_FLAT)
                    s += _dot(q_bd, tl.trans(k_slab), PRECISION, UPCAST)
        s = tl.where(mask_t[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a head whose keys so far are all masked has m = -inf: exponentiate against 0 instead (no NaN)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(_to_storage(p, cdt, UPCAST), c_tile, PRECISION, UPCAST)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if DIRECT:
        tl.store(out_ptr + row * s_ob + offs_h[:, None] * s_oh + ro[None, :] * s_or,
                 _to_storage(o, out_ptr.dtype.element_ty, UPCAST).to(out_ptr.dtype.element_ty),
                 mask=mask_h[:, None] & mask_ro[None, :])
    else:
        # partials: (b, n_splits, H, r) fp32 and (b, n_splits, H) log2-sum-exp, contiguous
        base = (row * n_splits + split) * H
        tl.store(part_ptr + (base + offs_h[:, None]) * r + ro[None, :], o, mask=mask_h[:, None] & mask_ro[None, :])
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + base + offs_h, lse, mask=mask_h & (rb == 0))


@triton.jit
def _latent_combine_kernel(part_ptr, lse_ptr, out_ptr, H, r, n_splits, s_ob, s_oh, s_or,
                           BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr):
    h = tl.program_id(0)
    rb = tl.program_id(1)
    row = tl.program_id(2).to(tl.int64)
    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < r
    n_chunks = tl.cdiv(n_splits, BLOCK_S)
    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for i in range(0, n_chunks):
        offs_s = i * BLOCK_S + tl.arange(0, BLOCK_S)
        lse = tl.load(lse_ptr + (row * n_splits + offs_s) * H + h, mask=offs_s < n_splits, other=float("-inf"))
        m = tl.maximum(m, lse)
    m_all = tl.max(m, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    num = tl.zeros([BLOCK_R], tl.float32)
    den = tl.zeros([BLOCK_S], tl.float32)
    for i in range(0, n_chunks):
        offs_s = i * BLOCK_S + tl.arange(0, BLOCK_S)
        mask_s = offs_s < n_splits
        lse = tl.load(lse_ptr + (row * n_splits + offs_s) * H + h, mask=mask_s, other=float("-inf"))
        w = tl.exp2(lse - m_all)
        o = tl.load(part_ptr + ((row * n_splits + offs_s[:, None]) * H + h) * r + offs_r[None, :],
                    mask=mask_s[:, None] & mask_r[None, :], other=0.0)
        num += tl.sum(w[:, None] * o, axis=0)
        den += w
    total = tl.sum(den, axis=0)
    out = num / tl.where(total > 0, total, 1.0)
    out = _to_storage(out, out_ptr.dtype.element_ty, UPCAST).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * s_ob + h * s_oh + offs_r * s_or, out, mask=mask_r)


# ----------------------------------------------------------------------------------------------- host side
def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (int(n) - 1).bit_length()))


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _SM_COUNT.get(idx)
    if n is None:
        n = _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


# Launch parameters picked on the GPU by ``benchmarks/latent_sweep.py`` (it prints entries in this
# form), keyed by :func:`tuned_key`: (bytes per element, r padded to a power of two, regime), regime
# "split" when the rows' head blocks alone fill at most a quarter of the SMs (4 b ceil(H / 16) <= SMs:
# the context is split many ways; b1 and b16 at 32 heads on 132 SMs) and "batch" otherwise (b64:
# two or three splits at most). An entry may set any of CONFIG_KEYS; what it leaves out comes from the
# heuristic below, and a caller's explicit overrides beat both.
# Picked by benchmarks/latent_sweep.py on one H200 (2026-12-02, fp16, H 32, R 20; the cases in
# each comment's list; benchmarks/results/latent_sweep_h200_2026-12-02.json): per (bytes per
# element, r rounded up to a power of two, regime) the overrides of the heuristic's choice.
TUNED: dict = {
    (2, 512, "batch"): {"BLOCK_K": 64, "num_warps": 4},        # b64 ctx4096: 0.357 ms vs 0.476 default
    (2, 512, "split"): {},                                      # b1 ctx16k / b16 ctx2048: default within 5 %
    (2, 1024, "batch"): {},
    (2, 1024, "split"): {"partial_frac": 0.5},
    (2, 4096, "batch"): {"BLOCK_RO": 1024, "BLOCK_K": 64},
    (2, 4096, "split"): {"split_waves": 8, "partial_frac": 1.0},  # b1 ctx16k r2560: 0.674 ms vs 1.022
}

CONFIG_KEYS = ("BLOCK_H", "BLOCK_T", "BLOCK_RO", "BLOCK_RC", "BLOCK_K", "RC_LOOP", "num_warps", "num_stages",
               "n_splits", "split_waves", "partial_frac")


def tuned_key(b: int, H: int, r: int, dtype: torch.dtype, sm_count: int = 132) -> tuple:
    es = torch.empty((), dtype=dtype).element_size()
    return (es, _pow2(r), "split" if 4 * b * triton.cdiv(H, 16) <= sm_count else "batch")


def decode_config(b: int, H: int, r: int, R: int, T: int, dtype: torch.dtype, sm_count: int = 132,
                  tuned: Optional[dict] = None, **override) -> dict:
    """Launch parameters for a call: the heuristic, then the :data:`TUNED` entry of the call's regime
    (``tuned``: another table, e.g. a sweep's), then ``override`` (any of :data:`CONFIG_KEYS`, e.g. a
    benchmark sweep or a test forcing ``n_splits``)."""
    bad = sorted(set(override) - set(CONFIG_KEYS))
    if bad:
        raise FxoptError(f"latent_decode_attention: unknown launch parameter(s) {bad}; known: {list(CONFIG_KEYS)}")
    table = TUNED if tuned is None else tuned
    picked = dict(table.get(tuned_key(b, H, r, dtype, sm_count), {}))
    picked.update(override)
    override = picked
    r_pad = _pow2(r)
    es = torch.empty((), dtype=dtype).element_size()
    # Register and shared-memory budgets, as compiled for sm_90 (tests/test_latent_kernel.py checks
    # they lower without spills and within 227 KiB): r <= 512 (fp16/bf16) one latent block of 32
    # tokens; r <= 1024 one block of 16 tokens; larger r output blocks of 512 scored in chunks of 128
    # by a loop of their own (RC_LOOP: pipelined; unrolled, one stage fits and every chunk's load
    # latency is exposed -- 15 ms at r 2560 b64 ctx 4096 on the H200). fp32 tiles are half as wide.
    single_max = 512 if es <= 2 else 256
    if r_pad <= single_max:
        cfg = dict(BLOCK_RO=r_pad, BLOCK_RC=r_pad, BLOCK_T=32 if r_pad * es >= 1024 else 64)
    elif r_pad <= 2 * single_max:
        cfg = dict(BLOCK_RO=r_pad, BLOCK_RC=r_pad, BLOCK_T=16)
    else:
        cfg = dict(BLOCK_RO=single_max, BLOCK_RC=128 if es <= 2 else 64, BLOCK_T=16)
    cfg.update(BLOCK_H=16 if (H <= 16 or r_pad * es > 512) else 32, num_warps=8 if r_pad >= 256 else 4, num_stages=2)
    cfg["RC_LOOP"] = r_pad > 2 * single_max
    cfg.update(split_waves=2, partial_frac=0.125)
    cfg.update({k: v for k, v in override.items() if k not in ("n_splits", "BLOCK_K")})
    for k in ("BLOCK_H", "BLOCK_T", "BLOCK_RO", "BLOCK_RC"):
        v = cfg[k]
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise FxoptError(f"latent_decode_attention: {k} must be a power of two >= 16, got {v!r}")
    # the rotary slab of a head block in one dot when it is small (the block-diagonal query then
    # stays in registers across the loop), else in chunks
    k_max = 512 if es <= 2 else 256
    cfg["BLOCK_K"] = override.get("BLOCK_K", _pow2(cfg["BLOCK_H"] * R) if cfg["BLOCK_H"] * R <= k_max else k_max // 4)
    if not isinstance(cfg["BLOCK_K"], int) or cfg["BLOCK_K"] < 16 or cfg["BLOCK_K"] & (cfg["BLOCK_K"] - 1):
        raise FxoptError(f"latent_decode_attention: BLOCK_K must be a power of two >= 16, got {cfg['BLOCK_K']!r}")
    single = cfg["BLOCK_RO"] >= r and cfg["BLOCK_RC"] == cfg["BLOCK_RO"]
    cfg["RC_LOOP"] = bool(cfg["RC_LOOP"]) and not single
    if "num_stages" not in override:
        # the software pipeline keeps num_stages copies of every tile a loop iteration loads in shared
        # memory: stay within ~200 KiB (H100/H200 allow 227 KiB per block)
        rot = triton.cdiv(cfg["BLOCK_H"] * R, cfg["BLOCK_K"]) * cfg["BLOCK_K"] if R else 0
        scores = cfg["BLOCK_RO"] if single else (
            cfg["BLOCK_RC"] if cfg["RC_LOOP"] else triton.cdiv(r, cfg["BLOCK_RC"]) * cfg["BLOCK_RC"])
        per_stage = cfg["BLOCK_T"] * (scores + (0 if single else cfg["BLOCK_RO"]) + rot) * es
        cfg["num_stages"] = max(1, min(cfg["num_stages"], (200 * 1024) // max(per_stage, 1)))
    n_hb = triton.cdiv(H, cfg["BLOCK_H"])
    n_rb = triton.cdiv(r, cfg["BLOCK_RO"])
    if override.get("n_splits") is not None:
        splits = int(override["n_splits"])
    else:
        # split_waves programs per SM in all; no split shorter than two tiles
        base = max(1, b * n_hb * n_rb)
        splits = triton.cdiv(int(round(cfg["split_waves"] * sm_count)), base)
        splits = min(splits, max(1, T // (2 * cfg["BLOCK_T"])))
        # the partials (fp32, written and read back) stay under partial_frac of the cache bytes the step reads
        cache_bytes = T * (r + H * R) * es
        splits = min(splits, max(1, int(cache_bytes * cfg["partial_frac"]) // (4 * H * r)))
    if splits < 1:
        raise FxoptError(f"latent_decode_attention: n_splits must be >= 1, got {splits}")
    cfg["n_splits"] = splits
    return cfg


def latent_decode_attention_triton(q_latent: Tensor, q_rot: Tensor, c: Tensor, k_rot: Tensor, lengths: Tensor,
                                   starts: Optional[Tensor] = None, scale: float = 1.0,
                                   key_mask: Optional[Tensor] = None, **config) -> Tensor:
    """The kernel on any tensors Triton can take (CUDA; CPU under ``TRITON_INTERPRET=1``).
    ``config``: overrides of :func:`decode_config`. No host synchronisation (CUDA-graph safe)."""
    check_decode_inputs(q_latent, q_rot, c, k_rot, lengths, starts, key_mask)
    b, H, r = q_latent.shape
    T, R = c.shape[1], q_rot.shape[2]
    out = torch.empty((b, H, r), dtype=q_latent.dtype, device=q_latent.device)
    if out.numel() == 0:
        return out
    if T == 0:
        return out.zero_()
    # offsets within one row are int32 (row offsets are int64)
    reach = max((T - 1) * abs(c.stride(1)) + (r - 1) * abs(c.stride(2)),
                (T - 1) * abs(k_rot.stride(1)) + (H - 1) * abs(k_rot.stride(2)) + max(R - 1, 0) * abs(k_rot.stride(3)))
    if reach >= 2**31:
        raise FxoptError(f"latent_decode_attention: one row of the cache spans {reach:,} elements, beyond the kernel's "
                         "int32 offsets; use a shorter cache or fewer latent dims per token")
    cfg = decode_config(b, H, r, R, T, c.dtype, _sm_count(c.device), **config)
    n_splits = cfg["n_splits"]
    single = cfg["BLOCK_RO"] >= r and cfg["BLOCK_RC"] == cfg["BLOCK_RO"]
    n_rb = triton.cdiv(r, cfg["BLOCK_RO"])
    n_hb = triton.cdiv(H, cfg["BLOCK_H"])
    num_kc = triton.cdiv(cfg["BLOCK_H"] * R, cfg["BLOCK_K"]) if R else 0
    direct = n_splits == 1
    if direct:
        part = lse = out  # unused
    else:
        part = torch.empty((b, n_splits, H, r), dtype=torch.float32, device=c.device)
        lse = torch.empty((b, n_splits, H), dtype=torch.float32, device=c.device)
    precision = "ieee" if c.dtype == torch.float32 else "tf32"
    upcast = c.dtype == torch.bfloat16 and current().triton_interpret
    if upcast and q_latent.dtype != torch.bfloat16:
        raise FxoptError("latent_decode_attention under TRITON_INTERPRET=1: a bf16 cache needs a bf16 query")
    if key_mask is not None and key_mask.stride(1) != 1 and T > 1:
        key_mask = key_mask.contiguous()
    km = key_mask.view(torch.uint8) if key_mask is not None else lengths
    _latent_decode_kernel[(n_hb * n_rb, n_splits, b)](
        q_latent, q_rot, c, k_rot, lengths, starts if starts is not None else lengths, km, out, part, lse,
        H, r, max(R, 1), T, float(scale) * LOG2E, n_rb, n_splits, km.stride(0) if key_mask is not None else 0,
        *q_latent.stride(), *q_rot.stride(), *c.stride(), *k_rot.stride(), *out.stride(),
        HAS_STARTS=starts is not None, HAS_MASK=key_mask is not None, HAS_ROT=R > 0, SINGLE=single, DIRECT=direct,
        BLOCK_H=cfg["BLOCK_H"], BLOCK_T=cfg["BLOCK_T"], BLOCK_RC=cfg["BLOCK_RC"],
        NUM_RC=1 if single else triton.cdiv(r, cfg["BLOCK_RC"]), BLOCK_RO=cfg["BLOCK_RO"],
        BLOCK_K=cfg["BLOCK_K"], NUM_KC=max(num_kc, 1), PRECISION=precision, UPCAST=upcast,
        KR_FLAT=k_rot.stride(2) == R * k_rot.stride(3), RC_LOOP=cfg["RC_LOOP"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if not direct:
        block_r = min(_pow2(r), 128)
        _latent_combine_kernel[(H, triton.cdiv(r, block_r), b)](
            part, lse, out, H, r, n_splits, *out.stride(), BLOCK_S=min(_pow2(n_splits), 32), BLOCK_R=block_r,
            UPCAST=upcast and out.dtype == torch.bfloat16, num_warps=4)
    return out


def cache_bytes_read(b: int, T: int, H: int, r: int, R: int, dtype: torch.dtype) -> int:
    """Bytes of cache one call must read at least (every row's whole cache): what bandwidth is measured on."""
    return b * T * (r + H * R) * torch.empty((), dtype=dtype).element_size()


def kernel_source() -> str:
    import inspect

    return inspect.getsource(inspect.getmodule(_latent_decode_kernel))


__all__ = ["latent_decode_attention_triton", "latent_decode_attention_ref", "decode_config", "tuned_key", "TUNED",
           "CONFIG_KEYS", "cache_bytes_read",
           "kernel_source"]


def compile_for_target(arch: int = 90, *, dtype: str = "fp16", H: int = 32, r: int = 512, R: int = 20,
                       T: int = 4096, b: int = 64, has_starts: bool = True, has_mask: bool = False, **override):
    """Compile the decode kernel for ``sm_<arch>`` (no GPU needed: ptxas ships with Triton) as a call
    with contiguous 16-byte aligned caches of these sizes would specialise it. For tests that
    check every configuration lowers to machine code, and for reading its register use."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    cfg = decode_config(b, H, r, R, T, tdt, **override)
    single = cfg["BLOCK_RO"] >= r and cfg["BLOCK_RC"] == cfg["BLOCK_RO"]
    consts = dict(HAS_STARTS=has_starts, HAS_MASK=has_mask, HAS_ROT=R > 0, SINGLE=single, DIRECT=cfg["n_splits"] == 1,
                  BLOCK_H=cfg["BLOCK_H"], BLOCK_T=cfg["BLOCK_T"], BLOCK_RC=cfg["BLOCK_RC"],
                  NUM_RC=1 if single else triton.cdiv(r, cfg["BLOCK_RC"]), BLOCK_RO=cfg["BLOCK_RO"],
                  BLOCK_K=cfg["BLOCK_K"], NUM_KC=max(1, triton.cdiv(cfg["BLOCK_H"] * R, cfg["BLOCK_K"]) if R else 1),
                  PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False, KR_FLAT=True,
                  RC_LOOP=cfg["RC_LOOP"])
    ptr_dtype = {"q_ptr": dtype, "qr_ptr": dtype, "c_ptr": dtype, "kr_ptr": dtype, "len_ptr": "i32",
                 "start_ptr": "i32", "km_ptr": "u8", "out_ptr": dtype, "part_ptr": "fp32", "lse_ptr": "fp32"}
    # the int arguments of a launch on contiguous (b, H, r) / (b, T, r) / (b, T, H, R) tensors: the JIT
    # specialises ints equal to 1 to constants and marks those divisible by 16 (so do we)
    n_rb = triton.cdiv(r, cfg["BLOCK_RO"])
    ints = dict(H=H, r=r, R=max(R, 1), T=T, n_rb=n_rb, n_splits=cfg["n_splits"], s_mb=T,
                s_qb=H * r, s_qh=r, s_qr=1, s_pb=H * R, s_ph=R, s_pe=1, s_cb=T * r, s_ct=r, s_cr=1,
                s_kb=T * H * R, s_kt=H * R, s_kh=R, s_ke=1, s_ob=H * r, s_oh=r, s_or=1)
    names = _latent_decode_kernel.arg_names
    sig, div16 = {}, []
    for i, nm in enumerate(names):
        if nm in consts:
            sig[nm] = "constexpr"
        elif nm in ptr_dtype:
            sig[nm] = "*" + ptr_dtype[nm]
            div16.append(i)
        elif nm == "scale_log2":
            sig[nm] = "fp32"
        elif ints[nm] == 1:
            sig[nm] = "constexpr"
            consts[nm] = 1
        else:
            sig[nm] = "i32"
            if ints[nm] % 16 == 0:
                div16.append(i)
    src = ASTSource(fn=_latent_decode_kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in div16})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])), cfg
