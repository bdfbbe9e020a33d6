"""The "addcmul" pass: spellings, legality, and its numerical contract."""
from __future__ import annotations

import pytest
import torch

from fxopt.passes.addcmul import ADDCMUL_RULES, AddcmulPass
from fxopt.testing import ulp_distance

import hypothesis
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fxopt.testing import strategies as fst  # noqa: E402

aten = torch.ops.aten


def _export(fn, *args):
    class M(torch.nn.Module):
        def forward(self, *a):
            return fn(*a)

    return torch.export.export(M(), args, strict=False).module()


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


# ----------------------------------------------------------------------------- the contract
def fp64_error(x: torch.Tensor, f64: torch.Tensor) -> torch.Tensor:
    """|x - f64| per element; a non-finite x is exact only where f64 is the same
    non-finite value (any NaN matches NaN), otherwise infinitely wrong."""
    x64 = x.to(torch.float64)
    err = (x64 - f64).abs()
    nan_ok = f64.isnan() & x64.isnan()
    inf_ok = f64.isinf() & (x64 == f64)
    err = torch.where(nan_ok | inf_ok, torch.zeros_like(err), err)
    bad = (f64.isnan() & ~x64.isnan()) | (~f64.isnan() & x64.isnan())
    return torch.where(bad | err.isnan(), torch.full_like(err, float("inf")), err)


def check_contract(orig, cand, f64, no_cancel_mask):
    """Never further from fp64 than the original (every element); within 1 ulp of the
    original where no cancellation/overflow happened."""
    assert cand.dtype == orig.dtype and cand.shape == orig.shape
    e_o, e_c = fp64_error(orig, f64), fp64_error(cand, f64)
    worse = e_c > e_o
    if worse.any():
        i = int(worse.reshape(-1).nonzero()[0])
        raise AssertionError(
            f"addcmul further from fp64 than the original at flat {i}: orig={orig.reshape(-1)[i].item()!r} "
            f"cand={cand.reshape(-1)[i].item()!r} fp64={f64.reshape(-1)[i].item()!r}")
    m = no_cancel_mask & orig.isfinite()
    if m.any():
        d = ulp_distance(orig, cand)
        assert float(d[m].max()) <= 1, f"more than 1 ulp from the original: {float(d[m].max())}"


SPELLINGS = {
    # name: (fn(a, b, c), fp64 reference fn, the rule it must hit)
    "c+a*b": (lambda a, b, c: c + a * b, lambda a, b, c: c + a * b, "add(c,mul(a,b))"),
    "a*b+c": (lambda a, b, c: a * b + c, lambda a, b, c: c + a * b, "add(mul(a,b),c)"),
    "c-a*b": (lambda a, b, c: c - a * b, lambda a, b, c: c - a * b, "sub(c,mul(a,b))"),
    "add alpha=-1": (lambda a, b, c: torch.add(c, a * b, alpha=-1), lambda a, b, c: c - a * b, "add(c,mul(a,b))"),
    "sub alpha=-1": (lambda a, b, c: torch.sub(c, a * b, alpha=-1), lambda a, b, c: c + a * b, "sub(c,mul(a,b))"),
    "c+a*0.25": (lambda a, b, c: c + a * 0.25, lambda a, b, c: c + a * 0.25, "add(c,mul(a,s))"),
    "a*4+c": (lambda a, b, c: a * 4 + c, lambda a, b, c: c + a * 4, "add(mul(a,s),c)"),
    "c-a*2": (lambda a, b, c: c - a * 2, lambda a, b, c: c - a * 2, "sub(c,mul(a,s))"),
}


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_each_spelling_rewrites_once(name):
    fn, _, rule = SPELLINGS[name]
    args = tuple(torch.randn(3, 4) for _ in range(3))
    gm = _export(fn, *args)
    entry = next(r for r in ADDCMUL_RULES if r.name == rule)
    res = AddcmulPass()(gm)
    assert res.matches == 1 and res.stats[f"rule:{rule}"] == 1  # per run; the rule keeps no counter
    t = _targets(gm)
    assert aten.mul.Tensor not in t and aten.sub.Tensor not in t
    assert (aten.addcmul.default in t) != (aten.add.Tensor in t)
    node = next(n for n in gm.graph.nodes if n.target in (aten.addcmul.default, aten.add.Tensor))
    prov = node.meta["fxopt_provenance"]
    assert prov["rule"] == rule and prov["pass"] == "addcmul" and prov["source"].endswith(f"addcmul.py:{entry.source.split(':')[-1]}")
    assert node.meta["val"].shape == (3, 4)
    out, ref = gm(*args), fn(*args)
    assert out.dtype == ref.dtype and out.shape == ref.shape


def test_rules_table_documented():
    assert len({r.name for r in ADDCMUL_RULES}) == len(ADDCMUL_RULES)
    for r in ADDCMUL_RULES:
        assert r.description and "addcmul.py:" in r.source and r.fn.__doc__


@pytest.mark.parametrize(
    "fn,args",
    [
        # the product has another user
        (lambda a, b, c: (lambda p: (c + p, p))(a * b), tuple(torch.randn(3) for _ in range(3))),
        # mixed dtypes (type promotion)
        (lambda a, b, c: c + a * b, (torch.randn(3, dtype=torch.float16), torch.randn(3, dtype=torch.float16), torch.randn(3))),
        # integers
        (lambda a, b, c: c + a * b, tuple(torch.randint(-3, 3, (3,)) for _ in range(3))),
        # alpha other than ±1: value*a would round (0.3), or underflow (0.5, see below)
        (lambda a, b, c: torch.add(c, a * b, alpha=0.3), tuple(torch.randn(3) for _ in range(3))),
        (lambda a, b, c: torch.sub(c, a * b, alpha=0.5), tuple(torch.randn(3) for _ in range(3))),
        # sub(mul, c) would need neg(c)
        (lambda a, b, c: a * b - c, tuple(torch.randn(3) for _ in range(3))),
        # alpha on the add scales c, not the product
        (lambda a, b, c: torch.add(a * b, c, alpha=2), tuple(torch.randn(3) for _ in range(3))),
        # a product of the same node twice in one add
        (lambda a, b, c: (lambda p: p + p)(a * b), tuple(torch.randn(3) for _ in range(3))),
    ],
    ids=["other-user", "mixed-dtype", "integer", "alpha-0.3", "alpha-0.5", "mul-minus-c", "alpha-on-c", "p+p"],
)
def test_negative_cases_untouched(fn, args):
    gm = _export(fn, *args)
    before = gm.code
    res = AddcmulPass()(gm)
    assert res.matches == 0 and gm.code == before


def test_broadcast_shapes_kept():
    fn = lambda a, b, c: c + a * b  # noqa: E731
    args = (torch.randn(4, 1), torch.randn(1, 5), torch.randn(5))
    gm = _export(fn, *args)
    assert AddcmulPass()(gm).matches == 1
    assert gm(*args).shape == (4, 5)


def test_gpt_neox_rotary_matches():
    from fxopt.models.hf import tiny_gpt_neox

    model = tiny_gpt_neox(True, num_hidden_layers=2)
    ids = torch.randint(0, 128, (1, 8))
    gm = torch.export.export(model, (ids,), {"use_cache": False}, strict=False).module()
    res = AddcmulPass()(gm)
    assert res.matches == 4  # q*cos + rot(q)*sin and the same for k, per layer
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = gm(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- contract, property-based
@settings(max_examples=60)
@given(data=st.data())
def test_contract_hypothesis(data):
    name = data.draw(st.sampled_from(list(SPELLINGS)))
    fn, ref64, _ = SPELLINGS[name]
    dtype = data.draw(fst.float_dtypes())
    shape = data.draw(fst.shapes(min_dims=1, max_dims=3, max_side=16))
    a = data.draw(fst.tensors(shape, dtype))
    b = data.draw(fst.tensors(data.draw(fst.broadcastable_shapes(shape)), dtype))
    c = data.draw(fst.tensors(data.draw(fst.broadcastable_shapes(shape)), dtype))
    gm = _export(fn, a, b, c)
    assert AddcmulPass()(gm).matches == 1
    orig, cand = fn(a, b, c), gm(a, b, c)
    f64 = ref64(a.double(), b.double(), c.double())
    # "no cancellation": the term added to c has c's sign (or one of them is zero)
    c64 = c.double()
    no_cancel = (f64 - c64) * c64 >= 0
    check_contract(orig, cand, f64, no_cancel.expand(orig.shape))


def test_contract_cannot_be_1ulp_under_cancellation():
    """Documented: where a*b cancels against c, the original's rounded product is the
    whole error, so addcmul (one rounding) is far in ulps from the original - but closer
    to the true value. The pass's contract is the fp64 clause there."""
    a = torch.tensor([1 + 2**-12], dtype=torch.float32)
    b = a.clone()
    c = -(a * b)  # -(rounded product)
    orig = c + a * b  # exactly 0
    cand = torch.addcmul(c, a, b)  # the rounding error of a*b, 2**-24 (fma on CPU)
    f64 = c.double() + a.double() * b.double()
    assert orig.item() == 0.0 and cand.item() == f64.item() != 0.0
    assert float(ulp_distance(orig, cand).max()) > 1e6
    check_contract(orig, cand, f64, torch.zeros(1, dtype=torch.bool))


def test_overflowing_product_fp16():
    """fp16: a*b overflows to inf in the original, addcmul (fp32 inside) does not."""
    a = torch.tensor([300.0], dtype=torch.float16)
    c = torch.tensor([-60000.0], dtype=torch.float16)
    orig = c + a * a
    cand = torch.addcmul(c, a, a)
    assert orig.isinf().all() and cand.isfinite().all()
    check_contract(orig, cand, c.double() + a.double() ** 2, torch.zeros(1, dtype=torch.bool))


def test_power_of_two_alpha_would_break_the_contract():
    """Why alpha=0.5 is not folded into value (found by Hypothesis): ATen's addcmul
    computes value*a first, which underflows into the subnormals and rounds."""
    a = torch.tensor([1.9595e-38], dtype=torch.float32)
    b = torch.tensor([-2.1788], dtype=torch.float32)
    c = torch.zeros(1)
    orig = torch.sub(c, a * b, alpha=0.5)
    folded = torch.addcmul(c, a, b, value=-0.5)
    f64 = c.double() - 0.5 * a.double() * b.double()
    with pytest.raises(AssertionError, match="further from fp64"):
        check_contract(orig, folded, f64, torch.zeros(1, dtype=torch.bool))


@pytest.mark.parametrize("order", [["addcmul", "scan"], ["scan", "addcmul"]])
def test_composes_with_scan_in_either_order(order):
    import fxopt.passes.scan  # noqa: F401 - a test dependency, required
    import fxopt
    from fxopt.models.seed_mamba import SeedMamba, SeedMambaConfig

    model = SeedMamba(SeedMambaConfig(n_layer=2)).eval()
    ids = torch.randint(0, 100, (1, 12))
    opt = fxopt.optimize(model, (ids,), passes=order)
    assert opt.report().matches.get("scan") == 2  # one loop per layer, whether or not its body became addcmul
    with torch.no_grad():
        torch.testing.assert_close(opt(ids), model(ids), rtol=1e-4, atol=1e-5)
