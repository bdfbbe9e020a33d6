"""Length-generic templates: long sequences are optimized from three short probes."""
import pytest
import torch

import fxopt
from fxopt import length_generic as lg
from fxopt.models.hf import tiny_gpt_neox
from fxopt.models.seed_mamba import seed_mamba


def _used_template(opt):
    return any(n.startswith("length-generic: graph instantiated") for n in opt.report().notes)


@pytest.mark.parametrize("parallel", [True, False])
def test_gpt_neox_template_is_bitwise_equal_at_new_lengths(parallel):
    model = tiny_gpt_neox(parallel_residual=parallel)
    ids = torch.randint(0, 128, (2, 40))
    opt = fxopt.optimize(model, (ids,), passes=[])
    assert _used_template(opt)
    assert torch.equal(opt(ids).logits, model(ids).logits)
    # another long length reuses the same template: no new probes
    ids2 = torch.randint(0, 128, (2, 57))
    assert torch.equal(opt(ids2).logits, model(ids2).logits)
    assert len(opt._templates) == 1 and _used_template(opt)


def test_short_sequences_capture_directly():
    model = tiny_gpt_neox()
    opt = fxopt.optimize(model, (torch.randint(0, 128, (1, 8)),), passes=[])
    assert not opt.report().notes and not opt._templates


def test_unrolled_loop_without_scan_pass_falls_back_and_says_why():
    model = seed_mamba()
    ids = torch.randint(0, 256, (1, 36))
    opt = fxopt.optimize(model, (ids,), passes=[])
    assert not _used_template(opt)
    assert any("template not used" in n and "differs between probe lengths" in n for n in opt.report().notes)
    assert torch.equal(opt(ids), model(ids))


class _QuadraticShape(torch.nn.Module):
    """A literal that is L*L: not affine, so the template must be refused."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 4)

    def forward(self, ids):
        x = self.emb(ids)  # (b, l, 4)
        outer = x[:, :, None, :] * x[:, None, :, :]  # (b, l, l, 4)
        return outer.reshape(ids.shape[0], ids.shape[1] * ids.shape[1], 4).sum(1)


def test_non_affine_literal_is_refused_and_still_correct():
    model = _QuadraticShape()
    ids = torch.randint(0, 16, (2, 40))
    opt = fxopt.optimize(model, (ids,), passes=[])
    assert not _used_template(opt)
    assert any("not affine in L" in n for n in opt.report().notes)
    assert torch.equal(opt(ids), model(ids))


def test_seq_dim_none_disables_templates():
    model = tiny_gpt_neox()
    ids = torch.randint(0, 128, (1, 40))
    opt = fxopt.optimize(model, (ids,), passes=[], seq_dim=None)
    assert not opt._templates and not _used_template(opt)


def test_affine_fit_unit():
    calls = []

    def fake_optimize_at(args, kwargs):
        calls.append(args[0].shape[1])
        return fxopt.capture_function(lambda x: x.reshape(-1)[: x.shape[1] * 3 + 1], args)

    t = lg.build_template(fake_optimize_at, (torch.zeros(2, 50),), {}, 1)
    assert calls == list(lg.DEFAULT_PROBES)
    assert (3, 1) in t.coeffs
