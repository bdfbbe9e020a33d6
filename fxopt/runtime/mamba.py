"""HF Mamba generation graphs: a prefill wrapper and a decode-step wrapper over explicit states.

Both wrappers hold the user's own submodules (embeddings, blocks, final norm, head: shared,
never copied or modified) and recompute what ``MambaForCausalLM`` does on HF's torch path (the
one it takes without the official kernels: ``causal_conv1d_fn`` / ``causal_conv1d_update`` /
the recurrent scan loop / ``selective_state_update``, written out here so that the installed
kernels, if any, do not change what is captured), with the states as explicit inputs instead
of a cache object. The prefill's scan loop is what fxopt's ``scan`` pass re-rolls into one
``fxopt::selective_scan`` (whose ``h_last`` is the final state); the decode step's state
update is what the ``ssm_update`` pass (:mod:`fxopt.passes.ssm_update`) fuses into
``fxopt::selective_state_update`` and ``fxopt::conv_state_update``.

Cache (declared; a pass may change it, see :mod:`fxopt.runtime.cache_spec`):

    conv : (n, 1, b, d, k)    the last k inputs of each layer's causal conv (model dtype)
    ssm  : (n, 1, b, d, s)    each layer's SSM state (fp32, as HF keeps it)

n layers, b batch, d = intermediate size, k = conv kernel, s = state size. Axis 1 has the fixed
size 1 on purpose: optimize's length templates cut inputs along axis 1 at their probe lengths,
which must never hit a cache. Each layer takes ``rest[0][0]`` and hands ``rest[1:]`` on (views;
see :mod:`fxopt.runtime.neox` for why the cache is carried and the tail returned).

Prefill ``forward(input_ids (b, L), attention_mask (b, L) | None, cache) -> (logits (b, V) fp32,
tails)``; decode ``forward(input_ids (b, 1), cache) -> (logits, tails)`` (HF passes no mask
after the first step either).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.ssm_update import conv_state_update_ref, selective_state_update_ref
from .cache_spec import CacheEntry, CacheSpec


def is_mamba(model: nn.Module) -> bool:
    return type(model).__name__ == "MambaForCausalLM" and hasattr(model, "backbone") and hasattr(model, "lm_head")


def declared_spec(model: nn.Module) -> CacheSpec:
    layers = model.backbone.layers
    mixer = layers[0].mixer
    n = len(layers)
    conv_dtype = mixer.in_proj.weight.dtype
    return CacheSpec((
        CacheEntry("conv", (n, 1, "b", mixer.intermediate_size, mixer.conv_kernel_size), conv_dtype),
        CacheEntry("ssm", (n, 1, "b", mixer.intermediate_size, mixer.ssm_state_size), torch.float32),
    ))


def _mask_padding(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # HF's apply_mask_to_padding_states
    if mask is None:
        return hidden
    return (hidden * mask[:, :, None]).to(hidden.dtype)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` without the no-op cast node: export records ``to`` of a tensor that already
    has the dtype as an alias of it, and a later in-place write of the state would then read the
    alias (the scan pass would see the readout's cast used outside the loop)."""
    return x if x.dtype == dtype else x.to(dtype)


def _scan_with_state(u, dt, A, B, C, D, z, dt_bias):
    """HF's torch selective scan (recurrent form) returning the final state: the loop the
    ``scan`` pass re-rolls. u, dt, z: (b, d, l); B, C: (b, s, l); returns y (b, d, l), h (b, d, s)."""
    batch, d, length = u.shape
    dt = dt + dt_bias.to(dt.dtype)[..., None]
    dt = F.softplus(dt)
    B = B.transpose(1, 2)
    C = C.transpose(1, 2)
    dA = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
    dB = dt[:, :, :, None] * B[:, None, :, :].float()
    dBu = dB * u[:, :, :, None].float()
    state = torch.zeros(batch, d, A.shape[-1], dtype=u.dtype, device=u.device)
    ys = []
    for i in range(length):
        state = dA[:, :, i] * state + dBu[:, :, i]
        y = torch.matmul(_cast(state, u.dtype), C[:, i, :].unsqueeze(-1))
        ys.append(y[:, :, 0])
    y = torch.stack(ys, dim=-1)
    y = y + u * D[None, :, None]
    y = y * F.silu(z)
    return y, state


def _conv_update(x, conv_state, weight, bias, act):
    """HF's torch ``causal_conv1d_update`` for any activation module: x (b, d, 1), conv_state
    (b, d, k) updated in place. (For silu, the runtime calls the op reference instead, which the
    ``ssm_update`` pass fuses.)"""
    _, d, length = x.shape
    k = conv_state.shape[-1]
    window = torch.cat([conv_state, x], dim=-1).to(weight.dtype)
    conv_state.copy_(window[:, :, -k:])
    out = F.conv1d(window, weight.unsqueeze(1), bias, padding=0, groups=d)
    out = out[:, :, -length:]
    return act(out).to(x.dtype)


class _Block(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def _enter(self, hidden):
        block = self.block
        residual = hidden
        hidden = block.norm(hidden.to(dtype=block.norm.weight.dtype))
        if block.residual_in_fp32:
            residual = residual.to(torch.float32)
        return residual, hidden


class _PrefillBlock(_Block):
    def forward(self, hidden, mask, conv_rest, ssm_rest):
        residual, hidden = self._enter(hidden)
        mixer = self.block.mixer
        conv_state, ssm_state = conv_rest[0][0], ssm_rest[0][0]
        dtype = hidden.dtype
        length = hidden.shape[1]
        hidden = _mask_padding(hidden, mask)
        projected = mixer.in_proj(hidden).transpose(1, 2)
        A = -torch.exp(mixer.A_log.float())
        xbc, gate = projected.chunk(2, dim=1)
        k = mixer.conv_kernel_size
        # HF's cache keeps the last k conv inputs, zero-padded on the left for short prompts
        window = F.pad(xbc, (k - length, 0)) if length < k else xbc[:, :, length - k:]
        conv_state.copy_(window)
        weight = mixer.conv1d.weight.squeeze(1)
        xbc = F.conv1d(xbc.to(weight.dtype), weight.unsqueeze(1), mixer.conv1d.bias, padding=k - 1,
                       groups=xbc.shape[1])[:, :, :length]
        xbc = mixer.act(xbc).to(projected.dtype)
        xbc = _mask_padding(xbc.transpose(1, 2), mask)
        ts, B, C = torch.split(mixer.x_proj(xbc), [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1)
        ts = mixer.dt_proj.weight @ ts.transpose(1, 2)
        y, state = _scan_with_state(xbc.transpose(1, 2), ts, A, B.transpose(1, 2), C.transpose(1, 2),
                                    mixer.D.float(), gate, mixer.dt_proj.bias.float())
        ssm_state.copy_(state)
        out = mixer.out_proj(y.transpose(1, 2).to(dtype))
        return residual + out, conv_rest[1:], ssm_rest[1:]


class _DecodeBlock(_Block):
    def forward(self, hidden, conv_rest, ssm_rest):
        residual, hidden = self._enter(hidden)
        mixer = self.block.mixer
        conv_state, ssm_state = conv_rest[0][0], ssm_rest[0][0]
        dtype = hidden.dtype
        projected = mixer.in_proj(hidden).transpose(1, 2)
        A = -torch.exp(mixer.A_log.float())
        xbc, gate = projected.chunk(2, dim=1)
        weight = mixer.conv1d.weight.squeeze(1)
        if getattr(mixer, "activation", None) == "silu":
            xbc = conv_state_update_ref(xbc, conv_state, weight, mixer.conv1d.bias, silu=True)
        else:
            xbc = _conv_update(xbc, conv_state, weight, mixer.conv1d.bias, mixer.act)
        xbc = xbc.transpose(1, 2)
        ts, B, C = torch.split(mixer.x_proj(xbc), [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1)
        ts = mixer.dt_proj.weight @ ts.transpose(1, 2)
        y = selective_state_update_ref(ssm_state, xbc.transpose(1, 2)[..., 0], ts[..., 0], A, B[:, 0], C[:, 0], mixer.D,
                                       gate[..., 0], mixer.dt_proj.bias.float(), True).unsqueeze(-1)
        out = mixer.out_proj(y.transpose(1, 2).to(dtype))
        return residual + out, conv_rest[1:], ssm_rest[1:]


class _Common(nn.Module):
    block_class: type

    def __init__(self, model: nn.Module):
        super().__init__()
        base = model.backbone
        # The layer stack first: optimize's layer templates look for the largest ModuleList.
        self.layers = nn.ModuleList([self.block_class(block) for block in base.layers])
        self.embeddings = base.embeddings
        self.norm_f = base.norm_f
        self.lm_head = model.lm_head

    def _logits(self, hidden):
        hidden = self.norm_f(hidden)
        return self.lm_head(hidden[:, -1, :].to(self.lm_head.weight.dtype)).float()


class MambaPrefill(_Common):
    """``forward(input_ids, attention_mask | None, cache) -> (last-position logits fp32, tails)``."""

    block_class = _PrefillBlock

    def forward(self, input_ids, attention_mask, cache):
        conv, ssm = cache
        hidden = self.embeddings(input_ids)
        for layer in self.layers:
            hidden, conv, ssm = layer(hidden, attention_mask, conv, ssm)
        return self._logits(hidden), (conv, ssm)


class MambaDecode(_Common):
    """``forward(input_ids (b, 1), cache) -> (logits fp32, tails)``."""

    block_class = _DecodeBlock

    def forward(self, input_ids, cache):
        conv, ssm = cache
        hidden = self.embeddings(input_ids)
        for layer in self.layers:
            hidden, conv, ssm = layer(hidden, conv, ssm)
        return self._logits(hidden), (conv, ssm)
