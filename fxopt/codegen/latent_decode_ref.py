"""Plain-PyTorch reference of the latent decode attention (beside its Triton kernel in
:mod:`.latent_decode`); :mod:`fxopt.ops.latent_attention` uses it as the op's CPU implementation."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import FxoptError


def _compute_dtype(*ts: Optional[Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def check_decode_inputs(q_latent: Tensor, q_rot: Tensor, c: Tensor, k_rot: Tensor, lengths: Tensor,
                        starts: Optional[Tensor], key_mask: Optional[Tensor] = None) -> None:
    """Shapes and dtypes (metadata only: never reads a device tensor)."""
    if q_latent.dim() != 3 or q_rot.dim() != 3 or c.dim() != 3 or k_rot.dim() != 4:
        raise FxoptError(
            "latent_decode_attention: expected q_latent (b, H, r), q_rot (b, H, R), c (b, T, r), k_rot (b, T, H, R); "
            f"got {tuple(q_latent.shape)}, {tuple(q_rot.shape)}, {tuple(c.shape)}, {tuple(k_rot.shape)}")
    b, H, r = q_latent.shape
    T = c.shape[1]
    R = q_rot.shape[2]
    if tuple(q_rot.shape[:2]) != (b, H) or tuple(c.shape) != (b, T, r) or tuple(k_rot.shape) != (b, T, H, R):
        raise FxoptError(
            f"latent_decode_attention: shapes disagree: q_latent {tuple(q_latent.shape)}, q_rot {tuple(q_rot.shape)}, "
            f"c {tuple(c.shape)}, k_rot {tuple(k_rot.shape)} (want c (b, T, r) and k_rot (b, T, H, R))")
    for name, t in (("lengths", lengths), ("starts", starts)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != b or t.dtype not in (torch.int32, torch.int64):
            raise FxoptError(f"latent_decode_attention: {name} must be an int32/int64 tensor of shape ({b},), "
                             f"got {t.dtype} {tuple(t.shape)}")
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (b, T)):
        raise FxoptError(f"latent_decode_attention: key_mask must be a bool tensor of shape ({b}, {T}), got "
                         f"{key_mask.dtype} {tuple(key_mask.shape)}")
    if not (q_latent.is_floating_point() and q_rot.dtype == q_latent.dtype and c.dtype == k_rot.dtype
            and c.is_floating_point()):
        raise FxoptError(f"latent_decode_attention: q_latent/q_rot must share a float dtype and c/k_rot another; got "
                         f"{q_latent.dtype}, {q_rot.dtype}, {c.dtype}, {k_rot.dtype}")


def valid_keys(lengths: Tensor, starts: Optional[Tensor], T: int, key_mask: Optional[Tensor] = None) -> Tensor:
    """(b, T) bool: the keys each row attends."""
    j = torch.arange(T, device=lengths.device)
    ok = j[None, :] < lengths.clamp(0, T)[:, None]
    if starts is not None:
        ok = ok & (j[None, :] >= starts.clamp(min=0)[:, None])
    if key_mask is not None:
        ok = ok & key_mask
    return ok


def latent_decode_attention_ref(q_latent: Tensor, q_rot: Tensor, c: Tensor, k_rot: Tensor, lengths: Tensor,
                                starts: Optional[Tensor] = None, scale: float = 1.0,
                                key_mask: Optional[Tensor] = None) -> Tensor:
    """Plain-PyTorch decode attention over (c, k_rot) (module docstring)."""
    check_decode_inputs(q_latent, q_rot, c, k_rot, lengths, starts, key_mask)
    cd = _compute_dtype(q_latent, q_rot, c, k_rot)
    T = c.shape[1]
    cc = c.to(cd)
    s = torch.einsum("bhr,btr->bht", q_latent.to(cd), cc)
    if q_rot.shape[-1]:
        s = s + torch.einsum("bhe,bthe->bht", q_rot.to(cd), k_rot.to(cd))
    s = s * scale
    keys = valid_keys(lengths, starts, T, key_mask)
    ok = keys[:, None, :]
    s = torch.where(ok, s, torch.full((), -torch.inf, dtype=cd, device=s.device))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    # slots that are not attended may hold anything (stale or never written): 0 * nan must not leak
    cc = torch.where(keys[..., None], cc, torch.zeros((), dtype=cd, device=cc.device))
    out = torch.einsum("bht,btr->bhr", p, cc) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.to(q_latent.dtype)
