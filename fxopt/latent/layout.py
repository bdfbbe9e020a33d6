"""Where GPTNeoX keeps q, k and v inside its fused ``query_key_value`` projection.

HF's ``GPTNeoXAttention.forward`` computes ``qkv = x W^T + b`` (``W``: (3d, d)), views it as
``(..., H, 3*hd)`` and chunks the last axis into q, k, v. So output row ``o`` of ``W`` belongs to
head ``o // (3 hd)`` and, within it, to q (``o % 3hd < hd``), k (``< 2hd``) or v: the heads are
interleaved, ``W.view(H, 3, hd, d)[h, j]`` is head ``h``'s q (j=0), k (1) or v (2) block.
The rotary embedding then rotates the first ``rotary_dim`` dims of every q and k head
(``apply_rotary_pos_emb``: ``rotary_dim = cos.shape[-1]``, which is ``2 * len(inv_freq)``,
i.e. ``int(hd * rotary_pct)`` rounded up to even).

Letter glossary used across :mod:`fxopt.latent`: ``d`` hidden size, ``H`` heads, ``hd`` head dim,
``R`` rotary dims per head, ``P = hd - R`` pass-through dims, ``r`` latent rank,
``m = H (P + hd)`` rows of the stacked k_pass / v projection ``M``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..errors import FxoptError


class LatentKVError(FxoptError):
    """Bad input to the latent-KV factorisation (wrong model family, rank, budget, calibration...)."""


@dataclass(frozen=True)
class AttentionShape:
    """The sizes of one GPTNeoX attention layer (see the module glossary)."""

    hidden: int       # d
    heads: int        # H
    head_dim: int     # hd
    rotary_dim: int   # R

    def __post_init__(self):
        if self.heads < 1 or self.head_dim < 1 or self.heads * self.head_dim != self.hidden:
            raise LatentKVError(
                f"GPTNeoX attention needs hidden = heads * head_dim, got hidden={self.hidden}, "
                f"heads={self.heads}, head_dim={self.head_dim}")
        if not 0 <= self.rotary_dim <= self.head_dim:
            raise LatentKVError(f"rotary_dim={self.rotary_dim} must lie in [0, head_dim={self.head_dim}]")

    @property
    def pass_dim(self) -> int:  # P
        return self.head_dim - self.rotary_dim

    @property
    def stacked_rows(self) -> int:  # m: rows of M = [W_k_pass; W_v]
        return self.heads * (self.pass_dim + self.head_dim)


def rotary_dim_for(head_dim: int, rotary_pct: float) -> int:
    """The number of dims HF actually rotates: ``int(head_dim * rotary_pct)`` rounded up to even
    (``inv_freq`` has ``ceil(dim / 2)`` entries and ``cos`` twice that)."""
    dim = int(head_dim * rotary_pct)
    return 2 * ((dim + 1) // 2)


def attention_shape_of(model) -> AttentionShape:
    """The attention shape of an HF ``GPTNeoXForCausalLM`` (or ``GPTNeoXModel``), read off the
    model's own modules (the rotary width from its ``rotary_emb.inv_freq``, what HF rotates)."""
    base = getattr(model, "gpt_neox", model)
    layers = getattr(base, "layers", None)
    rotary = getattr(base, "rotary_emb", None)
    if layers is None or rotary is None or len(layers) == 0 or not hasattr(layers[0], "attention"):
        raise LatentKVError(
            f"latent KV needs an HF GPTNeoX model (GPTNeoXForCausalLM / GPTNeoXModel), got {type(model).__name__}")
    attn = layers[0].attention
    cfg = base.config
    heads = int(cfg.num_attention_heads)
    head_dim = int(attn.head_size)
    return AttentionShape(hidden=int(cfg.hidden_size), heads=heads, head_dim=head_dim,
                          rotary_dim=2 * int(rotary.inv_freq.numel()))


@dataclass(frozen=True)
class SplitQKV:
    """Head-major blocks of one layer's ``query_key_value``: weights ``(H, rows, d)``, biases
    ``(H, rows)`` (None when the layer has no bias)."""

    q_weight: Tensor       # (H, hd, d)
    k_rot_weight: Tensor   # (H, R, d)
    k_pass_weight: Tensor  # (H, P, d)
    v_weight: Tensor       # (H, hd, d)
    q_bias: Optional[Tensor]
    k_rot_bias: Optional[Tensor]
    k_pass_bias: Optional[Tensor]
    v_bias: Optional[Tensor]

    def stacked(self) -> Tensor:
        """``M = [W_k_pass; W_v]`` as an (m, d) matrix: rows head by head, k_pass heads first."""
        d = self.v_weight.shape[-1]
        return torch.cat([self.k_pass_weight.reshape(-1, d), self.v_weight.reshape(-1, d)], 0)

    def stacked_bias(self) -> Optional[Tensor]:
        if self.k_pass_bias is None:
            return None
        return torch.cat([self.k_pass_bias.reshape(-1), self.v_bias.reshape(-1)])


def split_qkv(weight: Tensor, bias: Optional[Tensor], shape: AttentionShape) -> SplitQKV:
    """Split GPTNeoX's fused projection into q, k_rot, k_pass, v per head (views, no copies)."""
    d, H, hd, R = shape.hidden, shape.heads, shape.head_dim, shape.rotary_dim
    if tuple(weight.shape) != (3 * d, d):
        raise LatentKVError(f"query_key_value.weight must be ({3 * d}, {d}) for hidden={d}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (3 * d,):
        raise LatentKVError(f"query_key_value.bias must be ({3 * d},), got {tuple(bias.shape)}")
    w = weight.view(H, 3, hd, d)
    b = None if bias is None else bias.view(H, 3, hd)
    return SplitQKV(
        q_weight=w[:, 0], k_rot_weight=w[:, 1, :R], k_pass_weight=w[:, 1, R:], v_weight=w[:, 2],
        q_bias=None if b is None else b[:, 0], k_rot_bias=None if b is None else b[:, 1, :R],
        k_pass_bias=None if b is None else b[:, 1, R:], v_bias=None if b is None else b[:, 2])
