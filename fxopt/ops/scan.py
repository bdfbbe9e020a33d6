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

CPU implementations are the plain-PyTorch references (``selective_scan_ref``, ``linear_scan_ref``):
the same multiply-then-add per step in fp32 that the eager loop does, vectorised over every
axis but time and chunked so the (b, d, l, n) tensors are never materialised whole.
CUDA implementations are the Triton kernels of :mod:`fxopt.codegen.scan_triton` (falling back to
the reference where Triton is unavailable or the layout is unsupported).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# Time steps materialised at once by the references: bounds memory to chunk * b * d * n.
_REF_CHUNK = 64


def _compute_dtype(*ts: Optional[Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------
def selective_scan_ref(
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
    """Plain-PyTorch selective scan (see the module docstring for the layout)."""
    cd = _compute_dtype(u, delta, A, B, C, D, z, h0)
    bsz, d, L = u.shape
    n = A.shape[-1]
    out_dtype = out_dtype or u.dtype
    A_ = A.to(cd)
    h = torch.zeros(bsz, d, n, dtype=cd, device=u.device) if h0 is None else h0.to(cd).expand(bsz, d, n).clone()
    y = torch.empty(bsz, d, L, dtype=cd, device=u.device)
    for s in range(0, L, _REF_CHUNK):
        e = min(L, s + _REF_CHUNK)
        dt = delta[:, :, s:e].to(cd)                                   # (b d T)
        dA = torch.exp(dt.unsqueeze(-1) * A_[None, :, None, :])         # (b d T n)
        dBu = (dt.unsqueeze(-1) * B[:, :, s:e].to(cd).transpose(1, 2).unsqueeze(1)) * u[:, :, s:e].to(cd).unsqueeze(-1)
        hs = []
        for t in range(e - s):
            h = dA[:, :, t] * h + dBu[:, :, t]
            hs.append(h)
        H = torch.stack(hs, dim=2)                                      # (b d T n)
        y[:, :, s:e] = torch.einsum("bdtn,bnt->bdt", H, C[:, :, s:e].to(cd))
    if D is not None:
        y = y + u.to(cd) * D.to(cd)[None, :, None]
    if z is not None:
        zz = z.to(cd)
        y = y * (zz * torch.sigmoid(zz))
    return y.to(out_dtype), h


def _linear_scan_shapes(a: Tensor, b: Tensor, h0: Optional[Tensor]) -> list[int]:
    shape = torch.broadcast_shapes(tuple(a.shape[1:]), tuple(b.shape[1:]), *(() if h0 is None else (tuple(h0.shape),)))
    return list(shape)


def linear_scan_ref(
    a: Tensor,
    b: Tensor,
    h0: Optional[Tensor] = None,
    C: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    state_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch general linear scan (see the module docstring for the layout)."""
    cd = _compute_dtype(a, b, h0, C)
    S = _linear_scan_shapes(a, b, h0)
    L = a.shape[0]
    state_dtype = state_dtype or torch.promote_types(a.dtype, b.dtype)
    out_dtype = out_dtype or state_dtype
    h = torch.zeros(S, dtype=cd, device=a.device) if h0 is None else h0.to(cd).expand(S).clone()
    ys = []
    for s in range(0, L, _REF_CHUNK):
        e = min(L, s + _REF_CHUNK)
        aa, bb = a[s:e].to(cd), b[s:e].to(cd)
        hs = []
        for t in range(e - s):
            h = aa[t] * h + bb[t]
            hs.append(h)
        H = torch.stack(hs, 0)
        if C is not None:
            H = (H * C[s:e].to(cd)).sum(-1)
        ys.append(H.to(out_dtype))
    if L == 0:
        yshape = [0] + (S[:-1] if C is not None else S)
        y = torch.empty(yshape, dtype=out_dtype, device=a.device)
    else:
        y = torch.cat(ys, 0)
    return y, h.to(state_dtype)


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
    try:
        from ..codegen import scan_triton
    except ImportError:  # pragma: no cover
        return linear_scan_ref(a, b, h0, C, out_dtype, state_dtype)
    return scan_triton.linear_scan_triton(a, b, h0, C, out_dtype, state_dtype)


SELECTIVE_SCAN = torch.ops.fxopt.selective_scan.default
LINEAR_SCAN = torch.ops.fxopt.linear_scan.default
