"""Plain-PyTorch references of the single-step Mamba ops (HF's torch decode path, op for op).

They live in codegen, beside the Triton kernels that must match them (:mod:`.ssm_update_triton`);
the ops in :mod:`fxopt.ops.ssm_update` use them as their CPU implementations.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    # no cast node for a no-op cast (export records `to` to the same dtype as an alias)
    return x if x.dtype == dtype else x.to(dtype)


def selective_state_update_ref(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                               D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                               dt_bias: Optional[Tensor] = None, dt_softplus: bool = True,
                               A_is_log: bool = False) -> Tensor:
    """HF's torch ``selective_state_update``; writes the new state into ``state``, returns y.
    ``A_is_log``: ``A`` is Mamba's ``A_log`` parameter and ``A = -exp(A_log.float())`` is computed
    here (as ``MambaMixer`` does before the update)."""
    if A_is_log:
        A = -torch.exp(A.float())
    input_dtype = x.dtype
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dA = torch.exp(dt.float()[..., None] * A.float())
    dB = dt.float()[..., None] * B.float()[:, None, :]
    dBx = dB * x.float()[..., None]
    new_state = state.float() * dA + dBx
    state.copy_(_cast(new_state, state.dtype))
    out = torch.matmul(_cast(new_state, C.dtype), C.unsqueeze(-1)).squeeze(-1)
    if D is not None:
        out = out + x * D
    if z is not None:
        out = out * F.silu(z)
    return _cast(out, input_dtype)


def conv_state_update_ref(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                          silu: bool = True) -> Tensor:
    """HF's torch ``causal_conv1d_update`` (activation silu or none); updates ``conv_state``."""
    _, d, length = x.shape
    k = conv_state.shape[-1]
    w = weight if weight.dim() == 3 else weight.unsqueeze(1)
    window = torch.cat([conv_state, x], dim=-1).to(w.dtype)
    conv_state.copy_(window[:, :, -k:])
    out = F.conv1d(window, w, bias, padding=0, groups=d)
    out = out[:, :, -length:]
    if silu:
        out = F.silu(out)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------
