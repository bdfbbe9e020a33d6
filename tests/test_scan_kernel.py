"""The scan ops: CPU reference vs the original loop under the fp64_relative contract (Hypothesis),
and the Triton kernels under TRITON_INTERPRET=1 against the reference at small sizes."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from fxopt import config as fxopt_config
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxopt.ops.scan  # noqa: F401  (registers torch.ops.fxopt.*)
from fxopt.codegen.scan_ref import selective_scan_ref
from fxopt.testing.contracts import fp64_relative

CONTRACT = fp64_relative(2.0, atol=1e-6)


def _loop(u, delta, A, B, C, D, z):
    """The original unrolled loop (HF slow-path algebra), in whatever dtype it is given."""
    dA = torch.exp(A[None, :, None, :] * delta[..., None])
    dBu = delta[..., None] * B.transpose(1, 2)[:, None].to(delta.dtype) * u[..., None]
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=dA.dtype)
    ys = []
    for t in range(u.shape[2]):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append(torch.matmul(h, C[:, :, t].to(h.dtype).unsqueeze(-1))[..., 0])
    y = torch.stack(ys, -1) + u * D[None, :, None]
    return y * torch.nn.functional.silu(z)


def _inputs(b, L, d, n, dtype, dmax, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, L, generator=g)
    delta = torch.rand(b, d, L, generator=g) * dmax
    A = -torch.exp(torch.randn(d, n, generator=g))
    B = torch.randn(b, n, L, generator=g)
    C = torch.randn(b, n, L, generator=g)
    D = torch.randn(d, generator=g)
    z = torch.randn(b, d, L, generator=g)
    return [x.to(dtype) if x.dim() == 3 else x for x in (u, delta, A, B, C, D, z)]


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2),
    L=st.sampled_from([1, 2, 3, 7, 16, 33, 70]),
    d=st.integers(1, 6),
    n=st.sampled_from([1, 2, 5, 16, 64]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    dmax=st.sampled_from([0.01, 1.0, 50.0, 1e4]),  # large delta: exp(delta*A) underflows
    seed=st.integers(0, 2**16),
)
def test_selective_scan_cpu_contract(b, L, d, n, dtype, dmax, seed):
    x = _inputs(b, L, d, n, dtype, dmax, seed)
    u, delta, A, B, C, D, z = x
    ref64 = _loop(*[t.double() for t in x])
    eager = _loop(u.float(), delta.float(), A, B.float(), C.float(), D, z.float())
    y, hl = torch.ops.fxopt.selective_scan(u, delta, A, B, C, D, z, None, torch.float32)
    assert y.shape == (b, d, L) and hl.shape == (b, d, n) and hl.dtype == torch.float32
    CONTRACT.check(eager, y, fp64_ref=ref64)


@settings(max_examples=20, deadline=None)
@given(L=st.sampled_from([1, 4, 9]), shape=st.sampled_from([(3,), (2, 4), (1, 3, 5)]), with_c=st.booleans(),
       with_h0=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_scan_cpu_contract(L, shape, with_c, with_h0, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand((L,) + shape, generator=g)
    bb = torch.randn((L,) + shape, generator=g)
    h0 = torch.randn(shape, generator=g) if with_h0 else None
    C = torch.randn((L,) + shape, generator=g) if with_c else None

    def loop(a, bb, h0, C):
        h = torch.zeros(shape, dtype=a.dtype) if h0 is None else h0
        ys = []
        for t in range(L):
            h = a[t] * h + bb[t]
            ys.append((h * C[t]).sum(-1) if C is not None else h)
        return torch.stack(ys, 0), h

    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref64, last64 = loop(d64(a), d64(bb), d64(h0), d64(C))
    eager, last = loop(a, bb, h0, C)
    y, hl = torch.ops.fxopt.linear_scan(a, bb, h0, C, torch.float32, torch.float32)
    CONTRACT.check(eager, y, fp64_ref=ref64)
    CONTRACT.check(last, hl, fp64_ref=last64)


def test_fake_impls_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        u = torch.empty(2, 3, 5, dtype=torch.bfloat16)
        y, hl = torch.ops.fxopt.selective_scan(u, u, torch.empty(3, 4), torch.empty(2, 4, 5), torch.empty(2, 4, 5),
                                               None, None, None, torch.float32)
        assert y.shape == (2, 3, 5) and y.dtype == torch.float32 and hl.shape == (2, 3, 4)
        y, hl = torch.ops.fxopt.linear_scan(torch.empty(5, 1, 4), torch.empty(5, 3, 4), None, torch.empty(5, 3, 4),
                                            torch.float16, torch.float32)
        assert y.shape == (5, 3) and y.dtype == torch.float16 and hl.shape == (3, 4)


_INTERP = textwrap.dedent("""
    import torch
    from fxopt.codegen import scan_launch, scan_triton as st
    from fxopt.codegen.scan_config import TritonScanConfig
    from fxopt.codegen.scan_ref import selective_scan_ref, linear_scan_ref
    g = torch.Generator().manual_seed(0)
    def mk(b, d, L, n, dt):
        u = torch.randn(b, d, L, generator=g).to(dt); delta = (torch.rand(b, d, L, generator=g) * 2).to(dt)
        A = -torch.rand(d, n, generator=g) * 3; B = torch.randn(b, n, L, generator=g).to(dt)
        C = torch.randn(b, n, L, generator=g).to(dt); D = torch.randn(d, generator=g)
        z = torch.randn(b, d, L, generator=g).to(dt); h0 = torch.randn(b, d, n, generator=g)
        return [u, delta, A, B, C, D, z, h0]
    T = lambda BD, K, G, PF2: TritonScanConfig(BD=BD, K=K, G=G, PF2=PF2, num_warps=1)  # noqa: E731
    # G > 1: the group pre-pass launch, then the main launch folding the groups' states
    cases = [((2, 6, 70, 5), T(4, 8, 4, False)), ((1, 3, 75, 3), T(2, 4, 9, True)), ((2, 3, 21, 16), T(2, 4, 3, False)),
             ((1, 5, 13, 3), T(4, 8, 1, True)), ((1, 3, 1, 1), T(4, 8, 1, False)), ((1, 5, 37, 3), None)]
    for (b, d, L, n), cfg in cases:
        for dt in (torch.float32, torch.bfloat16):
            x = mk(b, d, L, n, dt)
            for full in (True, False):
                a = list(x) if full else x[:5] + [None, None, None]
                y0, h0 = selective_scan_ref(*a, out_dtype=torch.float32)
                for rep in range(2):  # the second call replays the first's plan
                    y1, h1 = scan_launch.selective_scan(*a, torch.float32, config=cfg)
                    tol = 1e-4 * (1 + y0.abs().max().item())
                    assert (y0 - y1).abs().max().item() <= tol, (b, d, L, n, cfg, dt, full, rep, (y0 - y1).abs().max())
                    assert (h0 - h1).abs().max().item() <= 1e-4 * (1 + h0.abs().max().item()), (cfg, dt, full, rep)
    a = torch.rand(9, 3, 1, 4, generator=g); bb = torch.randn(9, 1, 2, 4, generator=g)
    h0 = torch.randn(3, 2, 4, generator=g); C = torch.randn(9, 3, 2, 4, generator=g)
    for hh in (None, h0):
        for CC in (None, C):
            y0, l0 = linear_scan_ref(a, bb, hh, CC); y1, l1 = st.linear_scan_triton(a, bb, hh, CC)
            assert torch.allclose(y0, y1, atol=1e-5) and torch.allclose(l0, l1, atol=1e-5)
    print("OK")
""")


def test_triton_kernels_interpreted():
    import triton  # noqa: F401 - a test dependency, required
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _INTERP], env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


_PLAN_REPLAY = textwrap.dedent("""
    import torch
    import fxopt.ops.scan as ops
    from fxopt.codegen import scan_launch
    from fxopt.codegen.scan_ref import selective_scan_ref
    builds, op_calls = [], []
    real_build, real_op = scan_launch.build_plan, ops.SELECTIVE_SCAN
    scan_launch.build_plan = lambda *a, **k: builds.append(1) or real_build(*a, **k)
    ops.SELECTIVE_SCAN = lambda *a: op_calls.append(1) or real_op(*a)
    ops.FAST_PATH_ON_CPU = True  # the entry point's kernel path with CPU tensors, interpreted
    g = torch.Generator().manual_seed(0)
    def mk(b, d, L, n, dt):
        return [torch.randn(b, d, L, generator=g).to(dt), (torch.rand(b, d, L, generator=g) + 0.1).to(dt),
                -torch.rand(d, n, generator=g), torch.randn(b, n, L, generator=g).to(dt),
                torch.randn(b, n, L, generator=g).to(dt), torch.randn(d, generator=g),
                torch.randn(b, d, L, generator=g).to(dt), None, None]
    def check(x):
        y0, h0 = selective_scan_ref(*x)
        y1, h1 = ops.selective_scan(*x)
        assert y1.dtype == y0.dtype and h1.dtype == h0.dtype
        assert (y0.float() - y1.float()).abs().max() <= 1e-2 * (1 + y0.float().abs().max()), (y0 - y1).abs().max()
        assert (h0 - h1).abs().max() <= 1e-4 * (1 + h0.abs().max())
    with torch.no_grad():
        for dt in (torch.float32, torch.bfloat16):
            for seed in range(3):  # one signature, new values: one plan, replayed
                check(mk(1, 4, 40, 3, dt))
        assert len(builds) == 2 and len(op_calls) == 0, (builds, op_calls)
        x = mk(1, 4, 40, 3, torch.float32)
        x[1] = x[1].transpose(1, 2).contiguous().transpose(1, 2)  # other strides: a plan of its own
        check(x)
        x = mk(1, 4, 40, 3, torch.float32)
        x[5] = torch.nn.Parameter(x[5])  # parameters are plain tensors to the kernels
        check(x)
        assert len(builds) == 3 and len(op_calls) == 0, (builds, op_calls)
    x = mk(1, 4, 40, 3, torch.float32)
    x[0].requires_grad_()
    y, h = ops.selective_scan(*x)  # a gradient can flow: through the op, which records its backward
    assert y.grad_fn is not None and len(op_calls) == 1
    print("OK", len(scan_launch._PLANS))
""")


def test_entry_point_replays_plans_interpreted():
    """The graph entry point under no_grad: the first call with a signature builds its launch plan,
    later calls (new values) replay it without building anything; new strides get a plan of their
    own; nothing goes through the dispatcher unless a gradient can flow."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _PLAN_REPLAY], env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


# ----------------------------------------------------------------------------------------------
# the graph entry points: the dispatcher is skipped exactly when no gradient can flow
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def op_spy(monkeypatch):
    """Counts the entry points' calls that went to the ops (the dispatcher)."""
    import fxopt.ops.scan as ops

    calls = {"selective": 0, "linear": 0}
    real_sel, real_lin = ops.SELECTIVE_SCAN, ops.LINEAR_SCAN

    def sel(*a):
        calls["selective"] += 1
        return real_sel(*a)

    def lin(*a):
        calls["linear"] += 1
        return real_lin(*a)

    monkeypatch.setattr(ops, "SELECTIVE_SCAN", sel)
    monkeypatch.setattr(ops, "LINEAR_SCAN", lin)
    return calls


def _small_scan(dtype=torch.float32, seed=0):
    return _inputs(2, 7, 3, 4, dtype, 1.0, seed) + [None, torch.float32]


def test_entry_point_skips_the_dispatcher_when_no_gradient_can_flow(op_spy):
    import fxopt.ops.scan as ops

    x = _small_scan()
    ref = torch.ops.fxopt.selective_scan(*x)
    with torch.no_grad():
        got = ops.selective_scan(*x)
    got2 = ops.selective_scan(*x)  # grad mode on, nothing requires grad
    x_param = list(x)
    x_param[5] = torch.nn.Parameter(x[5])  # D is a parameter in a model: still no gradient under no_grad
    with torch.inference_mode():
        got3 = ops.selective_scan(*x_param)
    assert op_spy["selective"] == 0
    for out in (got, got2, got3):
        assert all(torch.equal(r, o) for r, o in zip(ref, out)) and out[0].grad_fn is None
    a, b = torch.rand(5, 3), torch.randn(5, 3)
    with torch.no_grad():
        lin = ops.linear_scan(a, b)
    assert op_spy["linear"] == 0 and all(torch.equal(r, o) for r, o in zip(torch.ops.fxopt.linear_scan(a, b), lin))
    # the dispatcher records every op it runs: nothing of fxopt's under no_grad, the op with a gradient
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.no_grad():
            ops.selective_scan(*x)
            ops.linear_scan(a, b)
    assert not [e.name for e in prof.events() if e.name.startswith("fxopt::")]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.selective_scan(x[0].clone().requires_grad_(), *x[1:])
    assert "fxopt::selective_scan" in {e.name for e in prof.events()}


def test_entry_point_keeps_gradients(op_spy):
    import fxopt.ops.scan as ops

    x = _small_scan(torch.float64)
    leaves = [t.clone().requires_grad_() if i in (0, 2, 5) else t for i, t in enumerate(x)]  # u, A, D
    y, h = ops.selective_scan(*leaves)
    assert op_spy["selective"] == 1 and y.grad_fn is not None
    grads = torch.autograd.grad((y.sum() + h.sum()), [leaves[0], leaves[2], leaves[5]])
    ref_leaves = [t.clone().requires_grad_() if i in (0, 2, 5) else t for i, t in enumerate(x)]
    yr, hr = torch.ops.fxopt.selective_scan(*ref_leaves)
    ref = torch.autograd.grad((yr.sum() + hr.sum()), [ref_leaves[0], ref_leaves[2], ref_leaves[5]])
    assert all(torch.equal(g, r) for g, r in zip(grads, ref))
    a = torch.rand(5, 3, dtype=torch.float64, requires_grad=True)
    ya, _ = ops.linear_scan(a, torch.randn(5, 3, dtype=torch.float64))
    assert op_spy["linear"] == 1 and ya.grad_fn is not None


def test_entry_point_goes_through_the_op_under_tracing_and_transforms(op_spy):
    import torch.autograd.forward_ad as fwad
    from torch._subclasses.fake_tensor import FakeTensorMode

    import fxopt
    import fxopt.ops.scan as ops

    x = _small_scan()
    with FakeTensorMode() as mode:
        fx_ = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in x]
        y, h = ops.selective_scan(*fx_)
        assert y.shape == x[0].shape and h.shape == (2, 3, 4)
    assert op_spy["selective"] == 1
    us = torch.stack([x[0], 2 * x[0]])
    with torch.no_grad():  # a functorch transform (its batched tensors look plain to type()): the op
        ys = torch.func.vmap(lambda u: ops.selective_scan(u, *x[1:])[0])(us)
    assert op_spy["selective"] == 2
    assert torch.equal(ys[1], torch.ops.fxopt.selective_scan(us[1], *x[1:])[0])
    with fwad.dual_level():
        with pytest.raises(fxopt.FxoptError, match="forward-mode AD"):
            ops.selective_scan(fwad.make_dual(x[0], torch.ones_like(x[0])), *x[1:])
    with torch.no_grad():  # exported graphs contain the op, not the entry point
        ep = torch.export.export(_EntryModule(), tuple(x[:7]))
    assert any(n.target == torch.ops.fxopt.selective_scan.default for n in ep.graph.nodes)


class _EntryModule(torch.nn.Module):
    def forward(self, u, delta, A, B, C, D, z):
        import fxopt.ops.scan as ops

        return ops.selective_scan(u, delta, A, B, C, D, z)


def test_typed_launch_configs():
    """Launch choices are frozen dataclasses (part of the plan key); JSON configs are checked."""
    import dataclasses

    from fxopt.codegen import scan_config as sc
    from fxopt.errors import CodegenError

    cfg = sc.choose_gluon_config(1, 1536, 2048, 16, 132, "sfu")
    assert isinstance(cfg, sc.GluonScanConfig) and cfg.G > 1 and hash(cfg) == hash(dataclasses.replace(cfg))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.G = 1
    assert sc.config_from_dict(sc.config_to_dict(cfg)) == cfg
    tcfg = sc.choose_triton_config(1, 1536, 2048, 16, 132)
    assert isinstance(tcfg, sc.TritonScanConfig) and sc.config_from_dict(sc.config_to_dict(tcfg)) == tcfg
    assert isinstance(sc.choose_config(1, 8, 64, 16, device_index=-1), sc.TritonScanConfig)  # CPU: the interpreter
    with pytest.raises(CodegenError, match="no field"):
        sc.config_from_dict(dict(kind="gluon", TPC=2, M=1, W=1, K=16, STAGES=3, G=1, exp="sfu", fused=True))
    with pytest.raises(CodegenError, match="kind"):
        sc.config_from_dict(dict(kind="seq", BD=2))
    with pytest.raises(CodegenError, match="resolved"):
        sc.GluonScanConfig(TPC=2, M=1, W=1, K=16, STAGES=3, G=1, exp="auto")
    with pytest.raises(CodegenError, match="positive"):
        sc.TritonScanConfig(BD=0, K=8, G=1, PF2=False, num_warps=1)


def test_kernel_modules_spell_the_arguments_once():
    """Both kernels take the scan's arguments in the one order the shared host side passes them."""
    pytest.importorskip("triton.experimental.gluon")
    from fxopt.codegen import scan_gluon, scan_triton

    names = [scan_triton.selective_scan_kernel.arg_names, scan_gluon.selective_scan_kernel.arg_names]
    common = 12 + 6 + 20 + 4  # pointers, scalars, strides, HAS_D HAS_Z HAS_H0 STATE_ONLY
    assert names[0][:common] == names[1][:common]
    assert names[0][common - 4:common] == ["HAS_D", "HAS_Z", "HAS_H0", "STATE_ONLY"]


# ----------------------------------------------------------------------------------------------
# the Gluon kernel (CUDA fast path): compiled for sm_90 here, run where a GPU is
# ----------------------------------------------------------------------------------------------
_GLUON_CFGS = [
    dict(),                                                   # fp32, D and z, L-major B / C (async copies)
    dict(TPC=2, W=2, BC_REG=True),                            # the wide-batch default: B / C via registers
    dict(NP=64, TPC=16, K=16, BC_REG=True, HAS_H0=True),
    dict(dtype="*bf16", BC_LMAJOR=False),                     # bf16, B / C unit-stride along n
    dict(dtype="*bf16", TPC=2, W=2, BC_REG=True),             # bf16 B / C unit-stride along l: registers, no copy
    dict(dtype="*bf16", TPC=8, BC_REG=True),                  # ... with the short-and-narrow choice (b1 l512)
    dict(STATE_ONLY=True),                                    # the group pre-pass
    dict(NP=1, TPC=1, K=8, HAS_Z=False, HAS_D=False, N_EVEN=False),
    dict(NP=64, TPC=8, W=2),
    dict(TPC=2, W=2, BC_REG=True, EXP_SFU=True, SFU_BIAS=2e-8),  # FXOPT_SCAN_EXP=sfu
]


_COMPILE = textwrap.dedent("""
    import json, sys
    from fxopt.tools import sass as tools
    out = []
    for cfg in json.loads(sys.argv[1]):
        k = tools.compile_for_target(**cfg)
        sass = tools.disassemble(k)
        out.append(dict(cfg=cfg, res=tools.resource_usage(k), ldgsts="LDGSTS" in sass,
                        loop_spills=tools.local_accesses_in_longest_loop(sass),
                        poly=tools.polynomial_exps_in_longest_loop(sass)))
    print(json.dumps(out))
""")


def test_gluon_kernel_compiles_for_sm90(tmp_path):
    """Every constexpr branch of the Gluon kernel lowers to sm_90 machine code without spills in the
    time loop (ptxas ships with Triton; no GPU needed). In a subprocess without
    TRITON_INTERPRET (under the interpreter jit functions are not compilable) and with an empty
    Triton cache (so this compiles, not loads)."""
    pytest.importorskip("triton.experimental.gluon")
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(_GLUON_CFGS)], env=env, capture_output=True,
                       text=True, timeout=600, cwd=root)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results) == len(_GLUON_CFGS)
    for rec in results:
        # no spill traffic in the time loop (a value parked on the stack for after the loop is allowed)
        assert rec["res"]["LOCAL"] == 0 and rec["loop_spills"] == 0 and rec["res"]["STACK"] <= 16, rec
        # tiles through async copies
        assert rec["ldgsts"], rec
        # exp(dt A) on the FMA pipe (one polynomial per state and step: K * NP / TPC per chunk) unless
        # EXP_SFU asks for the SFU (then only the silu(z) epilogue's K / TPC polynomials are left)
        c = {**dict(NP=16, TPC=4, K=16, HAS_Z=True, STATE_ONLY=False, EXP_SFU=False), **rec["cfg"]}
        per_step = c["K"] * c["NP"] // c["TPC"]
        epilogue = c["K"] // c["TPC"] if c["HAS_Z"] and not c["STATE_ONLY"] else 0
        assert rec["poly"] == (0 if c["EXP_SFU"] else per_step) + epilogue, rec


def _gpu_inputs(b, d, L, n, dtype, layout, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    u = r(b, d, L).to(dtype)
    delta = torch.nn.functional.softplus(r(b, d, L) - 1).to(dtype)
    A = -torch.exp(r(d, n))
    B, C = r(b, n, L).to(dtype), r(b, n, L).to(dtype)
    D, z, h0 = r(d), r(b, d, L).to(dtype), r(b, d, n)
    if layout == "hf":  # delta, z as transposes of (b, l, d); B, C of (b, l, n): the HF Mamba graph
        delta = delta.transpose(1, 2).contiguous().transpose(1, 2)
        z = z.transpose(1, 2).contiguous().transpose(1, 2)
        B = B.transpose(1, 2).contiguous().transpose(1, 2)
        C = C.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "offset":  # views at odd element offsets (not 16-byte aligned)
        u = torch.cat([u.new_zeros(b, d, 1), u], 2)[:, :, 1:]
        B = torch.cat([B.new_zeros(b, n, 1), B], 2)[:, :, 1:]
    return u, delta, A, B, C, D, z, h0


_CUDA_SHAPES = [(1, 5, 13, 3), (2, 70, 96, 16), (1, 3, 1, 1), (2, 33, 264, 64), (1, 40, 2048, 16), (1, 24, 512, 8)]

# The CUDA path meets the op's contract (fp64_relative(2)) in both exp modes: FXOPT_SCAN_EXP=fma
# (exp2_mul: <= 1.06 ulp, unbiased) and sfu (MUFU.EX2 with a calibrated bias correction, the
# default on sm_90: within the contract as measured); both are checked here.
GPU_CONTRACT = CONTRACT


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI is CPU-only; run on the device tool)")
@pytest.mark.parametrize("exp", ["fma", "sfu"])
def test_scan_cuda_kernel_contract(exp, monkeypatch):
    """The CUDA implementation (Gluon kernel, or the Triton fallback where it declines a layout)
    against an fp64 evaluation of the loop, under the op's contract, over shapes x dtypes x layouts;
    repeated (the later calls replay the first's launch plan): results must not change."""
    monkeypatch.setenv("FXOPT_SCAN_EXP", exp)
    fxopt_config.refresh()  # launch plans read the process snapshot

    for (b, d, L, n) in _CUDA_SHAPES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for layout in ("contiguous", "hf", "offset"):
                case = f"shape={(b, d, L, n)} dtype={dtype} layout={layout}"
                u, delta, A, B, C, D, z, h0 = _gpu_inputs(b, d, L, n, dtype, layout, seed=L + n)
                f64 = [t.double() for t in (u, delta, A, B, C, D, z, h0)]
                ref64, last64 = selective_scan_ref(*f64, out_dtype=torch.float64)
                eager, last = selective_scan_ref(u.float(), delta.float(), A, B.float(), C.float(), D, z.float(), h0,
                                                 torch.float32)
                first = None
                for _ in range(3):
                    y, hl = torch.ops.fxopt.selective_scan(u, delta, A, B, C, D, z, h0, torch.float32)
                    _check(GPU_CONTRACT, eager, y, ref64, case)
                    _check(GPU_CONTRACT, last, hl, last64, case + " h_last")
                    assert first is None or torch.equal(first, y), case + ": results differ between calls"
                    first = y
                # without the optional inputs
                y, hl = torch.ops.fxopt.selective_scan(u, delta, A, B, C, None, None, None, torch.float32)
                ref64, last64 = selective_scan_ref(*f64[:5], out_dtype=torch.float64)
                eager, last = selective_scan_ref(u.float(), delta.float(), A, B.float(), C.float(), out_dtype=torch.float32)
                _check(GPU_CONTRACT, eager, y, ref64, case + " (no D, z, h0)")
                _check(GPU_CONTRACT, last, hl, last64, case + " (no D, z, h0) h_last")


def _check(contract, ref, cand, ref64, case):
    try:
        contract.check(ref, cand, fp64_ref=ref64)
    except AssertionError as exc:
        raise AssertionError(f"{case}: {exc}") from None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI is CPU-only; run on the device tool)")
def test_scan_cuda_launch_plan_replays_per_signature(monkeypatch):
    """The second call with an input signature replays the first's launch plan (scan_launch.LaunchPlan,
    its compiled kernels launched directly): new values give their own results; a change of
    alignment, dtype or exp mode gets its own plan."""
    from fxopt.codegen import scan_launch

    monkeypatch.delenv("FXOPT_SCAN_EXP", raising=False)

    fxopt_config.refresh()  # launch plans read the process snapshot
    scan_launch.clear_plans()
    b, d, L, n = 1, 40, 256, 16  # l a multiple of 16: the Gluon kernel takes the bf16 tiles too
    for layout, seed in (("contiguous", 1), ("contiguous", 2), ("offset", 3), ("hf", 4)):
        for dtype in (torch.float32, torch.bfloat16):
            u, delta, A, B, C, D, z, h0 = _gpu_inputs(b, d, L, n, dtype, layout, seed=seed)
            for _ in range(2):  # the second call replays the plan
                y, hl = scan_launch.selective_scan(u, delta, A, B, C, D, z, h0, torch.float32)
            f64 = [t.double() for t in (u, delta, A, B, C, D, z, h0)]
            ref64, last64 = selective_scan_ref(*f64, out_dtype=torch.float64)
            eager, last = selective_scan_ref(u.float(), delta.float(), A, B.float(), C.float(), D, z.float(), h0,
                                             torch.float32)
            _check(GPU_CONTRACT, eager, y, ref64, f"{layout} {dtype} seed {seed}")
            _check(GPU_CONTRACT, last, hl, last64, f"{layout} {dtype} seed {seed} h_last")
    # contiguous seeds 1 and 2 share a plan; offset and hf inputs (and each dtype) have their own
    assert len(scan_launch._PLANS) == 6, len(scan_launch._PLANS)
    assert all(p.direct is not None for p in scan_launch._PLANS.values())  # replays launch compiled kernels
    monkeypatch.setenv("FXOPT_SCAN_EXP", "fma")
    fxopt_config.refresh()  # launch plans read the process snapshot
    y2, _ = scan_launch.selective_scan(u, delta, A, B, C, D, z, h0, torch.float32)
    assert len(scan_launch._PLANS) == 7
    _check(GPU_CONTRACT, eager, y2, ref64, "fma")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI is CPU-only; run on the device tool)")
def test_scan_cuda_entry_point(monkeypatch):
    """The graph entry point on the GPU: under no_grad the same bits as the op (one launch plan
    serves both) without the dispatcher; with an input requiring grad it is the op, and the
    backward runs (its state pass through the kernel)."""
    import fxopt.ops.scan as ops

    monkeypatch.delenv("FXOPT_SCAN_EXP", raising=False)

    fxopt_config.refresh()  # launch plans read the process snapshot
    for layout in ("contiguous", "hf"):
        for dtype in (torch.float32, torch.bfloat16):
            u, delta, A, B, C, D, z, _ = _gpu_inputs(1, 64, 512, 16, dtype, layout, seed=5)
            args = (u, delta, A, B, C, D, z, None, None)
            ref = torch.ops.fxopt.selective_scan(*args)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                with torch.no_grad():
                    outs = [ops.selective_scan(*args) for _ in range(3)]
            assert not [e.name for e in prof.events() if e.name.startswith("fxopt::")]
            for out in outs:
                assert all(torch.equal(r, o) for r, o in zip(ref, out)), (layout, dtype)
    u, delta, A, B, C, D, z, _ = _gpu_inputs(1, 8, 64, 16, torch.float32, "contiguous", seed=6)
    u.requires_grad_()
    y, h = ops.selective_scan(u, delta, A, B, C, D, z)
    assert y.grad_fn is not None
    (gu,) = torch.autograd.grad(y.sum() + h.sum(), u)
    u64 = u.detach().double().requires_grad_()
    y64, h64 = selective_scan_ref(u64, *(t.double() for t in (delta, A, B, C, D, z)))
    (g64,) = torch.autograd.grad(y64.sum() + h64.sum(), u64)
    assert (gu.double() - g64).abs().max() <= 1e-3 * (1 + g64.abs().max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI is CPU-only; run on the device tool)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scan_cuda_16bit_bc_register_path(dtype):
    """The Gluon kernel's 16-bit B / C register loads (unit stride along l, no fp32 copies) under
    the op's contract, aligned and at odd offsets, repeated; the quick subset of the contract test
    for the layouts that path takes (about 20 s per dtype on an H200; 16/16 passed 2026-12-02)."""
    for (b, d, L, n) in [(2, 70, 96, 16), (1, 24, 512, 8), (1, 40, 2048, 16), (2, 33, 264, 64)]:
        for layout in ("contiguous", "offset"):
            case = f"shape={(b, d, L, n)} dtype={dtype} layout={layout}"
            u, delta, A, B, C, D, z, h0 = _gpu_inputs(b, d, L, n, dtype, layout, seed=L + n)
            f64 = [t.double() for t in (u, delta, A, B, C, D, z, h0)]
            ref64, last64 = selective_scan_ref(*f64, out_dtype=torch.float64)
            eager, last = selective_scan_ref(u.float(), delta.float(), A, B.float(), C.float(), D, z.float(), h0,
                                             torch.float32)
            for _ in range(2):
                y, hl = torch.ops.fxopt.selective_scan(u, delta, A, B, C, D, z, h0, torch.float32)
                _check(GPU_CONTRACT, eager, y, ref64, case)
                _check(GPU_CONTRACT, last, hl, last64, case + " h_last")
