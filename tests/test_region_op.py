"""fxopt::fused_region: schema, CPU / fake impls, export, autograd, the graph entry point and
kernel_sources."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxopt.codegen import region as rg
from fxopt.codegen import region_blocks as rb
from fxopt.errors import FxoptError
from fxopt.ops import fused_region as fr
from fxopt.testing import assert_equivalent, bitwise
from fxopt.testing import strategies as fst

OP = torch.ops.fxopt.fused_region.default


def _inputs(region, rows=(2, 3), width=12, seed=0, dtype=None):
    g = torch.Generator().manual_seed(seed)
    xs = []
    for i, dt in enumerate(region.inputs):
        shape = (*rows, width) if i == 0 or region.inputs[0] == dt and i < 3 else (width,)
        xs.append(torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype or dt))
    return xs


def test_schema_and_cpu_impl_is_the_reference():
    assert str(OP._schema) == "fxopt::fused_region(Tensor[] xs, str region) -> Tensor[]"
    region = rb.neox_residual_two_layernorms(torch.bfloat16)
    xs = _inputs(region, width=40)
    for got, want in zip(OP(xs, region.text), region.evaluate(xs)):
        bitwise.check(want, got)
    # the entry point rewritten graphs call: the op on CPU tensors
    for got, want in zip(fr.fused_region(xs, region.text), region.evaluate(xs)):
        bitwise.check(want, got)


def test_bad_calls_raise_fxopt_errors():
    region = rb.bias_gelu(torch.float16)
    with pytest.raises(FxoptError, match="declares"):
        OP([torch.randn(2, 4), torch.randn(4)], region.text)
    with pytest.raises(FxoptError):
        OP([torch.randn(2, 4).half()], region.text)
    with pytest.raises(FxoptError):
        OP([torch.randn(2, 4).half(), torch.randn(4).half()], "not a region")


@settings(max_examples=20)
@given(perm=st.permutations([0, 1, 2]))
def test_fake_impl_layouts_are_eagers(perm):
    """Under FakeTensorMode the op yields eager's output sizes and strides (TensorIterator
    follows a permuted input's layout)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    region = rg.parse_region("x0:f32,x1:f32|t0=mul(x0,x1):f32;t1=neg(t0):f32->t1,t0")
    x = torch.randn(3, 4, 5).permute(*perm)
    y = torch.randn(x.shape[-1])
    want = [(o.shape, o.stride()) for o in region.evaluate([x, y])]
    with FakeTensorMode() as mode:
        fx_, fy = mode.from_tensor(x), mode.from_tensor(y)
        got = [(o.shape, o.stride()) for o in OP([fx_, fy], region.text)]
    assert got == want


def test_export_keeps_the_op():
    region = rb.mamba_residual_rmsnorm(torch.bfloat16)

    class M(torch.nn.Module):
        def forward(self, res, out, w):
            return fr.fused_region([res, out, w], region.text)

    xs = [torch.randn(2, 5, 16), torch.randn(2, 5, 16).bfloat16(), torch.randn(16).bfloat16()]
    ep = torch.export.export(M(), tuple(xs))
    assert any(n.target is OP for n in ep.graph.nodes)
    for got, want in zip(ep.module()(*xs), region.evaluate(xs)):
        bitwise.check(want, got)


# ----------------------------------------------------------------------------- autograd
_GRAD_REGIONS = [
    rb.neox_residual_two_layernorms(torch.float64),
    # RMSNorm as HF spells it, in fp64 throughout (the block builder casts to fp32 like HF does)
    rg.parse_region("x0:f64,x1:f64,x2:f64|t0=add(x0,x1):f64;t1=pow(t0,exponent=2):f64;t2=mean(t1):f64;"
                    "t3=add(t2,1e-05):f64;t4=rsqrt(t3):f64;t5=mul(t0,t4):f64;t6=mul(x2,t5):f64->t0,t6"),
    rb.bias_gelu(torch.float64, "tanh"),
    rb.bias_gelu(torch.float64, "none"),
    rg.parse_region("x0:f64,x1:f64|t0=slice(x0,start=0,stop=4):f64;t1=slice(x0,start=4,stop=12):f64;"
                    "t2=cat(t1,t0):f64;t3=mul(t2,x1):f64;t4=var(t3,correction=1):f64;"
                    "t5=sigmoid(t3):f64;t6=sub(t5,t4):f64->t6,t4"),
    rg.parse_region("x0:f64,x1:f64|t0=div(x0,x1):f64;t1=exp(t0):f64;t2=sum(t1):f64;t3=mean(t1):f64;"
                    "t4=erf(t0):f64;t5=tanh(t4):f64;t6=silu(t5):f64;t7=pow(t6,exponent=2):f64->t7,t2,t3"),
]


@pytest.mark.parametrize("region", _GRAD_REGIONS, ids=lambda r: r.short_hash())
def test_gradcheck_fp64(region):
    """The backward (the reference recomputed with autograd) against finite differences,
    first and second order."""
    xs = [x.requires_grad_(True) for x in _inputs(region, rows=(2, 3), width=12, seed=1)]
    if region.stmts[0].op == "div":
        xs[1] = (xs[1].detach().abs() + 1.0).requires_grad_(True)  # keep the divisor away from 0
    fn = lambda *a: tuple(OP(list(a), region.text))  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(xs))
    assert torch.autograd.gradgradcheck(fn, tuple(xs))


def test_gradients_equal_eagers():
    """Training through the op gives the gradients of the unfused computation, only for the
    inputs that ask for them, with unused outputs contributing nothing."""
    region = rb.neox_residual_two_layernorms(torch.float32)
    xs = _inputs(region, width=24, seed=2)
    ref_xs = [x.clone().requires_grad_(i != 2) for i, x in enumerate(xs)]
    cand_xs = [x.clone().requires_grad_(i != 2) for i, x in enumerate(xs)]
    h, ln1, _ = region.evaluate(ref_xs)
    (h.sum() + (ln1 * ln1).sum()).backward()
    h2, ln1b, _ = fr.fused_region(cand_xs, region.text)
    (h2.sum() + (ln1b * ln1b).sum()).backward()
    for i, (a, b) in enumerate(zip(ref_xs, cand_xs)):
        if i in (2, 5, 6):  # no grad asked / the second LayerNorm's parameters: its output was unused
            assert a.grad is None and b.grad is None
        else:
            bitwise.check(a.grad, b.grad)


def test_no_grad_inputs_need_no_backward():
    region = rb.bias_gelu(torch.float32)
    xs = _inputs(region)
    outs = fr.fused_region(xs, region.text)
    assert not outs[0].requires_grad


# ----------------------------------------------------------------------------- contracts, sources
def test_assert_equivalent_with_the_stated_contract():
    region = rb.rotary_qk(torch.float16, 16, 4)
    qkv = torch.randn(2, 7, 3, 48).half().transpose(1, 2)
    cos, sin = torch.randn(1, 1, 7, 4).half(), torch.randn(1, 1, 7, 4).half()
    assert_equivalent(lambda *a: region.evaluate(list(a)), lambda *a: fr.fused_region(list(a), region.text),
                      (qkv[..., :16], qkv[..., 16:32], cos, sin), fr.contract(region))


def test_kernel_sources_of_a_graph_with_the_op(monkeypatch, tmp_path):
    import fxopt
    from fxopt.codegen import kernel_sources

    region = rb.neox_residual_two_layernorms(torch.float16)

    def fn(a, b, c, w1, b1, w2, b2):
        return tuple(fr.fused_region([a, b, c, w1, b1, w2, b2], region.text))

    xs = _inputs(region, rows=(1, 5), width=64)
    gm = fxopt.capture_function(fn, tuple(xs))
    srcs = kernel_sources(gm)
    assert len(srcs) == 1
    name, src = next(iter(srcs.items()))
    assert name.startswith("fxopt_region_") and "layer_norm(t1,x3,x4" in src and "@triton.jit" in src


@settings(max_examples=10)
@given(data=st.data())
def test_cpu_op_bitwise_on_random_layouts(data):
    """The CPU impl is the reference whatever the layout (a guard against an impl that
    densifies inputs and changes eager's output strides)."""
    region = rg.parse_region("x0:f16,x1:f16|t0=add(x0,x1):f16;t1=gelu(t0,approximate=none):f16->t1,t0")
    shape = data.draw(fst.shapes(min_dims=1, max_dims=3, max_side=6))
    x = data.draw(fst.strided_tensors(shape, torch.float16))
    y = data.draw(fst.strided_tensors(shape, torch.float16))
    for got, want in zip(OP([x, y], region.text), region.evaluate([x, y])):
        assert got.stride() == want.stride()
        bitwise.check(want, got)


def test_forward_mode_ad_is_refused():
    import torch.autograd.forward_ad as fwAD

    region = rb.bias_gelu(torch.float32)
    x, b = torch.randn(3, 5), torch.randn(5)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(FxoptError, match="forward-mode AD"):
            fr.fused_region([dual, b], region.text)


def test_torch_func_transforms_get_a_clear_error():
    """torch cannot run a torch.library op with registered autograd inside functorch
    transforms; the entry point says so instead of a traceback from torch.autograd.Function."""
    region = rb.bias_gelu(torch.float64)
    x, b = torch.randn(2, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    with pytest.raises(FxoptError, match="torch.func"):
        torch.func.grad(lambda a: fr.fused_region([a, b], region.text)[0].sum())(x)
    with pytest.raises(FxoptError, match="torch.func"):
        torch.func.vmap(lambda a: fr.fused_region([a, b], region.text)[0])(x)


def test_fast_path_under_the_interpreter(monkeypatch, tmp_path):
    """The dispatcher bypass (taken on CUDA) driven with CPU tensors through the interpreted
    kernel: cached per specialisation, and never taken when a gradient could flow."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fr, "FAST_PATH_ON_CPU", True)
    monkeypatch.setattr(fr, "_FAST", {})
    region = rb.rotary_qk(torch.float16, 16, 4)
    qkv = torch.randn(1, 5, 2, 48).half().transpose(1, 2)
    cos, sin = torch.randn(1, 1, 5, 4).half(), torch.randn(1, 1, 5, 4).half()
    xs = [qkv[..., :16], qkv[..., 16:32], cos, sin]
    outs = fr.fused_region(xs, region.text)
    assert len(fr._FAST) == 1 and next(iter(fr._FAST.values())).launch is not None
    for r, o in zip(region.evaluate(xs), outs):
        bitwise.check(r, o)
    fr.fused_region(xs, region.text)
    assert len(fr._FAST) == 1  # the same specialisation: reused
    g = [x.detach().clone().requires_grad_() for x in xs]
    out = fr.fused_region(g, region.text)
    assert out[0].grad_fn is not None and len(fr._FAST) == 1  # went through the op
