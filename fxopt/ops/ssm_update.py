"""Single-step Mamba custom ops (namespace ``fxopt``) for the decode step, each beside its reference.

``fxopt::selective_state_update`` -- one step of the selective scan, the state updated in place::

    state : (b, d, s) (a!)   x, dt, z : (b, d)   A : (d, s)   B, C : (b, s)   D, dt_bias : (d,)
    A     = -exp(A_log) when A_is_log               (Mamba's parameter: no separate kernels per step)
    dt'   = softplus(dt + dt_bias)                  (in dt's dtype, as HF computes it)
    state = state * exp(dt' A) + (dt' B) x          (fp32)
    y     = (state . C + x D) * silu(z)             -> (b, d) in x's dtype

``fxopt::conv_state_update`` -- one step of the depthwise causal conv1d, its window updated in place::

    conv_state : (b, d, k) (a!)   x : (b, d, 1)   weight : (d, 1, k) or (d, k)   bias : (d,)
    window = [conv_state, x][..., 1:]  -> conv_state
    y = act(sum_j weight[:, j] window[:, :, j] + bias)    -> (b, d, 1) in x's dtype

The references (:func:`selective_state_update_ref`, :func:`conv_state_update_ref`) are HF's torch
decode path (``mamba_selective_state_update``, ``causal_conv1d_update``) op for op: the
generation wrappers call them, the ``ssm_update`` pass finds exactly their ATen sequence, and the
CPU implementations of the ops are the references themselves (bit-equal to what they replace).
The CUDA implementations are the Triton kernels of :mod:`fxopt.codegen.ssm_update_triton`
(contract ``fp64_relative(2)`` against the reference, one launch per op instead of ~25 / ~6).
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
@torch.library.custom_op("fxopt::selective_state_update", mutates_args=("state",))
def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                           dt_bias: Optional[Tensor] = None, dt_softplus: bool = True,
                           A_is_log: bool = False) -> Tensor:
    return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, A_is_log)


@selective_state_update.register_fake
def _ssu_fake(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, A_is_log=False):
    return x.new_empty(x.shape, dtype=x.dtype)


@selective_state_update.register_kernel("cuda")
def _ssu_cuda(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, A_is_log=False):
    from ..codegen import ssm_update_triton

    return ssm_update_triton.selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, A_is_log)


@torch.library.custom_op("fxopt::conv_state_update", mutates_args=("conv_state",))
def conv_state_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                      silu: bool = True) -> Tensor:
    return conv_state_update_ref(x, conv_state, weight, bias, silu)


@conv_state_update.register_fake
def _csu_fake(x, conv_state, weight, bias=None, silu=True):
    return x.new_empty(x.shape, dtype=x.dtype)


@conv_state_update.register_kernel("cuda")
def _csu_cuda(x, conv_state, weight, bias=None, silu=True):
    from ..codegen import ssm_update_triton

    return ssm_update_triton.conv_state_update_triton(x, conv_state, weight, bias, silu)


SELECTIVE_STATE_UPDATE = torch.ops.fxopt.selective_state_update.default
CONV_STATE_UPDATE = torch.ops.fxopt.conv_state_update.default
