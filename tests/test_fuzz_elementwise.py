"""Fuzzing the elementwise passes with random small programs.

A Hypothesis strategy draws a program - inputs of broadcastable shapes, then a sequence
of add / sub / mul / scalar mul / add with alpha / dtype casts whose operands are drawn
from every value computed so far (so intermediates are reused and escape as outputs) -
and builds it directly as an ATen-level ``torch.fx`` graph with fake-tensor metadata,
the form captured graphs have. Each example checks

* ``residual_add``: the rewritten program is bit-equal to the original on every output;
* ``addcmul``: every rewrite meets its contract *locally* (on the original values of its
  operands: never further from fp64 than the replaced add, within 1 ulp of it where no
  cancellation happened), and outputs keep shapes and dtypes;
* both orders compose: ``addcmul`` then ``residual_add`` is bit-equal to ``addcmul``
  alone, ``residual_add`` then ``addcmul`` lints and keeps shapes/dtypes.

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

from test_addcmul import check_contract  # noqa: E402

aten = torch.ops.aten
SCALARS = (2.0, 0.5, -1.0, 0.25, 3.0, 0.1)
OPS = ("add", "add", "add", "sub", "mul", "mul", "mul_s", "add_alpha", "cast")


@st.composite
def programs(draw):
    dtype = draw(fst.float_dtypes())
    other = torch.float32 if dtype != torch.float32 else draw(st.sampled_from([torch.float16, torch.bfloat16]))
    shape = draw(fst.shapes(min_dims=1, max_dims=3, max_side=6))
    n_in = draw(st.integers(2, 4))
    inputs = []
    for i in range(n_in):
        s = shape if i == 0 else draw(fst.broadcastable_shapes(shape))
        x = draw(fst.tensors(s, dtype))
        if draw(st.integers(0, 4)) == 0:  # sometimes a non-contiguous or broadcast view
            x = draw(fst.strided_tensors(s, dtype, layouts=("transposed", "sliced", "offset")))
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

    for n in new_gm.graph.nodes:
        prov = n.meta.get("fxopt_provenance")
        if not prov or prov["pass"] != "addcmul":
            continue
        args = [orig_value(a) for a in n.args]
        cand = n.target(*args, **n.kwargs)
        orig = env[prov["from"][-1]]
        a64 = [x.double() if isinstance(x, torch.Tensor) else x for x in args]
        if n.target is aten.addcmul.default:
            c, a, b = a64
            f64 = c + n.kwargs.get("value", 1) * (a * b)
        else:
            c, a = a64
            f64 = c + n.kwargs.get("alpha", 1) * a
        no_cancel = ((f64 - c) * c >= 0).expand(orig.shape)
        check_contract(orig, cand, f64, no_cancel)


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
        check_addcmul_local(build(inputs, ops, extra), gm_a, inputs)

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
