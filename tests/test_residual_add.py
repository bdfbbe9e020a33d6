"""The "residual_add" pass: add trees -> one bit-equal fused op."""
from __future__ import annotations

import operator

import pytest
import torch

from fxopt.ops.fused_add import fused_add_tree, fused_add_tree_op
from fxopt.passes.residual_add import ResidualAddPass, find_trees
from fxopt.testing import assert_equivalent, bitwise


def _export(fn, *args):
    class M(torch.nn.Module):
        def forward(self, *a):
            return fn(*a)

    return torch.export.export(M(), args, strict=False).module()


def _fused_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (fused_add_tree, fused_add_tree_op)]


def _run(gm, fn, args, matches, contract=bitwise):
    ref = gm(*args)
    res = ResidualAddPass()(gm)
    assert res.matches == matches, gm.code
    assert_equivalent(fn, gm, args, contract)
    assert_equivalent(lambda *a: ref, gm, args, contract)
    return res


# ----------------------------------------------------------------------------- GPTNeoX
def _neox(parallel: bool, dtype, layers: int = 3):
    from fxopt.models.hf import tiny_gpt_neox

    return tiny_gpt_neox(parallel_residual=parallel, num_hidden_layers=layers).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_neox_parallel_one_match_per_layer_bit_equal(dtype):
    model = _neox(True, dtype)
    ids = torch.randint(0, 128, (2, 12))
    gm = torch.export.export(model, (ids,), {"use_cache": False}, strict=False).module()
    res = ResidualAddPass()(gm)
    assert res.matches == 3 and res.stats["rule:residual_add.tree"] == 3
    fused = _fused_nodes(gm)
    assert len(fused) == 3
    # (mlp + attn) + hidden, same association as HF
    assert all(n.args[1] == "t0=add(x0,x1);t1=add(t0,x2)->t1" for n in fused)
    prov = fused[0].meta["fxopt_provenance"]
    assert prov["pass"] == "residual_add" and len(prov["from"]) == 2 and prov["source"]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = gm(ids, use_cache=False).logits
    bitwise.check(ref, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_neox_serial_no_match_unchanged(dtype):
    model = _neox(False, dtype)
    ids = torch.randint(0, 128, (1, 9))
    gm = torch.export.export(model, (ids,), {"use_cache": False}, strict=False).module()
    before = gm.code
    res = ResidualAddPass()(gm)
    assert res.matches == 0 and not res.modified
    assert gm.code == before
    with torch.no_grad():
        bitwise.check(model(ids, use_cache=False).logits, gm(ids, use_cache=False).logits)


def test_gpt_neox_via_optimize_and_after_addcmul():
    import fxopt
    from fxopt.passes.addcmul import AddcmulPass

    model = _neox(True, torch.float32, layers=2)
    ids = torch.randint(0, 128, (1, 10))
    opt = fxopt.optimize(model, (ids,), {"use_cache": False}, passes=["residual_add"])
    with torch.no_grad():
        bitwise.check(model(ids, use_cache=False).logits, opt(ids, use_cache=False).logits)
    assert opt.report().matches.get("residual_add") == 2
    # addcmul first (it rewrites the rotary q*cos + rot(q)*sin), residual trees unaffected
    gm = torch.export.export(model, (ids,), {"use_cache": False}, strict=False).module()
    assert AddcmulPass()(gm).matches > 0
    assert ResidualAddPass()(gm).matches == 2


# ----------------------------------------------------------------------------- shapes of trees
def test_chain_of_four_is_one_node():
    fn = lambda a, b, c, d, e: (((a + b) + c) - d) + e  # noqa: E731
    args = tuple(torch.randn(3, 5) for _ in range(5))
    gm = _export(fn, *args)
    _run(gm, fn, args, 1)
    (node,) = _fused_nodes(gm)
    assert node.args[1] == "t0=add(x0,x1);t1=add(t0,x2);t2=sub(t1,x3);t3=add(t2,x4)->t3"


def test_balanced_tree_and_reused_leaf():
    fn = lambda a, b, c: (a + b) + (c + a)  # noqa: E731
    args = tuple(torch.randn(4, 4, dtype=torch.float16) for _ in range(3))
    gm = _export(fn, *args)
    _run(gm, fn, args, 1)
    (node,) = _fused_nodes(gm)
    assert len(node.args[0]) == 3  # a appears once as x0, used twice


def test_broadcast_leaves_and_small_intermediate():
    # (bias1 + bias2) has shape (8,) and only one user: computed per output element
    fn = lambda x, b1, b2: x + (b1 + b2)  # noqa: E731
    args = (torch.randn(2, 3, 8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16))
    gm = _export(fn, *args)
    _run(gm, fn, args, 1)


def test_non_contiguous_and_special_inputs():
    fn = lambda a, b, c: (a + b) + c  # noqa: E731
    a = torch.randn(6, 4).t()
    b = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 1e-45, 3e38]).repeat(4)[:6]
    c = torch.full((4, 6), -0.0)
    gm = _export(fn, a, b, c)
    _run(gm, fn, (a, b, c), 1)


def test_extra_output_when_intermediate_used_after_root():
    def fn(a, b, c):
        t = a + b
        r = t + c
        return r, t * 2

    args = tuple(torch.randn(5, 7) for _ in range(3))
    gm = _export(fn, *args)
    res = _run(gm, fn, args, 1)
    assert res.stats["extra_outputs"] == 1
    (node,) = _fused_nodes(gm)
    assert node.args[1] == "t0=add(x0,x1);t1=add(t0,x2)->t1,t0"
    assert len([u for u in node.users if u.target is operator.getitem]) == 2


# ----------------------------------------------------------------------------- must not fuse
def test_not_fused_when_intermediate_used_before_root():
    # serial residual: a = attn + x feeds a LayerNorm *before* h = mlp(ln(a)) + a
    ln = torch.nn.LayerNorm(8)

    def fn(attn, x):
        a = attn + x
        return torch.relu(ln(a)) + a

    args = (torch.randn(2, 8), torch.randn(2, 8))
    gm = _export(fn, *args)
    before = gm.code
    assert ResidualAddPass()(gm).matches == 0 and gm.code == before


def test_not_fused_on_promotion_alpha_or_scalar():
    cases = [
        (lambda a, b, c: (a + b) + c, (torch.randn(3, dtype=torch.float16), torch.randn(3), torch.randn(3))),  # mixed
        (lambda a, b, c: torch.add(a + b, c, alpha=2), (torch.randn(3), torch.randn(3), torch.randn(3))),  # alpha
        (lambda a, b, c: (a + b) + 1.5, (torch.randn(3), torch.randn(3), torch.randn(3))),  # scalar
        (lambda a, b, c: (a + b) + c, tuple(torch.randint(0, 5, (3,)) for _ in range(3))),  # integer
        (lambda a, b, c: (a * b) + c, (torch.randn(3), torch.randn(3), torch.randn(3))),  # one add only
    ]
    for fn, args in cases:
        gm = _export(fn, *args)
        assert ResidualAddPass()(gm).matches == 0, fn


def test_not_fused_when_intermediate_needs_bigger_output():
    # t = b1 + b2 (shape (8,)) is also returned: it cannot be an extra output of a (2,8) tree
    def fn(x, b1, b2):
        t = b1 + b2
        return x + t, t

    args = (torch.randn(2, 8), torch.randn(8), torch.randn(8))
    gm = _export(fn, *args)
    assert ResidualAddPass()(gm).matches == 0


def test_separate_trees_when_data_dependency_in_between():
    def fn(a, b, c, d):
        s = (a + b) + c  # tree 1
        return (torch.tanh(s) + d) + s  # tree 2 uses s through tanh: s stays a leaf

    args = tuple(torch.randn(4) for _ in range(4))
    gm = _export(fn, *args)
    _run(gm, fn, args, 2)


def test_rewritten_graph_exports_again_and_trees_found_once():
    fn = lambda a, b, c: (a + b) + c  # noqa: E731
    args = tuple(torch.randn(2, 3) for _ in range(3))
    gm = _export(fn, *args)
    assert len(find_trees(gm)) == 1
    ResidualAddPass()(gm)
    assert find_trees(gm) == []
    ep = torch.export.export(gm, args, strict=False)
    assert any(n.target is fused_add_tree_op for n in ep.graph.nodes)
    bitwise.check(fn(*args), ep.module()(*args))


def test_shared_intermediate_read_as_leaf_stays_leaf():
    """Found by the fuzzer: v3 = x+x is read by v5 (as a leaf: its other user v4 was not
    yet in the tree) and later by v4 (then in the tree): it must stay a leaf."""
    def fn(x):
        v3 = x + x
        v4 = x + v3
        v5 = v3 + x
        return v5 + v4

    args = (torch.tensor([1.5410, -0.2935, -2.1797], dtype=torch.float16),)
    gm = _export(fn, *args)
    _run(gm, fn, args, 1)
