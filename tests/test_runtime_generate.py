"""fxopt.runtime.generate for HF GPTNeoX: tokens equal to HF's generate, HF's eos/pad and streamer
semantics, seeded sampling, cache_bytes, soundness (the model untouched; changes to it rebuild the
graphs) and clear errors."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import fxopt
from fxopt import runtime
from fxopt.models.hf import tiny_gpt_neox
from fxopt.runtime.engine import inferred_attention_mask, runtime_for


def _left_padded(b: int, length: int, pads: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    for row, p in enumerate(pads):
        mask[row, :p] = 0
        ids[row, :p] = 1
    return ids, mask


def _hf(model, ids, mask=None, **kw):
    kw.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **kw)


@pytest.fixture(scope="module")
def neox():
    model = tiny_gpt_neox(parallel_residual=True)
    opt = fxopt.optimize(model, (torch.randint(0, 128, (1, 8)),))
    return model, opt


@pytest.mark.parametrize("parallel,rotary_pct", [(True, 0.25), (False, 0.5), (False, 1.0)])
def test_greedy_equals_hf_left_padded_batch(parallel, rotary_pct):
    model = tiny_gpt_neox(parallel_residual=parallel, rotary_pct=rotary_pct, seed=3)
    ids, mask = _left_padded(3, 7, [0, 2, 5])
    opt = fxopt.optimize(model, (ids,))
    out = runtime.generate(opt, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    ref = _hf(model, ids, mask, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    assert out.shape == ref.shape == (3, 19)
    assert torch.equal(out, ref)
    assert len(set(out[0, 7:].tolist())) > 3  # the tiny model's tokens vary: a real comparison


def test_second_call_reuses_graphs_and_cache(neox):
    model, opt = neox
    ids, mask = _left_padded(2, 6, [0, 1], seed=1)
    first = runtime.generate(opt, ids, attention_mask=mask, max_new_tokens=9)
    rt = runtime_for(opt)
    built, caches = len(rt.stats.built), {k: [t.data_ptr() for t in c.tensors] for k, c in rt._caches.items()}
    ids2, mask2 = _left_padded(2, 6, [1, 0], seed=2)   # same shapes, other tokens and padding
    second = runtime.generate(opt, ids2, attention_mask=mask2, max_new_tokens=9)
    assert len(rt.stats.built) == built, "the second call built graphs again"
    assert {k: [t.data_ptr() for t in c.tensors] for k, c in rt._caches.items()} == caches
    assert torch.equal(first, _hf(model, ids, mask, max_new_tokens=9))
    assert torch.equal(second, _hf(model, ids2, mask2, max_new_tokens=9))
    # a shorter generation in the same cache-length bucket uses the same decode graph and cache
    third = runtime.generate(opt, ids2, attention_mask=mask2, max_new_tokens=3)
    assert torch.equal(third, _hf(model, ids2, mask2, max_new_tokens=3))
    assert [k for k, *_ in rt.stats.built[built:]] == []


def test_eos_and_pad_semantics_match_hf(neox):
    model, opt = neox
    ids, mask = _left_padded(2, 6, [0, 2], seed=4)
    free = _hf(model, ids, mask, max_new_tokens=14, eos_token_id=None, pad_token_id=0)
    eos = int(free[0, 6 + 2])  # row 0 emits it at step 2; the other row maybe later or never
    for pad in (0, 7):
        out = runtime.generate(opt, ids, attention_mask=mask, max_new_tokens=14, eos_token_id=eos, pad_token_id=pad)
        ref = _hf(model, ids, mask, max_new_tokens=14, eos_token_id=eos, pad_token_id=pad)
        assert torch.equal(out, ref), (out, ref)
        assert (out[0, 6 + 3:] == pad).all()  # finished row padded
    # every row done early: HF stops; the batched eos check must trim to the same length
    both = ids[:1].repeat(2, 1)
    ref = _hf(model, both, None, max_new_tokens=14, eos_token_id=eos, pad_token_id=0)
    out = runtime.generate(opt, both, max_new_tokens=14, eos_token_id=eos, pad_token_id=0)
    assert ref.shape[1] == 6 + 3 and torch.equal(out, ref)
    # a list of eos ids, pad defaulting to the first eos (HF)
    ref = _hf(model, ids, mask, max_new_tokens=10, eos_token_id=[eos, 99])
    out = runtime.generate(opt, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[eos, 99])
    assert torch.equal(out, ref)


def test_defaults_from_generation_config(neox):
    model, opt = neox
    ids = torch.tensor([[5, 9, 17, 33, 40, 41], [7, 8, 9, 10, 11, 12]])
    # tiny_gpt_neox's generation_config: eos_token_id=2 (no pad: HF pads with eos)
    assert model.generation_config.eos_token_id == 2
    assert torch.equal(runtime.generate(opt, ids, max_new_tokens=16), _hf(model, ids, max_new_tokens=16))


class _Recorder:
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(("put", value.clone()))

    def end(self):
        self.calls.append(("end", None))


def test_streamer_calls_match_hf(neox):
    model, opt = neox
    ids, mask = _left_padded(2, 6, [0, 1], seed=5)
    free = _hf(model, ids, mask, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    eos = int(free[1, 6 + 1])
    mine, theirs = _Recorder(), _Recorder()
    out = runtime.generate(opt, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0,
                           streamer=mine)
    ref = _hf(model, ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0, streamer=theirs)
    assert torch.equal(out, ref)
    assert [k for k, _ in mine.calls] == [k for k, _ in theirs.calls]
    for (_, a), (_, b) in zip(mine.calls, theirs.calls):
        assert (a is None and b is None) or torch.equal(a, b)


def test_sampling_reproducible_with_seeded_generator(neox):
    _, opt = neox
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(6))

    def run(seed, **kw):
        return runtime.generate(opt, ids, max_new_tokens=10, do_sample=True, eos_token_id=None,
                                generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # top_k=1 is greedy whatever the seed; a tiny top_p keeps only the most likely token too
    greedy = runtime.generate(opt, ids, max_new_tokens=10, eos_token_id=None)
    assert torch.equal(run(3, top_k=1), greedy)
    assert torch.equal(run(4, top_p=1e-6, top_k=0), greedy)
    # temperature -> 0 concentrates on the argmax
    assert torch.equal(run(5, temperature=1e-4), greedy)


def test_sampling_warpers_follow_hf():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from fxopt.runtime.sampling import GenerationParams, warp

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 50, generator=g) * 3
    scores[1, :10] = scores[1, 10]  # ties
    for t, k, p in [(0.7, 5, 0.9), (1.3, None, 0.5), (1.0, 50, 1.0), (2.0, 3, 0.2)]:
        ref = TemperatureLogitsWarper(t)(None, scores.clone()) if t != 1.0 else scores.clone()
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1.0:
            ref = TopPLogitsWarper(p)(None, ref)
        mine = warp(scores.clone(), GenerationParams(True, t, k, p, (), None))
        assert torch.equal(mine, ref)


def test_cache_bytes_is_what_generate_allocates(neox):
    model, opt = neox
    ids = torch.randint(3, 128, (2, 6))
    predicted = runtime.cache_bytes(opt, 2, 6 + 50)
    runtime.generate(opt, ids, max_new_tokens=50, eos_token_id=None)
    rt = runtime_for(opt)
    t = runtime.cache_length(56)
    allocated = rt._caches[(2, t)].tensors
    assert predicted == sum(x.numel() * x.element_size() for x in allocated)
    cfg = model.config
    head = cfg.hidden_size // cfg.num_attention_heads
    assert predicted == cfg.num_hidden_layers * 2 * 2 * cfg.num_attention_heads * t * head * 4
    assert t == 64 and runtime.cache_bytes(opt, 4, 6 + 50) == 2 * predicted


def _model_state(model):
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "attrs": {name: sorted(vars(m)) for name, m in model.named_modules()},
        "training": {name: m.training for name, m in model.named_modules()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
    }


def test_model_unchanged_by_generate(neox):
    model, opt = neox
    before = _model_state(model)
    ids, mask = _left_padded(2, 6, [0, 3])
    runtime.generate(opt, ids, attention_mask=mask, max_new_tokens=5)
    runtime.generate(opt, ids, attention_mask=mask, max_new_tokens=5, do_sample=True,
                     generator=torch.Generator().manual_seed(0))
    after = _model_state(model)
    assert before["ids"] == after["ids"] and before["attrs"] == after["attrs"]
    assert before["training"] == after["training"] and before["grad"] == after["grad"]
    for k, v in before["tensors"].items():
        assert torch.equal(v, after["tensors"][k]), k
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_model_changes_rebuild_the_graphs():
    model = tiny_gpt_neox(seed=8)
    opt = fxopt.optimize(model, (torch.randint(0, 128, (1, 4)),))
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(9))
    runtime.generate(opt, ids, max_new_tokens=4, eos_token_id=None)
    rt = runtime_for(opt)
    # an in-place update of a parameter's values needs no rebuild (the graphs read the tensor)
    built = len(rt.stats.built)
    with torch.no_grad():
        model.gpt_neox.final_layer_norm.weight.mul_(1.5)
    out = runtime.generate(opt, ids, max_new_tokens=6, eos_token_id=None)
    assert len(rt.stats.built) == built
    assert torch.equal(out, _hf(model, ids, max_new_tokens=6, eos_token_id=None))
    # a reassigned parameter: the old graphs read the old tensor, so they are rebuilt
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    out = runtime.generate(opt, ids, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(out, _hf(model, ids, max_new_tokens=6, eos_token_id=None))
    assert any("lm_head.weight" in n and "replaced" in n for n in rt.stats.notes)
    assert len(rt.stats.built) == built + 2
    # train mode (dropout), a dtype change: the guard says so before anything runs
    model.train()
    assert "train mode" in rt.guard.check()
    model.eval()
    assert rt.guard.check() is None
    model.gpt_neox.final_layer_norm.to(torch.float64)
    assert "float64" in rt.guard.check()


def test_forward_hooks_are_refused(neox):
    model, opt = neox
    handle = model.gpt_neox.layers[0].mlp.register_forward_hook(lambda m, i, o: o * 2)
    try:
        with pytest.raises(fxopt.FxoptError, match="forward hooks"):
            runtime.generate(opt, torch.tensor([[4, 5, 6]]), max_new_tokens=2)
    finally:
        handle.remove()


def test_unknown_family_is_a_clear_error():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)

        def forward(self, ids):
            return self.emb(ids).sum(-1)

    opt = fxopt.optimize(Tiny(), (torch.tensor([[1, 2]]),))
    with pytest.raises(runtime.UnsupportedModelError, match="GPTNeoXForCausalLM and MambaForCausalLM") as info:
        runtime.generate(opt, torch.tensor([[1, 2]]))
    assert isinstance(info.value, fxopt.FxoptError)
    with pytest.raises(runtime.UnsupportedModelError):
        runtime.cache_bytes(opt, 1, 8)


def test_bad_arguments_are_clear_errors(neox):
    model, opt = neox
    ids = torch.tensor([[4, 5, 6]])
    cases = [
        (dict(input_ids=ids.float()), "2-D integer tensor"),
        (dict(input_ids=ids[0]), "2-D integer tensor"),
        (dict(input_ids=ids, max_new_tokens=0), "max_new_tokens must be a positive int"),
        (dict(input_ids=ids, attention_mask=torch.ones(1, 2)), "attention_mask must be"),
        (dict(input_ids=ids, attention_mask=torch.tensor([[1, 1, 0]])), "right"),
        (dict(input_ids=ids, do_sample=True, temperature=0.0), "temperature"),
        (dict(input_ids=ids, do_sample=True, top_p=1.5), "top_p"),
        (dict(input_ids=ids, eos_token_id="x"), "eos_token_id"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(fxopt.FxoptError, match=msg):
            runtime.generate(opt, **kwargs)
    with pytest.raises(fxopt.FxoptError, match="batch_size"):
        runtime.cache_bytes(opt, 0, 8)
    with pytest.raises(fxopt.FxoptError, match="OptimizedModule"):
        runtime.generate(model, ids)


def test_unsupported_generation_config_is_refused(neox):
    model, opt = neox
    old = model.generation_config.repetition_penalty
    model.generation_config.repetition_penalty = 1.3
    try:
        with pytest.raises(runtime.GenerationConfigError, match="repetition_penalty"):
            runtime.generate(opt, torch.tensor([[4, 5]]), max_new_tokens=2)
    finally:
        model.generation_config.repetition_penalty = old


def test_threads_share_one_optimized_module(neox):
    import threading

    model, opt = neox
    cases = [_left_padded(2, 6, [0, 2], seed=20 + i) for i in range(3)] + [(torch.randint(3, 128, (2, 6)), None)]
    refs = [_hf(model, ids, mask, max_new_tokens=7) for ids, mask in cases]
    errors = []

    def work(i):
        try:
            for r in range(2):
                ids, mask = cases[(i + r) % len(cases)]
                out = runtime.generate(opt, ids, attention_mask=mask, max_new_tokens=7)
                if not torch.equal(out, refs[(i + r) % len(cases)]):
                    errors.append((i, r))
        except Exception as exc:  # noqa: BLE001
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# ----------------------------------------------------------------------------- HF's inferred mask
def _with_pads(seed=30):
    """Row 0 starts with the pad token 2 and holds it again in the middle (a hole); row 1 has none."""
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    ids[0, 0] = ids[0, 4] = 2
    return ids


def test_pad_token_in_the_prompt_is_masked_as_hf_infers(neox):
    """HF's generate, given no attention_mask, masks the prompt's pad tokens when the pad token is
    not an eos token (the trained byte model's separator 0 is its pad id: issue 13's step-16
    divergence from HF was this, not the latent cache)."""
    model, opt = neox
    ids = _with_pads()
    kw = dict(max_new_tokens=10, eos_token_id=None, pad_token_id=2)
    out = runtime.generate(opt, ids, **kw)
    assert torch.equal(out, _hf(model, ids, None, **kw))
    # the mask matters: treating the pad tokens as real ones gives other tokens (both as HF)
    ones = runtime.generate(opt, ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(ones, _hf(model, ids, torch.ones_like(ids), **kw))
    assert not torch.equal(ones[0], out[0]) and torch.equal(ones[1], out[1])


def test_pad_token_that_is_also_eos_is_not_masked(neox):
    """Look-alike: the same prompt with pad == eos: HF infers no mask (it cannot tell a pad from a
    document end), and neither does the runtime; with no pad token at all nothing is inferred."""
    model, opt = neox
    ids = _with_pads()
    kw = dict(max_new_tokens=10, eos_token_id=2, pad_token_id=2)
    out = runtime.generate(opt, ids, **kw)
    assert torch.equal(out, _hf(model, ids, None, **kw))
    assert torch.equal(out, _hf(model, ids, torch.ones_like(ids), **kw))
    params = runtime.sampling.resolve(model, do_sample=False, temperature=None, top_k=None, top_p=None,
                                      eos_token_id=None, pad_token_id=None)
    assert params.pad_token_id is None and inferred_attention_mask(ids, params) is None


def test_prompt_ending_in_the_pad_token_is_a_clear_error(neox):
    model, opt = neox
    ids = _with_pads()
    ids[1, -1] = 2
    with pytest.raises(runtime.GenerateError, match="ends with the pad token 2.*attention_mask explicitly"):
        runtime.generate(opt, ids, max_new_tokens=3, eos_token_id=None, pad_token_id=2)
    out = runtime.generate(opt, ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, eos_token_id=None,
                           pad_token_id=2)  # the way out the message names
    assert torch.equal(out, _hf(model, ids, torch.ones_like(ids), max_new_tokens=3, eos_token_id=None, pad_token_id=2))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), pad=st.one_of(st.none(), st.integers(0, 4)),
       eos=st.one_of(st.none(), st.integers(0, 4), st.lists(st.integers(0, 4), min_size=1, max_size=2)))
def test_inferred_mask_is_hfs(neox, data, pad, eos):
    """inferred_attention_mask is HF's _prepare_attention_mask_for_generation (after HF's own
    special-token resolution: pad falls back to the first eos), or an error where HF's mask would
    hide a row's last prompt token."""
    import copy

    model, _ = neox
    b, length = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6))
    ids = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 5), min_size=length, max_size=length),
                                          min_size=b, max_size=b)))
    cfg = copy.deepcopy(model.generation_config)
    cfg.pad_token_id, cfg.eos_token_id = pad, eos
    model._prepare_special_tokens(cfg, kwargs_has_attention_mask=False, device="cpu")
    hf = model._prepare_attention_mask_for_generation(ids, cfg, {})
    params = runtime.sampling.resolve(model, do_sample=False, temperature=None, top_k=None, top_p=None,
                                      eos_token_id=eos, pad_token_id=pad)
    if bool((hf[:, -1] == 0).any()):
        with pytest.raises(runtime.GenerateError, match="ends with the pad token"):
            inferred_attention_mask(ids, params)
        return
    mine = inferred_attention_mask(ids, params)
    assert torch.equal(hf, torch.ones_like(ids)) if mine is None else torch.equal(mine, hf)
