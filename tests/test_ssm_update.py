"""The ``ssm_update`` pass (Mamba decode-step state updates -> fused in-place ops) and the ops'
Triton kernels (under TRITON_INTERPRET=1 here, against the references)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fxopt
from fxopt.ops.ssm_update import (CONV_STATE_UPDATE, SELECTIVE_STATE_UPDATE, conv_state_update_ref,
                                  selective_state_update_ref)
from fxopt.passes.ssm_update import SSMUpdatePass, explain_ssm_update
from fxopt.testing import assert_equivalent, fp64_relative
from fxopt.testing.strategies import tensors

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the special values

CONTRACT = fp64_relative(2.0, atol=1e-6)
EPS32 = torch.finfo(torch.float32).eps


def _dot_contract(n: int, a: torch.Tensor, b: torch.Tensor):
    """fp64_relative(2) with the floor of an n-term fp32 dot product summed in another order:
    n eps max|a| max|b| (the kernels reduce in a tree, ATen in sequence; either may be the luckier)."""
    floor = n * EPS32 * float(a.double().abs().max()) * float(b.double().abs().max())
    return fp64_relative(2.0, atol=1e-6 + floor)


def _inputs(b=2, d=5, s=3, k=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return dict(state=r(b, d, s), x=r(b, d).to(dtype), dt=(r(b, d) - 1).to(dtype), A=-torch.exp(r(d, s) * 0.5),
                B=r(b, s).to(dtype), C=r(b, s).to(dtype), D=r(d).to(dtype), z=r(b, d).to(dtype),
                bias=r(d).to(dtype), conv=r(b, d, k).to(dtype), xc=r(b, d, 1).to(dtype), w=r(d, k).to(dtype),
                wb=r(d).to(dtype))


def _step(state, x, dt, A, B, C, D, z, bias, conv, xc, w, wb):
    """One Mamba decode step's two updates, as the runtime's wrapper spells them."""
    u = conv_state_update_ref(xc, conv, w, wb, silu=True)
    y = selective_state_update_ref(state, x + u[..., 0], dt, A, B, C, D, z, bias.float(), True)
    return y


def _run_pass(fn, args):
    gm = fxopt.capture_function(fn, tuple(args))
    before = fxopt.capture_function(fn, tuple(args))
    p = SSMUpdatePass()
    result = p(gm)
    return before, result, p


def _clone(args):
    return [a.clone() for a in args]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fuses_both_updates_bitwise_on_cpu(dtype):
    args = list(_inputs(dtype=dtype).values())
    before, result, _ = _run_pass(_step, args)
    assert result.matches == 2 and result.stats["rule:state_update"] == 1 and result.stats["rule:conv_update"] == 1
    targets = [n.target for n in result.graph_module.graph.nodes]
    assert SELECTIVE_STATE_UPDATE in targets and CONV_STATE_UPDATE in targets
    assert torch.ops.aten.softplus.default not in targets and torch.ops.aten.conv1d.default not in targets
    a1, a2 = _clone(args), _clone(args)
    for _ in range(3):  # the states carry over: three decode steps
        y1, y2 = before(*a1), result.graph_module(*a2)
        assert torch.equal(y1, y2)
        for t1, t2 in zip(a1, a2):
            assert torch.equal(t1, t2)  # state and conv window written identically


def test_a_from_a_log_is_folded_into_the_op():
    """HF's mixer computes A = -exp(A_log.float()) every step: the op takes A_log instead."""
    def fn(state, x, dt, A_log, B, C, D, z, bias):
        A = -torch.exp(A_log.float())
        return selective_state_update_ref(state, x, dt, A, B, C, D, z, bias.float(), True)

    a = _inputs()
    args = [a["state"], a["x"], a["dt"], torch.log(-a["A"]), a["B"], a["C"], a["D"], a["z"], a["bias"]]
    before, result, _ = _run_pass(fn, args)
    (op,) = [n for n in result.graph_module.graph.nodes if n.target is SELECTIVE_STATE_UPDATE]
    placeholders = [n for n in result.graph_module.graph.nodes if n.op == "placeholder"]
    assert op.args[3] is placeholders[3] and op.args[10] is True  # A_log itself
    assert torch.ops.aten.exp.default not in [n.target for n in result.graph_module.graph.nodes]
    a1, a2 = _clone(args), _clone(args)
    assert torch.equal(before(*a1), result.graph_module(*a2)) and torch.equal(a1[0], a2[0])


def _lookalike(kind):
    def fn(state, x, dt, A, B, C, D, z, bias, conv, xc, w, wb):
        dt = dt + bias.float().to(dt.dtype)
        dt = F.softplus(dt, beta=2.0) if kind == "softplus_beta" else F.softplus(dt)
        dA = torch.exp(dt.float()[..., None] * A.float())
        dBx = dt.float()[..., None] * B.float()[:, None, :] * x.float()[..., None]
        new = state.float() * dA + dBx
        state.copy_(new)
        if kind == "read_between":
            extra = state.sum()
        if kind == "sum_readout":
            out = (new * C[:, None, :]).sum(-1)
        else:
            out = torch.matmul(new, C.unsqueeze(-1)).squeeze(-1)
        out = out + x * D
        out = out * (torch.sigmoid(z) if kind == "sigmoid_gate" else F.silu(z))
        if kind == "dA_used":
            return out, dA
        if kind == "read_between":
            return out, extra
        return out
    return fn


@pytest.mark.parametrize("kind", ["softplus_beta", "sum_readout", "sigmoid_gate", "dA_used", "read_between"])
def test_state_update_lookalikes_do_not_match(kind):
    args = list(_inputs().values())
    before, result, p = _run_pass(_lookalike(kind), args)
    assert result.stats["rule:state_update"] == 0 and not result.modified
    assert any(r.rule == "state_update" for r in p.last_rejections)
    assert "state_update" in explain_ssm_update(before)


def test_state_update_reference_itself_matches():
    args = list(_inputs().values())
    _, result, _ = _run_pass(_lookalike("plain"), args)
    assert result.stats["rule:state_update"] == 1


def test_float_cast_of_x_in_the_skip_is_not_the_reference():
    # bf16: x.float() * D is another computation than the reference's x * D (no rounding to bf16)
    def fn(state, x, dt, A, B, C, D, z, bias):
        y = selective_state_update_ref(state, x, dt, A, B, C, None, z, bias.float(), True)
        return y + x.float() * D
    a = _inputs(dtype=torch.bfloat16)
    args = [a[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "bias")]
    _, result, p = _run_pass(fn, args)
    assert result.matches == 0
    assert any("+ x * D" in r.reason for r in p.last_rejections)


@pytest.mark.parametrize("kind", ["gelu", "padded", "swapped"])
def test_conv_update_lookalikes_do_not_match(kind):
    def fn(conv, xc, w, wb):
        k = conv.shape[-1]
        parts = [xc, conv] if kind == "swapped" else [conv, xc]
        window = torch.cat(parts, dim=-1)
        conv.copy_(window[:, :, -k:])
        out = F.conv1d(window, w.unsqueeze(1), wb, padding=1 if kind == "padded" else 0, groups=xc.shape[1])
        out = out[:, :, -1:]
        return F.gelu(out) if kind == "gelu" else F.silu(out)
    a = _inputs()
    _, result, p = _run_pass(fn, [a["conv"], a["xc"], a["w"], a["wb"]])
    assert result.matches == 0 and any(r.rule == "conv_update" for r in p.last_rejections)


# ---------------------------------------------------------------------------------------------- kernels


def _interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter here (these properties draw CPU tensors;
    on a GPU machine they rerun interpreted; the CUDA tests below cover the compiled kernels)."""
    import triton.runtime.interpreter as interp

    from fxopt.codegen import ssm_update_triton as k

    return isinstance(k._state_update_kernel, interp.InterpretedFunction)


_KERNEL_TESTS = ("test_state_update_kernel_contract", "test_conv_update_kernel_contract", "test_kernels_special_values")
_RERUN: dict[str, str] = {}


def _rerun_interpreted(test_id: str):
    """Run the kernel tests again, once, in a process with TRITON_INTERPRET=1 (the kernels are
    decorated at import, so the interpreter cannot be switched on in this process)."""
    if not _RERUN:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                            *(f"{__file__}::{t}" for t in _KERNEL_TESTS)],
                           env=env, cwd=root, capture_output=True, text=True, timeout=900)
        _RERUN["out"] = r.stdout + r.stderr
    out = _RERUN["out"]
    assert f"PASSED tests/test_ssm_update.py::{test_id}" in out, out[-4000:]


def _ref64_state_update(state, x, dt, A, B, C, D, z, bias):
    """The reference's algebra in fp64 throughout (no intermediate rounding)."""
    dt = F.softplus(dt + bias)
    new = state * torch.exp(dt[..., None] * A) + dt[..., None] * B[:, None, :] * x[..., None]
    state.copy_(new)
    return (torch.matmul(new, C.unsqueeze(-1)).squeeze(-1) + x * D) * F.silu(z)


def _ref64_conv(x, conv, w, wb):
    window = torch.cat([conv, x], -1)
    conv.copy_(window[:, :, 1:])
    return F.silu((window[:, :, 1:] * w[None]).sum(-1, keepdim=True) + wb[None, :, None])


_DIMS = st.tuples(st.sampled_from([1, 2, 3]), st.sampled_from([1, 5, 37]), st.sampled_from([1, 3, 16, 17]))


@settings(max_examples=10, deadline=None)
@given(dims=_DIMS, dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**16),
       dt_scale=st.sampled_from([0.01, 1.0, 30.0]), transposed=st.booleans(), a_is_log=st.booleans(), data=st.data())
def _state_update_property(dims, dtype, seed, dt_scale, transposed, a_is_log, data):
    b, d, s = dims
    g = torch.Generator().manual_seed(seed)
    state = torch.randn(b, d, s, generator=g) * 3
    x = data.draw(tensors((b, d), dtype, special=False))
    z = data.draw(tensors((b, d), dtype, special=False))
    dt = (torch.randn(b, d, generator=g) * dt_scale).to(dtype)
    A = -torch.exp(torch.randn(d, s, generator=g))
    B, C = (torch.randn(b, s, generator=g).to(dtype) for _ in range(2))
    D, bias = (torch.randn(d, generator=g).to(dtype) for _ in range(2))
    if transposed:  # non-contiguous x / dt / z / B (views of (d, b) / (s, b) buffers), as in the decode graph
        x, dt, z, B = (t.t().contiguous().t() for t in (x, dt, z, B))
    from fxopt.codegen.ssm_update_triton import selective_state_update_triton

    if a_is_log:  # the op computes A = -exp(A_log) itself
        A = torch.log(-A)
    args = (state, x, dt, A, B, C, D, z, bias)
    new = state.clone()
    selective_state_update_ref(new, *args[1:], True, a_is_log)
    contract = _dot_contract(s, new[new.isfinite()] if new.isfinite().any() else new.new_zeros(1), C.float())

    def ref64(state, x, dt, A, B, C, D, z, bias):
        return _ref64_state_update(state, x, dt, -torch.exp(A) if a_is_log else A, B, C, D, z, bias)

    assert_equivalent(lambda *a: selective_state_update_ref(*a, True, a_is_log),
                      lambda *a: selective_state_update_triton(*a, True, a_is_log),
                      args, contract, reference_fp64_fn=ref64, fp64_audit="error")


def test_state_update_kernel_contract():
    if not _interpreted():
        return _rerun_interpreted("test_state_update_kernel_contract")
    _state_update_property()


@settings(max_examples=8, deadline=None)
@given(dims=_DIMS, k=st.sampled_from([2, 3, 4]), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       data=st.data())
def _conv_update_property(dims, k, dtype, data):
    b, d, _ = dims
    x = data.draw(tensors((b, d, 1), dtype, special=False))
    conv = data.draw(tensors((b, d, k), dtype, special=False))
    w = data.draw(tensors((d, k), dtype, special=False, distributions=("normal", "integer")))
    wb = data.draw(tensors((d,), dtype, special=False, distributions=("normal",)))
    from fxopt.codegen.ssm_update_triton import conv_state_update_triton

    window = torch.cat([conv, x], -1).float()
    # The contract's domain: a reordered dot product may overflow in a partial sum where the
    # eager order does not (or the reverse) once the terms' magnitudes sum past the dtype's max;
    # there only the order decides finiteness, and no reordering kernel can promise eager's.
    mags = (window.double()[..., 1:].abs() * w.double().abs()).sum(-1) + wb.double().abs()
    assume(bool((mags < torch.finfo(dtype).max).all()))
    assert_equivalent(lambda *a: conv_state_update_ref(*a, True), lambda *a: conv_state_update_triton(*a, True),
                      (x, conv, w, wb), _dot_contract(k + 1, window, w.float()), reference_fp64_fn=_ref64_conv,
                      fp64_audit="error")


def test_conv_update_kernel_contract():
    if not _interpreted():
        return _rerun_interpreted("test_conv_update_kernel_contract")
    _conv_update_property()


def test_kernels_special_values():
    """inf / nan / -0.0 and fp16 overflow: the kernels' non-finite outputs sit where the references' do."""
    if not _interpreted():
        return _rerun_interpreted("test_kernels_special_values")
    from fxopt.codegen.ssm_update_triton import conv_state_update_triton, selective_state_update_triton

    for dtype in (torch.float32, torch.float16):
        a = _inputs(b=2, d=6, s=4, dtype=dtype, seed=3)
        a["x"][0, 0] = float("inf")
        a["x"][1, 1] = float("nan")
        a["z"][0, 2] = -0.0
        a["dt"][1, 3] = 60000.0 if dtype == torch.float16 else 1e30  # softplus past its threshold
        a["dt"][0, 4] = -1e4                                          # softplus underflows
        a["D"][5] = torch.finfo(dtype).max                            # x * D overflows in fp16
        a["conv"][1, 2, 1] = float("-inf")
        args = [a[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "bias")]
        s1, s2 = args[0].clone(), args[0].clone()
        y1 = selective_state_update_ref(s1, *args[1:], True)
        y2 = selective_state_update_triton(s2, *args[1:], True)
        for r, c in ((y1, y2), (s1, s2)):
            assert torch.equal(r.isnan(), c.isnan()) and torch.equal(r.isinf(), c.isinf())
            assert torch.equal(r[r.isinf()], c[c.isinf()])
        c1, c2 = a["conv"].clone(), a["conv"].clone()
        o1 = conv_state_update_ref(a["xc"], c1, a["w"], a["wb"], True)
        o2 = conv_state_update_triton(a["xc"], c2, a["w"], a["wb"], True)
        assert torch.equal(c1, c2)  # the window shift is exact
        assert torch.equal(o1.isnan(), o2.isnan()) and torch.equal(o1.isinf(), o2.isinf())


def test_op_cpu_impl_is_the_reference():
    a = _inputs(dtype=torch.bfloat16)
    args = [a[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "bias")]
    s1, s2 = args[0].clone(), args[0].clone()
    y1 = selective_state_update_ref(s1, *args[1:], True)
    y2 = SELECTIVE_STATE_UPDATE(s2, *args[1:], True)
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
