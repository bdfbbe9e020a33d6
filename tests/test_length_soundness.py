"""Length templates are only used where the model's op stream at the real L is the one
the probes predict (fxopt/length_check.py; issue 10, items 1 and 14)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxopt
from fxopt import length_check as lc
from fxopt import length_generic as lg
from fxopt.models.hf import tiny_gpt_neox, tiny_hf_mamba
from fxopt.models.seed_mamba import seed_mamba


def _notes(opt) -> list[str]:
    return opt.report().notes


def _verified(opt) -> bool:
    return any(n.startswith("length-generic: graph instantiated") and " verified at L=" in n for n in _notes(opt))


def _stream_fallback(opt) -> str | None:
    """The note of a fallback the op-stream check caused, or None."""
    hits = [n for n in _notes(opt) if n.startswith("length-generic template not used: op stream of")]
    return hits[0] if hits else None


# ----------------------------------------------------------------- models that branch on L

class _Base(torch.nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(32, d)
        self.proj = torch.nn.Linear(d, d)

    def hidden(self, ids):
        return self.proj(self.emb(ids))


class ShapeBranch(_Base):
    def forward(self, ids):
        h = self.hidden(ids)
        if ids.shape[1] > 20:
            h = h * 2
        return h


class ModuloBranch(_Base):
    def forward(self, ids):
        h = self.hidden(ids)
        if ids.size(1) % 8 == 0:
            h = h + 1
        return h


class WindowSlice(_Base):
    def forward(self, ids):
        h = self.hidden(ids)
        w = min(ids.shape[1], 16)
        return h[:, -w:].sum(1)


class AtLeast64(_Base):  # held-out form: a threshold the probes never reach
    def forward(self, ids):
        h = self.hidden(ids)
        if ids.shape[1] >= 64:
            h = torch.tanh(h)
        return h


class ClampedMask(_Base):  # held-out form: a mask literal min(L, 30)
    def forward(self, ids):
        h = self.hidden(ids)
        keep = torch.arange(ids.shape[1]) < min(ids.shape[1], 30)
        return h * keep[None, :, None]


class AttributeWindow(_Base):  # held-out form: the threshold is a module attribute
    def __init__(self):
        super().__init__()
        self.window = 24

    def forward(self, ids):
        h = self.hidden(ids)
        if ids.shape[1] > self.window:
            h = h[:, -self.window:] * 0.5
        return h


class StepBranchScan(_Base):
    """A recurrence h = a_t*h + b_t over time whose step 40 does something else."""

    def forward(self, ids):
        a, b = torch.sigmoid(self.hidden(ids)), self.hidden(ids)
        h = torch.zeros(ids.shape[0], a.shape[-1])
        ys = []
        for t in range(ids.shape[1]):
            h = a[:, t] * h + b[:, t]
            if t == 40:
                h = h * 3
            ys.append(h)
        return torch.stack(ys, 1)


BRANCHES = [
    (ShapeBranch, 40), (ModuloBranch, 48), (ModuloBranch, 64), (WindowSlice, 40), (WindowSlice, 64),
    (AtLeast64, 64), (ClampedMask, 40), (AttributeWindow, 48),
]


@pytest.mark.parametrize("cls,length", BRANCHES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_branch_on_length_falls_back_and_is_exact(cls, length):
    model = cls().eval()
    ids = torch.randint(0, 32, (2, length))
    opt = fxopt.optimize(model, (ids,), passes=[])
    note = _stream_fallback(opt)
    assert note is not None and f"at L={length}" in note, _notes(opt)
    assert "issued at" in note and "test_length_soundness.py" in note  # names the model's line
    assert not _verified(opt)
    assert torch.equal(opt(ids), model(ids))


@pytest.mark.parametrize("length", [48, 64])
def test_step_index_branch_in_a_scan_falls_back(length):
    model = StepBranchScan().eval()
    ids = torch.randint(0, 32, (2, length))
    opt = fxopt.optimize(model, (ids,))
    note = _stream_fallback(opt)
    assert note is not None and "(loop 0, repetition 4" in note and "h = h * 3" in note, _notes(opt)
    torch.testing.assert_close(opt(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_step_branch_not_reached_keeps_the_template():
    # L = 40: step 40 does not exist, the loop is affine, the template stands (and is right)
    model = StepBranchScan().eval()
    ids = torch.randint(0, 32, (2, 40))
    opt = fxopt.optimize(model, (ids,))
    assert _verified(opt), _notes(opt)
    assert opt.report().matches.get("scan", 0) >= 1
    torch.testing.assert_close(opt(ids), model(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [ShapeBranch, WindowSlice, AttributeWindow])
def test_short_first_then_long_call_falls_back(cls):
    model = cls().eval()
    short = torch.randint(0, 32, (2, 8))
    opt = fxopt.optimize(model, (short,), passes=[])
    assert not opt._templates  # L = 8: a direct capture
    ids = torch.randint(0, 32, (2, 40))
    assert torch.equal(opt(ids), model(ids))
    assert _stream_fallback(opt) is not None
    # the verdict is cached per call signature: no second recording
    assert len(opt._stream_checks) == 1
    assert torch.equal(opt(ids), model(ids))


def test_template_and_check_caches_are_bounded():
    model = ShapeBranch().eval()
    opt = fxopt.optimize(model, (torch.randint(0, 32, (1, 8)),), passes=[], cache_size=2)
    for b in (1, 2, 3, 4):
        ids = torch.randint(0, 32, (b, 40))
        assert torch.equal(opt(ids), model(ids))
    assert len(opt._templates) == 2 and len(opt._stream_checks) == 2


# ----------------------------------------------------------------- item 14

class FlatHead(torch.nn.Module):
    """Integer (b, l) input that is not a sequence: Linear over the flattened l*d."""

    def __init__(self, length: int = 40):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(16, 4)
        self.head = torch.nn.Linear(length * 4, 3)

    def forward(self, ids):
        return self.head(self.emb(ids).flatten(1))


def test_non_sequence_integer_input_just_works():
    model = FlatHead(40).eval()
    ids = torch.randint(0, 16, (2, 40))
    opt = fxopt.optimize(model, (ids,), passes=[])
    assert opt._seq_dim == 1  # "auto" took it for a sequence ...
    notes = [n for n in _notes(opt) if n.startswith("length-generic template not used: the probes")]
    assert notes, _notes(opt)  # ... the probes failed, and the report says so
    assert torch.equal(opt(ids), model(ids))


# ----------------------------------------------------------------- no false fallbacks

MODELS = {
    "hf_mamba": lambda: tiny_hf_mamba(),
    "hf_mamba_4_layers": lambda: tiny_hf_mamba(num_hidden_layers=4),
    "neox_parallel": lambda: tiny_gpt_neox(parallel_residual=True),
    "neox_serial": lambda: tiny_gpt_neox(parallel_residual=False),
    "seed_mamba": lambda: seed_mamba(),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_real_models_keep_the_verified_template(name):
    model = MODELS[name]()
    vocab = 128 if name != "seed_mamba" else 256
    ids = torch.randint(0, vocab, (1, 40))
    opt = fxopt.optimize(model, (ids,))
    for length in (40, 100):
        ids = torch.randint(0, vocab, (1, length))
        out = opt(ids)
        ref = model(ids)
        out, ref = (out.logits, ref.logits) if hasattr(out, "logits") else (out, ref)
        assert _verified(opt), (length, _notes(opt))
        assert any(f"verified at L={length}" in n for n in _notes(opt))
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    if name == "hf_mamba_4_layers":
        assert any("proxy with layers [0] of backbone.layers" in n for n in _notes(opt))
    assert len(opt._templates) == 1


def test_meta_recording_matches_fake_recording_on_hf_mamba():
    model = tiny_hf_mamba()
    ids = torch.randint(0, 128, (1, 7))
    a = lc.record_stream(model, (ids,), {"use_cache": False}, how="meta")
    b = lc.record_stream(model, (ids,), {"use_cache": False}, how="fake")
    assert len(a) > 50 and lc._same_modulo_device(a, b) is None


def test_recording_never_touches_the_model():
    model = tiny_hf_mamba()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = {id(p): p for p in model.parameters()}
    lc.record_stream(model, (torch.randint(0, 128, (1, 9)),), {"use_cache": False})
    assert {id(p): p for p in model.parameters()} == ids
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------- the fitter

def _stream(length, prefix, body, suffix, count, lits):
    """A synthetic op stream: prefix ops, body x count(L), suffix ops; op j of step t has
    literals lits(kind, j, L, t)."""
    keys, ints = [], []
    for j, k in enumerate(prefix):
        keys.append(k)
        ints.append(lits("p", j, length, 0))
    for t in range(count[0] * length + count[1]):
        for j, k in enumerate(body):
            keys.append(k)
            ints.append(lits("b", j, length, t))
    for j, k in enumerate(suffix):
        keys.append(k)
        ints.append(lits("s", j, length, 0))
    vocab = [("op", k) for k in range(30)]
    return lc.OpStream(keys, ints, vocab)


@st.composite
def _synthetic(draw):
    prefix = draw(st.lists(st.integers(0, 9), max_size=6))
    body = draw(st.lists(st.integers(10, 19), min_size=1, max_size=5))
    suffix = draw(st.lists(st.integers(20, 29), max_size=6))
    count = (draw(st.integers(1, 2)), draw(st.integers(-2, 2)))
    width = draw(st.integers(0, 3))
    big = st.integers(-(2 ** 40), 2 ** 40)  # literals far from small ints, and negative
    coeffs = {key: (draw(big), draw(st.integers(-64, 64)), draw(st.integers(-64, 64)))
              for key in [(kind, j, m) for kind, n in (("p", len(prefix)), ("b", len(body)), ("s", len(suffix)))
                          for j in range(n) for m in range(width)]}

    def lits(kind, j, length, t):
        out = []
        for m in range(width):
            c0, cl, ct = coeffs[(kind, j, m)]
            out.append(c0 + cl * length + (ct * t if kind == "b" else 0))
        return tuple(out)

    return prefix, body, suffix, count, lits, draw(st.integers(12, 90))


@settings(max_examples=60)
@given(_synthetic(), st.data())
def test_stream_fit_predicts_and_catches_any_perturbation(case, data):
    prefix, body, suffix, count, lits, length = case
    probes = lg.DEFAULT_PROBES
    model = lc.fit_streams([_stream(p, prefix, body, suffix, count, lits) for p in probes], probes)
    real = _stream(length, prefix, body, suffix, count, lits)
    model.check(length, real)  # predicts the unseen length exactly
    assert model.predicted_length(length) == len(real)

    i = data.draw(st.integers(0, len(real) - 1), label="position")
    bad = lc.OpStream(list(real.keys), list(real.ints), real.vocab)
    if real.ints[i] and data.draw(st.booleans(), label="literal"):
        m = data.draw(st.integers(0, len(real.ints[i]) - 1), label="which literal")
        lits_i = list(real.ints[i])
        lits_i[m] += data.draw(st.sampled_from([-1, 1, 2 ** 33]), label="delta")
        bad.ints[i] = tuple(lits_i)
    else:  # another op there
        bad.keys[i] = (real.keys[i] + 1) % 30
    with pytest.raises(lc.StreamDivergence) as err:
        model.check(length, bad)
    assert err.value.index == i

    # an extra step, or one missing, is caught too
    extra = lc.OpStream(real.keys[:i] + [real.keys[i]] + real.keys[i:], real.ints[:i] + [real.ints[i]] + real.ints[i:],
                        real.vocab)
    with pytest.raises(lc.StreamDivergence):
        model.check(length, extra)


def test_fit_refuses_what_it_cannot_express():
    def quad(kind, j, length, t):
        return (length * length,) if kind == "p" else ()

    streams = [_stream(p, [0, 1], [10], [20], (1, 0), quad) for p in lg.DEFAULT_PROBES]
    with pytest.raises(lg.TemplateMismatch, match="not affine in L"):
        lc.fit_streams(streams, lg.DEFAULT_PROBES)
    # a loop whose step count is L // 2: not affine in L over the probes
    half = [_stream(p, [0], [10], [20], (1, 0), lambda *a: ()) for p in lg.DEFAULT_PROBES]
    for s, p in zip(half, lg.DEFAULT_PROBES):
        n = p // 2
        s.keys[:] = [0] + [10] * n + [20]
        s.ints[:] = [()] * len(s.keys)
    with pytest.raises(lg.TemplateMismatch, match="iteration count"):
        lc.fit_streams(half, lg.DEFAULT_PROBES)


def test_first_step_reading_the_initial_state_is_fitted():
    # step 0 reads the initial state (op 1), later steps the previous step's output:
    # a peeled first iteration
    def lits(kind, j, length, t):
        if kind == "b":
            return (1 if t == 0 else 2 + (t - 1), t)
        return (length,)

    streams = [_stream(p, [0, 1], [10], [20], (1, 0), lits) for p in lg.DEFAULT_PROBES]
    model = lc.fit_streams(streams, lg.DEFAULT_PROBES)
    model.check(50, _stream(50, [0, 1], [10], [20], (1, 0), lits))


def test_peeled_layer_template_verifies_layers_0_and_1():
    # bf16 with residual_in_fp32: layer 0 differs (it casts the embeddings), the layer
    # template peels it, and the verification proxy must hold layers 0 and 1
    model = tiny_hf_mamba(num_hidden_layers=5, residual_in_fp32=True).to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 40))
    opt = fxopt.optimize(model, (ids,))
    assert any("first layer peeled" in n for n in _notes(opt)), _notes(opt)
    assert any("proxy with layers [0, 1] of backbone.layers verified at L=40" in n for n in _notes(opt)), _notes(opt)
    torch.testing.assert_close(opt(ids).logits.float(), model(ids).logits.float(), rtol=0.05, atol=0.1)


class DeviceBranch(_Base):
    """Code that branches on the device: recorded on meta tensors it would take the
    other branch, so the check must record with FakeTensorMode (real devices)."""

    def forward(self, ids):
        h = self.hidden(ids)
        if h.device.type == "cpu":
            h = h + 1
        if ids.shape[1] > 20:
            h = h * 2
        return h


def test_device_dependent_code_is_recorded_on_its_real_device():
    model = DeviceBranch().eval()
    calls = [((torch.randint(0, 32, (2, p)),), {}) for p in lg.DEFAULT_PROBES]
    sm = lc.fit_module(model, calls, lg.DEFAULT_PROBES)
    assert sm.how == "fake"
    with pytest.raises(lc.StreamDivergence, match="aten.mul"):
        lc.verify(sm, model, (torch.randint(0, 32, (2, 40)),), {}, 40)
    ids = torch.randint(0, 32, (2, 40))
    opt = fxopt.optimize(model, (ids,), passes=[])
    assert _stream_fallback(opt) is not None
    assert torch.equal(opt(ids), model(ids))
