"""Peeling more than one leading layer (issue 14): HF Mamba in bf16 with the block passes.

With ``BLOCK_PASSES`` the region that fuses layer i-1's residual add with layer i's RMSNorm sits
in layer i. In bf16 (``residual_in_fp32``) layer 1's region reads the bf16 embeddings (a cast to
fp32 inside the region) and every later layer's reads an fp32 residual, while layer 0 has no add
at all: layers 0 and 1 both differ from the repeating body. In fp32 the cast is not there and
only layer 0 differs. The template then peels the fewest leading layers that make the rest
repeat (at most ``layer_generic.MAX_PEEL``), every check kept: each probe holds the peeled
layers as themselves, the predicted graphs must equal the captured ones, and the whole model's
op stream is verified (so a layer no probe holds that does something else is still refused).
"""
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.models.mamba import modeling_mamba

import fxopt
from fxopt import layer_generic as lyr
from fxopt import length_generic as lg
from fxopt.graph_utils import op_name
from fxopt.models.hf import tiny_gpt_neox, tiny_hf_mamba
from fxopt.registry import BLOCK_PASSES


def _note(opt) -> str:
    return opt.report().notes[0] if opt.report().notes else ""


def _peel(opt) -> int | None:
    """Leading layers the layer template peeled (0: plain template), None: no template."""
    note = _note(opt)
    if not note.startswith("layer-generic: graph for"):
        return None
    if "first layer peeled" in note:
        return 1
    m = re.search(r"first (\d+) layers peeled", note)
    return int(m.group(1)) if m else 0


def _ops(gm):
    return [(n.op, op_name(n), len(n.args)) for n in gm.graph.nodes
            if n.op != "get_attr" and not (n.op == "call_module" and n.target == "_guards_fn")]


def _mamba(dtype, n=6):
    torch.manual_seed(0)
    return tiny_hf_mamba(num_hidden_layers=n, residual_in_fp32=True).to(dtype).eval()


# ------------------------------------------------------------------ HF Mamba with the block passes

@pytest.mark.parametrize("dtype,peel", [(torch.bfloat16, 2), (torch.float32, 1)], ids=["bf16", "fp32"])
def test_block_passes_mamba_uses_a_peeled_template_equal_to_a_whole_capture(dtype, peel):
    model = _mamba(dtype)
    ids = torch.randint(0, 128, (2, 8))
    opt = fxopt.optimize(model, (ids,), passes=BLOCK_PASSES)
    assert _peel(opt) == peel, opt.report().notes
    note = _note(opt)
    if peel == 2:  # the report says which layers were peeled and why
        assert "first 2 layers peeled (layers 0-1 as captured, layers 2-5 repeat one block; layers 0-1 differ: " in note
        assert "layer 1 of the 2-layer graph differs from its layer 0" in note
        assert "peeling the first layer not tried: layer 2 of the 3-layer graph differs" in note
        assert "captures with [3, 4, 5] of them" in note
    assert "op stream of all 6 layers verified" in note
    ref = fxopt.optimize(model, (ids,), passes=BLOCK_PASSES, layer_templates=False)
    assert _peel(ref) is None
    assert _ops(opt.graph_module) == _ops(ref.graph_module)
    assert opt.report().matches == ref.report().matches and opt.report().matches["fused_regions"] > 0
    assert torch.equal(opt(ids).logits, ref(ids).logits)
    # every layer reads its own parameters: the peeled ones too
    gm = opt.graph_module
    for i in range(6):
        w = f"backbone.layers.{i}.mixer.out_proj.weight"
        assert gm.get_parameter(w) is model.backbone.layers[i].mixer.out_proj.weight


def test_block_passes_neox_still_templates():
    torch.manual_seed(0)
    model = tiny_gpt_neox(True, num_hidden_layers=6).eval()
    ids = torch.randint(0, 128, (2, 8))
    opt = fxopt.optimize(model, (ids,), passes=BLOCK_PASSES)
    assert _peel(opt) is not None, opt.report().notes
    ref = fxopt.optimize(model, (ids,), passes=BLOCK_PASSES, layer_templates=False)
    assert torch.equal(opt(ids).logits, ref(ids).logits)


# Look-alikes: HF Mamba bf16 blocks that really differ. A block class that applies ``post`` to its
# output (every layer the same function: the template stands) or halves layer 4's output by its
# index: with the peel-2 probes [0, 1, 5], [0, 1, 3, 5], [0, 1, 2, 3, 5] no probe holds layer 4,
# and only the whole model's op stream can show it.

def _keep(x):
    return x


def _halve(x):
    return x * 0.5


class _PostBlock(modeling_mamba.MambaBlock):
    def forward(self, hidden_states, *args, **kwargs):
        out = super().forward(hidden_states, *args, **kwargs)
        return self.post(out)


class _IndexBlock(modeling_mamba.MambaBlock):
    def forward(self, hidden_states, *args, **kwargs):
        out = super().forward(hidden_states, *args, **kwargs)
        return out * 0.5 if self.layer_idx == 4 else out


def _odd_mamba(cls, posts=None):
    model = _mamba(torch.bfloat16)
    for i, layer in enumerate(model.backbone.layers):
        layer.__class__ = cls
        if posts is not None:
            layer.post = posts[i]
    return model


def test_same_callable_in_every_layer_still_templates():
    model = _odd_mamba(_PostBlock, [_keep] * 6)
    ids = torch.randint(0, 128, (1, 8))
    opt = fxopt.optimize(model, (ids,), passes=BLOCK_PASSES)
    assert _peel(opt) == 2, opt.report().notes
    assert torch.equal(opt(ids).logits, fxopt.optimize(model, (ids,), passes=BLOCK_PASSES, layer_templates=False)(ids).logits)


def test_a_layer_with_another_callable_is_refused():
    model = _odd_mamba(_PostBlock, [_keep] * 4 + [_halve, _keep])
    ids = torch.randint(0, 128, (1, 8))
    opt = fxopt.optimize(model, (ids,), passes=BLOCK_PASSES)
    assert _peel(opt) is None
    assert "layers differ in attribute backbone.layers.<i>.post" in _note(opt), opt.report().notes
    ref = fxopt.optimize(model, (ids,), passes=BLOCK_PASSES, layer_templates=False)
    assert torch.equal(opt(ids).logits, ref(ids).logits)


def test_an_unprobed_layer_branching_on_its_index_is_refused_by_the_op_stream():
    model = _odd_mamba(_IndexBlock)
    ids = torch.randint(0, 128, (1, 8))
    seen = []

    def optimize_at(module, args, kwargs):
        seen.append([layer.layer_idx for layer in module.backbone.layers])
        return fxopt.capture(module, args, kwargs)

    # the graph template alone fits (no probe holds layer 4) ...
    t = lyr.build_layer_template(optimize_at, model, (ids,), {}, "backbone.layers", 6)
    assert t.peel == 1 and all(4 not in s for s in seen)  # (no passes here: only layer 0 differs)
    # ... and optimize() still refuses it: the op stream of all layers shows layer 4
    opt = fxopt.optimize(model, (ids,), passes=BLOCK_PASSES)
    assert _peel(opt) is None
    assert "op stream" in _note(opt) and "layer-generic template not used" in _note(opt), opt.report().notes
    ref = fxopt.optimize(model, (ids,), passes=BLOCK_PASSES, layer_templates=False)
    assert torch.equal(opt(ids).logits, ref(ids).logits)


# ------------------------------------------------------------------ which layers a probe holds

@settings(max_examples=200, deadline=None)
@given(n=st.integers(4, 64), peel=st.integers(0, lyr.MAX_PEEL), extra=st.integers(1, 3))
def test_probes_hold_the_peeled_layers_in_place(n, peel, extra):
    k = peel + extra
    if k >= n:
        return
    sel = lyr._probe_layers(n, k, peel)
    assert len(sel) == len(set(sel)) == k and all(0 <= i < n for i in sel) and sel == sorted(sel)
    assert sel[:peel] == list(range(peel))  # a peeled layer is copied verbatim: it must be itself
    if peel and extra == 3 and n > peel + 3 + 1:
        assert peel in sel and n - 1 in sel  # the first repeated layer and the last are probed


# ------------------------------------------------------------------ the fewest peeled layers

class _Layer(nn.Module):
    def __init__(self, i: int, special: tuple[int, ...]):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.idx, self.special = i, special  # the same tuple in every layer: only the index differs

    def forward(self, x):
        y = x + torch.tanh(self.lin(x))
        return y * (2.0 + self.idx) if self.idx in self.special else y


class _Stack(nn.Module):
    def __init__(self, n: int, special: tuple[int, ...]):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([_Layer(i, special) for i in range(n)])
        self.head = nn.Linear(8, 16)

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(6, 8), lead=st.integers(0, 3), odd=st.one_of(st.none(), st.integers(2, 7)))
def test_peels_the_fewest_leading_layers_and_never_hides_a_differing_layer(n, lead, odd):
    special = tuple(sorted(set(range(lead)) | ({odd} if odd is not None and odd < n else set())))
    torch.manual_seed(0)
    model = _Stack(n, special).eval()
    ids = torch.randint(0, 16, (2, 8))
    opt = fxopt.optimize(model, (ids,), passes=[])
    assert torch.equal(opt(ids), model(ids))
    peel = _peel(opt)
    if peel is not None:  # every differing layer is a peeled one, copied as captured
        assert set(special) <= set(range(peel)), (special, opt.report().notes)
    if special in ((), (0,), (0, 1)):  # the leading layers alone differ: the fewest peeled
        assert peel == len(special), (special, opt.report().notes)


def test_three_leading_layers_that_differ_are_refused():
    torch.manual_seed(0)
    model = _Stack(7, (0, 1, 2)).eval()
    ids = torch.randint(0, 16, (2, 8))
    with pytest.raises(lg.TemplateMismatch, match="with the first 2 layers peeled: layer 2 of the 5-layer graph differs"):
        lyr.build_layer_template(lambda m, a, k: fxopt.capture(m, a, k), model, (ids,), {}, "layers", 7)
    opt = fxopt.optimize(model, (ids,), passes=[])
    assert _peel(opt) is None and torch.equal(opt(ids), model(ids))
