"""Calibration statistics for activation-aware factorisation: each layer's input second moment.

The inputs that matter are what ``query_key_value`` sees (the output of ``input_layernorm``):
``G_l = sum_t x_t x_t^T / n`` over the calibration tokens, accumulated in fp64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .layout import LatentKVError


@dataclass(frozen=True)
class Calibration:
    """Per-layer second moments ``grams[l]`` (d, d) fp64 measured over ``tokens`` tokens."""

    grams: tuple[Tensor, ...]
    tokens: int

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


def collect_calibration(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                        batch_size: int = 8) -> Calibration:
    """Run ``model`` (an HF GPTNeoX) on ``input_ids`` (b, L) and measure each layer's
    ``query_key_value`` input second moment (padding positions, ``attention_mask == 0``, excluded).

    Forward pre-hooks are registered on the model's projections for the duration of the call and
    removed afterwards (also on error); nothing else about the model is touched."""
    base = getattr(model, "gpt_neox", None)
    if base is None or not hasattr(base, "layers"):
        raise LatentKVError(f"collect_calibration needs an HF GPTNeoXForCausalLM, got {type(model).__name__}")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise LatentKVError("calibration input_ids must be an integer tensor (batch, length)")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise LatentKVError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    d = base.config.hidden_size
    grams = [torch.zeros(d, d, dtype=torch.float64) for _ in base.layers]
    count = [0]
    current_mask: list[Optional[Tensor]] = [None]

    def hook_for(i):
        def hook(_module, args):
            x = args[0].detach()
            flat = x.reshape(-1, d).to(torch.float64).cpu()
            m = current_mask[0]
            if m is not None:
                flat = flat[m.reshape(-1).bool().cpu()]
            grams[i].add_(flat.T @ flat)
        return hook

    handles = [layer.attention.query_key_value.register_forward_pre_hook(hook_for(i))
               for i, layer in enumerate(base.layers)]
    try:
        with torch.no_grad():
            for s in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[s:s + batch_size]
                mask = None if attention_mask is None else attention_mask[s:s + batch_size]
                current_mask[0] = mask
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                count[0] += int(ids.numel() if mask is None else mask.bool().sum())
    finally:
        for h in handles:
            h.remove()
    if count[0] == 0:
        raise LatentKVError("calibration saw no tokens (empty input or all padding)")
    return Calibration(tuple(g / count[0] for g in grams), count[0])
