"""The regions of GPTNeoX and HF Mamba blocks, spelled exactly as their captured graphs spell
them (transformers 5.x, ``torch.export`` ATen IR). A fusion rule that matches one of these
spellings produces the same region through :func:`fxopt.codegen.region.region_from_nodes`;
tests and ``benchmarks/blocks.py`` use these builders directly.

Glossary: ``b`` batch, ``l`` sequence, ``d`` hidden size, ``h`` heads, ``e`` head dim,
``r`` rotary dims (``rotary_pct * e``), ``k`` conv kernel width.
"""
from __future__ import annotations

import torch

from .region import Region, RegionBuilder


def neox_residual_two_layernorms(dtype: torch.dtype = torch.float16, eps: float = 1e-5) -> Region:
    """GPTNeoX parallel residual and the next layer's two LayerNorms::

        add_5 = add(mlp_out, attn_out); add_6 = add(add_5, hidden)      # (b l d)
        layer_norm_2 = layer_norm(add_6, [d], ln_in_w, ln_in_b, eps)     # next input_layernorm
        layer_norm_3 = layer_norm(add_6, [d], ln_post_w, ln_post_b, eps) # next post_attention_layernorm

    inputs ``mlp_out, attn_out, hidden, ln_in_w, ln_in_b, ln_post_w, ln_post_b``; outputs
    ``add_6, layer_norm_2, layer_norm_3``."""
    b = RegionBuilder()
    mlp, attn, hidden, w1, b1, w2, b2 = (b.input(dtype) for _ in range(7))
    h = b.add(b.add(mlp, attn), hidden)
    b.output(h, b.layer_norm(h, w1, b1, eps), b.layer_norm(h, w2, b2, eps))
    return b.build()


def neox_serial_residual_layernorm(dtype: torch.dtype = torch.float16, eps: float = 1e-5) -> Region:
    """GPTNeoX serial residual: ``a = attn_out + hidden`` read by ``post_attention_layernorm``:
    inputs ``attn_out, hidden, w, b``; outputs ``a, layer_norm(a)``."""
    b = RegionBuilder()
    attn, hidden, w, bias = (b.input(dtype) for _ in range(4))
    a = b.add(attn, hidden)
    b.output(a, b.layer_norm(a, w, bias, eps))
    return b.build()


def mamba_residual_rmsnorm(dtype: torch.dtype = torch.float16, residual_dtype: torch.dtype = torch.float32,
                           eps: float = 1e-5) -> Region:
    """HF Mamba block boundary: the residual add, then the next block's ``MambaRMSNorm``::

        add_11 = add(residual, mixer_out)                 # residual_dtype (fp32: residual_in_fp32)
        to_21 = to(add_11, dtype); to_22 = to(to_21, fp32) # hidden_states.to(norm dtype), then fp32
        pow_2 = pow(to_22, 2); mean_1 = mean(pow_2, [-1], True)
        add_12 = add(mean_1, eps); rsqrt_1 = rsqrt(add_12)
        mul_15 = mul(to_22, rsqrt_1); to_23 = to(mul_15, dtype)
        mul_16 = mul(norm_weight, to_23)

    inputs ``residual (residual_dtype), mixer_out (dtype), norm_weight (dtype)``; outputs
    ``add_11`` (the next residual) and ``mul_16`` (the mixer's input). Casts to the dtype a
    value already has are identities and do not appear (fp32 models: no casts at all)."""
    b = RegionBuilder()
    res, out, w = b.input(residual_dtype), b.input(dtype), b.input(dtype)
    s = b.add(res, out)
    x = s if s.dtype == dtype else b.to(s, dtype)
    x32 = x if x.dtype == torch.float32 else b.to(x, torch.float32)
    var = b.mean(b.pow(x32, 2))
    normed = b.mul(x32, b.rsqrt(b.add(var, eps)))
    normed = normed if dtype == torch.float32 else b.to(normed, dtype)
    b.output(s, b.mul(w, normed))
    return b.build()


def bias_gelu(dtype: torch.dtype = torch.float16, approximate: str = "none") -> Region:
    """An MLP's bias and activation as a pointwise epilogue: ``gelu(add(mm_out, bias))``
    (GPTNeoX's ``linear`` folds the bias into the GEMM; a rule that splits it off gets this);
    inputs ``mm_out (b l 4d), bias (4d)``."""
    b = RegionBuilder()
    x, bias = b.input(dtype), b.input(dtype)
    b.output(b.gelu(b.add(x, bias), approximate))
    return b.build()


def _rotate(b: RegionBuilder, x, cos, sin, rot: int):
    """GPTNeoX ``apply_rotary_pos_emb`` on one of q/k (width ``e``), partial rotary::

        x_rot = slice(x, 3, 0, r); x_pass = slice(x, 3, r, end)
        x1 = slice(x_rot, 3, 0, r/2); x2 = slice(x_rot, 3, r/2, end)
        rotate_half = cat([neg(x2), x1], -1)
        emb = add(mul(x_rot, cos), mul(rotate_half, sin)); out = cat([emb, x_pass], -1)"""
    x_rot = b.slice(x, 0, rot)
    half = rot // 2
    rh = b.cat(b.neg(b.slice(x_rot, half, rot)), b.slice(x_rot, 0, half))
    emb = b.add(b.mul(x_rot, cos), b.mul(rh, sin))
    return emb, x


def rotary_qk(dtype: torch.dtype = torch.float16, head_dim: int = 80, rot: int = 20) -> Region:
    """The rotary embedding on q and k in one kernel: inputs ``q (b h l e)``, ``k (b h l e)``
    (views of the fused qkv projection, read in place), ``cos, sin (1 1 l r)`` (already cast
    to the model dtype, broadcast over b and h); outputs the embedded q and k. With
    ``rot == head_dim`` (full rotary) there is no pass-through slice."""
    b = RegionBuilder()
    q, k, cos, sin = (b.input(dtype) for _ in range(4))
    outs = []
    for x in (q, k):
        emb, whole = _rotate(b, x, cos, sin, rot)
        outs.append(emb if rot == head_dim else b.cat(emb, b.slice(whole, rot, head_dim)))
    b.output(*outs)
    return b.build()


def mamba_conv_step_silu(dtype: torch.dtype = torch.float32) -> Region:
    """HF Mamba's decode-step convolution (the torch path with a conv cache)::

        h = sum(conv_state * conv1d.weight[:, 0, :], dim=-1)   # (b d k) * (d k) -> (b d)
        h = h + conv1d.bias; h = silu(h)

    as a region over rows ``(b d)`` and columns ``k``: inputs ``conv_state (b d k)``,
    ``weight (d k)``, ``bias`` viewed as ``(d 1)``; output ``(b d 1)`` (the rule views it back
    to ``(b d)``; ``sum`` keeps the reduced dim here)."""
    b = RegionBuilder()
    state, w, bias = (b.input(dtype) for _ in range(3))
    h = b.sum(b.mul(state, w))
    b.output(b.silu(b.add(h, bias)))
    return b.build()
