"""The scan pass on the real unrolled loops: HF MambaForCausalLM (slow path) and the seed-style
Mamba. One scan per layer, outputs unchanged, rewritten graphs still export."""
from __future__ import annotations

import pytest
import torch

from fxopt.models.seed_mamba import seed_mamba
from fxopt.ops.scan import SELECTIVE_SCAN_TARGETS
from fxopt.passes.scan import SELECTIVE_SCAN, ScanPass

import transformers
from fxopt.models.hf import tiny_hf_mamba  # noqa: E402


def _export(model, args, kwargs=None):
    return torch.export.export(model, args, kwargs or {}, strict=False).module()


def _count(gm, target):
    targets = SELECTIVE_SCAN_TARGETS if target is SELECTIVE_SCAN else (target,)
    return sum(1 for n in gm.graph.nodes if n.target in targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_mamba_one_scan_per_layer(dtype):
    model = tiny_hf_mamba(num_hidden_layers=3).to(dtype)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    gm = _export(model, (ids,), {"use_cache": False})
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    p = ScanPass()
    res = p(gm)
    assert res.matches == 3, p.last_rejections
    assert _count(gm, SELECTIVE_SCAN) == 3
    assert all(m["op"] == "selective_scan" and len(m["folded"]) == 2 for m in p.last_matches), p.last_matches
    # no per-step nodes left
    assert sum(1 for n in gm.graph.nodes if n.target == torch.ops.aten.select.int) < 10
    out = gm(ids, use_cache=False)
    out = out.logits if hasattr(out, "logits") else out[0]
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    else:
        # the op keeps the state and readout in fp32 (the loop rounds readouts to bf16)
        with torch.no_grad():
            ref64 = model.double()(ids, use_cache=False).logits
        err_opt = (out.double() - ref64).abs().max()
        err_eager = (ref.double() - ref64).abs().max()
        assert err_opt <= 2 * err_eager + 1e-3


def test_seed_mamba_one_scan_per_layer_and_reexport():
    model = seed_mamba(n_layer=2)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    gm = _export(model, (ids,))
    with torch.no_grad():
        ref = model(ids)
    p = ScanPass()
    res = p(gm)
    assert res.matches == 2, p.last_rejections
    assert [m["folded"] != [] for m in p.last_matches] == [True, True]
    torch.testing.assert_close(gm(ids), ref, rtol=1e-4, atol=1e-4)
    # the rewritten graph still exports (fake impls)
    ep = torch.export.export(gm, (ids,), strict=False)
    assert any(n.target == SELECTIVE_SCAN for n in ep.graph.nodes)


def test_seed_mamba_length_one():
    model = seed_mamba(n_layer=1)
    ids = torch.randint(0, 256, (2, 1), generator=torch.Generator().manual_seed(2))
    gm = _export(model, (ids,))
    with torch.no_grad():
        ref = model(ids)
    p = ScanPass()
    p(gm)
    torch.testing.assert_close(gm(ids), ref, rtol=1e-5, atol=1e-5)


def test_pass_is_registered_and_reports():
    import fxopt.registry as reg

    assert "scan" in reg.available_passes()
    assert isinstance(reg.get_pass("scan"), ScanPass)
