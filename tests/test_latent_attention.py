"""Latent attention math (fxopt.latent.attention) against HF's own GPTNeoXAttention, and the bias
identities the absorbed modes rely on."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

from fxopt.latent import AttentionShape, layer_svd, split_qkv, truncate
from fxopt.latent.attention import (absorbed_query, attention_weights, decode_attention, latent_attention, project,
                                    reconstruct_keys)
from fxopt.latent.layout import LatentKVError, attention_shape_of
from fxopt.models.hf import tiny_gpt_neox
from fxopt.testing.contracts import fp64_relative

MODES = list(itertools.product(["reconstruct", "absorb"], ["reconstruct", "after_sum", "into_output"]))

# The latent block vs HF's fp32 attention, both against HF's attention in fp64: the k_pass / v
# projections carry twice the original's rounding (see test_latent_factor.LOSSLESS); the scores,
# softmax and output projection then add the same roundings as HF's. Measured <= 2.3x (no rtol floor) over
# the cases below and three more seeds each; 4 leaves room.
CONTRACT = fp64_relative(4.0)


def _random_biases(model, scale=1.0, seed=1):
    """HF initialises biases to zero, which would make every bias identity vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.gpt_neox.layers:
            for lin in (layer.attention.query_key_value, layer.attention.dense):
                if lin.bias is not None:
                    lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * scale)
    return model


def _layer_model(rotary_pct, bias, seed=0):
    return _random_biases(tiny_gpt_neox(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                                        rotary_pct=rotary_pct, attention_bias=bias, attn_implementation="eager",
                                        seed=seed))


def _latent(attn, shape, dtype, rank=None):
    qkv = attn.query_key_value
    sp = split_qkv(qkv.weight.detach(), None if qkv.bias is None else qkv.bias.detach(), shape)
    svd = layer_svd(sp)
    return truncate(sp, svd, rank or max(1, svd.lossless_rank), shape, dtype)


def _inputs(model, b, L, pads, dtype, seed=0):
    """x, HF's cos/sin tables (computed once, in the model's way), the boolean causal + left-padding
    mask (b, 1, L, L) and the key-validity mask (b, L)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, model.config.hidden_size, generator=g).to(dtype)
    valid = torch.arange(L)[None, :] >= torch.tensor(pads)[:, None]
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cos, sin = model.gpt_neox.rotary_emb(x.float(), pos)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    mask = causal[None, None] & valid[:, None, None, :]
    return x, cos.to(dtype), sin.to(dtype), mask, valid


def _hf(attn, x, cos, sin, mask):
    add = torch.where(mask, torch.zeros((), dtype=x.dtype), torch.tensor(torch.finfo(x.dtype).min, dtype=x.dtype))
    out, _ = attn(x, attention_mask=add, position_embeddings=(cos, sin))
    return out


@pytest.mark.parametrize("rotary_pct", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("bias", [True, False])
def test_lossless_latent_attention_equals_hf(rotary_pct, bias):
    """Every (k_mode, v_mode) at the lossless rank: fp64 equal to HF's fp64 attention to ~1e-12;
    fp32 within fp64_relative(4) of HF's fp32 attention; causal with left padding."""
    model = _layer_model(rotary_pct, bias)
    attn = model.gpt_neox.layers[0].attention
    shape = attention_shape_of(model)
    assert shape.rotary_dim == {0.25: 4, 0.5: 8, 1.0: 16}[rotary_pct]
    attn64 = copy.deepcopy(attn).double()
    attn64.config._attn_implementation = "sdpa"  # HF's eager softmax runs in fp32 even for fp64 inputs
    x, cos, sin, mask, _ = _inputs(model, 3, 9, [0, 2, 5], torch.float32)
    ref32 = _hf(attn, x, cos, sin, mask)
    ref64 = _hf(attn64, x.double(), cos.double(), sin.double(), mask)
    lat32 = _latent(attn, shape, torch.float32)
    lat64 = _latent(attn64, shape, torch.float64)
    assert lat32.rank == 64
    dense, dense64 = attn.dense, attn64.dense
    for k_mode, v_mode in MODES:
        out64 = latent_attention(lat64, dense64.weight, dense64.bias, x.double(), cos.double(), sin.double(), mask,
                                 k_mode=k_mode, v_mode=v_mode)
        torch.testing.assert_close(out64, ref64, rtol=1e-11, atol=1e-12)
        out32 = latent_attention(lat32, dense.weight, dense.bias, x, cos, sin, mask, k_mode=k_mode, v_mode=v_mode)
        CONTRACT.check(ref32.detach(), out32.detach(), fp64_ref=ref64.detach())


def test_lossless_latent_attention_fails_when_truncated():
    """The comparison above can fail: a rank-8 truncation of the same layer misses HF's output."""
    model = _layer_model(0.25, True)
    attn = model.gpt_neox.layers[0].attention
    shape = attention_shape_of(model)
    x, cos, sin, mask, _ = _inputs(model, 2, 7, [0, 3], torch.float32)
    ref32 = _hf(attn, x, cos, sin, mask)
    ref64 = _hf(copy.deepcopy(attn).double(), x.double(), cos.double(), sin.double(), mask)
    lat = _latent(attn, shape, torch.float32, rank=8)
    out = latent_attention(lat, attn.dense.weight, attn.dense.bias, x, cos, sin, mask)
    with pytest.raises(AssertionError, match="fp64_relative"):
        CONTRACT.check(ref32.detach(), out.detach(), fp64_ref=ref64.detach())


def test_bias_identities_hold_at_any_rank():
    """The absorbed modes are exact rewrites of the reconstructed ones whatever the rank (fp64):
    identity 1, softmax ignores the per-query constant q_pass . k_bias that dropping the k bias
    removes (the raw scores do differ); identity 2, softmax rows sum to 1, so v's up-projection
    and bias commute with the weighted sum (and fold into the output projection)."""
    model = _random_biases(tiny_gpt_neox(hidden_size=48, num_attention_heads=3, num_hidden_layers=1, rotary_pct=0.25,
                                         attention_bias=True, attn_implementation="eager"), scale=20.0).double()
    attn = model.gpt_neox.layers[0].attention  # large biases, so that a wrong identity would show
    shape = attention_shape_of(model)
    lat = _latent(attn, shape, torch.float64, rank=3)
    x, cos, sin, mask, _ = _inputs(model, 2, 6, [0, 2], torch.float64)
    p = project(lat, x, cos, sin)
    scale = shape.head_dim ** -0.5
    full = torch.matmul(p.q, reconstruct_keys(lat, p.k_rot, p.c).transpose(2, 3)) * scale
    q_lat, q_rot = absorbed_query(lat, p.q)
    absorbed = (q_rot @ p.k_rot.transpose(2, 3) + q_lat @ p.c.unsqueeze(1).transpose(2, 3)) * scale
    assert (full - absorbed).abs().max() > 1.0  # the dropped constant is large ...
    torch.testing.assert_close(attention_weights(full, mask, full), attention_weights(absorbed, mask, absorbed),
                               rtol=1e-12, atol=1e-14)  # ... and softmax does not see it
    base = latent_attention(lat, attn.dense.weight, attn.dense.bias, x, cos, sin, mask, projected=p)
    for k_mode, v_mode in MODES[1:]:
        other = latent_attention(lat, attn.dense.weight, attn.dense.bias, x, cos, sin, mask, projected=p,
                                 k_mode=k_mode, v_mode=v_mode)
        torch.testing.assert_close(other, base, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
def test_decode_attention_over_the_latent_cache(rotary_pct):
    """One decode step through the fxopt::latent_decode_attention op (CPU reference) equals the
    reconstructed prefill attention's last position, with left padding skipped by ``starts`` and
    ragged rows by ``lengths`` (rows that end earlier are compared at their own last token)."""
    model = _layer_model(rotary_pct, True).double()
    attn = model.gpt_neox.layers[0].attention
    shape = attention_shape_of(model)
    lat = _latent(attn, shape, torch.float64, rank=20)
    pads = [0, 3, 1]
    x, cos, sin, mask, valid = _inputs(model, 3, 8, pads, torch.float64)
    full = latent_attention(lat, attn.dense.weight, attn.dense.bias, x, cos, sin, mask)
    p = project(lat, x, cos, sin)
    k_rot_cache = p.k_rot.transpose(1, 2).contiguous()  # (b, T, H, R)
    lengths = torch.tensor([8, 6, 7])
    rows = torch.arange(3)
    q_last = p.q[rows, :, lengths - 1].unsqueeze(2)       # each row's last real token
    out = decode_attention(lat, attn.dense.weight, attn.dense.bias, q_last, p.c, k_rot_cache, lengths,
                           torch.tensor(pads))
    torch.testing.assert_close(out[:, 0], full[rows, lengths - 1], rtol=1e-11, atol=1e-11)


def test_mode_errors():
    model = _layer_model(0.25, False)
    attn = model.gpt_neox.layers[0].attention
    lat = _latent(attn, attention_shape_of(model), torch.float32)
    x, cos, sin, mask, _ = _inputs(model, 1, 3, [0], torch.float32)
    with pytest.raises(LatentKVError, match="k_mode"):
        latent_attention(lat, attn.dense.weight, attn.dense.bias, x, cos, sin, mask, k_mode="fused")
    assert isinstance(lat.shape, AttentionShape)
