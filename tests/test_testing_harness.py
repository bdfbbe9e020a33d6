"""Tests of the equivalence harness itself: contracts accept what they should and reject what
they should; assert_equivalent isolates runs and walks pytrees; strategies produce what they
promise (size-1 dims, odd sides, every special value, non-contiguous / broadcast layouts)."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxopt.testing import (
    ExactValue,
    all_of,
    assert_equivalent,
    bitwise,
    exact_fma,
    fma_rounding,
    fp64_elementwise,
    fp64_relative,
    round_exact,
    rounded,
    ulp,
    ulp_distance,
)
from fxopt.testing import strategies as S

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
_IV = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def next_up(t: torch.Tensor, n: int = 1) -> torch.Tensor:
    """``t`` moved ``n`` representable values towards +inf (positive finite inputs only)."""
    iv = _IV[t.element_size()]
    return (t.view(iv) + n).view(t.dtype)


def from_bits(bits: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([bits], dtype=_IV[torch.finfo(dtype).bits // 8]).view(dtype)


def rejects(contract, ref, cand, fp64_ref=None, match=None):
    with pytest.raises(AssertionError, match=match) as info:
        contract.check(ref, cand, fp64_ref=fp64_ref)
    return str(info.value)


# --------------------------------------------------------------------------- bitwise / ulp


@pytest.mark.parametrize("dtype", FLOATS)
def test_one_ulp_fails_bitwise_passes_ulp1_two_ulp_fails_ulp1(dtype):
    ref = torch.tensor([1.0, 3.5, 100.0], dtype=dtype)
    one = ref.clone()
    one[1:2] = next_up(ref[1:2])
    two = ref.clone()
    two[1:2] = next_up(ref[1:2], 2)
    msg = rejects(bitwise, ref, one)
    assert "index (1,)" in msg and "ulp distance 1" in msg and "1 of 3" in msg
    assert ulp(1).check(ref, one) == {"max_ulp": 1}
    msg = rejects(ulp(1), ref, two)
    assert "index (1,)" in msg and "ulp distance 2" in msg
    assert ulp(2).check(ref, two) == {"max_ulp": 2}


def test_bitwise_accepts_identical_including_specials():
    specials = S.special_values(torch.float32)
    ref = torch.stack(list(specials.values()))
    bitwise.check(ref, ref.clone())
    assert bitwise() is bitwise


def test_bitwise_nan_payload_and_sign_ignored():
    a = from_bits(0x7FC00000, torch.float32)
    b = from_bits(0x7FC00001, torch.float32)
    c = from_bits(0xFFC00000 - (1 << 32), torch.float32)  # negative quiet NaN
    assert a.isnan().all() and b.isnan().all() and c.isnan().all()
    bitwise.check(a, b)
    bitwise.check(a, c)
    ulp(0).check(a, c)


def test_signed_zero_fails_bitwise_but_is_zero_ulp():
    ref = torch.tensor([1.0, -0.0, 2.0])
    cand = torch.tensor([1.0, 0.0, 2.0])
    msg = rejects(bitwise, ref, cand)
    assert "index (1,)" in msg and "-0.0" in msg and "0x80000000" in msg
    ulp(0).check(ref, cand)


@pytest.mark.parametrize(
    "contract",
    [bitwise, ulp(1), ulp(1000), fp64_relative(100.0), fp64_elementwise(100.0)],
    ids=lambda c: c.name,
)
@pytest.mark.parametrize("direction", ["nan_vs_number", "number_vs_nan"])
def test_nan_vs_number_fails_every_contract(contract, direction):
    a = torch.tensor([0.5, float("nan"), 2.0])
    b = torch.tensor([0.5, 1.0, 2.0])
    ref, cand = (a, b) if direction == "nan_vs_number" else (b, a)
    msg = rejects(contract, ref, cand, fp64_ref=ref.double())
    assert "(1,)" in msg and "nan" in msg


@pytest.mark.parametrize(
    "contract", [bitwise, ulp(5), fp64_relative(100.0), fp64_elementwise(100.0)], ids=lambda c: c.name
)
def test_infinities_must_match_exactly(contract):
    fmax = torch.finfo(torch.float16).max
    ref = torch.tensor([float("inf"), 1.0], dtype=torch.float16)
    for bad in ([fmax, 1.0], [float("-inf"), 1.0], [float("nan"), 1.0]):
        rejects(contract, ref, torch.tensor(bad, dtype=torch.float16), fp64_ref=ref.double())
    # and a finite reference must not become inf
    rejects(contract, torch.tensor([fmax]), torch.tensor([float("inf")]), fp64_ref=torch.tensor([fmax], dtype=torch.float64))


@pytest.mark.parametrize("dtype", FLOATS)
def test_ulp_distance_across_zero_and_subnormal_boundary(dtype):
    sv = S.special_values(dtype)
    z = lambda *xs: torch.stack([sv[x] if isinstance(x, str) else torch.tensor(x, dtype=dtype) for x in xs])  # noqa: E731
    d = ulp_distance(
        z("-min_subnormal", "0.0", "-0.0", "max_subnormal", "max", "inf", "nan", "-max"),
        z("min_subnormal", "min_subnormal", "min_subnormal", "min_normal", "inf", "inf", "nan", "max"),
    )
    assert d[:4].tolist() == [2.0, 1.0, 1.0, 1.0]
    assert math.isinf(d[4]) and d[5] == 0 and d[6] == 0
    assert d[7] > 1000  # -max to +max is almost the whole ordering, no overflow


def test_ulp_distance_float64_no_overflow():
    fmax = torch.finfo(torch.float64).max
    d = ulp_distance(torch.tensor([-fmax, 1.0], dtype=torch.float64), torch.tensor([fmax, 1.0], dtype=torch.float64))
    assert d[0] > 1e18 and d[1] == 0


def test_ulp_reports_worst_element():
    ref = torch.ones(2, 3)
    cand = ref.clone()
    cand[0, 2] = next_up(ref[0, 2:3], 3)
    cand[1, 1] = next_up(ref[1, 1:2], 7)
    msg = rejects(ulp(2), ref, cand)
    assert "2 of 6" in msg and "index (1, 1)" in msg and "ulp distance 7" in msg


@pytest.mark.parametrize("contract", [bitwise, ulp(1), fp64_relative(2.0)], ids=lambda c: c.name)
def test_dtype_and_shape_must_match(contract):
    a = torch.ones(3)
    rejects(contract, a, a.half(), fp64_ref=a.double(), match="dtype")
    rejects(contract, a, torch.ones(1, 3), fp64_ref=a.double(), match="shape")
    rejects(contract, a, [1.0, 1.0, 1.0], fp64_ref=a.double(), match="tensors")


@pytest.mark.parametrize("contract", [bitwise, ulp(3), fp64_relative(2.0)], ids=lambda c: c.name)
def test_integer_tensors_need_exact_equality(contract):
    a = torch.tensor([1, 2, 3])
    contract.check(a, a.clone(), fp64_ref=a.double())
    rejects(contract, a, torch.tensor([1, 2, 4]), fp64_ref=a.double(), match="index \\(2,\\)")


def test_complex_tensors_compared_as_real_view():
    a = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64)
    bitwise.check(a, a.clone())
    b = a.clone()
    b[1] = 3 + 1j
    msg = rejects(bitwise, a, b)
    assert "index (1, 1)" in msg


def test_empty_tensors_pass():
    e = torch.empty(0, 3)
    for c in (bitwise, ulp(1), fp64_relative(2.0), fp64_elementwise()):
        c.check(e, e.clone(), fp64_ref=e.double())


# --------------------------------------------------------------------------- fp64 contracts


def _fp16_case(factor_worse: float, n: int = 1000):
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(n, generator=g, dtype=torch.float64) * 3
    ref = exact.half()
    err = ref.double() - exact
    cand = (exact + factor_worse * err).half()
    return ref, cand, exact


def test_fp64_relative_rejects_candidate_10x_worse():
    ref, cand, exact = _fp16_case(10.0)
    msg = rejects(fp64_relative(2.0), ref, cand, fp64_ref=exact)
    assert "max abs error" in msg and "fp64=" in msg and "index (" in msg
    msg = rejects(fp64_relative(2.0, rtol=0.0), ref, cand, fp64_ref=exact)
    assert "max abs error" in msg and "RMS error" in msg


def test_fp64_relative_accepts_as_good_or_better():
    ref, _, exact = _fp16_case(1.0)
    stats = fp64_relative(1.0, rtol=0.0).check(ref, ref.clone(), fp64_ref=exact)
    assert stats["max_err"] == stats["max_err_ref"] > 0
    better = exact.half()  # correctly rounded: the best possible
    worse_ref = (exact + 3 * (ref.double() - exact)).half()
    fp64_relative(1.0, rtol=0.0).check(worse_ref, better, fp64_ref=exact)
    # candidate 1.5x worse passes factor 2
    ref2, cand2, exact2 = _fp16_case(1.5)
    fp64_relative(2.0, rtol=0.0).check(ref2, cand2, fp64_ref=exact2)


def test_fp64_relative_floor_for_exact_reference():
    exact = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    ref = exact.float()
    cand = ref.clone()
    cand[2:] = next_up(ref[2:])  # one ulp off; the reference is exact (error 0)
    fp64_relative(2.0).check(ref, cand, fp64_ref=exact)  # default rtol = eps floor
    rejects(fp64_relative(2.0, rtol=0.0), ref, cand, fp64_ref=exact)
    fp64_relative(2.0, atol=1e-6, rtol=0.0).check(ref, cand, fp64_ref=exact)


def test_fp64_relative_needs_fp64_reference():
    with pytest.raises(ValueError, match="fp64 reference"):
        fp64_relative(2.0).check(torch.ones(2), torch.ones(2))
    assert fp64_relative(2.0).needs_fp64 and not bitwise.needs_fp64 and not ulp(1).needs_fp64


def test_fp64_relative_nonfinite_positions_must_match():
    exact = torch.tensor([1e5, 1.0], dtype=torch.float64)
    ref = exact.half()  # 1e5 overflows to inf in fp16
    assert ref[0].isinf()
    fp64_relative(2.0).check(ref, ref.clone(), fp64_ref=exact)
    msg = rejects(fp64_relative(2.0), ref, torch.tensor([65504.0, 1.0], dtype=torch.float16), fp64_ref=exact)
    assert "non-finite" in msg and "(0,)" in msg


def test_fp64_elementwise_rejects_single_worse_element():
    ref, _, exact = _fp16_case(1.0, n=64)
    fp64_elementwise().check(ref, ref.clone(), fp64_ref=exact)
    cand = ref.clone()
    i = int((ref.double() - exact).abs().argmin())  # an element where the original is most accurate
    cand[i] = next_up(ref[i : i + 1].abs()) * ref[i].sign() if ref[i] != 0 else cand[i] + 1e-3
    msg = rejects(fp64_elementwise(), ref, cand, fp64_ref=exact)
    assert f"index ({i},)" in msg


# --------------------------------------------------------------------------- exact rounding


def _rn_rational(x: Fraction, dtype) -> float:
    """x rounded to nearest-even in dtype, by brute force over the neighbours (slow reference)."""
    fi = torch.finfo(dtype)
    top = Fraction(2) ** math.floor(math.log2(fi.max))
    if abs(x) >= Fraction(fi.max) + top * Fraction(fi.eps) / 2:
        return math.inf if x > 0 else -math.inf
    guess = torch.tensor(float(x), dtype=torch.float64).to(dtype)
    inf = torch.tensor(math.inf, dtype=dtype)
    cands = [t for t in (guess, torch.nextafter(guess, inf), torch.nextafter(guess, -inf)) if t.isfinite()]
    iv = _IV[torch.finfo(dtype).bits // 8]
    best = min(cands, key=lambda t: (abs(Fraction(t.item()) - x), int(t.reshape(1).view(iv)) & 1))
    return best.item()


def _exact_of(x: Fraction) -> ExactValue:
    hi = float(x)
    rest = float(x - Fraction(hi))
    return ExactValue(torch.tensor([hi], dtype=torch.float64), torch.tensor([rest], dtype=torch.float64))


@pytest.mark.parametrize("dtype", FLOATS)
def test_round_exact_at_ties_thresholds_and_subnormals(dtype):
    fi = torch.finfo(dtype)
    mx = Fraction(fi.max)
    half_ulp_max = Fraction(2) ** math.floor(math.log2(fi.max)) * Fraction(fi.eps) / 2
    one = Fraction(1)
    tiny = Fraction(from_bits(1, dtype).item())  # min subnormal
    eps = Fraction(fi.eps)
    nudge = Fraction(1, 2**200)
    cases = [
        mx + half_ulp_max,  # the threshold itself: a tie, rounds to "even" = inf
        mx + half_ulp_max - nudge,  # just below: max
        mx + half_ulp_max / 2,
        one + eps / 2,  # tie -> 1 (even)
        one + eps / 2 + nudge,  # past the tie (only lo tells) -> 1 + eps
        one + eps / 2 - nudge,
        one + 3 * eps / 2,  # tie -> 1 + 2 eps (even)
        -(one + eps / 2 + nudge),
        tiny / 2,  # tie between 0 and min subnormal -> +0
        tiny / 2 + nudge,  # -> min subnormal
        -(tiny / 2 + nudge),
        3 * tiny / 2,  # tie -> 2 tiny
        Fraction(1, 3),
        -Fraction(10**30, 7),
    ]
    for x in cases:
        got = round_exact(_exact_of(x), dtype)
        assert got.dtype == dtype
        want = _rn_rational(x, dtype)
        assert got.item() == want and (want != 0 or got.signbit().item() == (x < 0)), (x, got, want)


@pytest.mark.parametrize("dtype", FLOATS)
def test_exact_fma_and_round_exact_against_rationals(dtype):
    g = torch.Generator().manual_seed(5)
    vals = torch.cat([S._values(d, k, 64, dtype) for k, d in enumerate(S.DISTRIBUTIONS)])
    a, b, c = (vals[torch.randperm(len(vals), generator=g)] for _ in range(3))
    for value in (1.0, -1.0, 3.0):  # 3.0 takes the rational path
        ex = exact_fma(c, a, b, value)
        got = round_exact(ex, dtype)
        for i in range(0, len(vals), 7):
            x = Fraction(c[i].item()) + Fraction(value) * Fraction(a[i].item()) * Fraction(b[i].item())
            assert got[i].item() == _rn_rational(x, dtype), (value, a[i], b[i], c[i])


def test_exact_fma_non_finite_and_float64():
    inf, nan = math.inf, math.nan
    ex = exact_fma(torch.tensor([1.0, -inf, 1.0]), torch.tensor([inf, 2.0, nan]), torch.tensor([2.0, 3.0, 1.0]))
    assert ex.hi[0] == inf and ex.hi[1] == -inf and ex.hi[2].isnan() and (ex.lo == 0).all()
    a = torch.tensor([1 + 2.0**-40], dtype=torch.float64)
    ex = exact_fma(-a * a, a, a)  # the product's rounding error, beyond float64
    assert ex.hi.item() == float(Fraction(a.item()) ** 2 - Fraction((a * a).item()))
    big = torch.tensor([1e300], dtype=torch.float64)
    assert exact_fma(big, big, big).hi.item() == inf


def test_rounded_contract():
    t = lambda *v, dt=torch.float16: torch.tensor(v, dtype=dt)  # noqa: E731
    exact = _exact_of(Fraction(1) + Fraction(1, 2**11) + Fraction(1, 2**60))  # just past a tie
    up = t(1 + 2.0**-10)
    assert rounded().check(t(1.0), up, fp64_ref=exact)["rounded"] == 1
    msg = rejects(rounded(), up, t(1.0), fp64_ref=exact, match="not the rounding")
    assert "index (0,)" in msg and "correctly rounded 1.0009765625" in msg
    # through float32 first: 1 + 2^-11 exactly (a tie), then to even -> 1.0: the other neighbour
    assert rounded(via=torch.float32).check(up, t(1.0), fp64_ref=exact)["other_neighbour"] == 1
    rejects(rounded(via=torch.float32), up, t(1 - 2.0**-11), fp64_ref=exact)
    far = _exact_of(Fraction(1) + Fraction(1, 2**12))  # not near a tie: only RN(x) = 1.0
    rejects(rounded(via=torch.float32), t(1.0), up, fp64_ref=far)
    # or_reference: the reference's bits are accepted as they are
    assert rounded(or_reference=True).check(up, up, fp64_ref=far)["as_reference"] == 1
    # NaN, inf and signed zero
    assert rounded().check(t(0.0), t(math.nan), fp64_ref=torch.tensor([math.nan], dtype=torch.float64))
    rejects(rounded(), t(math.nan), t(0.0), fp64_ref=torch.tensor([math.nan], dtype=torch.float64))
    rejects(rounded(), t(65504.0), t(65504.0), fp64_ref=_exact_of(Fraction(65520)))  # the threshold: inf
    rounded().check(t(65504.0), t(math.inf), fp64_ref=_exact_of(Fraction(65520)))
    rejects(rounded(), t(0.0), t(-0.0), fp64_ref=_exact_of(Fraction(1, 2**30)))  # +tiny rounds to +0
    rounded(via=torch.float32).check(t(0.0), t(-0.0), fp64_ref=torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="exact value"):
        rounded().check(up, up)
    assert rounded().needs_fp64
    assert rounded(via=torch.float32, or_reference=True).name == "rounded(via=float32) | reference"


def test_fma_rounding_per_dtype():
    assert fma_rounding(torch.float32).via is None and fma_rounding(torch.float64).via is None
    assert fma_rounding(torch.float16).via == torch.float32 and fma_rounding(torch.bfloat16).or_reference
    a, b, c = (torch.tensor([v], dtype=torch.float16) for v in (39.5625, -384.5, -0.2185))
    stats = fma_rounding(torch.float16).check(c + a * b, torch.addcmul(c, a, b), fp64_ref=exact_fma(c, a, b))
    assert stats == {"rounded": 0, "other_neighbour": 1, "as_reference": 0, "violations": 0}


def test_all_of_and_operator():
    c = ulp(1) & fp64_elementwise()
    assert c.name == "ulp(1) & fp64_elementwise(1)" and c.needs_fp64
    assert all_of(ulp(1), bitwise).needs_fp64 is False
    assert len(all_of(c, bitwise).contracts) == 3
    ref = torch.tensor([1.0, 2.0])
    exact = ref.double()
    c.check(ref, ref.clone(), fp64_ref=exact)
    rejects(c, ref, next_up(ref, 2), fp64_ref=exact, match="ulp\\(1\\)")
    rejects(c, ref, next_up(ref, 1), fp64_ref=exact, match="fp64_elementwise")


# --------------------------------------------------------------------------- assert_equivalent


def test_assert_equivalent_pytree_outputs_and_paths():
    x = torch.randn(3, 4)

    def ref(x):
        return {"a": x + 1, "b": (x * 2, 7)}

    def cand_ok(x):
        return {"a": 1 + x, "b": (2 * x, 7)}

    def cand_bad(x):
        return {"a": 1 + x, "b": (2 * x + 1e-3, 7)}

    report = assert_equivalent(ref, cand_ok, (x,), bitwise)
    paths = [p for p, _ in report.entries]
    assert "output['a']" in paths and "output['b'][0]" in paths and "args[0]" in paths
    with pytest.raises(AssertionError, match=r"output\['b'\]\[0\]: bitwise"):
        assert_equivalent(ref, cand_bad, (x,), bitwise)
    with pytest.raises(AssertionError, match="non-tensor values differ"):
        assert_equivalent(ref, lambda x: {"a": x + 1, "b": (x * 2, 8)}, (x,), bitwise)
    with pytest.raises(AssertionError, match="structure differs"):
        assert_equivalent(ref, lambda x: {"a": x + 1, "b": [x * 2, 7]}, (x,), bitwise)


def test_assert_equivalent_hf_model_output():
    import transformers.modeling_outputs as mo
    x = torch.randn(2, 5)
    ref = lambda x: mo.CausalLMOutputWithPast(logits=x * 3)  # noqa: E731
    assert_equivalent(ref, lambda x: mo.CausalLMOutputWithPast(logits=3 * x), (x,), bitwise)
    with pytest.raises(AssertionError, match="logits"):
        assert_equivalent(ref, lambda x: mo.CausalLMOutputWithPast(logits=x * 3.0001), (x,), ulp(1))


def test_inplace_candidate_cannot_corrupt_reference_and_mutation_is_checked():
    x = torch.randn(4)
    orig = x.clone()
    seen = []

    def ref(x):
        seen.append(x.clone())
        return x + 1

    def cand(x):
        return x.add_(1)  # same result, but mutates its input

    # the reference runs first; check the candidate's mutation did not leak anywhere
    with pytest.raises(AssertionError, match=r"args\[0\]"):
        assert_equivalent(ref, cand, (x,), bitwise)
    assert_equivalent(ref, cand, (x,), bitwise, check_inputs=False)
    assert torch.equal(x, orig)
    assert all(torch.equal(s, orig) for s in seen)
    # candidate runs on its own copy even if the reference mutates
    assert_equivalent(lambda x: x.add_(1), lambda x: x.add_(1), (x,), bitwise)
    assert torch.equal(x, orig)


def test_inputs_keep_their_layout():
    base = torch.randn(4, 6)
    views = {
        "transposed": base.t(),
        "sliced": base[:, ::2],
        "expanded": torch.randn(4, 1).expand(4, 6),
        "offset": base.reshape(-1)[1:].reshape(23, 1)[:, 0],
    }
    for name, v in views.items():
        got = []

        def ref(t):
            got.append((tuple(t.stride()), t.storage_offset()))
            return t * 2

        assert_equivalent(ref, ref, (v,), bitwise)
        assert got == [(tuple(v.stride()), v.storage_offset())] * 2, name


def test_fp64_reference_only_when_needed_and_module_not_mutated():
    lin = torch.nn.Linear(4, 3)
    dtypes = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            dtypes.append(x.dtype)
            return self.lin(x)

    spy = Spy()
    x = torch.randn(5, 4)
    assert_equivalent(spy, lin, (x,), ulp(4))
    assert dtypes == [torch.float32]
    dtypes.clear()
    report = assert_equivalent(spy, lin, (x,), fp64_relative(2.0))
    assert dtypes == [torch.float32, torch.float64]
    assert lin.weight.dtype == torch.float32  # the deep copy was converted, not the module
    assert report["output"]["max_err"] == report["output"]["max_err_ref"]
    # an explicit fp64 reference function is used when given
    called = []
    lin64 = torch.nn.Linear(4, 3).double()
    lin64.load_state_dict({k: v.double() for k, v in lin.state_dict().items()})

    def fp64_fn(x):
        called.append(x.dtype)
        return lin64(x)

    assert_equivalent(lin, lin, (x,), fp64_relative(1.0), reference_fp64_fn=fp64_fn)
    assert called == [torch.float64]


def test_fp64_relative_via_assert_equivalent_rejects_worse_candidate():
    x = torch.randn(64, 64, dtype=torch.float32)
    y = torch.randn(64, 64, dtype=torch.float32)
    with pytest.raises(AssertionError, match="further from the fp64 reference"):
        assert_equivalent(torch.matmul, lambda a, b: (a.half() @ b.half()).float(), (x, y), fp64_relative(2.0))


def test_fp64_reference_with_hardcoded_dtype_is_an_error():
    with pytest.raises(TypeError, match="reference_fp64_fn"):
        assert_equivalent(
            lambda x: x.float() * 2, lambda x: x * 2, (torch.ones(3),), fp64_relative(2.0), fp64_audit="off"
        )


def test_fp64_audit_flags_lower_precision_inside_reference():
    def ref(x):
        return (x.float() * 3).to(x.dtype)  # hard-coded float32 step inside

    x = torch.randn(8)
    with pytest.warns(UserWarning, match=r"aten\._to_copy.*float32"):
        assert_equivalent(ref, ref, (x,), fp64_relative(2.0))
    with pytest.raises(TypeError, match="reference_fp64_fn"):
        assert_equivalent(ref, ref, (x,), fp64_relative(2.0), fp64_audit="error")
    assert_equivalent(ref, ref, (x,), fp64_relative(2.0), fp64_audit="off")
    assert_equivalent(ref, ref, (x,), fp64_relative(2.0), fp64_audit="error",
                      reference_fp64_fn=lambda x: x * 3)


def test_fp64_run_of_exported_graph_module():
    class M(torch.nn.Module):
        def forward(self, x, y):
            return torch.softmax(x, -1) * y + 1

    args = (torch.randn(3, 5), torch.randn(5))
    gm = torch.export.export(M(), args, strict=False).module()
    report = assert_equivalent(gm, M(), args, fp64_relative(2.0), fp64_audit="error")
    assert report["output"]["max_err_ref"] > 0


def test_kwargs_and_single_tensor_input():
    x = torch.randn(3)
    assert_equivalent(lambda x, *, s: x * s, lambda x, *, s: s * x, x, bitwise, kwargs={"s": 3.0})


# --------------------------------------------------------------------------- strategies

_COVERAGE = settings(max_examples=300, derandomize=True, database=None, deadline=None)


def test_shapes_biased_to_ones_and_odd_sides():
    seen = []

    @_COVERAGE
    @given(S.shapes(1, 4, 16))
    def collect(shape):
        assert 1 <= len(shape) <= 4 and all(1 <= s <= 16 for s in shape)
        seen.append(shape)

    collect()
    sides = [s for shape in seen for s in shape]
    ones = sum(s == 1 for s in sides) / len(sides)
    odd = sum(s > 1 and s & (s - 1) != 0 for s in sides) / len(sides)
    assert ones > 0.2 and odd > 0.2, (ones, odd)
    assert {len(s) for s in seen} == {1, 2, 3, 4}
    assert any(s > 8 for s in sides)


def test_shapes_zero_side_allowed_only_when_asked():
    seen = set()

    @_COVERAGE
    @given(S.shapes(0, 3, 4, min_side=0))
    def collect(shape):
        seen.update(shape)

    collect()
    assert 0 in seen


def test_tensors_cover_special_values_dtypes_and_distributions():
    seen_specials = set()
    seen_dtypes = set()
    subnormal_seen = False

    @_COVERAGE
    @given(S.tensors(shape=S.shapes(1, 3, 6)))
    def collect(t):
        nonlocal subnormal_seen
        seen_dtypes.add(t.dtype)
        for name, v in S.special_values(t.dtype).items():
            if name == "nan":
                hit = bool(t.isnan().any())
            else:
                hit = bool(((t == v) & (t.signbit() == v.signbit())).any())
            if hit:
                seen_specials.add(name)
        fi = torch.finfo(t.dtype)
        a = t.abs()
        subnormal_seen |= bool(((a > 0) & (a < fi.tiny)).any())

    collect()
    assert seen_dtypes == set(FLOATS)
    assert seen_specials == set(S.SPECIAL_NAMES), set(S.SPECIAL_NAMES) - seen_specials
    assert subnormal_seen


@pytest.mark.parametrize("dtype", FLOATS)
def test_distributions(dtype):
    fi = torch.finfo(dtype)
    for dist in S.DISTRIBUTIONS:
        v = S._values(dist, 0, 512, dtype)
        assert v.dtype == dtype and v.isfinite().all(), dist
    assert (S._values("large", 0, 512, dtype).abs() >= fi.max / 16 * 0.99).all()
    tiny = S._values("tiny", 0, 512, dtype).abs()
    assert ((tiny > 0) & (tiny < fi.tiny)).any()
    cancel = S._values("cancel", 0, 512, dtype).double()
    assert (cancel.abs() > 0.5 / fi.eps).all() and (cancel > 0).any() and (cancel < 0).any()
    near = S._values("near_max", 0, 512, dtype).abs()
    assert (near >= fi.max / 2).all() and (near == fi.max).any()
    p = S._values("sqrt_max", 0, 512, dtype) * S._values("sqrt_max", 1, 512, dtype)
    assert 0.2 < float(p.isinf().double().mean()) < 0.8  # products overflow about half the time
    sub = S._values("subnormal", 0, 512, dtype).abs()
    assert ((sub > 0) & (sub < fi.tiny)).all() and sub.unique().numel() > 100
    # dyadic: products fall exactly halfway between two dtype values (ties) often
    x = S._values("dyadic", 0, 512, dtype).double() * S._values("dyadic", 1, 512, dtype).double()
    r = x.to(dtype)
    inf = torch.tensor(math.inf, dtype=dtype)
    gap = torch.where(r.double().abs() < x.abs(), torch.nextafter(r, inf * r.sign()), torch.nextafter(r, -inf * r.sign()))
    tie = (x != r.double()) & ((x - r.double()).abs() * 2 == (gap.double() - r.double()).abs())
    assert int(tie.sum()) >= 10
    # overflow_edge: products within a few ulps of max, both sides of the overflow threshold
    e = S._values("overflow_edge", 0, 4096, dtype).double() * S._values("overflow_edge", 1, 4096, dtype).double()
    rel = e.abs() / fi.max - 1
    assert ((rel > 0) & (rel < 2 * fi.eps)).any() and ((rel <= 0) & (rel > -2 * fi.eps)).any()
    # tie_edge: c + a*b next to a tie, where one rounding, two roundings and the product's
    # rounding first disagree (float16, whose products can sit off a tie by less than c can push)
    a, b, c = (S._values("tie_edge", k, 4096, dtype) for k in range(3))
    x = exact_fma(c, a, b)
    once, twice = round_exact(x, dtype), (c.float() + a.float() * b.float()).to(dtype)
    if dtype == torch.float16:
        assert int((once != twice).sum()) >= 4 and int(((c + a * b) != twice).sum()) >= 4
    mixed = S._values("mixed", 0, 4096, dtype).abs()
    assert (mixed == fi.max).any() and ((mixed > 0) & (mixed < fi.tiny)).any() and (mixed == 3).any()


def test_tensors_without_specials_are_finite():
    @settings(max_examples=100, derandomize=True, database=None, deadline=None)
    @given(S.tensors(special=False))
    def check(t):
        assert t.isfinite().all()

    check()


def test_tensors_fixed_shape_and_dtype():
    @settings(max_examples=30, derandomize=True, database=None, deadline=None)
    @given(S.tensors((3, 5), torch.bfloat16))
    def check(t):
        assert t.shape == (3, 5) and t.dtype == torch.bfloat16 and t.is_contiguous()

    check()


def test_strided_tensors_cover_layouts():
    kinds = set()

    @_COVERAGE
    @given(st.data())
    def collect(data):
        shape = data.draw(S.shapes(2, 3, 6))
        t = data.draw(S.strided_tensors(shape))
        assert tuple(t.shape) == shape
        if 0 in t.stride() and t.numel() > 1 and max(shape) > 1:
            kinds.add("broadcast")
        elif not t.is_contiguous():
            kinds.add("non_contiguous")
        if t.storage_offset() != 0:
            kinds.add("offset")
        dense = S.relayout(t, "contiguous")
        assert dense.is_contiguous()
        bitwise.check(dense, t)

    collect()
    assert kinds == {"broadcast", "non_contiguous", "offset"}, kinds


@settings(deadline=None)
@given(S.tensors(shape=S.shapes(0, 4, 5)), S.layouts(include_expanded=False))
def test_relayout_preserves_values(t, layout):
    r = S.relayout(t, layout)
    assert r.shape == t.shape and r.dtype == t.dtype
    bitwise.check(t, r)
    big = sum(s > 1 for s in t.shape)
    if layout in ("transposed", "sliced") and big >= (2 if layout == "transposed" else 1):
        assert not r.is_contiguous()
    if layout == "offset":
        assert r.storage_offset() == 1


def test_relayout_expanded():
    t = torch.tensor([[1.0, float("nan"), 3.0]]).expand(4, 3).contiguous()
    r = S.relayout(t, "expanded")
    assert r.stride() == (0, 1)
    bitwise.check(t, r)
    with pytest.raises(ValueError, match="not constant"):
        S.relayout(torch.arange(6.0).reshape(2, 3), "expanded")


@settings(deadline=None)
@given(st.data())
def test_broadcastable_shapes(data):
    shape = data.draw(S.shapes(0, 4, 6))
    b = data.draw(S.broadcastable_shapes(shape))
    assert torch.broadcast_shapes(shape, b) == shape
    e = data.draw(S.broadcastable_shapes(shape, allow_expand=True, max_side=6))
    out = torch.broadcast_shapes(shape, e)
    assert len(out) <= 4


def test_broadcastable_shapes_cover_ones_and_dropped_dims():
    seen = set()

    @_COVERAGE
    @given(S.broadcastable_shapes((3, 5, 7)))
    def collect(b):
        seen.add(b)

    collect()
    assert (3, 5, 7) in seen and any(len(b) < 3 for b in seen) and any(1 in b for b in seen)


# --------------------------------------------------------------------------- the harness in use


@settings(deadline=None)
@given(st.data())
def test_commuted_add_is_bitwise_equal_on_nasty_inputs(data):
    """Example of how a rewrite test uses the harness: odd layouts, broadcasting, specials."""
    dtype = data.draw(S.float_dtypes())
    shape = data.draw(S.shapes(0, 3, 6))
    a = data.draw(S.strided_tensors(shape, dtype))
    b = data.draw(S.strided_tensors(data.draw(S.broadcastable_shapes(shape)), dtype))
    assert_equivalent(torch.add, lambda x, y: torch.add(y, x), (a, b), bitwise)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", FLOATS)
def test_contracts_on_cuda_tensors(dtype):
    x = torch.randn(1000, device="cuda", dtype=dtype)
    x[0], x[1], x[2] = float("nan"), -0.0, float("inf")
    bitwise.check(x, x.clone())
    bitwise.check(x.cpu(), x)  # mixed devices are compared on the CPU
    y = x.clone()
    y[1] = 0.0
    rejects(bitwise, x, y, match="index \\(1,\\)")
    y = x.clone()
    y[5:6] = next_up(x[5:6].abs()) * x[5].sign()
    assert ulp(1).check(x, y) == {"max_ulp": 1}
    fp64_relative(2.0).check(x, x.clone(), fp64_ref=x.double())
    fp64_elementwise().check(x, x.clone(), fp64_ref=x.double())
    a = S.relayout(torch.randn(4, 6, device="cuda", dtype=dtype), "transposed")
    b = torch.randn(a.shape[0], 1, device="cuda", dtype=dtype).expand(a.shape)
    assert_equivalent(torch.add, lambda p, q: q + p, (a, b), bitwise)
    lin = torch.nn.Linear(64, 32).cuda()
    assert_equivalent(lin, lambda t: t @ lin.weight.T + lin.bias, (torch.randn(16, 64, device="cuda"),),
                      fp64_relative(2.0), fp64_audit="error")
