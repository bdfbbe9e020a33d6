"""Calibration statistics for activation-aware factorisation, measured per layer on calibration tokens.

* ``grams[l]`` (d, d): ``G_l = sum_t x_t x_t^T / n``, the second moment of what ``query_key_value``
  sees (the output of ``input_layernorm``), over the calibration tokens; always collected.
* ``grad_grams[l]`` (m, m), with ``gradients=True``: ``S_l = sum_t g_t g_t^T / n``, the second moment
  of the gradient of the calibration tokens' summed next-token loss with respect to the layer's
  k_pass / v outputs (rows in ``M``'s order, :meth:`fxopt.latent.SplitQKV.stacked`). ``S_l (x) G_l``
  is the Kronecker-factored (K-FAC) approximation of the loss's Fisher information for the weights
  ``M``: a weight error ``E`` raises the loss by about ``tr(S E G E^T) / 2`` per token, in the same
  units in every layer (see :mod:`fxopt.latent.factor`).
* ``value_grams[l]`` (H, d, d), with ``value_inputs=True``: per head ``h`` the second moment of the
  attention-averaged inputs ``xbar_i = sum_j p_ij x_j`` (``p``: the model's own attention weights
  of head ``h``): head ``h``'s attention output is ``o_i = M_v,h xbar_i + b_v,h``, so an error ``E``
  in its v rows changes the output by exactly ``E xbar_i``; it is ``xbar``'s statistics, not ``x``'s,
  that say which input directions the v projection must keep (averaging over tokens cancels the
  directions that vary from token to token).

All sums are fp64 on the CPU; padding positions (``attention_mask == 0``) are excluded (as keys, as
queries and as loss terms).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .layout import AttentionShape, LatentKVError, attention_shape_of

log = logging.getLogger("fxopt")


@dataclass(frozen=True)
class Calibration:
    """Per-layer second moments measured over ``tokens`` tokens (module docstring)."""

    grams: tuple[Tensor, ...]                         # (d, d) fp64 per layer
    tokens: int
    grad_grams: Optional[tuple[Tensor, ...]] = None   # (m, m) fp64 per layer
    value_grams: Optional[tuple[Tensor, ...]] = None  # (H, d, d) fp64 per layer

    @classmethod
    def from_activations(cls, activations: Sequence[Tensor]) -> "Calibration":
        """From per-layer activation tensors ``(..., d)`` (all with the same number of tokens)."""
        grams, counts = [], set()
        for i, x in enumerate(activations):
            if not isinstance(x, Tensor) or x.dim() < 1 or not x.is_floating_point():
                raise LatentKVError(f"calibration activations[{i}] must be a floating tensor (..., d), got {type(x).__name__}")
            flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            if flat.shape[0] == 0:
                raise LatentKVError(f"calibration activations[{i}] hold no tokens")
            grams.append(flat.T @ flat / flat.shape[0])
            counts.add(flat.shape[0])
        return cls(tuple(grams), min(counts) if counts else 0)

    def inputs_only(self) -> "Calibration":
        """The same calibration without the gradient and attention statistics (``objective="inputs"``)."""
        return Calibration(self.grams, self.tokens)


def stacked_rows(shape: AttentionShape) -> Tensor:
    """Indices into ``query_key_value``'s output (3d) of ``M``'s rows: every head's k_pass, then every
    head's v (the interleaved layout of :mod:`fxopt.latent.layout`)."""
    H, hd, R = shape.heads, shape.head_dim, shape.rotary_dim
    k = [h * 3 * hd + hd + e for h in range(H) for e in range(R, hd)]
    v = [h * 3 * hd + 2 * hd + e for h in range(H) for e in range(hd)]
    return torch.tensor(k + v, dtype=torch.long)


def attention_weights_of(qkv_out: Tensor, cos: Tensor, sin: Tensor, shape: AttentionShape, scaling: float,
                         key_mask: Optional[Tensor]) -> Tensor:
    """The model's causal attention weights (b, H, L, L), fp32 or wider, recomputed from one layer's
    ``query_key_value`` output (b, L, 3d) and HF's rotary tables ``cos, sin`` (b, L, R); ``key_mask``
    (b, L) bool marks the real tokens. Rows of padding queries are returned as zeros."""
    from .attention import rotate

    b, L, _ = qkv_out.shape
    H, hd, R = shape.heads, shape.head_dim, shape.rotary_dim
    acc = torch.promote_types(qkv_out.dtype, torch.float32)
    qkv = qkv_out.detach().to(acc).view(b, L, H, 3 * hd).transpose(1, 2)
    q, k, _ = qkv.chunk(3, dim=-1)
    cos, sin = cos.to(acc), sin.to(acc)
    q = torch.cat([rotate(q[..., :R], cos, sin), q[..., R:]], dim=-1)
    k = torch.cat([rotate(k[..., :R], cos, sin), k[..., R:]], dim=-1)
    allowed = torch.ones(L, L, dtype=torch.bool, device=qkv_out.device).tril()[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    # a padding query may see no key at all (left padding): its row is NaN, and it is not a query we count
    return torch.nan_to_num(p, nan=0.0)


def collect_calibration(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, batch_size: int = 8, *,
                        gradients: bool = False, value_inputs: bool = False) -> Calibration:
    """Run ``model`` (an HF GPTNeoX) on ``input_ids`` (b, L) and measure each layer's statistics
    (module docstring): the ``query_key_value`` input second moments, and with ``gradients=True`` the
    loss-gradient second moments of the k_pass / v outputs (next-token loss of ``input_ids`` itself,
    so ``L >= 2``), with ``value_inputs=True`` the per-head attention-averaged input second moments.

    Hooks are registered on the model's modules for the duration of the call and removed afterwards
    (also on error); gradients are taken with respect to zero tensors added to the projections'
    outputs (``torch.autograd.grad``), so no parameter's ``.grad`` or ``requires_grad`` changes."""
    base = getattr(model, "gpt_neox", None)
    if base is None or not hasattr(base, "layers"):
        raise LatentKVError(f"collect_calibration needs an HF GPTNeoXForCausalLM, got {type(model).__name__}")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise LatentKVError("calibration input_ids must be an integer tensor (batch, length)")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise LatentKVError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    if gradients and input_ids.shape[1] < 2:
        raise LatentKVError("calibration with gradients needs sequences of >= 2 tokens (the loss predicts the next one)")
    if gradients and getattr(model, "lm_head", None) is None:
        raise LatentKVError("calibration with gradients needs the language-model head (GPTNeoXForCausalLM)")
    shape = attention_shape_of(model)
    d, H = shape.hidden, shape.heads
    n_layers = len(base.layers)
    rows = stacked_rows(shape)
    m = rows.numel()
    grams = [torch.zeros(d, d, dtype=torch.float64) for _ in range(n_layers)]
    grad_grams = [torch.zeros(m, m, dtype=torch.float64) for _ in range(n_layers)] if gradients else None
    value_grams = [torch.zeros(H, d, d, dtype=torch.float64) for _ in range(n_layers)] if value_inputs else None
    count = 0
    state: dict = {}

    def attention_pre_hook(i):
        def hook(_module, _args, kwargs):
            pe = kwargs.get("position_embeddings")
            if pe is None:
                raise LatentKVError("collect_calibration(value_inputs=True): the attention module got no "
                                    "position_embeddings (cos, sin): a transformers version this code does not know")
            state["rotary", i] = pe
        return hook

    def qkv_hook(i):
        def hook(module, args, out):
            x = args[0].detach()
            valid = state["valid"]  # (b, L) bool
            flat = x.reshape(-1, d).to(torch.float64).cpu()[valid.reshape(-1).cpu()]
            grams[i].add_(flat.T @ flat)
            if value_inputs:
                cos, sin = state["rotary", i]
                attn = base.layers[i].attention
                p = attention_weights_of(out, cos, sin, shape, float(attn.scaling), valid)
                xbar = torch.matmul(p, x.to(p.dtype)[:, None])  # (b, H, L, d)
                q_valid = valid.cpu()
                for h in range(H):
                    xb = xbar[:, h].to(torch.float64).cpu()[q_valid]
                    value_grams[i][h].add_(xb.T @ xb)
            if gradients:
                zero = torch.zeros_like(out, requires_grad=True)
                state["zeros"].append(zero)
                return out + zero
            return None
        return hook

    handles = []
    try:
        for i, layer in enumerate(base.layers):
            if value_inputs:
                handles.append(layer.attention.register_forward_pre_hook(attention_pre_hook(i), with_kwargs=True))
            handles.append(layer.attention.query_key_value.register_forward_hook(qkv_hook(i)))
        for s in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[s:s + batch_size]
            mask = None if attention_mask is None else attention_mask[s:s + batch_size]
            valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            state["valid"] = valid
            state["zeros"] = []
            if not gradients:
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
            else:
                with torch.enable_grad():
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    # the loss of predicting each real token from a real predecessor
                    pair = (valid[:, :-1] & valid[:, 1:]).reshape(-1)
                    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).reshape(-1, logits.shape[-1])
                    target = ids[:, 1:].reshape(-1).long()
                    loss = -(lp[pair].gather(1, target[pair, None])).sum()
                    if not loss.requires_grad:  # no real token pairs in this batch: no gradient signal
                        grads = [torch.zeros_like(z) for z in state["zeros"]]
                    else:
                        grads = torch.autograd.grad(loss, state["zeros"], allow_unused=True)
                for i, g in enumerate(grads):
                    if g is None:
                        continue
                    gf = g.detach().reshape(-1, g.shape[-1])[:, rows.to(g.device)].to(torch.float64).cpu()
                    gf = gf[valid.reshape(-1).cpu()]
                    grad_grams[i].add_(gf.T @ gf)
            count += int(valid.sum())
    finally:
        for h in handles:
            h.remove()
        state.clear()
    if count == 0:
        raise LatentKVError("calibration saw no tokens (empty input or all padding)")
    log.debug("latent calibration: %d tokens, %d layers%s%s", count, n_layers, ", loss gradients" if gradients else "",
              ", attention-averaged inputs" if value_inputs else "")
    return Calibration(tuple(g / count for g in grams), count,
                       None if grad_grams is None else tuple(g / count for g in grad_grams),
                       None if value_grams is None else tuple(g / count for g in value_grams))
