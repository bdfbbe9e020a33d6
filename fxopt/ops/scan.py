"""Scan custom ops (namespace ``fxopt``) that the ``scan`` pass calls.

``fxopt::selective_scan`` -- the Mamba selective scan with its prologue and epilogue folded in::

    u, delta, z : (b, d, l)      A : (d, n)      B, C : (b, n, l)      D : (d,)     h0 : (b, d, n)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t          (state in fp32, or fp64 for fp64 inputs)
    y_t = sum_n h_t * C_t  [+ u_t * D]  [* silu(z_t)]
    returns (y : (b, d, l) in ``out_dtype``, h_last : (b, d, n) in the compute dtype)

``fxopt::linear_scan`` -- a general first-order linear recurrence::

    a, b : (l, *S) (broadcastable to the state shape S, same rank)     h0 : broadcastable to S
    h_t = a_t * h_{t-1} + b_t
    C given  : y_t = sum over the last state axis of h_t * C_t  -> y : (l, *S[:-1])
    C absent : y_t = h_t                                         -> y : (l, *S)
    returns (y in ``out_dtype``, h_last : S in ``state_dtype``)

CPU implementations are the plain-PyTorch references of :mod:`fxopt.ops.scan_ref`
(``selective_scan_ref``, ``linear_scan_ref``): the same multiply-then-add per step in fp32 that the
eager loop does, vectorised over every axis but time and chunked so the (b, d, l, n) tensors are
never materialised whole. CUDA implementations are the Triton kernels of
:mod:`fxopt.codegen.scan_triton` (falling back to the reference where Triton is unavailable or the
layout is unsupported).

Both ops carry autograd (:mod:`fxopt.ops.scan_grad`): the backward of the reference, recomputed
chunk by chunk from states checkpointed at chunk boundaries, so training through a rewritten
graph gets the gradients of the computation the op's contract describes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import scan_grad
from .ad_support import refuse_forward_ad
from .scan_ref import _compute_dtype, _linear_scan_shapes, linear_scan_ref, selective_scan_ref  # noqa: F401

# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fxopt::selective_scan", mutates_args=())
def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    h0: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    refuse_forward_ad("fxopt::selective_scan")
    y, h = selective_scan_ref(u, delta, A, B, C, D, z, h0, out_dtype)
    return y, h


@selective_scan.register_fake
def _selective_scan_fake(u, delta, A, B, C, D=None, z=None, h0=None, out_dtype=None):
    bsz, d, L = u.shape
    n = A.shape[-1]
    cd = _compute_dtype(u, delta, A, B, C, D, z, h0)
    return u.new_empty((bsz, d, L), dtype=out_dtype or u.dtype), u.new_empty((bsz, d, n), dtype=cd)


@selective_scan.register_kernel("cuda")
def _selective_scan_cuda(u, delta, A, B, C, D=None, z=None, h0=None, out_dtype=None):
    refuse_forward_ad("fxopt::selective_scan")
    try:
        from ..codegen import scan_triton
    except ImportError:  # pragma: no cover - no triton on this machine
        return selective_scan_ref(u, delta, A, B, C, D, z, h0, out_dtype)
    return scan_triton.selective_scan_triton(u, delta, A, B, C, D, z, h0, out_dtype)


@torch.library.custom_op("fxopt::linear_scan", mutates_args=())
def linear_scan(
    a: Tensor,
    b: Tensor,
    h0: Optional[Tensor] = None,
    C: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    state_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    refuse_forward_ad("fxopt::linear_scan")
    y, h = linear_scan_ref(a, b, h0, C, out_dtype, state_dtype)
    return y, h


@linear_scan.register_fake
def _linear_scan_fake(a, b, h0=None, C=None, out_dtype=None, state_dtype=None):
    S = _linear_scan_shapes(a, b, h0)
    sd = state_dtype or torch.promote_types(a.dtype, b.dtype)
    od = out_dtype or sd
    L = a.shape[0]
    yshape = [L] + (S[:-1] if C is not None else S)
    return a.new_empty(yshape, dtype=od), a.new_empty(S, dtype=sd)


@linear_scan.register_kernel("cuda")
def _linear_scan_cuda(a, b, h0=None, C=None, out_dtype=None, state_dtype=None):
    refuse_forward_ad("fxopt::linear_scan")
    try:
        from ..codegen import scan_triton
    except ImportError:  # pragma: no cover
        return linear_scan_ref(a, b, h0, C, out_dtype, state_dtype)
    return scan_triton.linear_scan_triton(a, b, h0, C, out_dtype, state_dtype)


SELECTIVE_SCAN = torch.ops.fxopt.selective_scan.default
LINEAR_SCAN = torch.ops.fxopt.linear_scan.default

torch.library.register_autograd(
    "fxopt::selective_scan", scan_grad.selective_scan_backward, setup_context=scan_grad.selective_scan_setup_context)
torch.library.register_autograd(
    "fxopt::linear_scan", scan_grad.linear_scan_backward, setup_context=scan_grad.linear_scan_setup_context)
