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
from torch import Tensor

from ..codegen.ssm_update_ref import _cast, conv_state_update_ref, selective_state_update_ref  # noqa: F401


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
