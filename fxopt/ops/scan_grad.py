"""Backward of the scan ops (``fxopt::selective_scan``, ``fxopt::linear_scan``), registered with
``torch.library.register_autograd`` by :mod:`fxopt.ops.scan`.

What it differentiates: the op's contract is "the plain-PyTorch reference" (:mod:`fxopt.codegen.scan_ref`:
fp32 state for 16-bit inputs, fp64 for fp64), so the backward is the reference's own autograd
backward, recomputed chunk by chunk (gradient checkpointing over time):

1. forward, no grad: the op itself (the CUDA kernel on a GPU) run over time chunks ``[s, e)``, each
   from the previous chunk's final state, keeps only the state entering every chunk
   (``(b, d, n)`` per chunk, in the compute dtype);
2. backward, last chunk first: the reference re-run on that chunk under autograd, from the saved
   entering state, and ``torch.autograd.grad`` of (the chunk's ``y``, its leaving state) against
   (the incoming ``gy`` slice, the gradient carried back from the next chunk); the gradient of the
   entering state is what the previous chunk receives.

Memory: a chunk of ``T`` steps holds about six ``(b, d, T, n)`` fp32 tensors for its autograd
graph, plus one ``(b, d, n)`` state per chunk; ``T = clamp(isqrt(l), 1, 64)`` balances the two
(``l = 2048``: 45 steps, 46 saved states), so nothing of size ``(b, d, l, n)`` ever exists. Eager
autograd through the unrolled loop keeps all ``l`` steps.

Cost: a Python loop over time (the reference's), about one extra forward; there is no fused
backward kernel. Double backward is refused (:func:`fxopt.ops.ad_support.first_order_only`: a clear
error when a gradient taken with ``create_graph=True`` is differentiated, not a silent zero).

Gradients come back in each input's dtype: for 16-bit inputs, the gradient of the fp32 computation
rounded once (the chunk's leaves are upcast copies; ``A``'s and ``D``'s gradients, summed over
chunks, are accumulated in the compute dtype too).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .ad_support import first_order_only
from ..codegen.scan_ref import compute_dtype, linear_scan_ref, selective_scan_ref

# Largest chunk of time steps recomputed at once under autograd.
MAX_GRAD_CHUNK = 64

# What the state pass (step 1) runs: the ops themselves, so a GPU uses its kernels. Tests put the
# Triton kernels here to run them under TRITON_INTERPRET=1 on CPU tensors.
forward_ops = {
    "selective_scan": lambda *a: torch.ops.fxopt.selective_scan.default(*a),
    "linear_scan": lambda *a: torch.ops.fxopt.linear_scan.default(*a),
}


def grad_chunks(L: int) -> list[tuple[int, int]]:
    """The time chunks ``[(s, e), ...]`` of the checkpointed backward (one empty chunk for l = 0)."""
    T = max(1, min(MAX_GRAD_CHUNK, math.isqrt(L)))
    return [(s, min(L, s + T)) for s in range(0, L, T)] or [(0, 0)]


def _leaf(t: Optional[Tensor], needed: bool, cd: torch.dtype) -> Optional[Tensor]:
    """A fresh autograd leaf with ``t``'s values in the compute dtype, or None. Upcasting here, not
    inside the reference, makes each gradient one fp32 value rounded once to the input's dtype
    (``u`` feeds the reference twice: two ``.to`` backward casts would round twice and add in 16 bits)."""
    if t is None:
        return None
    return t.detach().to(cd).requires_grad_(needed)


def _chunk_vjp(outs: Sequence[tuple[Tensor, Optional[Tensor]]], wrt: Sequence[Optional[Tensor]]) -> list:
    """``d(sum <out, g>)/d(w)`` for every ``w`` of ``wrt`` that requires grad (None elsewhere and for
    gradients that do not reach ``w``); pairs whose gradient is None or whose output carries no
    history are zero contributions and are left out."""
    pairs = [(o, g) for o, g in outs if g is not None and o.requires_grad]
    idx = [i for i, w in enumerate(wrt) if w is not None and w.requires_grad]
    res: list = [None] * len(wrt)
    if not pairs or not idx:
        return res
    grads = torch.autograd.grad([o for o, _ in pairs], [wrt[i] for i in idx], [g for _, g in pairs],
                                allow_unused=True)
    for i, g in zip(idx, grads):
        res[i] = g
    return res


def _needs(ctx, k: int) -> tuple[bool, ...]:
    """The first ``k`` of ``ctx.needs_input_grad``: the dispatcher drops trailing arguments left at
    their defaults (None), which need no gradient; the gradients returned for them must be None."""
    need = tuple(ctx.needs_input_grad[:k])
    return need + (False,) * (k - len(need))


def _grad_buffer(t: Optional[Tensor], needed: bool) -> Optional[Tensor]:
    if t is None or not needed:
        return None
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _store(buf: Optional[Tensor], index, g: Optional[Tensor]) -> None:
    if buf is None:
        return
    if g is None:
        buf[index].zero_()
    else:
        buf[index] = g


def _accumulate(acc: Optional[Tensor], g: Optional[Tensor]) -> Optional[Tensor]:
    if g is None:
        return acc
    return g if acc is None else acc + g


def _cast(g: Optional[Tensor], like: Optional[Tensor]) -> Optional[Tensor]:
    return None if g is None or like is None else g.to(like.dtype)


# ----------------------------------------------------------------------------------------------
# selective scan
# ----------------------------------------------------------------------------------------------
def selective_scan_setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, h0, out_dtype = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, h0)
    ctx.out_dtype = out_dtype
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros allocated


@first_order_only("fxopt::selective_scan")
def selective_scan_backward(ctx, gy: Optional[Tensor], gh: Optional[Tensor]):
    inputs = ctx.saved_tensors
    need = _needs(ctx, 8)
    if (gy is None and gh is None) or not any(need):
        return (None,) * 9
    return (*selective_scan_vjp(inputs, ctx.out_dtype, gy, gh, need), None)


def selective_scan_vjp(inputs: Sequence[Optional[Tensor]], out_dtype: Optional[torch.dtype],
                       gy: Optional[Tensor], gh_last: Optional[Tensor], need: Sequence[bool]) -> list:
    """Gradients of ``(u, delta, A, B, C, D, z, h0)`` (None where not needed) given the gradients of
    ``y`` and ``h_last`` (None = zero)."""
    u, delta, A, B, C, D, z, h0 = inputs
    cd = compute_dtype(*inputs)
    chunks = grad_chunks(u.shape[2])
    op = forward_ops["selective_scan"]

    # 1. the state entering every chunk (only the state: no D, no z)
    starts: list[Optional[Tensor]] = [h0]
    with torch.no_grad():
        for s, e in chunks[:-1]:
            _, h = op(u[:, :, s:e], delta[:, :, s:e], A, B[:, :, s:e], C[:, :, s:e], None, None, starts[-1], None)
            starts.append(h)

    # 2. last chunk first
    n_u, n_delta, n_A, n_B, n_C, n_D, n_z, n_h0 = need
    gu, gdelta, gB, gC, gz = (_grad_buffer(t, n) for t, n in ((u, n_u), (delta, n_delta), (B, n_B), (C, n_C), (z, n_z)))
    A_cd = _leaf(A, n_A, cd)  # used by every chunk: its gradient is accumulated in cd
    D_cd = _leaf(D, n_D, cd)
    gA = gD = g_h0 = None
    carry = gh_last
    for k in range(len(chunks) - 1, -1, -1):
        s, e = chunks[k]
        t = slice(s, e)
        with torch.enable_grad():
            leaves = [_leaf(u[:, :, t], n_u, cd), _leaf(delta[:, :, t], n_delta, cd), _leaf(B[:, :, t], n_B, cd),
                      _leaf(C[:, :, t], n_C, cd), _leaf(z[:, :, t], n_z, cd) if z is not None else None]
            h_in = _leaf(h0, n_h0, cd) if k == 0 else _leaf(starts[k], True, cd)
            u_c, delta_c, B_c, C_c, z_c = leaves
            y_c, h_c = selective_scan_ref(u_c, delta_c, A_cd, B_c, C_c, D_cd, z_c, h_in, out_dtype)
        g = _chunk_vjp([(y_c, None if gy is None else gy[:, :, t]), (h_c, carry)],
                       [*leaves, A_cd, D_cd, h_in])
        for buf, gi in zip((gu, gdelta, gB, gC, gz), g[:5]):
            _store(buf, (slice(None), slice(None), t), gi)
        gA, gD = _accumulate(gA, g[5]), _accumulate(gD, g[6])
        if k == 0:
            g_h0 = g[7]
        else:
            carry = g[7]
    return [gu, gdelta, _cast(gA, A), gB, gC, _cast(gD, D), gz, _cast(g_h0, h0)]


# ----------------------------------------------------------------------------------------------
# linear scan
# ----------------------------------------------------------------------------------------------
def linear_scan_setup_context(ctx, inputs, output) -> None:
    a, b, h0, C, out_dtype, state_dtype = inputs
    ctx.save_for_backward(a, b, h0, C)
    ctx.dtypes = (out_dtype, state_dtype)
    ctx.set_materialize_grads(False)


@first_order_only("fxopt::linear_scan")
def linear_scan_backward(ctx, gy: Optional[Tensor], gh: Optional[Tensor]):
    inputs = ctx.saved_tensors
    need = _needs(ctx, 4)
    if (gy is None and gh is None) or not any(need):
        return (None,) * 6
    return (*linear_scan_vjp(inputs, *ctx.dtypes, gy, gh, need), None, None)


def linear_scan_vjp(inputs: Sequence[Optional[Tensor]], out_dtype: Optional[torch.dtype],
                    state_dtype: Optional[torch.dtype], gy: Optional[Tensor], gh_last: Optional[Tensor],
                    need: Sequence[bool]) -> list:
    """Gradients of ``(a, b, h0, C)`` (None where not needed) given those of ``y`` and ``h_last``."""
    a, b, h0, C = inputs
    cd = compute_dtype(*inputs)
    sd = state_dtype or torch.promote_types(a.dtype, b.dtype)
    od = out_dtype or sd  # resolved here: the chunks below pass their own state dtype
    chunks = grad_chunks(a.shape[0])
    op = forward_ops["linear_scan"]

    starts: list[Optional[Tensor]] = [h0]
    with torch.no_grad():
        for s, e in chunks[:-1]:
            # with C the op's y is the reduced readout, not every state: less to write
            _, h = op(a[s:e], b[s:e], starts[-1], None if C is None else C[s:e], cd, cd)
            starts.append(h)

    n_a, n_b, n_h0, n_C = need
    ga, gb, gC = _grad_buffer(a, n_a), _grad_buffer(b, n_b), _grad_buffer(C, n_C)
    g_h0 = None
    carry = gh_last
    for k in range(len(chunks) - 1, -1, -1):
        s, e = chunks[k]
        last = k == len(chunks) - 1
        with torch.enable_grad():
            leaves = [_leaf(a[s:e], n_a, cd), _leaf(b[s:e], n_b, cd), _leaf(C[s:e], n_C, cd) if C is not None else None]
            h_in = _leaf(h0, n_h0, cd) if k == 0 else _leaf(starts[k], True, cd)
            a_c, b_c, C_c = leaves
            # states between chunks stay in cd; only the op's own h_last is rounded to its state dtype
            y_c, h_c = linear_scan_ref(a_c, b_c, h_in, C_c, od, sd if last else cd)
        g = _chunk_vjp([(y_c, None if gy is None else gy[s:e]), (h_c, carry)], [*leaves, h_in])
        for buf, gi in zip((ga, gb, gC), g[:3]):
            _store(buf, slice(s, e), gi)
        if k == 0:
            g_h0 = g[3]
        else:
            carry = g[3]
    return [ga, gb, _cast(g_h0, h0), gC]
