"""The selective scan's host side (fxopt.codegen.scan_launch) without a GPU: the plan key, and the
direct replay of a plan (what every CUDA call after the first runs) against the JIT launch of
the same plan. Kernels are replaced by recorders: what is checked is what each launch is handed.
"""
from __future__ import annotations

import textwrap
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxopt.codegen import launch as ln
from fxopt.codegen import scan_launch
from fxopt.codegen.scan_ref import SelectiveScanArgs

pytest.importorskip("triton")

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# inputs described by a layout spec, so that two calls can share or differ in one attribute
# ----------------------------------------------------------------------------------------------
_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "h0")


def _tensor(name, b, d, L, n, dtype, layout, gen):
    shape = {"u": (b, d, L), "delta": (b, d, L), "z": (b, d, L), "A": (d, n), "D": (d,), "B": (b, n, L),
             "C": (b, n, L), "h0": (b, d, n)}[name]
    if layout == "broadcast" and name == "h0":
        return torch.randn(1, d, n, generator=gen).to(dtype)
    if layout == "transposed" and len(shape) == 3:  # a transpose of a (b, l, .) tensor, as HF hands it
        return torch.randn(shape[0], shape[2], shape[1], generator=gen).to(dtype).transpose(1, 2)
    if layout == "offset":  # one element in: another 16-byte alignment
        flat = torch.randn(int(torch.Size(shape).numel()) + 1, generator=gen).to(dtype)
        return flat[1:].view(shape)
    return torch.randn(shape, generator=gen).to(dtype)


def _args(spec, seed=0, out_dtype=None):
    """spec: per tensor None (absent) or (dtype, layout); sizes fixed."""
    gen = torch.Generator().manual_seed(seed)
    b, d, L, n = 2, 5, 24, 4
    ts = [None if s is None else _tensor(name, b, d, L, n, s[0], s[1], gen) for name, s in zip(_NAMES, spec)]
    return SelectiveScanArgs(*ts, out_dtype)


def _reference_key(a, config=None):
    """The key as specified: FXOPT_SCAN_EXP, config, out_dtype, per tensor shape, strides, dtype,
    device and 16-byte alignment (None for an absent tensor)."""
    from fxopt.config import scan_exp_raw

    return (scan_exp_raw(), config, a.out_dtype,
            *[None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.get_device(), t.data_ptr() & 15)
              for t in a[:8]])


_layout = st.sampled_from(["contiguous", "transposed", "offset"])
_required = st.tuples(st.sampled_from(_DTYPES), _layout)
_optional = st.one_of(st.none(), _required)
_spec = st.tuples(_required, _required, st.tuples(st.just(torch.float32), _layout), _required, _required,
                  st.one_of(st.none(), st.tuples(st.sampled_from(_DTYPES), st.just("contiguous"))), _optional,
                  st.one_of(st.none(), st.tuples(st.sampled_from(_DTYPES), st.sampled_from(["contiguous",
                                                                                          "broadcast"]))))


@settings(max_examples=60)
@given(spec=_spec, other=_spec, mutate=st.booleans(), out_dtype=st.sampled_from([None, torch.float32]))
def test_plan_key_is_the_specified_signature(spec, other, mutate, out_dtype):
    """Two calls share a plan exactly when the specified signature (per tensor shape, strides,
    dtype, device, alignment; out_dtype; exp mode; config) agrees, whatever their values; the
    addresses read for the key are the tensors' own."""
    a1 = _args(spec, seed=1, out_dtype=out_dtype)
    a2 = _args(other if mutate else spec, seed=2, out_dtype=out_dtype)
    k1, p1 = scan_launch._key_and_ptrs(a1, None)
    k2, _ = scan_launch._key_and_ptrs(a2, None)
    assert (k1 == k2) == (_reference_key(a1) == _reference_key(a2))
    assert k1 == scan_launch.plan_key(a1) and hash(k1) == hash(scan_launch.plan_key(a1))
    assert p1 == tuple(None if t is None else t.data_ptr() for t in a1[:8])


def test_plan_key_tells_apart_what_the_launch_depends_on():
    base = [(torch.float32, "contiguous")] * 5 + [(torch.float32, "contiguous")] * 2 + [None]
    k = scan_launch.plan_key(_args(base))
    assert scan_launch.plan_key(_args(base, seed=9)) == k  # new values, same signature
    for i in range(7):
        for change in ((torch.bfloat16, "contiguous"), (torch.float32, "offset"), (torch.float32, "transposed")):
            if change[1] == "transposed" and i in (2, 5):
                continue  # A / D: no transposed spelling
            spec = list(base)
            spec[i] = change
            assert scan_launch.plan_key(_args(spec)) != k, (i, change)
    assert scan_launch.plan_key(_args(base[:5] + [None] + base[6:])) != k  # D absent
    assert scan_launch.plan_key(_args(base), config=object()) != k
    assert scan_launch.plan_key(_args(base, out_dtype=torch.bfloat16)) != k


# ----------------------------------------------------------------------------------------------
# direct replay == the JIT launch of the same plan
# ----------------------------------------------------------------------------------------------
class _RecordingKernel:
    """Stands for a CompiledKernel: ``run`` records what a launch hands the launcher."""

    function = 0xF00D
    packed_metadata = (1, 1, 0)

    def __init__(self):
        self.calls: list = []

    def run(self, *args):
        self.calls.append(args)

    def launch_metadata(self, grid, stream, *args):
        return ("meta", grid, stream, args)


class _RecordingJit:
    """Stands for a jit function: ``kernel[grid](*args, **options)`` records and hands back the
    compiled kernel."""

    def __init__(self, compiled):
        self.compiled, self.calls = compiled, []

    def __getitem__(self, grid):
        def launch(*args, **options):
            self.calls.append((tuple(grid), args))
            return self.compiled

        return launch


def _recording_plan(a, monkeypatch, extra_prep: bool, build=scan_launch.build_plan):
    plan = build(a)
    assert isinstance(plan, scan_launch.LaunchPlan)
    plan.device_index = 0  # as on a GPU: once compiled, replays launch directly
    monkeypatch.setattr(scan_launch, "_raw_stream", lambda index: 4321)
    kernels = [_RecordingKernel() for _ in plan.launches]
    jits = [_RecordingJit(k) for k in kernels]
    for launch, jit in zip(plan.launches, jits):
        launch.kernel = jit
    preps = list(plan.preps)
    if extra_prep:  # a copy of B, as the Gluon kernel's layouts may ask for one
        preps.insert(0, (3, lambda t: t.float()))
    copies: list = []  # every copy a call makes, kept alive so that their addresses stay theirs

    def recorded(prep):
        def run(t):
            copies.append(prep(t))
            return copies[-1]

        return run

    plan.preps = tuple((i, recorded(p)) for i, p in preps)
    return plan, kernels, jits, copies


def _ptr(x):
    return x.data_ptr() if isinstance(x, torch.Tensor) else x


@settings(max_examples=40)
@given(spec=_spec, L=st.sampled_from([8, 24, 130]), extra_prep=st.booleans(), hooked=st.booleans())
def test_direct_replay_launches_what_the_jit_launch_got(spec, L, extra_prep, hooked):
    """The direct replay hands each launch the JIT launch's grid and scalars, the inputs'
    addresses (a copy's where the plan copies: this call's copy), this call's outputs and
    scratch, any valid address for an absent input; hooks and launch metadata as Triton passes
    them. L=130: two launches (the group pre-pass) and scratch."""
    gen = torch.Generator().manual_seed(3)
    b, d, n = 2, 5, 4
    ts = [None if s is None else _tensor(name, b, d, L, n, s[0], s[1], gen) for name, s in zip(_NAMES, spec)]
    a = SelectiveScanArgs(*ts, None)
    with pytest.MonkeyPatch.context() as mp:
        plan, kernels, jits, copies = _recording_plan(a, mp, extra_prep)
        hook = (lambda meta: None) if hooked else None
        mp.setattr(ln, "_runtime_knobs", types.SimpleNamespace(launch_enter_hook=hook, launch_exit_hook=None))
        y0, h0 = plan(a)                       # first call: through the JIT
        assert plan.direct is not None and len(plan.direct) == len(plan.launches)
        first_copies = list(copies)
        _, ptrs = scan_launch._key_and_ptrs(a, None)
        y1, h1 = plan(a, ptrs)                 # replay: direct
    second_copies = copies[len(first_copies):]
    assert len(first_copies) == len(second_copies) == len(plan.preps)
    assert (y1.shape, y1.dtype, h1.shape, h1.dtype) == (y0.shape, y0.dtype, h0.shape, h0.dtype)
    for launch, jit, k in zip(plan.launches, jits, kernels):
        assert len(jit.calls) == 1 and len(k.calls) == 1
        grid, jargs = jit.calls[0]
        dargs = k.calls[0]
        g3 = (grid + (1, 1))[:3]
        assert dargs[:4] == (*g3, 4321)
        assert dargs[4:6] == (k.function, k.packed_metadata)
        jp, dp = [_ptr(x) for x in jargs[:12]], list(dargs[9:21])
        assert dargs[6:9] == ((("meta", g3, 4321, tuple(dargs[9:])), hook, None) if hooked else (None, None, None))
        assert tuple(dargs[21:]) == tuple(jargs[12:]) == launch.tail
        expect = list(jp)
        for (i, _), c0, c1 in zip(plan.preps, first_copies, second_copies):
            assert jp[i] == c0.data_ptr()
            expect[i] = c1.data_ptr()
        for i in (5, 6, 7):
            if a[i] is None:
                assert jp[i] == y0.data_ptr()
                expect[i] = y1.data_ptr()
        assert jp[8:10] == [y0.data_ptr(), h0.data_ptr()]
        expect[8:10] = [y1.data_ptr(), h1.data_ptr()]
        if plan.scratch:
            assert jp[11] - jp[10] == dp[11] - dp[10] == 4 * plan.split
            expect[10:12] = dp[10:12]
        else:
            assert jp[10] == jp[11] == h0.data_ptr()
            expect[10:12] = [h1.data_ptr()] * 2
        for i in range(8):  # inputs neither copied nor absent: their own addresses, both times
            if a[i] is not None and i not in dict(plan.preps):
                assert jp[i] == dp[i] == a[i].data_ptr()
        assert dp == expect
    if L == 130:
        assert len(plan.launches) == 2 and plan.scratch


def test_run_replays_the_cached_plan_directly(monkeypatch):
    """scan_launch.run: the first call builds and stores the plan, the second replays it with the
    addresses the key read (not through the JIT again)."""
    spec = [(torch.float32, "contiguous")] * 7 + [None]
    a = _args(spec)
    key = scan_launch.plan_key(a)
    monkeypatch.setattr(scan_launch, "_PLANS", {})
    real_build = scan_launch.build_plan
    built = {}

    def build(a_, config=None, gluon=True):
        plan, kernels, jits, _ = _recording_plan(a_, monkeypatch, False, real_build)
        built.update(plan=plan, kernels=kernels, jits=jits)
        return plan

    monkeypatch.setattr(scan_launch, "build_plan", build)
    scan_launch.run(a)
    assert scan_launch._PLANS[key] is built["plan"]
    a2 = _args(spec, seed=5)
    y, h = scan_launch.run(a2)
    assert all(len(j.calls) == 1 for j in built["jits"])      # the JIT only on the first call
    assert all(len(k.calls) == 1 for k in built["kernels"])   # the replay launched directly
    dargs = built["kernels"][-1].calls[0]
    assert tuple(dargs[9:14]) == tuple(t.data_ptr() for t in a2[:5]) and dargs[17:19] == (y.data_ptr(), h.data_ptr())


# ----------------------------------------------------------------------------------------------
# shapes: the kernels' broadcasting is the reference's; shapes they would read out of bounds raise
# ----------------------------------------------------------------------------------------------
_FULL = dict(u="bdl", delta="bdl", A="dn", B="bnl", C="bnl", D="d", z="bdl", h0="bdn")
_SIZES = dict(b=2, d=3, l=9, n=4)


def _shaped_args(shapes):
    gen = torch.Generator().manual_seed(0)
    ts = {r: torch.randn(shapes.get(r, tuple(_SIZES[c] for c in dims)), generator=gen) for r, dims in _FULL.items()}
    ts["delta"] = ts["delta"].abs() * 0.5
    ts["A"] = -ts["A"].abs()
    return SelectiveScanArgs(*[ts[r] for r in _FULL], None)


@settings(max_examples=80)
@given(role=st.sampled_from(["delta", "B", "C", "D", "z", "h0"]), data=st.data())
def test_shapes_broadcast_along_size_1_or_raise(role, data):
    """A dimension of a tensor's role shape (u: (b, d, l), A: (d, n)) of its own size or 1 is
    taken (1 broadcasts); any other size raises a clear CodegenError naming the tensor, before
    anything is launched."""
    from fxopt.errors import CodegenError

    full = [_SIZES[c] for c in _FULL[role]]
    shape = [data.draw(st.sampled_from([f, 1, f + 1, 5 * f + 2])) for f in full]
    bad = any(s not in (f, 1) for s, f in zip(shape, full))
    a = _shaped_args({role: tuple(shape)})
    if bad:
        with pytest.raises(CodegenError, match=f"{role} has shape"):
            scan_launch.check_shapes(a)
    else:
        scan_launch.check_shapes(a)


def test_shapes_that_do_not_fit_raise_at_the_launch_path(monkeypatch):
    from fxopt.errors import CodegenError

    monkeypatch.setattr(scan_launch, "_PLANS", {})
    with pytest.raises(CodegenError, match=r"B has shape \(2, 5, 9\)"):
        scan_launch.run(_shaped_args({"B": (2, 5, 9)}))
    with pytest.raises(CodegenError, match="u must be"):
        scan_launch.run(_shaped_args({"u": (2, 3, 9, 1)}))
    with pytest.raises(CodegenError, match="h0 has shape"):
        scan_launch.run(_shaped_args({"h0": (2, 2, 3, 4)}))
    assert scan_launch._PLANS == {}  # nothing planned for them
    scan_launch.check_shapes(_shaped_args({"h0": (3, 4)}))  # h0 may leave out leading dimensions


_LAYOUTS_INTERPRETED = textwrap.dedent("""
    import torch
    from fxopt.codegen import scan_launch
    from fxopt.codegen.scan_ref import SelectiveScanArgs, selective_scan_ref
    g = torch.Generator().manual_seed(0)
    b, d, L, n = 2, 5, 20, 4
    full = dict(u=(b, d, L), delta=(b, d, L), A=(d, n), B=(b, n, L), C=(b, n, L), D=(d,), z=(b, d, L), h0=(b, d, n))
    def inputs(**over):
        ts = {r: torch.randn(s, generator=g) for r, s in full.items()}
        ts.update(over)
        ts["delta"] = ts["delta"].abs() * 0.5
        ts["A"] = -ts["A"].abs()
        return SelectiveScanArgs(*[ts[r] for r in full], None)
    cases = {
        "D strided": dict(D=torch.randn(3 * d, generator=g)[::3]),     # read at unit stride before: wrong y
        "D size 1": dict(D=torch.randn(1, generator=g)),                # read out of bounds before
        "D offset": dict(D=torch.randn(d + 1, generator=g)[1:]),
        "D bf16 strided": dict(D=torch.randn(2 * d, generator=g)[::2].bfloat16()),
    }
    for role in ("delta", "B", "C", "z", "h0"):
        for k in range(3):
            shape = list(full[role])
            if role == "delta" and k == 2:
                continue  # the reference does not broadcast delta along l
            shape[k] = 1
            cases[f"{role} {tuple(shape)}"] = {role: torch.randn(shape, generator=g)}
    for name, over in cases.items():
        a = inputs(**over)
        y0, h0 = selective_scan_ref(*a)
        y1, h1 = scan_launch.run(a)
        err = max(float((y0 - y1).abs().max()), float((h0 - h1).abs().max()))
        assert err <= 1e-4 * (1 + float(y0.abs().max())), (name, err)
    print("OK", len(cases))
""")


def test_unusual_layouts_run_as_the_reference_interpreted():
    """Under the interpreter, through the launch plans: a strided / size-1 / offset D (the kernels
    read D at unit stride: the plan copies it) and size-1 broadcast dimensions give the
    reference's results."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _LAYOUTS_INTERPRETED], env=env, capture_output=True, text=True,
                       timeout=600, cwd=root)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


# ----------------------------------------------------------------------------------------------
# the Gluon kernel's layout needs (decided on the host: no GPU needed)
# ----------------------------------------------------------------------------------------------
def _gluon_cfg(tpc=2, bc_reg=True):
    from fxopt.codegen.scan_config import GluonScanConfig

    return GluonScanConfig(TPC=tpc, M=1, W=1, K=16, STAGES=3, G=1, exp="fma", bc_reg=bc_reg)


def _bc_args(dtype, bc_layout, n=16, bc_dtype=None):
    gen = torch.Generator().manual_seed(0)
    b, d, L = 2, 8, 32
    bc_dtype = bc_dtype or dtype
    ts = [_tensor("u", b, d, L, n, dtype, "contiguous", gen), _tensor("delta", b, d, L, n, dtype, "contiguous", gen),
          _tensor("A", b, d, L, n, torch.float32, "contiguous", gen),
          _tensor("B", b, d, L, n, bc_dtype, bc_layout, gen), _tensor("C", b, d, L, n, bc_dtype, bc_layout, gen),
          _tensor("D", b, d, L, n, torch.float32, "contiguous", gen),
          _tensor("z", b, d, L, n, dtype, "contiguous", gen), None]
    return SelectiveScanArgs(*ts, None)


def _received(a, choice):
    return [a[i] if choice.preps[i] is None else choice.preps[i](a[i]) for i in range(8)]


def test_gluon_reads_16bit_l_major_b_c_through_registers_without_copies():
    """bf16 B / C unit-stride along l (what a contiguous (b, n, l) B / C is): with bc_reg the
    kernel loads them through registers as they are: no per-call fp32 copies (each an allocation
    and a kernel launch)."""
    scan_gluon = pytest.importorskip("fxopt.codegen.scan_gluon")
    a = _bc_args(torch.bfloat16, "contiguous")
    choice = scan_gluon.specialise(a, _gluon_cfg(), (9, 0))
    assert choice.preps[3] is None and choice.preps[4] is None
    lmajor, bc_reg = choice.constexprs[5], choice.constexprs[8]
    assert lmajor and bc_reg


def test_gluon_copies_16bit_b_c_for_the_async_copies():
    """The look-alike: the same bf16 l-major B / C with bc_reg off go through async copies, which
    move >= 4 bytes per piece along n: they are read as fp32 copies (exactly B.float())."""
    scan_gluon = pytest.importorskip("fxopt.codegen.scan_gluon")
    a = _bc_args(torch.bfloat16, "contiguous")
    choice = scan_gluon.specialise(a, _gluon_cfg(bc_reg=False), (9, 0))
    assert choice.preps[3] is not None and choice.preps[4] is not None
    got = _received(a, choice)
    assert got[3].dtype == torch.float32 and torch.equal(got[3], a.B.float()) and torch.equal(got[4], a.C.float())
    assert choice.constexprs[5] and not choice.constexprs[8]


@settings(max_examples=60)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       bc_dtype=st.sampled_from([None, torch.float32, torch.bfloat16]),
       bc_layout=st.sampled_from(["contiguous", "transposed", "offset"]), n=st.sampled_from([4, 16, 12]),
       tpc=st.sampled_from([1, 2, 8]), bc_reg=st.booleans())
def test_gluon_b_c_reach_the_kernel_in_a_layout_it_reads(dtype, bc_dtype, bc_layout, n, tpc, bc_reg):
    """Whatever B / C look like: fp32 ones are never copied; a 16-bit one reaches the kernel
    uncopied only through registers (BC_REG: both unit-stride along l) or through the async
    copies' n-major layout with >= 2 states per lane, strides divisible by 16 elements and
    16-byte aligned; a copy is exactly the fp32 value; the kernel's layout flags describe what it
    receives."""
    scan_gluon = pytest.importorskip("fxopt.codegen.scan_gluon")
    from fxopt.codegen.scan_config import kernel_strides, next_pow2

    a = _bc_args(dtype, bc_layout, n=n, bc_dtype=bc_dtype)
    choice = scan_gluon.specialise(a, _gluon_cfg(tpc=tpc, bc_reg=bc_reg), (9, 0))
    if choice is None:  # 16-bit tiles the async copies cannot take (K < 2 TPC): the Triton kernel runs
        assert dtype != torch.float32 and 16 < 2 * min(tpc, next_pow2(n))
        return
    got = _received(a, choice)
    lmajor, bc_reg_on = choice.constexprs[5], choice.constexprs[8]
    B, C = got[3], got[4]
    assert lmajor == (B.stride(2) == 1 and C.stride(2) == 1 and not (B.stride(1) == 1 and C.stride(1) == 1))
    assert bc_reg_on == (bc_reg and lmajor)
    NP = next_pow2(n)
    wide = n == NP and NP // min(tpc, NP) >= 2
    for orig, rec, i in ((a.B, B, 3), (a.C, C, 4)):
        if orig.dtype == torch.float32:
            assert choice.preps[i] is None
        elif choice.preps[i] is None:
            sb, _, sl = kernel_strides(orig)
            assert bc_reg_on or (orig.stride(1) == 1 and wide and sb % 16 == 0 and sl % 16 == 0
                                 and orig.data_ptr() % 16 == 0)
        else:
            assert rec.dtype == torch.float32 and torch.equal(rec, orig.float())
