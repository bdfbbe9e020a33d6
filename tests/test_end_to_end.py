"""Acceptance: optimize() on the real model families, match counts and numbers."""
import pytest
import torch

import fxopt
from fxopt.models.hf import tiny_gpt_neox, tiny_hf_mamba
from fxopt.models.seed_mamba import seed_mamba
from fxopt.testing import assert_equivalent, bitwise, fp64_relative

N_LAYERS = 2  # the tiny builders' default


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_neox_parallel_residual_is_fused_once_per_layer_and_bitwise(dtype):
    model = tiny_gpt_neox(parallel_residual=True).to(dtype)
    ids = torch.randint(0, 128, (2, 11))
    opt = fxopt.optimize(model, (ids,), passes=["residual_add"])
    assert opt.report().matches == {"residual_add": N_LAYERS}
    assert_equivalent(lambda x: _logits(model(x)), lambda x: _logits(opt(x)), (ids,), bitwise)


def test_gpt_neox_serial_residual_is_left_alone():
    model = tiny_gpt_neox(parallel_residual=False)
    ids = torch.randint(0, 128, (1, 9))
    opt = fxopt.optimize(model, (ids,), passes=["residual_add"])
    assert opt.report().matches == {"residual_add": 0}
    assert len(opt.graph_module.graph.nodes) == len(opt.original_graph_module.graph.nodes)
    assert torch.equal(_logits(opt(ids)), _logits(model(ids)))


def test_gpt_neox_default_passes():
    model = tiny_gpt_neox(parallel_residual=True)
    ids = torch.randint(0, 128, (2, 13))
    opt = fxopt.optimize(model, (ids,))
    # rotary embedding: q*cos + rotate_half(q)*sin and the same for k, per layer
    matches = opt.report().matches
    assert matches.pop("cleanup") > 0  # export's dtype checks and identity casts (tests/test_cleanup.py)
    assert matches == {"scan": 0, "addcmul": 2 * N_LAYERS, "residual_add": N_LAYERS}
    assert_equivalent(lambda x: _logits(model(x)), lambda x: _logits(opt(x)), (ids,), fp64_relative(2.0),
                      reference_fp64_fn=_fp64_model(model), fp64_audit="off")


def _fp64_model(model):
    """The model in float64. Mamba code casts with .float() (A, D, the scan state), so a
    few values of this reference are fp32: it is a sanity check of the whole model;
    the scan op's own fp64 contract is tested at op level in test_scan_*."""
    import copy

    m64 = copy.deepcopy(model).double()
    return lambda x: _logits(m64(x)).double()


@pytest.mark.parametrize("build,vocab", [(tiny_hf_mamba, 128), (seed_mamba, 256)])
def test_mamba_scan_once_per_layer(build, vocab):
    model = build()
    ids = torch.randint(0, vocab, (2, 10))
    opt = fxopt.optimize(model, (ids,))
    assert opt.report().matches["scan"] == N_LAYERS
    assert opt.report().matches["residual_add"] == 0
    assert_equivalent(lambda x: _logits(model(x)), lambda x: _logits(opt(x)), (ids,), fp64_relative(2.0),
                      reference_fp64_fn=_fp64_model(model), fp64_audit="off")


@pytest.mark.parametrize("build,vocab", [(tiny_hf_mamba, 128), (seed_mamba, 256)])
def test_long_mamba_uses_a_length_template_with_scans(build, vocab):
    model = build()
    ids = torch.randint(0, vocab, (1, 48))
    opt = fxopt.optimize(model, (ids,))
    assert any(n.startswith("length-generic: graph instantiated at L=48") for n in opt.report().notes)
    assert opt.report().matches["scan"] == N_LAYERS
    # the instantiated graph has no unrolled loop left: node count independent of L
    assert len(opt.graph_module.graph.nodes) < 600
    assert_equivalent(lambda x: _logits(model(x)), lambda x: _logits(opt(x)), (ids,), fp64_relative(2.0),
                      reference_fp64_fn=_fp64_model(model), fp64_audit="off")


def test_optimized_graph_still_exports():
    """Rewritten graphs call fxopt custom ops with fake impls, so they can be captured again."""
    model = tiny_gpt_neox(parallel_residual=True)
    ids = torch.randint(0, 128, (1, 7))
    opt = fxopt.optimize(model, (ids,))
    again = fxopt.capture(opt.graph_module, (ids,))  # the graph takes the call as the user wrote it
    assert torch.equal(_logits(again(ids)), _logits(opt(ids)))


def test_generated_kernel_source_is_visible(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors run kernels only through the interpreter
    mamba = fxopt.optimize(seed_mamba(), (torch.randint(0, 256, (1, 6)),))
    src = mamba.kernel_sources()
    # the kernel that runs (the plain-Triton scan under TRITON_INTERPRET=1), not whole modules
    assert list(src) == ["fxopt_selective_scan_triton"] and "@triton.jit" in src["fxopt_selective_scan_triton"]
    assert "def selective_scan_kernel(" in src["fxopt_selective_scan_triton"]
    neox = fxopt.optimize(tiny_gpt_neox(), (torch.randint(0, 128, (1, 6)),), passes=["residual_add"])
    (name, code), = neox.kernel_sources().items()
    assert name.startswith("fxopt_add_tree") and "@triton.jit" in code
