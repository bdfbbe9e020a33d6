"""optimize(): same outputs, re-specialisation, no mutation, report, errors."""
import pytest
import torch

import fxopt
from fxopt.graph_utils import propagate_meta, mark_provenance, op_name
from fxopt.models.hf import tiny_gpt_neox, tiny_hf_mamba
from fxopt.models.seed_mamba import seed_mamba


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_no_pass_is_bitwise_and_keeps_output_type():
    model = tiny_gpt_neox()
    ids = torch.randint(0, 128, (1, 9))
    opt = fxopt.optimize(model, (ids,), passes=[])
    out = opt(ids)
    assert type(out).__name__ == "CausalLMOutputWithPast"
    assert torch.equal(out.logits, model(ids).logits)
    assert opt.report().matches == {}


@pytest.mark.parametrize("build,vocab", [(tiny_hf_mamba, 128), (seed_mamba, 256), (tiny_gpt_neox, 128)])
def test_model_is_never_mutated(build, vocab):
    model = build()
    before = _snapshot(model)
    forward, training = model.forward, model.training
    ids = torch.randint(0, vocab, (1, 6))
    ref = model(ids)
    opt = fxopt.optimize(model, (ids,))
    opt(ids)
    opt(ids[:, :3])
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.forward == forward and model.training == training
    again = model(ids)
    ref_l = ref.logits if hasattr(ref, "logits") else ref
    again_l = again.logits if hasattr(again, "logits") else again
    assert torch.equal(ref_l, again_l)
    # our module does not re-register the user's parameters
    assert list(opt.parameters()) == []


def test_new_shapes_respecialise_with_a_bounded_cache():
    model = seed_mamba()
    opt = fxopt.optimize(model, (torch.randint(0, 256, (1, 4)),), passes=[], cache_size=2)
    for length in (5, 7, 4):
        ids = torch.randint(0, 256, (2, length))
        assert torch.equal(opt(ids), model(ids))
    assert opt.specializations == 2  # bounded: the oldest was dropped
    # graph_module follows the most recent call
    assert opt.graph_module is not opt.original_graph_module
    assert opt.graph_module.meta["fxopt_model"] == "SeedMamba"


def test_unknown_pass_name_lists_available_ones():
    with pytest.raises(fxopt.UnknownPassError) as info:
        fxopt.optimize(seed_mamba(), (torch.zeros(1, 2, dtype=torch.long),), passes=["no_such_pass"])
    assert "no_such_pass" in str(info.value) and "available" in str(info.value)
    with pytest.raises(fxopt.FxoptError, match="registered names"):
        fxopt.optimize(seed_mamba(), (torch.zeros(1, 2, dtype=torch.long),), passes=[42])


class NegNegPass(fxopt.Pass):
    """-(-x) -> x: a tiny user pass proving the Pass -> manager -> report path."""

    name = "negneg"

    def call(self, gm):
        hits = 0
        for node in list(gm.graph.nodes):
            if op_name(node) == "aten.neg.default" and op_name(node.args[0]) == "aten.neg.default":
                inner = node.args[0]
                node.replace_all_uses_with(inner.args[0])
                gm.graph.erase_node(node)
                if not inner.users:
                    gm.graph.erase_node(inner)
                hits += 1
        return fxopt.PassResult(gm, hits > 0, {"matches": hits})


class NegNegModel(torch.nn.Module):
    def forward(self, x, y):
        return -(-x) + (-(-(y * 2)))


def test_user_pass_object_runs_and_is_counted():
    model = NegNegModel()
    x, y = torch.randn(3, 5), torch.randn(3, 5)
    opt = fxopt.optimize(model, (x, y), passes=[NegNegPass()])
    assert opt.report().matches == {"negneg": 2}
    assert torch.equal(opt(x, y), model(x, y))
    table = str(opt.report())
    assert "negneg" in table and "nodes before" in table and "capture" in table
    assert not any(op_name(n) == "aten.neg.default" for n in opt.graph_module.graph.nodes)
    assert sum(op_name(n) == "aten.neg.default" for n in opt.original_graph_module.graph.nodes) == 4


def test_registered_user_pass_by_name():
    fxopt.register_pass("negneg_test", NegNegPass, replace=True)
    assert "negneg_test" in fxopt.available_passes()
    opt = fxopt.optimize(NegNegModel(), (torch.randn(2), torch.randn(2)), passes=["negneg_test"])
    assert opt.report().matches["negneg"] == 2
