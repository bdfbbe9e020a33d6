"""The ``"cleanup"`` pass (fxopt/passes/cleanup.py): metadata checks on computed values,
identity dtype casts and view chains that undo themselves go; real casts, copies, layout changes,
views that change the layout and checks on graph inputs stay.
Contract: bitwise (the rewritten graph returns the same values, with the same strides)."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxopt.passes.cleanup as cleanup_mod
from fxopt.capture import capture
from fxopt.passes.cleanup import RULES, CleanupPass
from fxopt.testing.contracts import bitwise

aten = torch.ops.aten
ASSERT = aten._assert_tensor_metadata.default


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _check_same(gm_ref, gm, args):
    for r, c in zip(torch.utils._pytree.tree_leaves(gm_ref(*args)), torch.utils._pytree.tree_leaves(gm(*args))):
        bitwise.check(r, c)
        assert r.stride() == c.stride() and r.storage_offset() == c.storage_offset()


_VIEW_OPS = cleanup_mod._PURE_VIEWS


def _views(gm):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in _VIEW_OPS)


class Casts(torch.nn.Module):
    def forward(self, x, y):
        a = (x * 2).to(torch.float32)          # identity cast of a computed value
        b = a.float() + y.to(torch.float32)    # identity casts (the second of a graph input)
        c = b.to(torch.float16).to(torch.float32, copy=True)  # a real cast, then a copy
        return c.to(memory_format=torch.contiguous_format), a.to(torch.float64)


def test_removes_identity_casts_and_checks_on_computed_values():
    args = (torch.tensor([[1.5, -0.0, float("inf"), float("nan")]]).expand(3, 4), torch.randn(3, 4))
    gm = capture(Casts(), args, {})
    ref = capture(Casts(), args, {})
    asserts_before, to_before = _count(gm, ASSERT), _count(gm, aten.to.dtype)
    res = CleanupPass()(gm)
    # checks: 7 captured, the one on input y stays; casts: a, a.float(), y.to(float32) go
    assert res.stats["rule:assert_on_computed_value"] == asserts_before - 1 == 6
    assert res.stats["rule:to_same_dtype"] == 3 and res.matches == 9
    assert _count(gm, ASSERT) == 1 and _count(gm, aten.to.dtype) == to_before - 3
    kept = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ASSERT]
    assert kept[0].args[0].op == "placeholder"
    _check_same(ref, gm, args)
    assert [r.name for r in RULES] == ["assert_on_computed_value", "to_same_dtype", "identity_view", "dead_view"]
    assert all(r.source.startswith(cleanup_mod.__file__ + ":") for r in RULES)


class RealCasts(torch.nn.Module):
    """Look-alikes: every cast changes dtype, copies or changes the layout."""

    def forward(self, x):
        a = x.to(torch.float16)
        b = a.to(torch.float32)
        c = b.to(torch.float32, copy=True)
        d = c.to(memory_format=torch.channels_last)
        return d, a


def test_keeps_real_casts_copies_and_layout_changes():
    args = (torch.randn(2, 3, 4, 5),)
    gm = capture(RealCasts(), args, {})
    ref = capture(RealCasts(), args, {})
    before = [(n.target, n.args) for n in gm.graph.nodes if n.op == "call_function" and n.target is not ASSERT]
    res = CleanupPass()(gm)
    assert res.stats["rule:to_same_dtype"] == 0
    after = [(n.target, n.args) for n in gm.graph.nodes if n.op == "call_function" and n.target is not ASSERT]
    assert [t for t, _ in after] == [t for t, _ in before]
    _check_same(ref, gm, args)


def test_graph_without_such_calls_is_unchanged():
    gm = capture(torch.nn.Linear(3, 2), (torch.randn(4, 3),), {})
    code = gm.code
    res = CleanupPass()(gm)
    assert res.matches == 0 and not res.modified and gm.code == code


_DT = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


class Chain(torch.nn.Module):
    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def forward(self, x):
        outs = []
        y = x * 1.5
        for dtype, copy in self.steps:
            y = y.to(dtype, copy=copy)
            outs.append(y)
        return tuple(outs)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_DT), st.booleans()), min_size=1, max_size=5),
       st.sampled_from(_DT), st.sampled_from([(1,), (3, 1), (2, 5)]))
def test_property_bitwise_and_exact_count(steps, in_dtype, shape):
    """Chains of casts: outputs bit-identical after the pass; removed casts = the identity ones."""
    x = torch.tensor([1.0, -0.0, 3e-39, 65504.0, float("inf"), float("nan"), -2.5e-8, 7.0, 1 / 3, 1e30])
    x = x.repeat(10)[: int(torch.tensor(shape).prod())].reshape(shape).to(in_dtype)
    gm = capture(Chain(steps), (x,), {})
    ref = capture(Chain(steps), (x,), {})
    cur = in_dtype  # x * 1.5 keeps the dtype
    expected = 0
    for dtype, copy in steps:
        expected += int(dtype == cur and not copy)
        cur = dtype
    res = CleanupPass()(gm)
    assert res.stats["rule:to_same_dtype"] == expected
    assert _count(gm, ASSERT) == 0  # every check in this graph is on a computed value
    _check_same(ref, gm, (x,))


def test_default_pipeline_on_hf_mamba_is_bitwise():
    """optimize() with the default passes: cleanup fires, and the logits are bit-equal to the
    same passes without it."""
    import fxopt
    import transformers

    from fxopt.models.hf import mamba_130m_config

    cfg = mamba_130m_config()
    cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers = 16, 32, 64, 2
    cfg.state_size, cfg.time_step_rank = 4, 2
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 9))
    with_cleanup = fxopt.optimize(model, (ids,), layer_templates=False)
    without = fxopt.optimize(model, (ids,), passes=["scan", "addcmul", "residual_add"], layer_templates=False)
    assert with_cleanup.report().matches["cleanup"] > 0
    # per layer: the conv weight's squeeze/unsqueeze and delta's transpose pair cancel
    assert with_cleanup.report().rule_hits["identity_view"] >= 2 * cfg.num_hidden_layers
    a, b = with_cleanup(ids), without(ids)
    bitwise.check(b.logits if hasattr(b, "logits") else b[0], a.logits if hasattr(a, "logits") else a[0])


# ----------------------------------------------------------------------------------------------
# view chains that undo themselves
# ----------------------------------------------------------------------------------------------
class Views(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 1, 4))

    def forward(self, x):
        a = x.transpose(1, 2).transpose(1, 2).permute(0, 2, 1)  # the pair cancels, the permute stays
        w = self.w.squeeze(1).unsqueeze(1)                      # a size-1 dim out and back (HF's conv weight)
        c = x.unsqueeze(0).squeeze(0)
        return a * 2, w * 3, c + 1


def test_removes_view_chains_that_undo_themselves():
    args = (torch.tensor([1.5, -0.0, float("inf"), float("nan"), 3e-39, -7.0] * 10).reshape(2, 5, 6),)
    m = Views()
    gm, ref = capture(m, args, {}), capture(m, args, {})
    views_before = _views(gm)
    res = CleanupPass()(gm)
    # transpose.transpose -> x, squeeze.unsqueeze -> w, unsqueeze.squeeze -> x; their first halves die
    assert res.stats["rule:identity_view"] == 3 and res.stats["rule:dead_view"] == 3
    assert _views(gm) == views_before - 6
    assert [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target in _VIEW_OPS] == [aten.permute.default]
    _check_same(ref, gm, args)


class ViewLookAlikes(torch.nn.Module):
    """Chains that end in the shape they started from but not in the layout, or not in the shape."""

    def forward(self, x, sq):
        a = sq.t()                                  # square: same shape, other strides
        b = sq.transpose(0, 1).transpose(1, 0).t()  # (the pair cancels; the t stays)
        c = x.transpose(0, 1).transpose(1, 2)       # a rotation, not the identity
        d = x[:, :1].squeeze(1).unsqueeze(0)        # a dim out and back in elsewhere
        e = x.expand(2, 3, 4)[:, 1:]                # a slice of a broadcast
        f = x.reshape(3, 4).reshape(1, 3, 4)        # reshape may copy: never looked through
        return a * 1, b * 1, c * 1, d * 1, e * 1, f * 1


def test_keeps_views_that_change_the_layout():
    args = (torch.randn(1, 3, 4), torch.randn(5, 5))
    gm, ref = capture(ViewLookAlikes(), args, {}), capture(ViewLookAlikes(), args, {})
    before = _views(gm)
    res = CleanupPass()(gm)
    assert res.stats["rule:identity_view"] == 1 and res.stats["rule:dead_view"] == 1  # only b's pair
    assert _views(gm) == before - 2
    _check_same(ref, gm, args)


_VIEW_STEPS = st.lists(st.tuples(st.sampled_from(["transpose", "unsqueeze", "squeeze", "permute"]),
                                 st.integers(0, 7), st.integers(0, 7)), min_size=1, max_size=6)


class ViewChain(torch.nn.Module):
    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def forward(self, x):
        y = x
        for op, i, j in self.steps:
            r = y.dim()
            if op == "transpose" and r >= 1:
                y = y.transpose(i % r, j % r)
            elif op == "unsqueeze":
                y = y.unsqueeze(i % (r + 1))
            elif op == "squeeze" and r >= 1 and y.shape[i % r] == 1:
                y = y.squeeze(i % r)
            elif op == "permute" and r >= 1:
                perm = list(range(r))
                perm = perm[i % r:] + perm[:i % r]  # a rotation
                y = y.permute(perm)
        return y * 1, y.sum()


@settings(max_examples=40, deadline=None)
@given(_VIEW_STEPS, st.sampled_from([(3, 1, 4), (1, 5), (2, 1, 1, 3), (7,)]), st.booleans())
def test_property_view_chains_bitwise(steps, shape, transposed_input):
    """Random view chains over shapes with size-1 dims, contiguous or not: outputs bit-identical
    with the same strides; a chain whose end is laid out like its start leaves no view behind."""
    x = torch.randn(shape)
    if transposed_input and x.dim() >= 2:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)  # non-contiguous input
    gm, ref = capture(ViewChain(steps), (x,), {}), capture(ViewChain(steps), (x,), {})
    before = _views(gm)
    res = CleanupPass()(gm)
    assert _views(gm) == before - res.stats["rule:identity_view"] - res.stats["rule:dead_view"]
    _check_same(ref, gm, (x,))
    y = ViewChain(steps)(x)[0]
    identity = (y.shape, y.stride()) == (x.shape, x.stride())
    if identity:
        assert _views(gm) == 0, gm.code
