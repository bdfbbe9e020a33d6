"""The scan ops' arguments and their plain-PyTorch references (the bottom of the scan stack).

Glossary: ``b`` batch, ``d`` channels, ``l`` time steps, ``n`` state size.

``fxopt::selective_scan`` (arguments: :class:`SelectiveScanArgs`), the Mamba selective scan with
its prologue and epilogue folded in::

    u, delta, z : (b, d, l)      A : (d, n)      B, C : (b, n, l)      D : (d,)     h0 : (b, d, n)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t          (state in fp32, or fp64 for fp64 inputs)
    y_t = sum_n h_t * C_t  [+ u_t * D]  [* silu(z_t)]
    returns (y : (b, d, l) in ``out_dtype``, h_last : (b, d, n) in the compute dtype)

``fxopt::linear_scan`` (arguments: :class:`LinearScanArgs`), a general first-order linear recurrence::

    a, b : (l, *S) (broadcastable to the state shape S, same rank)     h0 : broadcastable to S
    h_t = a_t * h_{t-1} + b_t
    C given  : y_t = sum over the last state axis of h_t * C_t  -> y : (l, *S[:-1])
    C absent : y_t = h_t                                         -> y : (l, *S)
    returns (y in ``out_dtype``, h_last : S in ``state_dtype``)

The references do the same multiply-then-add per step in the compute dtype (fp32, or fp64 for
fp64 inputs) that the eager loop does, vectorised over every axis but time and chunked so the
(b, d, l, n) tensors are never materialised whole. They are the ops' CPU implementations, what the
kernels (:mod:`fxopt.codegen.scan_triton`, :mod:`fxopt.codegen.scan_gluon`) are tested against and
fall back to (fp64 inputs), and, recomputed chunk by chunk under autograd, the ops' backward
(:mod:`fxopt.ops.scan_grad`). This module imports only torch: the ops (:mod:`fxopt.ops.scan`) and the
kernels' host code both build on it, and it imports neither.

Each argument list is spelled once, as a ``NamedTuple``; the ops' schemas are read from them
(:func:`op_signature`).
"""
from __future__ import annotations

import inspect
import typing
from typing import NamedTuple, Optional

import torch
from torch import Tensor

# Time steps materialised at once by the references: bounds memory to chunk * b * d * n.
_REF_CHUNK = 64


class SelectiveScanArgs(NamedTuple):
    """The arguments of ``fxopt::selective_scan``, in the op's order (layouts: module docstring)."""

    u: Tensor
    delta: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    D: Optional[Tensor] = None
    z: Optional[Tensor] = None
    h0: Optional[Tensor] = None
    out_dtype: Optional[torch.dtype] = None

    def tensors(self) -> tuple[Optional[Tensor], ...]:
        return self[:8]


class LinearScanArgs(NamedTuple):
    """The arguments of ``fxopt::linear_scan``, in the op's order (layouts: module docstring)."""

    a: Tensor
    b: Tensor
    h0: Optional[Tensor] = None
    C: Optional[Tensor] = None
    out_dtype: Optional[torch.dtype] = None
    state_dtype: Optional[torch.dtype] = None

    def tensors(self) -> tuple[Optional[Tensor], ...]:
        return self[:4]


def op_signature(args_type: type, returns=tuple[Tensor, Tensor]) -> inspect.Signature:
    """The Python signature of a function taking ``args_type``'s fields (what
    ``torch.library.custom_op`` reads an op's schema from)."""
    hints = typing.get_type_hints(args_type)
    empty = inspect.Parameter.empty
    return inspect.Signature(
        [inspect.Parameter(f, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[f],
                           default=args_type._field_defaults.get(f, empty)) for f in args_type._fields],
        return_annotation=returns)


def compute_dtype(*ts: Optional[Tensor]) -> torch.dtype:
    """The dtype of the state and the arithmetic: fp64 if any input is fp64, else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def selective_scan_shapes(a: SelectiveScanArgs) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Shapes of ``(y, h_last)``."""
    bsz, d, L = a.u.shape
    return (bsz, d, L), (bsz, d, a.A.shape[-1])


def linear_scan_shapes(a: Tensor, b: Tensor, h0: Optional[Tensor]) -> list[int]:
    """The state shape ``S``."""
    shape = torch.broadcast_shapes(tuple(a.shape[1:]), tuple(b.shape[1:]), *(() if h0 is None else (tuple(h0.shape),)))
    return list(shape)


# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------
def selective_scan_ref(*args, **kwargs) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch selective scan; arguments as :class:`SelectiveScanArgs`."""
    u, delta, A, B, C, D, z, h0, out_dtype = SelectiveScanArgs(*args, **kwargs)
    cd = compute_dtype(u, delta, A, B, C, D, z, h0)
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


def linear_scan_ref(*args, **kwargs) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch general linear scan; arguments as :class:`LinearScanArgs`."""
    a, b, h0, C, out_dtype, state_dtype = LinearScanArgs(*args, **kwargs)
    cd = compute_dtype(a, b, h0, C)
    S = linear_scan_shapes(a, b, h0)
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
