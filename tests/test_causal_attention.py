"""The "causal_sdpa" pass: transformers' positional causal mask feeding SDPA -> is_causal=True.

Contract: the rewritten call is eager's SDPA with is_causal=True (bitwise, checked on the CPU);
logits of tiny HF GPTNeoX, GPT-2, Llama, GPT-J and Phi stay within a few fp32 ulps of the
original graph's. Padded batches (an attention_mask input) and non-causal masks are left alone."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fxopt
from fxopt.passes.causal_attention import SDPA, CausalSdpaPass
from fxopt.rewrite import run_pass
from fxopt.testing import bitwise
from fxopt.testing import strategies as fst

transformers = pytest.importorskip("transformers")
T = transformers

MODELS = {
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        rotary_pct=0.25)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128)),
    "gptj": lambda: T.GPTJForCausalLM(T.GPTJConfig(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64, bos_token_id=0,
        eos_token_id=0)),
    "phi": lambda: T.PhiForCausalLM(T.PhiConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)),
}


def _model(name):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return MODELS[name]().eval()


def _sdpas(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]


def _mask_of(n):
    return n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hf_models_causal_mask_becomes_is_causal(name):
    model = _model(name)
    ids = torch.randint(0, 128, (2, 12))
    gm = fxopt.capture(model, (ids,))
    n_attn = len(_sdpas(gm))
    assert n_attn == 2 and all(_mask_of(n) is not None for n in _sdpas(gm))
    with torch.no_grad():
        ref = gm(ids)[0]
    before = len(gm.graph.nodes)
    res = run_pass(CausalSdpaPass(), gm)
    assert res.stats["matches"] == n_attn
    for n in _sdpas(gm):
        assert _mask_of(n) is None and n.kwargs["is_causal"] is True
        assert n.meta["fxopt_provenance"]["pass"] == "causal_sdpa"
    # the mask computation is gone (dead code): arange, le, and, expand, ...
    assert len(gm.graph.nodes) < before - 10
    assert not any("arange" in str(n.target) and n.users and any(u.target is SDPA for u in n.users)
                   for n in gm.graph.nodes)
    with torch.no_grad():
        out = gm(ids)[0]
    # the same function by a different SDPA path: a few fp32 ulps at most
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt_neox", "llama"])
def test_padded_batch_mask_is_left_alone(name):
    model = _model(name)
    ids = torch.randint(0, 128, (2, 12))
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, :3] = 0
    gm = fxopt.capture(model, (ids,), {"attention_mask": am})
    before = gm.code
    res = run_pass(CausalSdpaPass(), copy.deepcopy(gm))
    assert res.stats["matches"] == 0
    rep = fxopt.explain(gm, "causal_sdpa")
    assert "graph input attention_mask" in str(rep), str(rep)
    assert gm.code == before


def test_all_ones_attention_mask_input_is_still_left_alone():
    """The values of a mask input are only known at run time, whatever the example holds."""
    model = _model("gpt2")
    ids = torch.randint(0, 128, (1, 8))
    gm = fxopt.capture(model, (ids,), {"attention_mask": torch.ones(1, 8, dtype=torch.long)})
    assert run_pass(CausalSdpaPass(), gm).stats["matches"] == 0


def _export(fn, *args):
    class M(torch.nn.Module):
        def forward(self, *a):
            return fn(*a)

    return fxopt.capture(M(), args)


def _positional(kind, L, S):
    """Masks built from positions only, in several spellings; ``kind`` picks the spelling."""
    q_pos = torch.arange(L) + (S - L if kind == "bottom_right" else 0)
    k_pos = torch.arange(S)
    if kind in ("le", "bottom_right"):
        return k_pos[None, None, None, :] <= q_pos[None, None, :, None]
    if kind == "tril":
        return torch.ones(L, S, dtype=torch.bool).tril()[None, None]
    if kind == "float_ninf":
        return torch.zeros(L, S).masked_fill(k_pos[None, :] > q_pos[:, None], -math.inf)
    if kind == "float_min":
        return torch.zeros(L, S).masked_fill(k_pos[None, :] > q_pos[:, None], torch.finfo(torch.float32).min)
    if kind == "window":
        return (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - 3)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,matches", [("le", 1), ("tril", 1), ("float_ninf", 1), ("float_min", 0),
                                          ("window", 0)])
def test_mask_spellings(kind, matches):
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_positional(kind, 7, 7), scale=0.3)

    gm = _export(fn, q, k, v)
    res = run_pass(CausalSdpaPass(), gm)
    assert res.stats["matches"] == matches
    if matches:
        bitwise.check(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3), gm(q, k, v))
    else:
        bitwise.check(fn(q, k, v), gm(q, k, v))
        rep = fxopt.explain(_export(fn, q, k, v), "causal_sdpa")
        assert "not purely causal" in str(rep) or "additive bias" in str(rep), str(rep)


def test_mask_from_a_graph_input_or_a_buffer_is_left_alone():
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    pos = torch.arange(5)

    def fn(q, k, v, pos):  # positions passed in: values known only at run time
        return F.scaled_dot_product_attention(q, k, v, attn_mask=pos[None, :] <= pos[:, None])

    gm = _export(fn, q, k, v, pos)
    assert run_pass(CausalSdpaPass(), gm).stats["matches"] == 0

    class WithBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("tri", torch.ones(5, 5, dtype=torch.bool).tril())

        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.tri)

    gm = fxopt.capture(WithBuffer(), (q, k, v))
    assert run_pass(CausalSdpaPass(), gm).stats["matches"] == 0
    assert "module attribute" in str(fxopt.explain(gm, "causal_sdpa"))


def test_prefix_lengths_bottom_right_mask_is_not_is_causal():
    """With L < S (a prefix of keys) transformers' mask is bottom-right aligned; SDPA's
    is_causal is top-left: not the same mask, so it is left alone."""
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_positional("bottom_right", 3, 6))

    gm = _export(fn, q, k, v)
    assert run_pass(CausalSdpaPass(), gm).stats["matches"] == 0


@settings(max_examples=30)
@given(L=st.integers(1, 9), heads=st.integers(1, 3), e=st.sampled_from([1, 4, 7, 16]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
       kind=st.sampled_from(["le", "tril", "float_ninf"]), data=st.data())
def test_property_rewrite_is_eager_is_causal_bitwise(L, heads, e, dtype, kind, data):
    shape = (2, heads, L, e)
    # finite values over the dtype's range (a score of inf - inf is nan either way)
    q, k, v = (data.draw(fst.tensors(shape, dtype, special=False)) for _ in range(3))
    mask = _positional(kind, L, L)
    if mask.is_floating_point():
        mask = mask.to(dtype)

    def fn(q, k, v):
        m = _positional(kind, L, L)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m.to(q.dtype) if m.is_floating_point() else m)

    gm = _export(fn, q, k, v)
    assert run_pass(CausalSdpaPass(), gm).stats["matches"] == 1
    bitwise.check(F.scaled_dot_product_attention(q, k, v, is_causal=True), gm(q, k, v))
