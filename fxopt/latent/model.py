"""A whole HF GPTNeoX computed from its latent factorisation: forward and greedy generation.

This is the reference the ``latent_kv`` graph pass and the runtime's decode graphs answer to, and
what the quality measurements run on: :class:`LatentGPTNeoX` recomputes
``GPTNeoXForCausalLM.forward`` with the model's own embedding, layer norms, MLPs, output
projections and rotary tables (shared, read-only: the user's model is never changed) and the
attention from :mod:`fxopt.latent.attention`.

``generate`` keeps a latent cache per layer, ``c (b, T, r)`` and post-rotary ``k_rot (b, T, H, R)``:
prefill with reconstructed K/V, decode with absorbed scores through
``fxopt::latent_decode_attention`` (the Triton kernel on CUDA) and v applied after the sum --
the per-phase choice of :mod:`fxopt.latent.attention`. Batches may be left-padded (HF's
convention: positions count the real tokens); the decode step skips each row's padding through
the op's ``starts``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .attention import PHASE_MODES, decode_attention, latent_attention, project
from .layout import LatentKVError, attention_shape_of
from .plan import LatentFactorization


class LatentGPTNeoX(nn.Module):
    """``forward(input_ids, attention_mask=None) -> logits`` and greedy ``generate`` of an HF
    ``GPTNeoXForCausalLM`` whose attention runs on ``factorization``'s latent weights."""

    def __init__(self, model: nn.Module, factorization: LatentFactorization):
        super().__init__()
        shape = attention_shape_of(model)
        if shape != factorization.shape or len(factorization.layers) != len(model.gpt_neox.layers):
            raise LatentKVError(f"the factorisation ({factorization.shape}, {len(factorization.layers)} layers) does "
                                f"not belong to this model ({shape}, {len(model.gpt_neox.layers)} layers)")
        # a plain attribute, not a submodule: .to() / .train() on this wrapper must not reach the user's model
        object.__setattr__(self, "_hf", model)
        self.factorization = factorization
        self.shape = shape

    @property
    def hf_model(self) -> nn.Module:
        return self._hf

    # ------------------------------------------------------------------------- pieces
    def _layer(self, i: int, hidden: Tensor, attend) -> Tensor:
        """HF's ``GPTNeoXLayer.forward`` with the attention block replaced by ``attend(normed)``."""
        layer = self._hf.gpt_neox.layers[i]
        attn_out = layer.post_attention_dropout(attend(layer.input_layernorm(hidden)))
        if layer.use_parallel_residual:
            mlp_out = layer.post_mlp_dropout(layer.mlp(layer.post_attention_layernorm(hidden)))
            return mlp_out + attn_out + hidden
        attn_out = attn_out + hidden
        mlp_out = layer.post_mlp_dropout(layer.mlp(layer.post_attention_layernorm(attn_out)))
        return mlp_out + attn_out

    def _dense(self, i: int):
        dense = self._hf.gpt_neox.layers[i].attention.dense
        return dense.weight, dense.bias

    def _logits(self, hidden: Tensor) -> Tensor:
        return self._hf.lm_head(self._hf.gpt_neox.final_layer_norm(hidden))

    def _scaling(self, i: int) -> float:
        return float(self._hf.gpt_neox.layers[i].attention.scaling)

    @staticmethod
    def _left_padding(attention_mask: Tensor) -> Tensor:
        """Pads per row; refuses masks that are not left padding (a hole would need a key mask)."""
        m = attention_mask.bool()
        pads = (~m).long().cumprod(-1).sum(-1)
        if not bool((m.sum(-1) == m.shape[1] - pads).all()):
            raise LatentKVError("LatentGPTNeoX.generate supports left padding only (0s then 1s in every row)")
        return pads

    # ------------------------------------------------------------------------- forward
    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                *, k_mode: str = "reconstruct", v_mode: str = "reconstruct") -> Tensor:
        """Logits (b, L, V) as ``GPTNeoXForCausalLM.forward(...).logits`` (no cache)."""
        base = self._hf.gpt_neox
        b, L = input_ids.shape
        hidden = base.emb_dropout(base.embed_in(input_ids))
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device)[None].expand(b, L)
        cos, sin = base.rotary_emb(hidden, position_ids=position_ids)
        mask = torch.ones(L, L, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
        for i, lat in enumerate(self.factorization.layers):
            w, bias = self._dense(i)
            hidden = self._layer(i, hidden, lambda x: latent_attention(
                lat, w, bias, x, cos, sin, mask, scaling=self._scaling(i), k_mode=k_mode, v_mode=v_mode))
        return self._logits(hidden)

    # ------------------------------------------------------------------------- generation
    def allocate_cache(self, batch_size: int, max_length: int, device, dtype=None) -> list[tuple[Tensor, Tensor]]:
        """Zero-filled ``(c (b, T, r), k_rot (b, T, H, R))`` per layer."""
        dtype = dtype or self.factorization.layers[0].dtype
        H, R = self.shape.heads, self.shape.rotary_dim
        return [(torch.zeros(batch_size, max_length, lat.rank, dtype=dtype, device=device),
                 torch.zeros(batch_size, max_length, H, R, dtype=dtype, device=device))
                for lat in self.factorization.layers]

    def cache_bytes(self, batch_size: int, max_length: int) -> int:
        es = torch.empty((), dtype=self.factorization.layers[0].dtype).element_size()
        H, R = self.shape.heads, self.shape.rotary_dim
        return sum(batch_size * max_length * (lat.rank + H * R) * es for lat in self.factorization.layers)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, max_new_tokens: int = 20) -> Tensor:
        """Greedy decoding: prompt + ``max_new_tokens`` tokens (b, L + new), no early stop."""
        if max_new_tokens <= 0:
            return input_ids.clone()
        base = self._hf.gpt_neox
        b, L = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pads = self._left_padding(attention_mask)
        # HF generate's positions: count the real tokens; pads get position 1 (masked anyway)
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        cache = self.allocate_cache(b, L + max_new_tokens, device)
        k_mode, v_mode = PHASE_MODES["prefill"]

        hidden = base.emb_dropout(base.embed_in(input_ids))
        cos, sin = base.rotary_emb(hidden, position_ids=position_ids)
        mask = torch.ones(L, L, dtype=torch.bool, device=device).tril()[None, None] & attention_mask.bool()[:, None, None, :]
        for i, lat in enumerate(self.factorization.layers):
            w, bias = self._dense(i)

            def prefill(x, i=i, lat=lat, w=w, bias=bias):
                p = project(lat, x, cos, sin)
                c_cache, kr_cache = cache[i]
                c_cache[:, :L] = p.c
                kr_cache[:, :L] = p.k_rot.transpose(1, 2)
                return latent_attention(lat, w, bias, x, cos, sin, mask, scaling=self._scaling(i), k_mode=k_mode,
                                        v_mode=v_mode, projected=p)

            hidden = self._layer(i, hidden, prefill)
        token = self._logits(hidden[:, -1:]).argmax(-1)  # (b, 1)
        out = [input_ids, token]
        pos = position_ids[:, -1:]
        starts = pads.to(torch.int32)
        for step in range(1, max_new_tokens):
            slot = L + step - 1
            pos = pos + 1
            hidden = base.embed_in(token)
            cos, sin = base.rotary_emb(hidden, position_ids=pos)
            lengths = torch.full((b,), slot + 1, dtype=torch.int32, device=device)
            for i, lat in enumerate(self.factorization.layers):
                w, bias = self._dense(i)

                def decode(x, i=i, lat=lat, w=w, bias=bias):
                    p = project(lat, x, cos, sin)
                    c_cache, kr_cache = cache[i]
                    c_cache[:, slot] = p.c[:, 0]
                    kr_cache[:, slot] = p.k_rot[:, :, 0]
                    return decode_attention(lat, w, bias, p.q, c_cache, kr_cache, lengths, starts,
                                            scaling=self._scaling(i), v_mode=PHASE_MODES["decode"][1])

                hidden = self._layer(i, hidden, decode)
            token = self._logits(hidden).argmax(-1)
            out.append(token)
        return torch.cat(out, dim=1)


@torch.no_grad()
def greedy_reference(model: nn.Module, input_ids: Tensor, max_new_tokens: int) -> Tensor:
    """Greedy tokens of an HF causal LM by full forwards (no cache, no padding): the plain
    definition generated tokens are compared with."""
    ids = input_ids
    for _ in range(max_new_tokens):
        nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids
