"""fxopt.runtime.generate for HF Mamba: prompts long enough for optimize's length templates, the
decode step through the fused ssm_update ops, tokens equal to HF's generate."""
from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt import runtime
from fxopt.models.hf import tiny_hf_mamba
from fxopt.ops.ssm_update import CONV_STATE_UPDATE, SELECTIVE_STATE_UPDATE
from fxopt.runtime.engine import runtime_for


def scrambled_mamba(seed: int = 0, std: float = 0.3, **overrides):
    """A tiny HF Mamba whose projections have larger random weights: HF's init makes a random tiny
    Mamba repeat one token forever, which would make token comparisons weak."""
    model = tiny_hf_mamba(seed=seed, **overrides)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() >= 2 and "conv1d" not in name:
                p.normal_(0.0, std, generator=g)
    return model


def _hf(model, ids, mask=None, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, **kw)


@pytest.fixture(scope="module")
def mamba():
    model = scrambled_mamba()
    opt = fxopt.optimize(model, (torch.randint(0, 128, (1, 8)),))
    return model, opt


def test_greedy_equals_hf_with_length_templates(mamba):
    model, opt = mamba
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    out = runtime.generate(opt, ids, max_new_tokens=12, eos_token_id=None)
    ref = _hf(model, ids, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, ref)
    assert len(set(out[0, 40:].tolist())) > 4
    rt = runtime_for(opt)
    notes = " ".join(rt.stats.notes)
    assert "length-generic: graph instantiated at L=40" in notes  # the prefill used the template
    dec = rt.decode_graph(2, runtime.cache_length(52))
    targets = [n.target for n in dec.gm.graph.nodes]
    assert targets.count(SELECTIVE_STATE_UPDATE) == 2 and targets.count(CONV_STATE_UPDATE) == 2
    # again, other prompts of the same shape: no graph is built, same tokens as HF
    built = len(rt.stats.built)
    ids2 = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    out2 = runtime.generate(opt, ids2, max_new_tokens=12, eos_token_id=None)
    assert len(rt.stats.built) == built
    assert torch.equal(out2, _hf(model, ids2, max_new_tokens=12, eos_token_id=None, pad_token_id=0))
    # eos / pad: a finished row is padded, as HF does
    eos = int(out2[1, 40 + 3])
    out3 = runtime.generate(opt, ids2, max_new_tokens=12, eos_token_id=eos, pad_token_id=5)
    assert torch.equal(out3, _hf(model, ids2, max_new_tokens=12, eos_token_id=eos, pad_token_id=5))
    # the decode graph and the cache do not depend on the length bucket (Mamba's state has no t)
    out4 = runtime.generate(opt, ids2, max_new_tokens=40, eos_token_id=None)
    assert len(rt.stats.built) == built
    assert torch.equal(out4, _hf(model, ids2, max_new_tokens=40, eos_token_id=None, pad_token_id=0))


def test_short_prompt_with_padding_mask(mamba):
    model, opt = mamba
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    out = runtime.generate(opt, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(out, _hf(model, ids, mask, max_new_tokens=6, eos_token_id=None, pad_token_id=0))


def test_cache_bytes_mamba(mamba):
    model, opt = mamba
    cfg = model.config
    d = cfg.intermediate_size
    expect = cfg.num_hidden_layers * 3 * (d * cfg.conv_kernel * 4 + d * cfg.state_size * 4)
    assert runtime.cache_bytes(opt, 3, 100) == expect == runtime.cache_bytes(opt, 3, 5000)
