"""Layer-generic templates: deep models are optimized from proxies holding 1-3 layers."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from torch import nn

import fxopt
from fxopt import layer_generic as lyr
from fxopt import length_generic as lg
from fxopt.graph_utils import op_name
from fxopt.inspection import graph_diff
from fxopt.models.hf import tiny_gpt_neox, tiny_hf_mamba
from fxopt.models.seed_mamba import seed_mamba

MODELS = {
    "neox_parallel": (lambda: tiny_gpt_neox(True, num_hidden_layers=6), "gpt_neox.layers", 6, 128),
    "neox_serial": (lambda: tiny_gpt_neox(False, num_hidden_layers=5), "gpt_neox.layers", 5, 128),
    "hf_mamba": (lambda: tiny_hf_mamba(num_hidden_layers=6), "backbone.layers", 6, 128),
    "seed_mamba": (lambda: seed_mamba(n_layer=5), "layers", 5, 256),
    # residual_in_fp32 in bf16: layer 0 casts the bf16 embeddings to an fp32 residual, the
    # others receive one. Layer 0 differs from the others: the template peels it.
    "hf_mamba_bf16": (lambda: tiny_hf_mamba(num_hidden_layers=6, residual_in_fp32=True).to(torch.bfloat16),
                      "backbone.layers", 6, 128),
}
PEELED = {"hf_mamba_bf16"}


def _out(x):
    return x.logits if hasattr(x, "logits") else x


def _used_layers(opt):
    return any(n.startswith("layer-generic: graph for") for n in opt.report().notes)


def _peeled(opt):
    return any(n.startswith("layer-generic: graph for") and "first layer peeled" in n for n in opt.report().notes)


def _ops(gm):
    """What the graph computes, in order (names, get_attrs and export's guard aside)."""
    return [(n.op, op_name(n), len(n.args)) for n in gm.graph.nodes
            if n.op not in ("get_attr",) and not (n.op == "call_module" and n.target == "_guards_fn")]


@pytest.mark.parametrize("name", list(MODELS))
def test_find_layer_stack(name):
    build, path, n, _ = MODELS[name]
    assert lyr.find_layer_stack(build()) == (path, n)


def test_shallow_models_have_no_stack():
    assert lyr.find_layer_stack(tiny_gpt_neox(num_hidden_layers=2)) is None


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("passes", [None, []], ids=["default", "nopasses"])
def test_short_sequences_same_graph_as_full_capture(name, passes):
    build, path, n, vocab = MODELS[name]
    model = build()
    ids = torch.randint(0, vocab, (2, 6))
    opt = fxopt.optimize(model, (ids,), passes=passes)
    assert _used_layers(opt), opt.report().notes
    assert _peeled(opt) == (name in PEELED), opt.report().notes
    ref = fxopt.optimize(model, (ids,), passes=passes, layer_templates=False)
    assert not _used_layers(ref)
    assert _ops(opt.graph_module) == _ops(ref.graph_module)
    assert opt.report().matches == ref.report().matches
    assert opt.report().nodes_captured == ref.report().nodes_captured
    got = _out(opt(ids))
    assert torch.equal(got, _out(ref(ids)))
    if passes == []:  # the passes may round differently from eager (addcmul), never from a full capture
        assert torch.equal(got, _out(model(ids)))
    # block i reads layer i's parameters and is labelled as layer i
    depth = len(path.split("."))
    layer = lambda p: p.split(".")[depth] if p.startswith(path + ".") else None
    seen = set()
    for node in opt.graph_module.graph.nodes:
        reads = {layer(str(a.target)) for a in node.all_input_nodes if a.op == "get_attr"} - {None}
        if reads:
            assert reads == {layer(p) for p, _ in node.meta["nn_module_stack"].values()} - {None}, node.format_node()
        seen |= reads
    assert seen == {str(i) for i in range(n)}


@pytest.mark.parametrize("name,passes", [
    ("neox_serial", []), ("hf_mamba", None), ("seed_mamba", None), ("hf_mamba", []),
], ids=["neox_serial-nopasses", "hf_mamba-default", "seed_mamba-default", "hf_mamba-nopasses"])
def test_long_sequences_compose_with_length_templates(name, passes):
    build, _, n, vocab = MODELS[name]
    model = build()
    ids = torch.randint(0, vocab, (1, 33))
    opt = fxopt.optimize(model, (ids,), passes=passes)
    notes = opt.report().notes
    assert _used_layers(opt), notes
    assert _peeled(opt) == (name in PEELED), notes
    if "mamba" in name and passes == []:  # unrolled scan: length template refused, layers at L=33
        assert any("length-generic template not used" in x for x in notes), notes
    else:  # the length template's three probes each came from layer templates
        assert any(x.startswith("length-generic: graph instantiated") for x in notes), notes
    if "mamba" in name and passes is None:
        assert opt.report().matches["scan"] == n
    # seed Mamba's scan and passes=[] are bit-exact with eager; else compare with a full capture
    exact = passes == [] or name == "seed_mamba"
    ref = model if exact else fxopt.optimize(model, (ids,), passes=passes, layer_templates=False)
    assert torch.equal(_out(opt(ids)), _out(ref(ids)))


def test_user_model_is_never_modified_and_graphs_are_inspectable():
    model = tiny_gpt_neox(num_hidden_layers=6)
    ids = torch.randint(0, 128, (1, 8))
    before_out = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    containers = {name: (m, m._modules, dict(m._modules)) for name, m in model.named_modules()}
    proxy = lyr.truncated_proxy(model, "gpt_neox.layers", [0, 5])
    assert len(proxy.gpt_neox.layers) == 2 and proxy.gpt_neox.layers[1] is model.gpt_neox.layers[5]
    assert proxy.gpt_neox.embed_in is model.gpt_neox.embed_in and proxy.lm_head.weight is model.lm_head.weight
    opt = fxopt.optimize(model, (ids,))
    assert _used_layers(opt)
    assert len(model.gpt_neox.layers) == 6
    assert {name for name, _ in model.named_modules()} == set(containers)
    for name, m in model.named_modules():
        mod, modules, content = containers[name]
        assert m is mod and m._modules is modules and m._modules == content
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(ids).logits, before_out)
    # the rewritten graph shares the model's parameters
    gm = opt.graph_module
    assert gm.get_parameter("gpt_neox.layers.5.attention.dense.weight") is model.gpt_neox.layers[5].attention.dense.weight
    # original_graph_module: the probes' captures, fitted and instantiated at full depth
    before = opt.original_graph_module
    assert sum(op_name(n) == "aten.linear.default" for n in before.graph.nodes) == 4 * 6 + 1
    # capture drops export's input guard (and graph_utils.node_count would not count it): counts agree
    assert opt.report().nodes_captured == len(before.graph.nodes)
    assert torch.equal(before(ids).logits, model(ids).logits)
    diff = graph_diff(before, opt.graph_module)
    matches = opt.report().matches
    # every match is one rewrite of the diff; cleanup's only delete (export's checks, identity
    # casts): the engine's erasure record attributes them, with nothing added
    assert len(diff.rewrites) == sum(matches.values()) and diff.unattributed_removed == []
    cleaned = matches.pop("cleanup")
    assert sum(1 for rw in diff.rewrites if not rw.added) == cleaned
    assert sum(1 for rw in diff.rewrites if rw.added) == sum(matches.values()) == 6 * 3
    assert cleaned >= 1 and sum(n.startswith("_assert_tensor_metadata") for n in diff.removed) >= 1


# ------------------------------------------------------------------ layers that differ

class _Layer(nn.Module):
    def __init__(self, i: int, n: int, mode: str):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.idx, self.n, self.mode = i, n, mode
        self.halve = mode == "flag" and i % 3 == 2

    def forward(self, x):
        y = x + torch.tanh(self.lin(x))
        if self.halve:
            y = y * 0.5
        if self.mode == "last" and self.idx == self.n - 1:
            y = y * 0.5
        if self.mode == "third" and self.idx % 3 == 2:
            y = y - 1.0
        if self.mode in ("first", "first_last", "first_two") and self.idx == 0:
            y = y * 2.0
        if self.mode == "first_last" and self.idx == self.n - 1:
            y = y * 0.5
        if self.mode == "first_two" and self.idx == 1:
            y = y * 0.5
        return y


class _Stack(nn.Module):
    def __init__(self, n: int = 6, mode: str = "same", collect: bool = False, odd_one: bool = False):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([_Layer(i, n, mode) for i in range(n)])
        if odd_one:
            self.layers[3].lin = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 16)
        self.collect = collect

    def forward(self, ids):
        x, hidden = self.emb(ids), []
        for layer in self.layers:
            x = layer(x)
            hidden.append(x)
        return self.head(torch.stack(hidden).sum(0) if self.collect else x)


def _stack(**kw):
    torch.manual_seed(0)
    return _Stack(**kw).eval()


def test_identical_custom_layers_use_the_template():
    model = _stack()
    ids = torch.randint(0, 16, (2, 8))
    opt = fxopt.optimize(model, (ids,), passes=[])
    assert _used_layers(opt)
    assert torch.equal(opt(ids), model(ids))


@pytest.mark.parametrize("mode,why", [
    ("flag", "layers differ in attribute layers.<i>.halve"),        # every 3rd layer, by a flag
    ("last", "layer 1 of the 2-layer graph differs"),              # last layer, by its index
    ("third", "layer 1 of the 2-layer graph differs"),             # every 3rd layer, by its index
])
def test_layers_that_behave_differently_fall_back(mode, why):
    model = _stack(mode=mode)
    ids = torch.randint(0, 16, (2, 8))
    opt = fxopt.optimize(model, (ids,), passes=[])
    assert not _used_layers(opt)
    assert any(n.startswith("layer-generic template not used") and why in n for n in opt.report().notes), opt.report().notes
    assert torch.equal(opt(ids), model(ids))


def test_suffix_reading_every_layer_falls_back():
    model = _stack(collect=True)
    ids = torch.randint(0, 16, (2, 8))
    opt = fxopt.optimize(model, (ids,), passes=[])
    assert not _used_layers(opt)
    assert any("layer-generic template not used" in n for n in opt.report().notes)
    assert torch.equal(opt(ids), model(ids))


def test_structurally_different_layers_are_not_a_stack():
    model = _stack(odd_one=True)
    assert lyr.find_layer_stack(model) is None
    ids = torch.randint(0, 16, (2, 8))
    opt = fxopt.optimize(model, (ids,), passes=[])
    assert not _used_layers(opt)
    assert torch.equal(opt(ids), model(ids))


def test_build_layer_template_unit():
    model = _stack(n=5)
    ids = torch.randint(0, 16, (2, 8))
    seen = []

    def optimize_at(module, args, kwargs):
        seen.append(len(module.layers))
        return fxopt.capture(module, args, kwargs)

    t = lyr.build_layer_template(optimize_at, model, (ids,), {}, "layers", 5)
    assert seen == [2, 1, 3] and len(model.layers) == 5  # the 2-layer proxy first: do its layers differ?
    assert t.carry.count(None) == len(t.carry) - 1  # one carried input: the hidden state
    assert t.ks == (1, 2, 3) and t.peel == 0
    gm = t.instantiate(5, (ids,), {})
    assert torch.equal(gm(ids), model(ids))
    assert sum(op_name(n) == "aten.tanh.default" for n in gm.graph.nodes) == 5
    with pytest.raises(lg.TemplateMismatch, match="layers differ in attribute"):
        lyr.build_layer_template(optimize_at, _stack(mode="flag"), (ids,), {}, "layers", 6)


def test_layer_templates_off():
    model = _stack()
    ids = torch.randint(0, 16, (2, 8))
    opt = fxopt.optimize(model, (ids,), passes=[], layer_templates=False)
    assert not _used_layers(opt) and not opt._layer_templates


class _ConfiguredStack(_Stack):
    """HF style: what a layer does is looked up in a per-layer config list by index."""

    class _Cfg:
        def __init__(self, n):
            self.layer_types = ["plain"] * (n - 2) + ["scaled", "plain"]

    def __init__(self, n: int = 6):
        super().__init__(n)
        self.config = self._Cfg(n)

    def forward(self, ids):
        x = self.emb(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.config.layer_types[i] == "scaled":  # layer n-2: no probed layer index
                x = x * 0.5
        return self.head(x)


def test_per_layer_config_list_falls_back():
    torch.manual_seed(0)
    model = _ConfiguredStack().eval()
    ids = torch.randint(0, 16, (2, 8))
    opt = fxopt.optimize(model, (ids,), passes=[])
    assert not _used_layers(opt)
    assert any("config.layer_types varies per layer" in n for n in opt.report().notes), opt.report().notes
    assert torch.equal(opt(ids), model(ids))


# ------------------------------------------------------------------ a peeled first layer

def test_only_first_layer_differs_peels_it():
    model = _stack(mode="first")  # only layer 0 doubles its output
    ids = torch.randint(0, 16, (2, 8))
    opt = fxopt.optimize(model, (ids,), passes=[])
    assert _peeled(opt), opt.report().notes
    assert "captures with [2, 3, 4] of them" in opt.report().notes[0]
    assert torch.equal(opt(ids), model(ids))
    assert opt.report().nodes_captured == fxopt.optimize(model, (ids,), passes=[], layer_templates=False).report().nodes_captured
    gm = opt.graph_module
    assert sum(op_name(n) == "aten.tanh.default" for n in gm.graph.nodes) == 6
    assert gm.get_parameter("layers.4.lin.weight") is model.layers[4].lin.weight
    before = opt.original_graph_module  # the captures' peeled template at full depth
    assert _ops(before) == _ops(gm) and torch.equal(before(ids), model(ids))
    # the builder: the 2-layer proxy's layers differ, so no 1-layer proxy; 2, 3 and 4 layers
    seen = []

    def optimize_at(module, args, kwargs):
        seen.append([module.layers[j].idx for j in range(len(module.layers))])
        return fxopt.capture(module, args, kwargs)

    t = lyr.build_layer_template(optimize_at, model, (ids,), {}, "layers", 6)
    assert seen == [[0, 5], [0, 3, 5], [0, 1, 3, 5]]
    assert t.peel == 1 and t.ks == (2, 3, 4) and "layer 1 of the 2-layer graph differs from its layer 0" in t.peel_reason
    assert torch.equal(t.instantiate(6, (ids,), {})(ids), model(ids))
    seen.clear()
    t = lyr.build_layer_template(optimize_at, model, (ids,), {}, "layers", 6, ks=(1, 2))  # later length probes
    assert t.peel == 1 and t.ks == (2, 3) and len(seen) == 2
    assert torch.equal(t.instantiate(6, (ids,), {})(ids), model(ids))
    with pytest.raises(lg.TemplateMismatch, match="peeling the first layer needs more than 4 layers"):
        lyr.build_layer_template(optimize_at, _stack(n=4, mode="first"), (ids,), {}, "layers", 4)


@pytest.mark.parametrize("mode,why", [
    # layer n-1 differs too: the 3-layer graph shows layers 3 and 5 differ; no 4-layer probe
    ("first_last", "layer 1 of the 2-layer graph differs from its layer 0"),
])
def test_first_and_another_layer_differ_falls_back(mode, why):
    model = _stack(mode=mode)
    ids = torch.randint(0, 16, (2, 8))
    opt = fxopt.optimize(model, (ids,), passes=[])
    assert not _used_layers(opt)
    assert any(n.startswith("layer-generic template not used") and why in n for n in opt.report().notes), opt.report().notes
    assert torch.equal(opt(ids), model(ids))


def test_first_two_layers_differ_peels_both():
    # layer 1 differs too: the 4-layer probe [0, 1, 3, 5] shows it, and layers 2.. repeat. Two
    # leading layers peeled (lyr.MAX_PEEL), each probe holding layers 0 and 1 as themselves.
    model = _stack(mode="first_two")
    ids = torch.randint(0, 16, (2, 8))
    seen = []

    def optimize_at(module, args, kwargs):
        seen.append([module.layers[j].idx for j in range(len(module.layers))])
        return fxopt.capture(module, args, kwargs)

    t = lyr.build_layer_template(optimize_at, model, (ids,), {}, "layers", 6)
    assert seen == [[0, 5], [0, 3, 5], [0, 1, 3, 5], [0, 1, 5], [0, 1, 2, 3, 5]]
    assert t.peel == 2 and t.ks == (3, 4, 5) and t.sels == [(0, 1, 5), (0, 1, 3, 5), (0, 1, 2, 3, 5)]
    assert "with the first layer peeled: layer 1 of the 4-layer graph differs from layer 1 of the 2-layer graph" in t.peel_reason
    assert torch.equal(t.instantiate(6, (ids,), {})(ids), model(ids))
    opt = fxopt.optimize(model, (ids,), passes=[])
    assert _used_layers(opt) and "first 2 layers peeled (layers 0-1 as captured" in opt.report().notes[0]
    assert torch.equal(opt(ids), model(ids))


def test_peeled_layers_compose_with_length_templates():
    # (bf16 HF Mamba composes too, but costs ~10 s here): the first length probe peels with
    # 2, 3, 4 layers, the later ones with 2 and 3
    model = _stack(mode="first")
    ids = torch.randint(0, 16, (2, 40))
    opt = fxopt.optimize(model, (ids,), passes=[])
    notes = opt.report().notes
    assert _peeled(opt) and any(x.startswith("length-generic: graph instantiated at L=40") for x in notes), notes
    assert torch.equal(opt(ids), model(ids))


# ------------------------------------------------------------------ a pass refusing the probes

class _RefuseAt(fxopt.pass_base.Pass):
    """Refuses graphs holding ``depths`` layers (a pass that cannot rewrite such a probe as it
    rewrites the whole model); changes nothing. Counts the depths it saw."""

    name = "refuse_at"
    fixpoint = False

    def __init__(self, depths, why="the probe is not the model"):
        self.depths, self.why, self.seen = set(depths), why, []

    def call(self, gm):
        k = sum(1 for n in gm.graph.nodes if n.op == "call_function" and op_name(n) == "aten.tanh.default")
        self.seen.append(k)
        if k in self.depths:
            lyr.refuse_template(gm, self.why)
        return fxopt.pass_base.PassResult(gm, False)


def test_a_pass_refusing_a_probe_makes_optimize_capture_the_whole_model():
    model = _stack()
    ids = torch.randint(0, 16, (2, 8))
    p = _RefuseAt({2}, why="latent cache laid out for 6 layers")
    opt = fxopt.optimize(model, (ids,), passes=[p])
    assert not _used_layers(opt)
    note = next(n for n in opt.report().notes if n.startswith("layer-generic template not used"))
    assert "refused the 2-layer probe" in note and "latent cache laid out for 6 layers" in note
    assert p.seen == [2, 6]  # refused at the first probe: no more probes captured, then the whole model
    assert torch.equal(opt(ids), model(ids))


def test_a_pass_refusing_other_depths_leaves_the_template_alone():
    """Look-alike: the same pass refusing a depth no probe has (and the whole model's graph,
    which is not a probe) does not stop the template."""
    model = _stack()
    ids = torch.randint(0, 16, (2, 8))
    p = _RefuseAt({4, 6})
    opt = fxopt.optimize(model, (ids,), passes=[p])
    assert _used_layers(opt), opt.report().notes
    assert 6 not in p.seen and sorted(p.seen) == [1, 2, 3]
    assert torch.equal(opt(ids), model(ids))


@settings(max_examples=6, deadline=None)
@given(n=st.integers(4, 6), refused=st.sets(st.integers(1, 3), min_size=1))
def test_any_refused_probe_depth_falls_back_to_a_whole_capture(n, refused):
    model = _stack(n=n)
    ids = torch.randint(0, 16, (2, 8))
    p = _RefuseAt(refused)
    opt = fxopt.optimize(model, (ids,), passes=[p])
    assert not _used_layers(opt)
    assert p.seen[-1] == n and p.seen.count(n) == 1  # the fallback: one capture of every layer
    assert torch.equal(opt(ids), model(ids))


def test_fit_layer_template_refuses_marked_graphs():
    model = _stack(n=5)
    ids = torch.randint(0, 16, (2, 8))
    graphs = [fxopt.capture(lyr.truncated_proxy(model, "layers", lyr._probe_layers(5, k)), (ids,), {}) for k in (1, 2, 3)]
    assert lyr.fit_layer_template(model, "layers", 5, graphs).instantiate(5, (ids,), {}) is not None
    lyr.refuse_template(graphs[1], "marked")
    with pytest.raises(lg.TemplateMismatch, match="refused the 2-layer probe as a layer template: marked"):
        lyr.fit_layer_template(model, "layers", 5, graphs)
