"""Plain-PyTorch references of the scan ops (layouts in :mod:`fxopt.ops.scan`).

The same multiply-then-add per step in the compute dtype (fp32, or fp64 for fp64 inputs) that the
eager loop does, vectorised over every axis but time and chunked so the (b, d, l, n) tensors are
never materialised whole. They are the CPU implementations of the ops, what the CUDA kernels are
tested against, and (recomputed chunk by chunk under autograd) their backward: see
:mod:`fxopt.ops.scan_grad`.
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
