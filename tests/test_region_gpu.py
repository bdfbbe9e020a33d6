"""Region kernels on a CUDA device, against CUDA eager (the coordinator runs these on the GPU
machine; skipped elsewhere).

What they check:
* exact regions are bitwise (random DAGs, special values, no flush-to-zero, layouts);
* ``test_transcendentals_bitwise_claim``: the design claim that the libdevice-based
  transcendentals (exp, tanh, erf, rsqrt, sqrt, sigmoid, silu, gelu none/tanh), compiled
  without contraction and without flush-to-zero, are bit-equal to ATen's CUDA kernels. If it
  fails, the op's contract (fp64_relative(2), checked by test_block_regions_contracts) still
  holds; the claim in fxopt/ops/fused_region.py is then to be withdrawn;
* the block regions' contracts, CUDA-graph capture, autograd, and the host cost per call.
"""
from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxopt.codegen import region as rg
from fxopt.codegen import region_blocks as rb
from fxopt.ops import fused_region as fr
from fxopt.testing import assert_equivalent, bitwise, fp64_relative, ulp_distance
from fxopt.testing import strategies as fst

from region_cases import FLOATS, exact_regions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_like(x: torch.Tensor) -> torch.Tensor:
    """``x`` on the GPU with the same sizes, strides and storage offset (broadcast, sliced and
    misaligned layouts stay so)."""
    if x.numel() == 0:
        return x.cuda()
    extent = 1 + sum((s - 1) * st for s, st in zip(x.shape, x.stride()))
    flat = torch.empty(x.storage_offset() + extent, dtype=x.dtype, device="cuda")
    flat[x.storage_offset():].copy_(x.as_strided((extent,), (1,), x.storage_offset()))
    return flat.as_strided(tuple(x.shape), tuple(x.stride()), x.storage_offset())


def _eager(region, xs):
    return region.evaluate(list(xs))  # the ATen ops, on CUDA tensors: CUDA eager


def _fused(region, xs):
    return fr.fused_region(list(xs), region.text)  # the graph entry point (fast path)


@settings(max_examples=100)
@given(exact_regions())
def test_exact_regions_bitwise(case):
    region, xs = case
    xs = [cuda_like(x) for x in xs]
    for r, o in zip(_eager(region, xs), _fused(region, xs)):
        assert r.shape == o.shape
        bitwise.check(r, o)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_no_flush_to_zero(dtype):
    fi = torch.finfo(dtype)
    region = rg.parse_region(f"x0:{rg.CODE_OF[dtype]},x1:{rg.CODE_OF[dtype]}|t0=mul(x0,x1):{rg.CODE_OF[dtype]};"
                             f"t1=add(t0,x0):{rg.CODE_OF[dtype]}->t1,t0")
    tiny = torch.full((1000,), fi.smallest_normal / 8, dtype=dtype, device="cuda")
    half = torch.full((1000,), 0.5, dtype=dtype, device="cuda")
    for r, o in zip(_eager(region, [tiny, half]), _fused(region, [tiny, half])):
        bitwise.check(r, o)
        assert bool((o != 0).all())


_UNARY = ("exp", "tanh", "erf", "rsqrt", "sqrt", "sigmoid", "silu", "gelu", "gelu_tanh")
_NOT_BITWISE_ON_GPU = ("erf", "gelu")  # measured: see test_transcendentals_bitwise_claim


def _unary(op, dtype):
    b = rg.RegionBuilder()
    x = b.input(dtype)
    v = b.gelu(x) if op == "gelu" else b.gelu(x, "tanh") if op == "gelu_tanh" else b.op(op, x)
    b.output(v)
    return b.build()


def _unary_values(op, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g, dtype=torch.float64) * s for s in (1e-3, 1.0, 4.0, 30.0)])
    x = torch.cat([x.to(dtype), torch.stack(list(fst.special_values(dtype).values()))])
    return (x.abs() if op in ("rsqrt", "sqrt") else x).cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", _UNARY)
def test_transcendentals_bitwise_claim(op, dtype):
    region = _unary(op, dtype)
    x = _unary_values(op, dtype)
    ref, out = _eager(region, [x])[0], _fused(region, [x])[0]
    if op in _NOT_BITWISE_ON_GPU:
        # Measured on the H200 (2026-12-02): erf fp32 1 ulp on 3777 of 80k values, gelu up to
        # 3 ulp (fp16) / 128 ulp (bf16) and a sign-of-zero-sized fp32 difference: Triton's erf is
        # not ATen's. The op's contract for them is fp64_relative(2), checked here.
        assert fr.contract(region) is not bitwise
        fr.contract(region).check(ref, out, fp64_ref=region.in_fp64().evaluate([x.double()])[0])
        return
    d = ulp_distance(ref, out)
    assert float(d.max()) == 0, f"{op} {dtype}: {int((d > 0).sum())} elements differ, max {float(d.max())} ulp"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", _UNARY)
def test_transcendentals_contract(op, dtype):
    region = _unary(op, dtype)
    x = _unary_values(op, dtype)
    f64 = region.in_fp64()
    assert_equivalent(lambda a: _eager(region, [a]), lambda a: _fused(region, [a]), (x,), fp64_relative(2),
                      reference_fp64_fn=lambda a: f64.evaluate([a]), check_inputs=False)


def _block_cases():
    g = torch.Generator().manual_seed(0)

    def r(*shape, dt, scale=1.0, off=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + off).to(dt)

    cases = []
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for shape in ((1, 1, 2560), (2, 33, 2560), (3, 5, 77)):
            d = shape[-1]
            cases.append((f"neox_ln_{dt}_{shape}", rb.neox_residual_two_layernorms(dt),
                          [r(*shape, dt=dt), r(*shape, dt=dt), r(*shape, dt=dt, off=3.0)]
                          + [r(d, dt=dt) for _ in range(4)]))
            cases.append((f"mamba_rms_{dt}_{shape}", rb.mamba_residual_rmsnorm(dt),
                          [r(*shape, dt=torch.float32), r(*shape, dt=dt), r(d, dt=dt)]))
            cases.append((f"bias_gelu_{dt}_{shape}", rb.bias_gelu(dt, "tanh"), [r(*shape, dt=dt, scale=3), r(d, dt=dt)]))
        cases.append((f"conv_silu_{dt}", rb.mamba_conv_step_silu(dt),
                      [r(2, 1536, 4, dt=dt), r(1536, 4, dt=dt), r(1536, 1, dt=dt)]))
    return cases


@pytest.mark.parametrize("name,region,xs", _block_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_block_regions_contracts(name, region, xs):
    xs = [x.cuda() for x in xs]
    f64 = region.in_fp64()
    rep = assert_equivalent(lambda *a: _eager(region, a), lambda *a: _fused(region, a), tuple(xs), fr.contract(region),
                            reference_fp64_fn=lambda *a: f64.evaluate(list(a)), check_inputs=False)
    print(name, rep)


@pytest.mark.parametrize("dtype", FLOATS)
def test_rotary_bitwise(dtype):
    region = rb.rotary_qk(dtype, 80, 20)
    qkv = torch.randn(2, 64, 32, 240, device="cuda").to(dtype).transpose(1, 2)
    cos, sin = (torch.randn(1, 1, 64, 20, device="cuda").to(dtype) for _ in range(2))
    xs = [qkv[..., :80], qkv[..., 80:160], cos, sin]
    for r, o in zip(_eager(region, xs), _fused(region, xs)):
        assert r.stride() == o.stride()
        bitwise.check(r, o)


def test_cuda_graph_replay():
    region = rb.neox_residual_two_layernorms(torch.float16)
    xs = [torch.randn(1, 1, 2560, device="cuda", dtype=torch.float16) for _ in range(3)] + \
        [torch.randn(2560, device="cuda", dtype=torch.float16) for _ in range(4)]
    holder = {}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            _fused(region, xs)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        holder["outs"] = _fused(region, xs)
    for x in xs[:3]:
        x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    for r, o in zip(_fused(region, xs), holder["outs"]):
        bitwise.check(r, o)


def test_autograd_on_cuda():
    region = rb.neox_residual_two_layernorms(torch.float32)
    xs = [torch.randn(2, 3, 64, device="cuda") for _ in range(3)] + [torch.randn(64, device="cuda") for _ in range(4)]
    a = [x.clone().requires_grad_() for x in xs]
    b = [x.clone().requires_grad_() for x in xs]
    sum(o.square().sum() for o in _eager(region, a)).backward()
    sum(o.square().sum() for o in _fused(region, b)).backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)  # both are eager's backward: equal up to the forward's rounding


def test_host_cost_per_call():
    """Decode size: the Python-side cost of one call (key, cached launcher, output allocation,
    direct launch). Issue 12's budget for fxopt's ops is 25 us; prints the measurement."""
    region = rb.neox_residual_two_layernorms(torch.float16)
    xs = [torch.randn(1, 1, 2560, device="cuda", dtype=torch.float16) for _ in range(3)] + \
        [torch.randn(2560, device="cuda", dtype=torch.float16) for _ in range(4)]
    for _ in range(50):
        _fused(region, xs)
    torch.cuda.synchronize()
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        _fused(region, xs)
    host = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    print(f"fused_region host cost per call: {host * 1e6:.1f} us")
    assert host < 40e-6
