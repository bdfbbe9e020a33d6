"""Latent attention in plain PyTorch: the reference every fast path (and the graph pass) answers to.

One layer, shapes ``x (b, L, d)``, ``cos, sin (b, L, R)`` (HF's rotary tables), and per head::

    q     = x W_q^T + b_q                    (b, H, L, hd), first R dims rotated
    k_rot = rot(x W_krot^T + b_krot)         (b, H, L, R)   cached post-rotary
    c     = x W_D^T                          (b, L, r)      cached (the latent; no bias)
    k     = [k_rot | c k_up^T + k_bias]      (b, H, L, hd)
    v     = c v_up^T + v_bias                (b, H, L, hd)
    out   = dense(softmax(scale q k^T + mask) v)

Two ways to score the keys (``k_mode``):

* ``"reconstruct"``: build K from the cache, then ordinary attention;
* ``"absorb"`` (MLA-decode style): ``q_lat = q_pass k_up`` (b, H, L, r) and
  ``scores = scale (q_rot k_rot^T + q_lat c^T)``: the keys are never built. The k bias adds
  ``q_pass . k_bias`` to every score of a query -- one constant per (query, head) -- and softmax is
  invariant to adding a constant to all its inputs, so it is dropped (identity 1).

Three ways to apply v's up-projection (``v_mode``):

* ``"reconstruct"``: build V, then ``p V``;
* ``"after_sum"``: ``c_hat = p c`` (b, H, L, r), then ``c_hat v_up^T + v_bias``: the weights of a
  softmax row sum to 1, so ``sum_j p_j (U c_j + b) = U (sum_j p_j c_j) + b`` (identity 2);
* ``"into_output"``: fold v_up into the output projection, ``W_ov[h] = W_o[:, h] v_up[h]``
  (H, d, r), and v_bias into its bias, ``b_o + W_o v_bias`` (identity 2, then linearity).

Which to use per phase (per layer; b batch, L new tokens, T cached tokens; P = hd - R):

* decode (L = 1): reconstructing K/V reads the r-value latent but writes/reads ``H (P + hd)``
  values per cached token, undoing the compression; absorbing costs ``H P r`` flops per token
  independent of T, and attention then streams ``r + H R`` values per cached token (the
  :func:`fxopt.ops.latent_attention.latent_decode_attention` kernel). For v, ``after_sum``
  reads ``H hd r + d^2`` weights per step, ``into_output`` ``H d r`` (H times more for the
  latent part: 84 MB vs 16 MB at the Pythia-2.8B shape, r = 512): **absorb + after_sum**.
* prefill (L = T): absorbed scores cost ``L^2 H (r + R)`` flops against ``L^2 H hd`` for
  ordinary attention, (r + R) / hd = 7-33x more at the Pythia shape, while reconstructing costs
  ``2 L H (P + hd) r`` once and lets SDPA's flash kernels run: **reconstruct + reconstruct**.

``benchmarks/latent_kv.py`` measures both choices per phase.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .factor import LatentLayer
from .layout import LatentKVError

K_MODES = ("reconstruct", "absorb")
V_MODES = ("reconstruct", "after_sum", "into_output")
PHASE_MODES = {"prefill": ("reconstruct", "reconstruct"), "decode": ("absorb", "after_sum")}


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF GPTNeoX's rotary embedding of ``x`` (b, H, L, R) with ``cos, sin`` (b, L, R)."""
    if x.shape[-1] == 0:
        return x
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def _flat(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.reshape(-1)


def _heads(y: Tensor, H: int) -> Tensor:
    """(b, L, H * e) -> (b, H, L, e)."""
    b, L, _ = y.shape
    return y.view(b, L, H, -1).transpose(1, 2)


@dataclass
class Projected:
    q: Tensor       # (b, H, L, hd), post-rotary
    k_rot: Tensor   # (b, H, L, R), post-rotary
    c: Tensor       # (b, L, r)


def project(layer: LatentLayer, x: Tensor, cos: Tensor, sin: Tensor) -> Projected:
    """The three projections of ``x`` (b, L, d): what the latent cache stores (c, k_rot) and q."""
    s = layer.shape
    d = s.hidden
    q = _heads(F.linear(x, layer.q_weight.reshape(-1, d), _flat(layer.q_bias)), s.heads)
    k_rot = _heads(F.linear(x, layer.k_rot_weight.reshape(-1, d), _flat(layer.k_rot_bias)), s.heads)
    R = s.rotary_dim
    q = torch.cat([rotate(q[..., :R], cos, sin), q[..., R:]], dim=-1)
    k_rot = rotate(k_rot, cos, sin)
    c = F.linear(x, layer.down)
    return Projected(q, k_rot, c)


def reconstruct_keys(layer: LatentLayer, k_rot: Tensor, c: Tensor) -> Tensor:
    """K (b, H, T, hd) from the cache: ``[k_rot | c k_up^T + k_bias]``."""
    s = layer.shape
    k_pass = _heads(F.linear(c, layer.k_up.reshape(-1, layer.rank), _flat(layer.k_bias)), s.heads)
    return torch.cat([k_rot, k_pass], dim=-1)


def reconstruct_values(layer: LatentLayer, c: Tensor) -> Tensor:
    """V (b, H, T, hd) from the latent: ``c v_up^T + v_bias``."""
    return _heads(F.linear(c, layer.v_up.reshape(-1, layer.rank), _flat(layer.v_bias)), layer.shape.heads)


def absorbed_query(layer: LatentLayer, q: Tensor) -> tuple[Tensor, Tensor]:
    """``(q_lat (b, H, L, r), q_rot (b, H, L, R))``: the query against (c, k_rot) directly."""
    R = layer.shape.rotary_dim
    return torch.matmul(q[..., R:], layer.k_up), q[..., :R]


def absorbed_output_weight(layer: LatentLayer, dense_weight: Tensor) -> Tensor:
    """``W_ov`` (H, d, r): head h's output projection times its v up-projection."""
    s = layer.shape
    w_o = dense_weight.reshape(s.hidden, s.heads, s.head_dim).permute(1, 0, 2)  # (H, d, hd)
    return torch.matmul(w_o.to(torch.float64), layer.v_up.to(torch.float64)).to(layer.v_up.dtype)


def absorbed_output_bias(layer: LatentLayer, dense_weight: Tensor, dense_bias: Optional[Tensor]) -> Optional[Tensor]:
    """``b_o + W_o v_bias``: v's bias carried through the output projection (None if neither exists)."""
    if layer.v_bias is None:
        return dense_bias
    extra = (dense_weight.to(torch.float64) @ layer.v_bias.reshape(-1).to(torch.float64)).to(dense_weight.dtype)
    return extra if dense_bias is None else dense_bias + extra


def additive_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """HF's eager format: a boolean "allowed" mask becomes 0 / ``finfo(dtype).min``; a float mask
    is used as given (a fully masked row then softmaxes to uniform weights, as HF's eager does)."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device),
                       torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device))


def _softmax(scores: Tensor, like: Tensor) -> Tensor:
    # HF's eager attention takes the softmax in fp32 and casts back; fp64 stays fp64
    acc = torch.promote_types(scores.dtype, torch.float32)
    return F.softmax(scores, dim=-1, dtype=acc).to(like.dtype)


def attention_weights(scores: Tensor, mask: Optional[Tensor], like: Tensor) -> Tensor:
    m = additive_mask(mask, scores.dtype)
    if m is not None:
        scores = scores + m
    return _softmax(scores, like)


def latent_attention(layer: LatentLayer, dense_weight: Tensor, dense_bias: Optional[Tensor], x: Tensor, cos: Tensor,
                     sin: Tensor, mask: Optional[Tensor] = None, *, scaling: Optional[float] = None,
                     k_mode: str = "reconstruct", v_mode: str = "reconstruct",
                     projected: Optional[Projected] = None) -> Tensor:
    """The attention block's output (b, L, d) over its own tokens (prefill: keys = the queries'
    tokens), computed from the latent form with the chosen modes (module docstring).

    ``mask``: broadcastable to (b, 1, L, L), boolean (True = attend) or HF-style additive."""
    if k_mode not in K_MODES or v_mode not in V_MODES:
        raise LatentKVError(f"k_mode must be one of {K_MODES} and v_mode one of {V_MODES}, got {k_mode!r}, {v_mode!r}")
    s = layer.shape
    scaling = s.head_dim ** -0.5 if scaling is None else scaling
    p = projected or project(layer, x, cos, sin)
    return attend(layer, dense_weight, dense_bias, p.q, p.k_rot, p.c, mask, scaling=scaling, k_mode=k_mode, v_mode=v_mode)


def attend(layer: LatentLayer, dense_weight: Tensor, dense_bias: Optional[Tensor], q: Tensor, k_rot: Tensor, c: Tensor,
           mask: Optional[Tensor], *, scaling: float, k_mode: str, v_mode: str) -> Tensor:
    """Attention of queries ``q`` (b, H, Lq, hd) over cached ``k_rot`` (b, H, T, R) and ``c`` (b, T, r),
    then the output projection: (b, Lq, d)."""
    b, H, Lq, _ = q.shape
    if k_mode == "reconstruct":
        scores = torch.matmul(q, reconstruct_keys(layer, k_rot, c).transpose(2, 3)) * scaling
    else:
        q_lat, q_rot = absorbed_query(layer, q)
        scores = (torch.matmul(q_rot, k_rot.transpose(2, 3)) + torch.matmul(q_lat, c.unsqueeze(1).transpose(2, 3))) * scaling
    w = attention_weights(scores, mask, q)
    if v_mode == "reconstruct":
        o = torch.matmul(w, reconstruct_values(layer, c))
        return F.linear(o.transpose(1, 2).reshape(b, Lq, -1), dense_weight, dense_bias)
    c_hat = torch.matmul(w, c.unsqueeze(1))  # (b, H, Lq, r)
    return output_from_latent(layer, dense_weight, dense_bias, c_hat, v_mode)


def absorbed_output(layer: LatentLayer, dense_weight: Tensor, dense_bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """``(W_ov, bias)`` for ``v_mode="into_output"``: computed once per layer, not per step."""
    return absorbed_output_weight(layer, dense_weight), absorbed_output_bias(layer, dense_weight, dense_bias)


def output_from_latent(layer: LatentLayer, dense_weight: Tensor, dense_bias: Optional[Tensor], c_hat: Tensor,
                       v_mode: str = "after_sum", absorbed: Optional[tuple[Tensor, Optional[Tensor]]] = None) -> Tensor:
    """The attention block's output (b, Lq, d) from the attention-weighted latent ``c_hat`` (b, H, Lq, r).
    ``absorbed``: :func:`absorbed_output`'s precomputed weights for ``"into_output"``."""
    b, H, Lq, r = c_hat.shape
    if v_mode == "after_sum":
        o = torch.matmul(c_hat, layer.v_up.transpose(1, 2))  # (b, H, Lq, hd)
        if layer.v_bias is not None:
            o = o + layer.v_bias[None, :, None, :]
        return F.linear(o.transpose(1, 2).reshape(b, Lq, -1), dense_weight, dense_bias)
    if v_mode == "into_output":
        w_ov, bias = absorbed if absorbed is not None else absorbed_output(layer, dense_weight, dense_bias)
        out = torch.einsum("bhlr,hdr->bld", c_hat, w_ov)  # w_ov (H, d, r)
        return out if bias is None else out + bias
    raise LatentKVError(f"output_from_latent: v_mode must be 'after_sum' or 'into_output', got {v_mode!r}")


def decode_attention(layer: LatentLayer, dense_weight: Tensor, dense_bias: Optional[Tensor], q: Tensor,
                     c_cache: Tensor, k_rot_cache: Tensor, lengths: Tensor, starts: Optional[Tensor] = None, *,
                     key_mask: Optional[Tensor] = None, scaling: Optional[float] = None, v_mode: str = "after_sum",
                     absorbed: Optional[tuple[Tensor, Optional[Tensor]]] = None) -> Tensor:
    """One decode step's attention block output (b, 1, d) over the latent cache, through the
    ``fxopt::latent_decode_attention`` op (absorbed scores; the Triton kernel on CUDA).

    ``q`` (b, H, 1, hd) post-rotary; ``c_cache`` (b, T, r); ``k_rot_cache`` (b, T, H, R) post-rotary;
    keys ``starts[i] <= j < lengths[i]`` (``starts`` default 0: left padding skipped) with
    ``key_mask[i, j]`` (b, T) bool, if given, are attended."""
    from ..ops.latent_attention import latent_decode_attention

    s = layer.shape
    scaling = s.head_dim ** -0.5 if scaling is None else scaling
    q_lat, q_rot = absorbed_query(layer, q)
    c_hat = latent_decode_attention(q_lat[:, :, 0].contiguous(), q_rot[:, :, 0].contiguous(), c_cache, k_rot_cache,
                                    lengths, starts, float(scaling), key_mask)
    return output_from_latent(layer, dense_weight, dense_bias, c_hat.unsqueeze(2), v_mode, absorbed)
