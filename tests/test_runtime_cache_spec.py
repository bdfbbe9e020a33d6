"""CacheSpec: the generation graphs' own description of their cache, which passes may change and
from which the runtime allocates (a toy pass changes it without any change to the runtime)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import fxopt
from fxopt import runtime
from fxopt.graph_utils import propagate_meta
from fxopt.models.hf import tiny_gpt_neox
from fxopt.runtime import CACHE_SPEC_KEY, CacheEntry, CacheSpec, CacheSpecError
from fxopt.runtime.cache_spec import RecordCacheSpec, cache_spec_of, replace_cache_inputs
from fxopt.runtime.engine import runtime_for

aten = torch.ops.aten
PAD = 3


class PadKVHeadDim(fxopt.Pass):
    """Toy cache-changing pass: the K/V cache gets PAD unused columns per head (a different shape,
    more bytes); the graph reads and writes the first head_dim columns through a narrow view."""

    name = "pad_kv_head_dim"
    fixpoint = False

    def __init__(self, only_decode: bool = False):
        self.only_decode = only_decode

    def call(self, gm):
        spec = gm.meta.get(CACHE_SPEC_KEY)
        if spec is None or [e.name for e in spec.entries] != ["kv"]:
            return fxopt.PassResult(gm, False)
        if self.only_decode and not any(n.op == "placeholder" and n.name == "slot" for n in gm.graph.nodes):
            return fxopt.PassResult(gm, False)
        (kv,) = spec.entries
        head = kv.shape[-1]
        padded = CacheSpec((CacheEntry("kv_padded", kv.shape[:-1] + (head + PAD,), kv.dtype),),
                           notes=(f"{self.name}: +{PAD} columns per head",))
        (old,), (new,) = replace_cache_inputs(gm, padded)
        with gm.graph.inserting_after(new):
            view = gm.graph.call_function(aten.narrow.default, (new, -1, 0, head))
        propagate_meta(gm, [view])
        old.replace_all_uses_with(view)
        gm.graph.erase_node(old)
        gm.recompile()
        return fxopt.PassResult(gm, True, {"matches": 1})


def test_cache_spec_basics():
    spec = CacheSpec((CacheEntry("kv", (3, 2, "b", 4, "t", 16), torch.float16), CacheEntry("s", ("b", 5), torch.float32)))
    assert spec.shapes(2, 64) == [(3, 2, 2, 4, 64, 16), (2, 5)]
    assert spec.nbytes(2, 64) == 3 * 2 * 2 * 4 * 64 * 16 * 2 + 2 * 5 * 4
    cache = spec.allocate(2, 64, "cpu")
    assert [tuple(c.shape) for c in cache] == spec.shapes(2, 64) and all(not c.any() for c in cache)
    assert sum(c.numel() * c.element_size() for c in cache) == spec.nbytes(2, 64)
    spec.check(cache, 2, 64)
    with pytest.raises(CacheSpecError, match="spec says"):
        spec.check(cache, 2, 32)
    for bad in [(3, "x"), (-1,), (True,), (2.0,)]:
        with pytest.raises(CacheSpecError, match="dimension"):
            CacheEntry("e", bad, torch.float32)
    with pytest.raises(CacheSpecError, match="unique"):
        CacheSpec((CacheEntry("a", (1,), torch.float32), CacheEntry("a", (2,), torch.float32)))
    assert "kv: (3x2xbx4xtx16) float16" in spec.describe()


def test_record_pass_keeps_a_later_change():
    gm = fxopt.capture_function(lambda x: x + 1, (torch.ones(2),))
    with pytest.raises(CacheSpecError, match="no 'fxopt_cache_spec'"):
        cache_spec_of(gm)
    a = CacheSpec((CacheEntry("a", ("b",), torch.float32),))
    b = CacheSpec((CacheEntry("b", ("b",), torch.float32),))
    assert not RecordCacheSpec(a)(gm).modified
    assert cache_spec_of(gm) == a
    gm.meta[CACHE_SPEC_KEY] = b
    RecordCacheSpec(a)(gm)
    assert cache_spec_of(gm) == b


def test_replace_cache_inputs_changes_the_entry_count():
    def step(x, cache):
        (c,) = cache
        c.add_(x)
        return c.sum(-1) * 2

    cache = (torch.zeros(2, 3),)
    gm = fxopt.capture_function(step, (torch.ones(2, 3), cache))
    gm.meta[CACHE_SPEC_KEY] = CacheSpec((CacheEntry("c", ("b", 3), torch.float32),))
    new_spec = CacheSpec((CacheEntry("c2", ("b", 3), torch.float32), CacheEntry("extra", ("b",), torch.float32)))
    (old,), (first, second) = replace_cache_inputs(gm, new_spec)
    old.replace_all_uses_with(first)
    gm.graph.erase_node(old)
    gm.recompile()
    assert cache_spec_of(gm) == new_spec
    two = (torch.zeros(2, 3), torch.zeros(2))
    out = gm(torch.ones(2, 3), two)
    assert torch.equal(out, torch.full((2,), 6.0)) and torch.equal(two[0], torch.ones(2, 3))
    with pytest.raises(Exception):
        gm(torch.ones(2, 3), (torch.zeros(2, 3),))  # the graph now takes two cache tensors


def test_a_pass_changes_what_the_runtime_allocates():
    model = tiny_gpt_neox(seed=11)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(12))
    mask = torch.tensor([[1] * 6, [0, 1, 1, 1, 1, 1]])
    plain = fxopt.optimize(model, (ids,))
    padded = fxopt.optimize(model, (ids,), passes=[PadKVHeadDim(), "cleanup"])
    cfg = model.config
    n, h, hd = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    t = runtime.cache_length(6 + 10)
    assert runtime.cache_bytes(plain, 2, 16) == n * 2 * 2 * h * t * hd * 4
    assert runtime.cache_bytes(padded, 2, 16) == n * 2 * 2 * h * t * (hd + PAD) * 4
    out = runtime.generate(padded, ids, attention_mask=mask, max_new_tokens=10)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, ref)
    (kv,) = runtime_for(padded)._caches[(2, t)].tensors
    assert tuple(kv.shape) == (n, 2, 2, h, t, hd + PAD)
    assert kv[..., :hd].abs().sum() > 0 and not kv[..., hd:].any()  # written through the narrow view only
    assert "kv_padded" in runtime.report(padded) and "+3 columns per head" in runtime.report(padded)


def test_prefill_and_decode_caches_must_agree():
    model = tiny_gpt_neox(seed=13)
    ids = torch.randint(3, 128, (1, 5))
    opt = fxopt.optimize(model, (ids,), passes=[PadKVHeadDim(only_decode=True)])
    with pytest.raises(CacheSpecError, match="prefill and decode graphs with different caches"):
        runtime.generate(opt, ids, max_new_tokens=3)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 1 << 20))
def test_cache_length_buckets(total):
    """Powers of two (>= 64) up to FINE_BUCKETS_FROM; past it, at most 12.5 % over the need (the
    decode step reads the whole cache); never below it, and monotone in ``total``."""
    from fxopt.runtime.engine import FINE_BUCKETS_FROM, MIN_CACHE_LENGTH

    t = runtime.cache_length(total)
    assert t >= total and t >= MIN_CACHE_LENGTH
    if t <= FINE_BUCKETS_FROM:
        assert t & (t - 1) == 0
    else:
        assert t <= total * 1.125 and t % 64 == 0
    assert runtime.cache_length(total + 1) >= t


def test_cache_length_fixed_points():
    assert [runtime.cache_length(x) for x in (1, 65, 1024, 1025, 2048, 2049, 4097)] == \
        [64, 128, 1024, 1152, 2048, 2304, 4608]
