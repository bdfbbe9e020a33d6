"""HF GPTNeoX generation graphs: a prefill wrapper and a decode-step wrapper over a static K/V cache.

Both wrappers hold the user's own submodules (embedding, rotary embedding, layers, final norm,
head: shared, never copied or modified) and recompute what ``GPTNeoXForCausalLM.forward`` does
with HF's own building blocks (its ``apply_rotary_pos_emb`` and attention functions, looked up
in the model's module so the numerics follow the installed transformers), with the cache as
an explicit input instead of a ``DynamicCache`` object.

Cache (declared; a pass may change it, see :mod:`fxopt.runtime.cache_spec`): one tensor

    kv : (n, 2, b, h, t, hd)      n layers, K and V, batch, heads, cache length, head dim

in the model's dtype. Axis 1 has the fixed size 2 on purpose: optimize's length templates cut
the inputs along axis 1 at their probe lengths, which must never hit a cache.

Each layer takes its slice ``kv_rest[0]`` and hands ``kv_rest[1:]`` to the next layer (views:
no copy). That makes the cache a value *carried* from layer to layer, like the hidden state,
so optimize's layer templates (which need every layer's graph to be the same sub-graph) apply
to deep models instead of a capture of every layer. Both wrappers return the empty tail left
after the last layer as a second output, so that the last layer's hand-over is not dead code
(a pass removing it would make the last layer differ from the others).

Prefill ``forward(input_ids (b, L), attention_mask (b, L) | None, cache) -> (logits (b, V) fp32, tail)``
(the last position's logits): K/V of positions ``0..L-1`` written to ``kv[:, :, :, :, :L]``; attention
over the prompt itself, as HF computes it (causal; with the padding mask when there is padding,
``is_causal`` otherwise).

Decode ``forward(input_ids (b, 1), position_ids (b, 1), slot (1,), key_mask (b, t) bool, cache)
-> (logits (b, V) fp32, tail)``: K/V of the new token written at cache position ``slot`` (one for the
whole batch: rows are left-padded, so they share positions in the cache), attention over the
whole cache under ``key_mask & (arange(t) <= slot)``.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .cache_spec import CacheEntry, CacheSpec


def is_gpt_neox(model: nn.Module) -> bool:
    return type(model).__name__ == "GPTNeoXForCausalLM" and hasattr(model, "gpt_neox") and hasattr(model, "lm_head")


def _hf_module(model: nn.Module):
    return sys.modules[type(model).__module__]


def _attention_function(model: nn.Module):
    """HF's attention function for the model's implementation: ``eager`` -> the module's
    ``eager_attention_forward``; anything else -> HF's SDPA integration (flash / flex kernels
    take arguments a static-cache graph does not have)."""
    mod = _hf_module(model)
    impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    if impl == "eager":
        return "eager", mod.eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return "sdpa", ALL_ATTENTION_FUNCTIONS["sdpa"]


def declared_spec(model: nn.Module) -> CacheSpec:
    cfg = model.config
    layers = model.gpt_neox.layers
    attn = layers[0].attention
    heads = cfg.num_attention_heads
    dtype = model.gpt_neox.embed_in.weight.dtype
    return CacheSpec((CacheEntry("kv", (len(layers), 2, "b", heads, "t", attn.head_size), dtype),))


class _Common(nn.Module):
    layer_class: type

    def __init__(self, model: nn.Module):
        super().__init__()
        base = model.gpt_neox
        # The layer stack first: optimize's layer templates look for the largest ModuleList.
        self.layers = nn.ModuleList([self.layer_class(layer) for layer in base.layers])
        self.embed_in = base.embed_in
        self.emb_dropout = base.emb_dropout
        self.rotary_emb = base.rotary_emb
        self.final_layer_norm = base.final_layer_norm
        self.lm_head = model.lm_head
        impl, fn = _attention_function(model)
        for layer in self.layers:
            object.__setattr__(layer, "_attend", fn)  # plain attributes: not modules, not compared
            object.__setattr__(layer, "_impl", impl)
            object.__setattr__(layer, "_rotary", _hf_module(model).apply_rotary_pos_emb)
        self.impl = impl

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.final_layer_norm(hidden)
        return self.lm_head(hidden[:, -1, :]).float()


class _Layer(nn.Module):
    """One GPTNeoX layer over the explicit cache (HF's ``GPTNeoXLayer.forward`` with
    ``GPTNeoXAttention.forward`` inlined; the cache update replaces ``layer_past.update``)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def _qkv(self, hidden, cos, sin):
        attn = self.layer.attention
        x = self.layer.input_layernorm(hidden)
        input_shape = x.shape[:-1]
        qkv = attn.query_key_value(x).view((*input_shape, -1, 3 * attn.head_size)).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = self._rotary(q, k, cos, sin)
        return q, k, v, input_shape

    def _finish(self, hidden, attn_output, input_shape):
        layer = self.layer
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = layer.attention.dense(attn_output)
        attn_output = layer.post_attention_dropout(attn_output)
        if layer.use_parallel_residual:
            mlp_output = layer.mlp(layer.post_attention_layernorm(hidden))
            mlp_output = layer.post_mlp_dropout(mlp_output)
            return mlp_output + attn_output + hidden
        attn_output = attn_output + hidden
        mlp_output = layer.mlp(layer.post_attention_layernorm(attn_output))
        mlp_output = layer.post_mlp_dropout(mlp_output)
        return mlp_output + attn_output

    def _attention(self, q, k, v, mask, is_causal: bool | None = None):
        attn = self.layer.attention
        kwargs: dict[str, Any] = {}
        if is_causal is not None and self._impl == "sdpa":
            kwargs["is_causal"] = is_causal
        out, _ = self._attend(attn, q, k, v, mask, scaling=attn.scaling,
                              dropout=0.0 if not attn.training else attn.attention_dropout, **kwargs)
        return out


class _PrefillLayer(_Layer):
    def forward(self, hidden, cos, sin, mask, kv_rest):
        q, k, v, input_shape = self._qkv(hidden, cos, sin)
        kv = kv_rest[0]
        length = k.shape[2]
        kv[0, :, :, :length].copy_(k)
        kv[1, :, :, :length].copy_(v)
        out = self._attention(q, k, v, mask)
        return self._finish(hidden, out, input_shape), kv_rest[1:]


class _DecodeLayer(_Layer):
    def forward(self, hidden, cos, sin, slot, mask, kv_rest):
        q, k, v, input_shape = self._qkv(hidden, cos, sin)
        kv = kv_rest[0]
        keys, values = kv[0], kv[1]
        keys.index_copy_(2, slot, k)
        values.index_copy_(2, slot, v)
        out = self._attention(q, keys, values, mask, is_causal=False)
        return self._finish(hidden, out, input_shape), kv_rest[1:]


def _mask_value(dtype: torch.dtype, impl: str, allowed: torch.Tensor) -> torch.Tensor:
    """HF's mask format: boolean for SDPA; 0 / dtype-min additive for eager."""
    if impl == "sdpa":
        return allowed
    return torch.where(allowed, torch.tensor(0.0, dtype=dtype, device=allowed.device),
                       torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=allowed.device))


class NeoXPrefill(_Common):
    """``forward(input_ids, attention_mask | None, cache) -> last-position logits (fp32)``."""

    layer_class = _PrefillLayer

    def forward(self, input_ids, attention_mask, cache):
        (kv,) = cache
        hidden = self.emb_dropout(self.embed_in(input_ids))
        b, length = input_ids.shape
        if attention_mask is None:
            position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0)
            mask = None  # HF's SDPA path: is_causal=True; eager: the plain causal mask
            if self.impl != "sdpa":
                causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
                mask = _mask_value(hidden.dtype, self.impl, causal[None, None].expand(b, 1, length, length))
        else:
            # HF's generate: positions count the real tokens, pads get position 0
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids = position_ids.masked_fill(attention_mask == 0, 0)
            causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
            allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
            mask = _mask_value(hidden.dtype, self.impl, allowed)
        cos, sin = self.rotary_emb(hidden, position_ids=position_ids)
        rest = kv
        for layer in self.layers:
            hidden, rest = layer(hidden, cos, sin, mask, rest)
        return self._logits(hidden), rest


class NeoXDecode(_Common):
    """``forward(input_ids, position_ids, slot, key_mask, cache) -> logits (fp32)``."""

    layer_class = _DecodeLayer

    def forward(self, input_ids, position_ids, slot, key_mask, cache):
        (kv,) = cache
        hidden = self.emb_dropout(self.embed_in(input_ids))
        t = key_mask.shape[1]
        allowed = key_mask & (torch.arange(t, device=key_mask.device) <= slot)
        mask = _mask_value(hidden.dtype, self.impl, allowed[:, None, None, :])
        cos, sin = self.rotary_emb(hidden, position_ids=position_ids)
        rest = kv
        for layer in self.layers:
            hidden, rest = layer(hidden, cos, sin, slot, mask, rest)
        return self._logits(hidden), rest
