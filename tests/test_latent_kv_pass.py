"""The ``latent_kv`` graph pass (issue 13): GPTNeoX attention found structurally in the captured
forward, prefill and decode graphs and rewritten over a latent K/V cache.

* lossless rank: logits within ``CONTRACT`` of HF's and greedy tokens identical to HF ``generate``
  through ``fxopt.runtime.generate`` (parallel / serial residual, rotary_pct 0.25 / 0.5 / 1.0, with and
  without attention bias, SDPA and eager attention, left-padded batches, a 4-layer model that goes
  through optimize's layer-template fallback, a long prompt through the length templates);
* truncated ranks on random models whose K/V projections are made low-rank on purpose (random
  weights have flat spectra): the runtime allocates the latent cache the rewritten graphs describe,
  its bytes shrink with the rank, ranks at or above the planted rank give HF's tokens, budgets give
  per-layer ranks; the graph's new weights obey Eckart-Young (Hypothesis; the factorisation's own
  bounds are tested in test_latent_factor.py);
* ``explain``: a look-alike attention (another head split), an already latent cache, a cache that
  is not K/V, an attention-free model (Mamba: zero matches, graph unchanged).
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt import runtime
from fxopt.latent import LatentKVError, collect_calibration, factorize
from fxopt.latent.model import LatentGPTNeoX
from fxopt.models.hf import tiny_gpt_neox, tiny_hf_mamba
from fxopt.passes.latent_kv import LatentKVPass, latent_report
from fxopt.runtime.cache_spec import CACHE_SPEC_KEY, CacheEntry, CacheSpec, set_cache_spec
from fxopt.runtime.engine import runtime_for
from fxopt.testing.contracts import fp64_relative

# Logits at valid positions vs HF's fp32 model, both against HF in fp64. The latent path rounds
# twice where HF rounds once for k_pass and v (x W_D^T, then c W_U^T) and its projection has other
# summation lengths; diluted by the rest of the model the measured ratio stays below 1.6 (the
# lossless factors are exact to ~1e-7 relative); 4 leaves the margin test_latent_model.py uses.
CONTRACT = fp64_relative(4.0)
PASSES = fxopt.registry.DEFAULT_PASSES


def _model(parallel=True, rotary_pct=0.25, bias=True, layers=2, impl="sdpa", seed=0, **kw):
    m = tiny_gpt_neox(parallel_residual=parallel, rotary_pct=rotary_pct, attention_bias=bias,
                      num_hidden_layers=layers, attn_implementation=impl, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # HF initialises biases to zero: make them matter
        for layer in m.gpt_neox.layers:
            for lin in (layer.attention.query_key_value, layer.attention.dense):
                if lin.bias is not None:
                    lin.bias.copy_(0.2 * torch.randn(lin.bias.shape, generator=g))
    return m


def _batch(b=3, length=9, pads=(0, 3, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (b, length), generator=g)
    mask = torch.ones_like(ids)
    for row, p in enumerate(pads):
        mask[row, :p] = 0
        ids[row, :p] = 1
    return ids, mask


def _hf_generate(model, ids, mask, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {id(p) for p in model.parameters()}


def _unchanged(model, snap):
    state, ids = snap
    assert {id(p) for p in model.parameters()} == ids
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not any("latent" in name for name, _ in model.named_buffers())


def _low_rank_kv(model, ranks, seed=0):
    """Plant rank ``ranks[i]`` in layer i's stacked [W_k_pass; W_v] (q and k_rot untouched)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    H, d = cfg.num_attention_heads, cfg.hidden_size
    hd = d // H
    R = 2 * model.gpt_neox.rotary_emb.inv_freq.numel()
    with torch.no_grad():
        for layer, k in zip(model.gpt_neox.layers, ranks):
            w = layer.attention.query_key_value.weight.view(H, 3, hd, d)
            m = H * (hd - R) + H * hd
            low = (torch.randn(m, k, generator=g) @ torch.randn(k, d, generator=g)) / (k * d) ** 0.5
            w[:, 1, R:] = low[: H * (hd - R)].view(H, hd - R, d)
            w[:, 2] = low[H * (hd - R):].view(H, hd, d)
    return model


# ----------------------------------------------------------------------------- lossless
# every residual form with every rotary width; bias and attention implementation alternating
CASES = [(True, 0.25, True, "sdpa"), (True, 0.5, False, "eager"), (True, 1.0, True, "eager"),
         (False, 0.25, False, "eager"), (False, 0.5, True, "sdpa"), (False, 1.0, False, "sdpa")]


@pytest.mark.parametrize("parallel,rotary_pct,bias,impl", CASES)
def test_lossless_logits_and_tokens_equal_hf(parallel, rotary_pct, bias, impl):
    model = _model(parallel, rotary_pct, bias, impl=impl, seed=3)
    snap = _snapshot(model)
    ids, mask = _batch()
    p = fxopt.get_pass("latent_kv", rank="lossless")
    opt = fxopt.optimize(model, (ids,), {"attention_mask": mask}, passes=[*PASSES, p])
    assert opt.report().matches["latent_kv"] == 2
    rep = latent_report(opt)
    H, hd, d = 4, 16, 64
    R = {0.25: 4, 0.5: 8, 1.0: 16}[rotary_pct]
    assert [r.rank for r in rep.rows] == [min(d, H * (2 * hd - R))] * 2  # the numerical rank of M
    assert rep.bytes_before == 2 * 2 * d * 4 and rep.bytes_after == 2 * (d + H * R) * 4
    # logits where HF's eager and SDPA agree (padded query rows attend nothing)
    valid = mask.bool()
    m64 = copy.deepcopy(model).double()
    m64.config._attn_implementation = "sdpa"  # a true fp64 reference (HF's eager softmax is fp32)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        ref64 = m64(input_ids=ids, attention_mask=mask).logits
        out = opt(ids, attention_mask=mask).logits
    stats = CONTRACT.check(ref[valid], out[valid], fp64_ref=ref64[valid])
    assert stats["max_err"] > 0  # the factorised path really ran (it does not round like HF's)
    # greedy generation over the latent cache, token for token HF's
    hf = _hf_generate(model, ids, mask, 12)
    ours = runtime.generate(opt, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, hf)
    if not bias:  # the tokens vary: a real comparison (the tiny biased models settle on one token; their
        assert len(set(hf[:, 9:].flatten().tolist())) > 3  # logits are compared above)
    dec = runtime_for(opt).decode_graph(3, runtime.cache_length(21))
    assert [e.name for e in dec.spec.entries] == ["latent", "k_rot"]
    op = torch.ops.fxopt.latent_decode_attention.default
    n_op = sum(1 for n in dec.gm.graph.nodes if n.target is op)
    assert n_op == (2 if impl == "sdpa" else 0)  # SDPA's boolean key mask -> the op; eager: ATen, its own mask
    assert not any(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in dec.gm.graph.nodes)
    _unchanged(model, snap)


def test_cache_bytes_and_allocation_are_the_latent_cache():
    model = _model(True, 0.25, True)
    ids, mask = _batch()
    plain = fxopt.optimize(model, (ids,))
    opt = fxopt.optimize(model, (ids,), passes=[*PASSES, fxopt.get_pass("latent_kv")])
    t = runtime.cache_length(9 + 5)
    mha = runtime.cache_bytes(plain, 3, 14)
    lat = runtime.cache_bytes(opt, 3, 14)
    assert mha == 2 * 2 * 3 * 4 * t * 16 * 4
    assert lat == 3 * t * 2 * (64 + 4 * 4) * 4 == mha * 0.625
    runtime.generate(opt, ids, attention_mask=mask, max_new_tokens=5)
    caches = runtime_for(opt)._caches
    assert sum(x.numel() * x.element_size() for c in caches.values() for x in c.tensors) == lat
    assert "latent_kv: K/V replaced" in runtime.report(opt)
    rep = fxopt.explain(fxopt.capture(model, (ids,)), "latent_kv")
    assert rep.matches == 2 and "MATCH layer 1: rank 64/64, kept energy 1.000000, 512 -> 320" in str(rep)


def test_decode_reconstruct_mode_and_four_layers_through_the_template_fallback():
    """decode="reconstruct" (K/V rebuilt from the latent cache each step) gives the same tokens; a
    4-layer model takes optimize's layer-template path, which cannot hold per-layer weights that are
    not the model's: optimize must fall back to whole captures (wrong weights would change tokens)."""
    model = _model(False, 0.5, True, layers=4, seed=2)
    ids, mask = _batch(seed=3)
    hf = _hf_generate(model, ids, mask, 10)
    for mode in ("absorb", "reconstruct"):
        opt = fxopt.optimize(model, (ids,), passes=[*PASSES, fxopt.get_pass("latent_kv", decode=mode)])
        assert opt.report().matches["latent_kv"] == 4
        assert any("layer-generic template not used" in n and "per-layer latent weights" in n
                   for n in opt.report().notes)
        out = runtime.generate(opt, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None, pad_token_id=0)
        assert torch.equal(out, hf), mode
        _generated_over_the_latent_cache(opt, 4)


def _generated_over_the_latent_cache(opt, layers):
    """The runtime's prefill and decode graphs were rewritten, not only opt's forward: the layer-
    template probes (1-3 of the layers, the whole model's cache) are refused by the pass, so the
    generation graphs are captured whole and the cache generate allocated is the latent one."""
    rt = runtime_for(opt)
    assert rt._decode and rt._prefill
    for d in rt._decode.values():
        assert [e.name for e in d.spec.entries] == ["latent", "k_rot"], d.spec.describe()
        assert latent_report(d.gm) is not None and len(latent_report(d.gm).rows) == layers
    for gm in rt._prefill.values():
        assert latent_report(gm) is not None and len(latent_report(gm).rows) == layers
    assert all(len(c.tensors) == 2 and c.spec.entries[0].name == "latent" for c in rt._caches.values())
    assert "a layer-template probe" in runtime.report(opt)


def test_long_prompt():
    """A prompt of >= 33 tokens: the runtime tries optimize's length templates for the prefill graph.
    Today their instantiation re-propagates with the *declared* (MHA) cache inputs and, the rewritten
    graph taking the latent cache, falls back to a direct capture (a runtime follow-up); the tokens
    must be HF's either way."""
    model = _model(True, 0.25, True, seed=4)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    opt = fxopt.optimize(model, (ids[:, :8],), passes=[*PASSES, fxopt.get_pass("latent_kv")])
    out = runtime.generate(opt, ids, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(out, _hf_generate(model, ids, None, 6))


# ----------------------------------------------------------------------------- truncated
def test_truncated_cache_shrinks_with_rank_and_planted_rank_is_lossless():
    planted = 6
    model = _low_rank_kv(_model(True, 0.25, True, seed=5), [planted, planted])
    ids, mask = _batch(seed=6)
    hf = _hf_generate(model, ids, mask, 10)
    sizes, energies = [], []
    for rank in ("lossless", planted, 4, 2, 1):
        p = fxopt.get_pass("latent_kv", rank=rank)
        opt = fxopt.optimize(model, (ids,), passes=[*PASSES, p])
        rep = latent_report(opt)
        want = planted if rank == "lossless" else rank
        assert [r.rank for r in rep.rows] == [want, want]
        assert p.last_report is rep
        rec = [r for r in opt.report().records if r.name == "latent_kv"][0]
        assert rec.stats["layer0.rank"] == want and rec.stats["bytes_per_token_after"] == 2 * (want + 16) * 4
        sizes.append(runtime.cache_bytes(opt, 3, 20))
        energies.append(rep.rows[0].kept_energy)
        out = runtime.generate(opt, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None, pad_token_id=0)
        if want >= planted:
            assert torch.equal(out, hf), rank
        else:
            # the cached generation computes the truncated model: the reference model's tokens
            ref = LatentGPTNeoX(model, factorize(model, rank=want)).generate(ids, mask, 10)
            assert torch.equal(out, ref), rank
            with torch.no_grad():  # truncating below the planted rank changes the model
                assert not torch.allclose(opt(ids).logits, model(ids).logits, atol=1e-3)
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes[1:])) == 4
    assert sizes[0] == sizes[1]  # lossless = the planted rank
    assert energies[:2] == [pytest.approx(1.0), pytest.approx(1.0)] and energies[2] > energies[3] > energies[4]


def test_budget_gives_per_layer_ranks_and_entries():
    model = _low_rank_kv(_model(True, 0.25, True, seed=7), [3, 12])
    ids, mask = _batch(seed=8)
    p = fxopt.get_pass("latent_kv", budget=0.18)
    opt = fxopt.optimize(model, (ids,), passes=[*PASSES, p])
    ranks = [r.rank for r in latent_report(opt).rows]
    # 0.18 of 2 x 512 B = 184 B = 46 values: 2 x 16 for k_rot, 14 latent values spread by the spectra
    # (each layer at most its planted rank)
    assert sum(ranks) == 14 and ranks[0] <= 3 and ranks[1] <= 12 and ranks[0] != ranks[1]
    out = runtime.generate(opt, ids, attention_mask=mask, max_new_tokens=6)
    assert out.shape == (3, 15)
    dec = runtime_for(opt).decode_graph(3, runtime.cache_length(15))
    assert [e.name for e in dec.spec.entries] == ["latent_0", "latent_1", "k_rot"]
    assert [e.shape[-1] for e in dec.spec.entries[:2]] == ranks
    assert runtime.cache_bytes(opt, 3, 15) == 3 * runtime.cache_length(15) * (sum(ranks) + 2 * 16) * 4


def test_calibration_is_used_and_layer_mismatch_is_named():
    model = _low_rank_kv(_model(True, 0.25, True, seed=9), [8, 8])
    ids, _ = _batch(seed=10)
    cal = collect_calibration(model, ids)
    p = fxopt.get_pass("latent_kv", rank=4, calibration=cal)
    opt = fxopt.optimize(model, (ids,), passes=[*PASSES, p])
    rep = latent_report(opt)
    assert {r.metric for r in rep.rows} == {"whitened"} and any("calibrated on" in n for n in rep.notes)
    with pytest.raises(fxopt.FxoptError, match="3 attention layers, the calibration 2"):
        fxopt.optimize(_model(True, 0.25, True, layers=3), (ids,),
                       passes=[fxopt.get_pass("latent_kv", rank=4, calibration=cal)])
    with pytest.raises(LatentKVError, match="collect_calibration"):
        fxopt.get_pass("latent_kv", rank=4, calibration=ids)
    with pytest.raises(LatentKVError, match="needs the loss gradients"):
        fxopt.get_pass("latent_kv", rank=4, calibration=cal, objective="loss")


def test_loss_calibration_gives_factorizes_weights():
    """A calibration with the loss statistics: the pass's graph weights are factorize's (two-sided SVD,
    v refit), its report says so, and the budget is spread by absolute (loss-unit) energies."""
    model = _model(True, 0.25, True, seed=11)
    ids, mask = _batch(seed=12)
    cal = collect_calibration(model, ids, mask, gradients=True, value_inputs=True)
    gm = fxopt.capture(model, (ids,))
    LatentKVPass(rank=6, calibration=cal)(gm)
    rep = latent_report(gm)
    assert {r.metric for r in rep.rows} == {"fisher"} and any("refit" in n for n in rep.notes)
    ref = factorize(model, rank=6, calibration=cal)
    H, hd, R = 4, 16, 4
    for i, lat in enumerate(ref.layers):
        qkc = getattr(gm.latent_kv, f"L{i}_qkc_weight")
        torch.testing.assert_close(qkc[H * hd + H * R:], lat.down, rtol=0, atol=0)
        torch.testing.assert_close(getattr(gm.latent_kv, f"L{i}_up_weight"), lat.stacked_up(), rtol=0, atol=0)
    budget = fxopt.optimize(model, (ids,), passes=[*PASSES, fxopt.get_pass("latent_kv", budget=0.4, calibration=cal)])
    assert any("ranks by absolute" in n for n in latent_report(budget).notes)
    inputs = fxopt.optimize(model, (ids,), passes=[*PASSES, fxopt.get_pass("latent_kv", rank=6, calibration=cal,
                                                                           objective="inputs")])
    assert {r.metric for r in latent_report(inputs).rows} == {"whitened"}
    for bad in ({"rank": 0}, {"rank": 4, "budget": 0.5}, {"budget": 1.5}, {"decode": "fast"}):
        with pytest.raises(LatentKVError):
            fxopt.get_pass("latent_kv", **bad)


@settings(max_examples=8, deadline=None)
@given(rank=st.integers(1, 24), seed=st.integers(0, 2**16), rotary_pct=st.sampled_from([0.25, 0.5]))
def test_graph_weights_obey_eckart_young(rank, seed, rotary_pct):
    """The weights the pass puts in the graph are the truncated SVD: ``||M - W_U W_D||_F^2`` equals the
    discarded energy (Eckart-Young, equality for the plain SVD), q and k_rot are the model's exactly."""
    model = _model(True, rotary_pct, True, layers=1, seed=seed)
    ids = torch.randint(3, 128, (1, 5))
    gm = fxopt.capture(model, (ids,))
    p = LatentKVPass(rank=rank)
    p(gm)
    lat = gm.latent_kv
    w = model.gpt_neox.layers[0].attention.query_key_value.weight.detach().double()
    H, hd, d = 4, 16, 64
    R = 8 if rotary_pct == 0.5 else 4
    P = hd - R
    blocks = w.view(H, 3, hd, d)
    M = torch.cat([blocks[:, 1, R:].reshape(-1, d), blocks[:, 2].reshape(-1, d)])
    r = min(rank, d)
    qkc = lat.L0_qkc_weight.double()
    assert torch.equal(qkc[: H * hd].float(), blocks[:, 0].reshape(-1, d).float())
    assert torch.equal(qkc[H * hd: H * hd + H * R].float(), blocks[:, 1, :R].reshape(-1, d).float())
    down, up = qkc[H * hd + H * R:], lat.L0_up_weight.double()
    assert down.shape == (r, d) and up.shape == (H * (P + hd), r)
    s = torch.linalg.svdvals(M)
    err = float((M - up @ down).pow(2).sum())
    discarded = float(s[r:].pow(2).sum())
    tol = 1e-5 * float(s.pow(2).sum())  # the factors are stored in fp32
    assert abs(err - discarded) <= tol
    assert latent_report(gm).rows[0].kept_energy == pytest.approx(1 - discarded / float(s.pow(2).sum()), abs=1e-9)


# ----------------------------------------------------------------------------- left alone
class _OtherSplitAttention(nn.Module):
    """GPTNeoX-like attention (fused qkv, partial rotary, SDPA) with a (b, L, 3, H, hd) head split."""

    def __init__(self, d=64, H=4, R=4):
        super().__init__()
        self.H, self.hd, self.R = H, d // H, R
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def _rot(self, t, cos, sin):
        R = self.R
        r, p = t[..., :R], t[..., R:]
        half = torch.cat([-r[..., R // 2:], r[..., : R // 2]], -1)
        return torch.cat([r * cos + half * sin, p], -1)

    def forward(self, x):
        b, L, d = x.shape
        q, k, v = self.qkv(x).view(b, L, 3, self.H, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        pos = torch.arange(L, dtype=torch.float32)[:, None] * torch.ones(self.R)
        cos, sin = pos.cos(), pos.sin()
        q, k = self._rot(q, cos, sin), self._rot(k, cos, sin)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(b, L, d))


def test_explain_names_the_look_alike_head_split():
    m = _OtherSplitAttention().eval()
    x = torch.randn(2, 6, 64)
    opt = fxopt.optimize(m, (x,), passes=[*PASSES, fxopt.get_pass("latent_kv")])
    assert opt.report().matches["latent_kv"] == 0
    p = LatentKVPass()
    rep = p.explain(opt)
    assert rep.matches == 0 and "0 attention(s) rewritten, 1 left alone" in str(rep)
    (miss,) = p.last_rejections
    assert miss.kind == "head split" and "GPTNeoX" in miss.message and miss.message in str(rep)
    assert "[head split]" in str(fxopt.explain(opt, "latent_kv"))
    torch.testing.assert_close(opt(x), m(x))


def test_explain_on_an_already_latent_cache_and_on_a_foreign_cache():
    model = _model(True, 0.25, True)
    ids, _ = _batch()
    opt = fxopt.optimize(model, (ids,), passes=[*PASSES, fxopt.get_pass("latent_kv")])
    dec = runtime_for(opt).decode_graph(3, 64).gm
    before = [(n.name, n.target, n.args) for n in dec.graph.nodes]
    p = LatentKVPass()
    rep = p.explain(dec)
    assert rep.matches == 0 and len(p.last_rejections) == 2  # the two latent decode ops
    assert all(r.kind == "cache" and "already runs over a latent cache" in r.message for r in p.last_rejections)
    assert "already runs over a latent cache" in str(rep)
    res = LatentKVPass()(dec)  # running it again changes nothing
    assert not res.modified and [(n.name, n.target, n.args) for n in dec.graph.nodes] == before
    # a K/V-shaped graph whose declared cache is something else: left alone, the spec named
    plain = fxopt.optimize(model, (ids,))
    gm = runtime_for(plain).decode_graph(3, 64).gm
    spec = gm.meta[CACHE_SPEC_KEY]
    e = spec.entries[0]
    set_cache_spec(gm, CacheSpec((CacheEntry("kv_int8", e.shape[:1] + (1,) + e.shape[2:], torch.int8),)))
    rep = fxopt.explain(gm, "latent_kv")
    assert rep.matches == 0 and "not the runtime's K/V cache" in str(rep)


def test_mamba_zero_matches_and_unchanged():
    model = tiny_hf_mamba()
    ids = torch.randint(0, 128, (1, 12))
    base = fxopt.optimize(model, (ids,))
    opt = fxopt.optimize(model, (ids,), passes=[*PASSES, fxopt.get_pass("latent_kv")])
    assert opt.report().matches["latent_kv"] == 0
    assert [str(n.target) for n in opt.graph_module.graph.nodes] == [str(n.target) for n in base.graph_module.graph.nodes]
    rep = fxopt.explain(opt, "latent_kv")
    assert rep.matches == 0 and "no attention" in str(rep)
    with torch.no_grad():
        assert torch.equal(opt(ids).logits, base(ids).logits)
    assert runtime.cache_bytes(opt, 2, 40) == runtime.cache_bytes(base, 2, 40)


def test_trained_gpt_neox_lossless_tokens():
    """On the trained model the lossless latent cache gives HF's tokens, with and without HF's
    inferred mask, through generation graphs that really run over the latent cache.

    The held-out stream starts with the document separator 0, which is also the model's pad id:
    HF's generate, given no mask and ``eos_token_id=None``, masks it (and counts positions without
    it). The runtime used to attend to it, which is where issue 13's step-16 divergence came from
    (the MHA runtime diverged there too). Given an all-ones mask both attend to it."""
    from fxopt.models import trained

    model = trained.load_trained("gpt_neox")  # shipped with the package: absent is an error
    ids = trained.byte_stream("heldout", max_bytes=48)[None, :].long()
    assert int(ids[0, 0]) == 0 == model.generation_config.pad_token_id  # the case this test is about
    opt = fxopt.optimize(model, (ids,), passes=[*PASSES, fxopt.get_pass("latent_kv")])
    out = runtime.generate(opt, ids, max_new_tokens=24, eos_token_id=None)
    hf = _hf_generate(model, ids, None, 24)
    assert torch.equal(out, hf)
    ones = torch.ones_like(ids)
    out_ones = runtime.generate(opt, ids, attention_mask=ones, max_new_tokens=24, eos_token_id=None)
    hf_ones = _hf_generate(model, ids, ones, 24)
    assert torch.equal(out_ones, hf_ones)
    assert not torch.equal(hf, hf_ones)  # the two masks give other tokens: both are checked
    _generated_over_the_latent_cache(opt, model.config.num_hidden_layers)
    assert latent_report(opt).cache_fraction <= 0.626
