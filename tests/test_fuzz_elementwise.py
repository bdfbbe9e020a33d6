"""Fuzzing the elementwise passes with random small programs.

A Hypothesis strategy draws a program - inputs of broadcastable shapes, then a sequence
of add / sub / mul / scalar mul / add with alpha / dtype casts whose operands are drawn
from every value computed so far (so intermediates are reused and escape as outputs) -
and builds it directly as an ATen-level ``torch.fx`` graph with fake-tensor metadata,
the form captured graphs have. Each example checks

* ``residual_add``: the rewritten program is bit-equal to the original on every output;
* ``addcmul``: every rewrite meets its contract *locally*, on the original values of its
  operands: :func:`fxopt.testing.fma_rounding` against the exact ``c + v*a*b`` (correctly
  rounded, through float32 for 16-bit dtypes, or the replaced add's bits), and outputs keep
  shapes and dtypes;
* both orders compose: ``addcmul`` then ``residual_add`` is bit-equal to ``addcmul``
  alone, ``residual_add`` then ``addcmul`` lints and keeps shapes/dtypes.

Inputs come from :mod:`fxopt.testing.strategies`: every value distribution (values up to max,
factors whose products sit at the overflow threshold, subnormals, rounding ties, mixtures),
inf / nan / -0.0 spliced in, size-1 and odd sides, broadcast and non-contiguous operands.

``FXOPT_FUZZ_EXAMPLES`` (default 200) sets the example count; CI runs the default.
"""
from __future__ import annotations


import pytest
import torch
import torch.fx

from fxopt.config import get_config
from fxopt.passes.addcmul import AddcmulPass
from fxopt.passes.residual_add import ResidualAddPass
from fxopt.testing import bitwise

import hypothesis
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fxopt.testing import strategies as fst  # noqa: E402

from test_addcmul import check_rewrite, scalar_factor  # noqa: E402

aten = torch.ops.aten
# exact in every dtype, not exact in 16-bit (0.1; 1e4 in bf16: left alone there), and ones that
# push products out of range (1e4 overflows fp16 products, 2^-20 makes fp16 subnormals)
SCALARS = (2.0, 0.5, -1.0, 0.25, 3.0, 0.1, 1e4, 2.0**-20)
OPS = ("add", "add", "add", "sub", "mul", "mul", "mul_s", "add_alpha", "cast")


@st.composite
def programs(draw):
    dtype = draw(fst.float_dtypes())
    other = torch.float32 if dtype != torch.float32 else draw(st.sampled_from([torch.float16, torch.bfloat16]))
    shape = draw(fst.shapes(min_dims=1, max_dims=3, max_side=6))
    n_in = draw(st.integers(2, 4))
    # half the programs draw every input from one distribution, so that products and sums
    # pair the regimes built for each other (factors at the overflow threshold, next to ties)
    dists = fst.DISTRIBUTIONS
    if draw(st.booleans()):
        dists = (draw(st.sampled_from(fst.DISTRIBUTIONS)),)
    inputs = []
    for i in range(n_in):
        s = shape if i == 0 else draw(fst.broadcastable_shapes(shape))
        x = draw(fst.tensors(s, dtype, distributions=dists))
        if draw(st.integers(0, 4)) == 0:  # sometimes a non-contiguous or broadcast view
            x = draw(fst.strided_tensors(s, dtype, layouts=("transposed", "sliced", "offset"), distributions=dists))
        inputs.append(x)
    n_ops = draw(st.integers(2, 9))
    ops = []
    n_vals = n_in
    for _ in range(n_ops):
        kind = draw(st.sampled_from(OPS))
        i = draw(st.integers(0, n_vals - 1))
        j = draw(st.integers(0, n_vals - 1))
        # bias towards the latest values so chains form
        if draw(st.booleans()):
            i = n_vals - 1
        s = draw(st.sampled_from(SCALARS))
        ops.append((kind, i, j, s, other))
        n_vals += 1
    extra_outs = draw(st.lists(st.integers(0, n_vals - 2), max_size=2, unique=True))
    return inputs, ops, extra_outs


def build(inputs, ops, extra_outs) -> torch.fx.GraphModule:
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=False)
    g = torch.fx.Graph()
    vals = []
    for k, x in enumerate(inputs):
        p = g.placeholder(f"x{k}")
        p.meta["val"] = mode.from_tensor(x)
        vals.append(p)
    for kind, i, j, s, other in ops:
        a, b = vals[i], vals[j]
        if kind == "add":
            n = g.call_function(aten.add.Tensor, (a, b))
        elif kind == "sub":
            n = g.call_function(aten.sub.Tensor, (a, b))
        elif kind == "mul":
            n = g.call_function(aten.mul.Tensor, (a, b))
        elif kind == "mul_s":
            n = g.call_function(aten.mul.Tensor, (a, s))
        elif kind == "add_alpha":
            n = g.call_function(aten.add.Tensor, (a, b), {"alpha": s})
        else:  # cast to the other float dtype
            n = g.call_function(aten._to_copy.default, (a,), {"dtype": other})
        with mode:
            args = torch.fx.node.map_arg(n.args, lambda x: x.meta["val"])
            n.meta["val"] = n.target(*args, **n.kwargs)
        vals.append(n)
    outs = [vals[-1]] + [vals[k] for k in extra_outs if vals[k] is not vals[-1]]
    g.output(tuple(outs))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def run_values(gm, inputs) -> dict[str, torch.Tensor]:
    env: dict[str, torch.Tensor] = {}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            env[n.name] = r
            return r

    Rec(gm).run(*inputs)
    return env


def check_addcmul_local(orig_gm, new_gm, inputs):
    env = run_values(orig_gm, inputs)

    def orig_value(n):
        if not isinstance(n, torch.fx.Node):
            return n
        prov = n.meta.get("fxopt_provenance")
        return env[prov["from"][-1]] if prov else env[n.name]

    checked = 0
    for n in new_gm.graph.nodes:
        prov = n.meta.get("fxopt_provenance")
        if not prov or prov["pass"] != "addcmul":
            continue
        args = [orig_value(a) for a in n.args]
        cand = n.target(*args, **n.kwargs)
        orig = env[prov["from"][-1]]
        if n.target is aten.addcmul.default:
            c, a, b = args
            check_rewrite(orig, cand, c, a, b, n.kwargs.get("value", 1))
        else:
            c, a = args
            check_rewrite(orig, cand, c, a, scalar_factor(n.kwargs["alpha"], a.dtype))
        checked += 1
    return checked


def _outputs(gm, inputs):
    out = gm(*inputs)
    return list(out) if isinstance(out, (tuple, list)) else [out]


@settings(max_examples=get_config().fuzz_examples)
@given(prog=programs())
def test_fuzz_elementwise(prog):
    inputs, ops, extra = prog
    ref = _outputs(build(inputs, ops, extra), inputs)

    # residual_add alone: bit-equal
    gm_r = build(inputs, ops, extra)
    res = ResidualAddPass()(gm_r)
    gm_r.graph.lint()
    for r, o in zip(ref, _outputs(gm_r, inputs)):
        bitwise.check(r, o)
    for n in gm_r.graph.nodes:
        if n.meta.get("fxopt_tree"):
            assert n.meta["fxopt_tree"].count("=") >= 2

    # addcmul alone: local contract per rewrite
    gm_a = build(inputs, ops, extra)
    res_a = AddcmulPass()(gm_a)
    gm_a.graph.lint()
    out_a = _outputs(gm_a, inputs)
    for r, o in zip(ref, out_a):
        assert r.shape == o.shape and r.dtype == o.dtype
    if res_a.matches:
        assert check_addcmul_local(build(inputs, ops, extra), gm_a, inputs) == res_a.matches

    # addcmul then residual_add: bit-equal to addcmul alone
    ResidualAddPass()(gm_a)
    gm_a.graph.lint()
    for r, o in zip(out_a, _outputs(gm_a, inputs)):
        bitwise.check(r, o)

    # residual_add then addcmul: still a valid graph computing the same shapes/dtypes
    AddcmulPass()(gm_r)
    gm_r.graph.lint()
    for r, o in zip(ref, _outputs(gm_r, inputs)):
        assert r.shape == o.shape and r.dtype == o.dtype
    assert res.matches >= 0


def test_fuzz_generator_covers_features():
    """The strategy really produces trees, products next to adds, casts and reuse."""
    from hypothesis import Phase, find

    fast = settings(phases=[Phase.generate], max_examples=200, database=None)  # no shrinking: just find one
    find(programs(), lambda p: sum(k in ("add", "sub") for k, *_ in p[1]) >= 3, settings=fast)
    find(programs(), lambda p: any(k == "cast" for k, *_ in p[1]), settings=fast)
    find(programs(), lambda p: any(i == j for _, i, j, *_ in p[1]), settings=fast)
    find(programs(), lambda p: any(not x.is_contiguous() for x in p[0]), settings=fast)


def _finite_inputs(p):
    return [x for x in p[0] if x.isfinite().any()]


def test_fuzz_values_reach_the_extremes():
    """Inputs hold values near max, subnormals, -0.0/inf/nan, and pairs whose products overflow
    the dtype or sit at its overflow threshold."""
    from hypothesis import Phase, find

    fast = settings(phases=[Phase.generate], max_examples=2000, database=None)

    def near_max(p):
        return any(bool((x.abs() >= torch.finfo(x.dtype).max / 2).logical_and(x.isfinite()).any()) for x in p[0])

    def subnormal(p):
        return any(bool(((x.abs() > 0) & (x.abs() < torch.finfo(x.dtype).tiny)).any()) for x in p[0])

    def product_overflows(p):
        xs = p[0]
        return any(bool(((x * y).isinf() & x.isfinite() & y.isfinite()).any()) for x in xs for y in xs)

    def product_at_threshold(p):  # a finite product above max: rounding it saturates or overflows
        xs = p[0]
        for x in xs:
            for y in xs:
                prod = x.double() * y.double()
                if bool(((prod.abs() > torch.finfo(x.dtype).max) & prod.isfinite()
                         & (prod.abs() < torch.finfo(x.dtype).max * (1 + 4 * torch.finfo(x.dtype).eps))).any()):
                    return True
        return False

    find(programs(), near_max, settings=fast)
    find(programs(), subnormal, settings=fast)
    find(programs(), product_overflows, settings=fast)
    find(programs(), product_at_threshold, settings=fast)
    find(programs(), lambda p: any(bool(x.isnan().any()) for x in p[0]), settings=fast)
    find(programs(), lambda p: any(bool((x.signbit() & (x == 0)).any()) for x in p[0]), settings=fast)
