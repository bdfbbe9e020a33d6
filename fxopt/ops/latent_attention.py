"""``fxopt::latent_decode_attention``: one decode step of attention over a latent K/V cache.

Letters: ``b`` batch, ``H`` heads, ``r`` latent rank, ``R`` rotary dims per head, ``T`` cache length::

    q_latent (b, H, r)   the absorbed query  q_pass k_up          (see fxopt.latent.attention)
    q_rot    (b, H, R)   the post-rotary rotary part of the query
    c        (b, T, r)   the latent cache  (shared by all heads)
    k_rot    (b, T, H, R) the post-rotary rotary part of every head's key
    lengths  (b,) int    keys j < lengths[i] exist for row i (a ragged batch) ...
    starts   (b,) int    ... and j >= starts[i] (left padding skipped); None: 0
    scale    float
    key_mask (b, T) bool ... and key_mask[i, j] (any pattern, e.g. the runtime's decode mask); None: all

    s[i, h, j]   = scale * (q_rot[i, h] . k_rot[i, j, h] + q_latent[i, h] . c[i, j])
    out[i, h]    = sum_j softmax_j(s[i, h, j valid]) c[i, j]                          (b, H, r)

``lengths`` is clamped to [0, T] and ``starts`` to >= 0; a row with no valid key gets zeros;
slots that are not attended are never read into the result (they may hold stale values, or
inf / nan); an inf or nan in an attended key makes its row's output nan. The
output has ``q_latent``'s dtype; scores, softmax and the weighted sum accumulate in fp32 (fp64
for fp64 inputs).

* CPU / fake: :func:`latent_decode_attention_ref` (plain PyTorch) / an empty tensor;
* CUDA: the Triton kernel of :mod:`fxopt.codegen.latent_decode` (fp16 / bf16 / fp32;
  the reference for fp64).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..codegen.latent_decode_ref import check_decode_inputs, latent_decode_attention_ref, valid_keys  # noqa: F401


@torch.library.custom_op("fxopt::latent_decode_attention", mutates_args=())
def latent_decode_attention(q_latent: Tensor, q_rot: Tensor, c: Tensor, k_rot: Tensor, lengths: Tensor,
                            starts: Optional[Tensor] = None, scale: float = 1.0,
                            key_mask: Optional[Tensor] = None) -> Tensor:
    return latent_decode_attention_ref(q_latent, q_rot, c, k_rot, lengths, starts, scale, key_mask)


@latent_decode_attention.register_fake
def _latent_decode_attention_fake(q_latent, q_rot, c, k_rot, lengths, starts=None, scale=1.0, key_mask=None):
    check_decode_inputs(q_latent, q_rot, c, k_rot, lengths, starts, key_mask)
    return q_latent.new_empty(q_latent.shape)


@latent_decode_attention.register_kernel("cuda")
def _latent_decode_attention_cuda(q_latent, q_rot, c, k_rot, lengths, starts=None, scale=1.0, key_mask=None):
    check_decode_inputs(q_latent, q_rot, c, k_rot, lengths, starts, key_mask)
    if q_latent.dtype == torch.float64 or c.dtype == torch.float64:
        return latent_decode_attention_ref(q_latent, q_rot, c, k_rot, lengths, starts, scale, key_mask)
    from ..codegen import latent_decode

    return latent_decode.latent_decode_attention_triton(q_latent, q_rot, c, k_rot, lengths, starts, scale,
                                                        key_mask=key_mask)


LATENT_DECODE_ATTENTION = torch.ops.fxopt.latent_decode_attention.default
