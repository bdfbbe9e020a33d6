"""capture(): ATen graphs of real models, equal to eager, with clear errors on bad input."""
import pytest
import torch

import fxopt
from fxopt.graph_utils import op_name
from fxopt.models.hf import tiny_gpt_neox, tiny_hf_mamba
from fxopt.models.seed_mamba import seed_mamba


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


MODELS = {
    "gpt_neox_parallel": (lambda: tiny_gpt_neox(parallel_residual=True), 128),
    "gpt_neox_serial": (lambda: tiny_gpt_neox(parallel_residual=False), 128),
    "hf_mamba": (tiny_hf_mamba, 128),
    "seed_mamba": (seed_mamba, 256),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_capture_is_bitwise_equal_to_eager(name):
    build, vocab = MODELS[name]
    model = build()
    ids = torch.randint(0, vocab, (2, 7))
    gm = fxopt.capture(model, (ids,))
    assert isinstance(gm, torch.fx.GraphModule)
    # ATen level with fake-tensor metadata on every computed node
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert calls and all("val" in n.meta for n in calls)
    assert any(op_name(n).startswith("aten.") for n in calls)
    with torch.no_grad():
        ref, out = _logits(model(ids)), _logits(gm(ids))
    assert type(out) is type(ref)
    assert torch.equal(ref, out)


def test_hf_output_structure_is_kept():
    model = tiny_gpt_neox()
    ids = torch.randint(0, 128, (1, 5))
    gm = fxopt.capture(model, (ids,))
    out = gm(ids)
    assert type(out).__name__ == "CausalLMOutputWithPast"
    assert out.logits.shape == (1, 5, 128)


def test_unrolled_loop_is_in_the_graph():
    """Python loops unroll: the seed Mamba's scan appears once per step and layer."""
    model = seed_mamba(n_layer=2)
    gm = fxopt.capture(model, (torch.randint(0, 256, (1, 6)),))
    stacks = [n for n in gm.graph.nodes if op_name(n) == "aten.stack.default"]
    assert len(stacks) == 2
    assert all(len(n.args[0]) == 6 for n in stacks)


class _DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # branch on a tensor value
            return x * 2
        return x - 1


def test_data_dependent_control_flow_raises_capture_error():
    with pytest.raises(fxopt.CaptureError) as info:
        fxopt.capture(_DataDependent(), (torch.randn(4),))
    msg = str(info.value)
    assert "data-dependent control flow" in msg
    assert "test_capture.py" in msg and "if x.sum() > 0" in msg  # names file:line and the construct
    assert "torch.cond" in msg  # says what to do


def test_hf_cache_object_is_handled_by_default_and_explained_when_forced():
    model = tiny_hf_mamba()
    ids = torch.randint(0, 128, (1, 4))
    gm = fxopt.capture(model, (ids,))  # no use_cache=False given: fxopt turns the cache off
    assert torch.equal(gm(ids).logits, model(ids, use_cache=False).logits)  # the graph takes the call as written
    with pytest.raises(fxopt.CaptureError, match="use_cache=True"):
        fxopt.capture(model, (ids,), {"use_cache": True})


def test_non_module_and_bad_args_are_rejected_clearly():
    with pytest.raises(fxopt.CaptureError, match="torch.nn.Module"):
        fxopt.capture(lambda x: x, (torch.randn(2),))
    with pytest.raises(fxopt.CaptureError, match="tuple of positional arguments"):
        fxopt.capture(seed_mamba(), {"input_ids": torch.zeros(1, 2, dtype=torch.long)})


def test_capture_function_matches_model_ir():
    gm = fxopt.capture_function(lambda x, y: x * torch.sigmoid(y), (torch.randn(3), torch.randn(3)))
    ops = [op_name(n) for n in gm.graph.nodes if n.op == "call_function"]
    assert ops == ["aten.sigmoid.default", "aten.mul.Tensor"]
