"""fxopt.latent.calibration: the statistics collect_calibration measures on tiny GPTNeoX models,
each checked against an independent computation -- the input second moments, the loss-gradient
second moments (against ``retain_grad`` on a copy of the model), the attention weights (against HF's
eager attention) and the attention-averaged input second moments; left-padded batches; the user's
model left as it was (no hooks, no ``.grad``, same weights)."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxopt.latent import (LatentKVError, attention_shape_of, attention_weights_of, collect_calibration, split_qkv,
                          stacked_rows)
from fxopt.models.hf import tiny_gpt_neox


def _model(rotary_pct=0.25, parallel=True, seed=0, impl="sdpa"):
    m = tiny_gpt_neox(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, rotary_pct=rotary_pct,
                      parallel_residual=parallel, attention_bias=True, attn_implementation=impl, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # HF initialises biases to zero: make them matter
        for layer in m.gpt_neox.layers:
            lin = layer.attention.query_key_value
            lin.bias.copy_(0.3 * torch.randn(lin.bias.shape, generator=g))
    return m.eval()


def _batch(pads=(0, 2, 5), length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (len(pads), length), generator=g)
    mask = torch.ones_like(ids)
    for row, p in enumerate(pads):
        mask[row, :p] = 0
        ids[row, :p] = 0
    return ids, mask


def _reference(model, ids, mask):
    """Per layer: the qkv inputs x (b, L, d), the loss gradients w.r.t. the qkv outputs (b, L, 3d) by
    retain_grad on a copy of the model (a different mechanism from collect_calibration's), and HF's
    own eager attention weights (b, H, L, L)."""
    m = copy.deepcopy(model)
    m.config._attn_implementation = "eager"
    xs, outs = {}, {}

    def hook(i):
        def f(_mod, args, out):
            xs[i] = args[0].detach()
            out.retain_grad()
            outs[i] = out
        return f

    for i, layer in enumerate(m.gpt_neox.layers):
        layer.attention.query_key_value.register_forward_hook(hook(i))
    res = m(input_ids=ids, attention_mask=mask, use_cache=False, output_attentions=True)
    valid = mask.bool()
    pair = valid[:, :-1] & valid[:, 1:]
    lp = torch.log_softmax(res.logits[:, :-1].double(), -1)
    nll = -lp.gather(-1, ids[:, 1:, None])[..., 0]
    (nll * pair).sum().backward()
    return xs, {i: o.grad for i, o in outs.items()}, [a.detach() for a in res.attentions]


def _grams_from(xs, grads, attns, mask, shape):
    valid = mask.bool()
    n = int(valid.sum())
    rows = stacked_rows(shape)
    G, S, V = [], [], []
    for i in sorted(xs):
        x = xs[i].double()[valid]
        G.append(x.T @ x / n)
        g = grads[i].double()[..., rows][valid]
        S.append(g.T @ g / n)
        xbar = torch.matmul(attns[i].double(), xs[i].double()[:, None])  # (b, H, L, d)
        V.append(torch.stack([xbar[:, h][valid].T @ xbar[:, h][valid] / n for h in range(shape.heads)]))
    return G, S, V


def _close(a, b, rtol=2e-5):
    scale = float(b.abs().max())
    return bool((a - b).abs().max() <= rtol * scale + 1e-30)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**10), rotary_pct=st.sampled_from([0.25, 0.5, 1.0]), parallel=st.booleans(),
       pads=st.sampled_from([(0, 0), (0, 3), (4, 1, 0)]))
def test_statistics_match_an_independent_computation(seed, rotary_pct, parallel, pads):
    """Input, loss-gradient and attention-averaged input second moments equal the ones computed from
    HF's eager attention weights and retain_grad gradients (padding excluded everywhere), for any
    rotary width, residual form and left padding; the SDPA model is measured (HF's attention weights
    come from an eager copy)."""
    model = _model(rotary_pct, parallel, seed)
    ids, mask = _batch(pads, seed=seed)
    shape = attention_shape_of(model)
    cal = collect_calibration(model, ids, mask, batch_size=2, gradients=True, value_inputs=True)
    G, S, V = _grams_from(*_reference(model, ids, mask), mask, shape)
    assert cal.tokens == int(mask.sum())
    for i in range(2):
        assert _close(cal.grams[i], G[i]) and _close(cal.grad_grams[i], S[i]) and _close(cal.value_grams[i], V[i])


def test_stacked_rows_are_M_and_attention_weights_are_hf_eager():
    """The rows collect_calibration reads the gradients at are M's rows (``x M^T + b``), not the
    blocked [Q; K; V] rows of other models (look-alike); the recomputed attention weights are HF's,
    and head h's attention output is ``M_v,h xbar + b_v,h`` (what the v refit relies on)."""
    model = _model(0.25, True, 3, impl="eager")
    shape = attention_shape_of(model)
    ids, mask = _batch((0, 3), seed=3)
    caught = {}

    def grab(i):
        def f(_mod, args, kwargs):
            caught[("rot", i)] = kwargs["position_embeddings"]
        return f

    hs = [layer.attention.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(model.gpt_neox.layers)]
    hs += [layer.attention.query_key_value.register_forward_hook(
        lambda _m, a, o, i=i: caught.__setitem__(("qkv", i), (a[0].detach(), o.detach())))
        for i, layer in enumerate(model.gpt_neox.layers)]
    hs += [layer.attention.dense.register_forward_pre_hook(lambda _m, a, i=i: caught.__setitem__(("o", i), a[0].detach()))
           for i, layer in enumerate(model.gpt_neox.layers)]
    with torch.no_grad():
        res = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    for h in hs:
        h.remove()
    valid = mask.bool()
    for i, layer in enumerate(model.gpt_neox.layers):
        qkv = layer.attention.query_key_value
        x, out = caught[("qkv", i)]
        sp = split_qkv(qkv.weight.detach(), qkv.bias.detach(), shape)
        torch.testing.assert_close(out[..., stacked_rows(shape)], x @ sp.stacked().T + sp.stacked_bias(), rtol=1e-5, atol=1e-5)
        blocked = torch.arange(shape.hidden, 3 * shape.hidden)[: stacked_rows(shape).numel()]
        assert not torch.allclose(out[..., blocked], x @ sp.stacked().T + sp.stacked_bias(), atol=1e-3)
        cos, sin = caught[("rot", i)]
        p = attention_weights_of(out, cos, sin, shape, float(layer.attention.scaling), valid)
        q_rows = valid[:, None, :, None]
        torch.testing.assert_close(p * q_rows, res.attentions[i] * q_rows, rtol=1e-5, atol=1e-6)
        xbar = torch.matmul(p, x[:, None])  # (b, H, L, d)
        o = torch.einsum("bhld,hed->bhle", xbar, sp.v_weight) + sp.v_bias[None, :, None, :]
        o_hf = caught[("o", i)].view(*ids.shape, shape.heads, shape.head_dim).transpose(1, 2)
        torch.testing.assert_close(o[valid[:, None].expand_as(o[..., 0])], o_hf[valid[:, None].expand_as(o_hf[..., 0])],
                                   rtol=1e-5, atol=1e-5)


def test_value_statistics_differ_from_input_statistics():
    """Look-alike: the attention-averaged inputs' second moment is not the inputs' own (averaging
    over tokens shrinks the directions that vary from token to token), except at the first
    position, which attends only to itself."""
    model = _model(seed=1)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    cal = collect_calibration(model, ids, value_inputs=True)
    G, V = cal.grams[1], cal.value_grams[1]
    assert float(torch.trace(V[0])) < 0.95 * float(torch.trace(G))
    first = collect_calibration(model, ids[:, :1], value_inputs=True)
    assert _close(first.value_grams[1][0], first.grams[1], 1e-6) and _close(first.value_grams[1][1], first.grams[1], 1e-6)


def test_collection_leaves_the_model_untouched():
    model = _model(seed=2)
    ids, mask = _batch(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    frozen = copy.deepcopy(model).requires_grad_(False)

    def hooks(m):
        return [(len(l.attention._forward_pre_hooks), len(l.attention.query_key_value._forward_hooks))
                for l in m.gpt_neox.layers]

    with torch.no_grad():  # gradients are still taken inside
        cal = collect_calibration(model, ids, mask, gradients=True, value_inputs=True)
    cal_frozen = collect_calibration(frozen, ids, mask, gradients=True)  # parameters that need no grad work too
    assert all(p.grad is None for p in model.parameters()) and all(p.grad is None for p in frozen.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags and not any(p.requires_grad for p in frozen.parameters())
    assert hooks(model) == [(0, 0), (0, 0)] and hooks(frozen) == [(0, 0), (0, 0)]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert float(torch.trace(cal.grad_grams[0])) > 0 and _close(cal_frozen.grad_grams[0], cal.grad_grams[0], 1e-6)
    inputs_only = cal.inputs_only()
    assert inputs_only.grad_grams is None and inputs_only.value_grams is None and inputs_only.grams is cal.grams


def test_collection_errors():
    model = _model()
    with pytest.raises(LatentKVError, match=">= 2 tokens"):
        collect_calibration(model, torch.ones(2, 1, dtype=torch.long), gradients=True)
    with pytest.raises(LatentKVError, match="integer tensor"):
        collect_calibration(model, torch.ones(2, 3))
    with pytest.raises(LatentKVError, match="must match"):
        collect_calibration(model, torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(LatentKVError, match="no tokens"):
        collect_calibration(model, torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(LatentKVError, match="GPTNeoXForCausalLM"):
        collect_calibration(torch.nn.Linear(2, 2), torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(LatentKVError, match="language-model head"):
        collect_calibration(_NoHead(model), torch.ones(1, 3, dtype=torch.long), gradients=True)


class _NoHead(torch.nn.Module):
    """A GPTNeoX body without the language-model head: no loss to take gradients of."""

    def __init__(self, model):
        super().__init__()
        self.gpt_neox = model.gpt_neox

    def forward(self, **kw):
        return self.gpt_neox(**kw)
