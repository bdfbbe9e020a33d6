"""fxopt.codegen: tree IR, Triton emitter (run under TRITON_INTERPRET=1, bit-equal to
eager), CUDA C emitter (nvcc -c compile check), kernel cache, kernel_sources."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fxopt.codegen import elementwise as ew
from fxopt.errors import CodegenError

import hypothesis
import triton
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fxopt.testing import assert_equivalent, bitwise  # noqa: E402
from fxopt.testing import strategies as fst  # noqa: E402

# the Triton interpreter computes with numpy, which warns on inf/nan arithmetic
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

TREES = [
    "t0=add(x0,x1);t1=add(t0,x2)->t1",  # GPTNeoX (mlp + attn) + hidden
    "t0=add(x0,x1);t1=sub(t0,x2)->t1,t0",  # extra output
    "t0=add(x0,x1);t1=add(x2,x3);t2=sub(t1,t0)->t2",  # balanced
    "t0=add(x0,x0);t1=add(t0,x1)->t1",  # reused leaf
]


@pytest.fixture(autouse=True)
def _interpret(monkeypatch, tmp_path_factory):
    # CPU tensors through the Triton interpreter; kernel cache in a temp dir
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fxopt_cache"))


# ----------------------------------------------------------------------------- IR
def test_parse_and_evaluate_roundtrip():
    t = ew.parse_tree(TREES[1])
    assert t.n_inputs == 3 and t.n_outputs == 2
    assert t.expression() == "((x0 + x1) - x2)"
    assert ew.format_tree([(s.op, s.a, s.b) for s in t.stmts], t.outputs) == TREES[1]
    xs = [torch.randn(3, 4) for _ in range(3)]
    o0, o1 = t.evaluate(xs)
    assert torch.equal(o0, (xs[0] + xs[1]) - xs[2]) and torch.equal(o1, xs[0] + xs[1])


@pytest.mark.parametrize(
    "bad",
    ["t0=add(x0,x1)", "t0=mul(x0,x1)->t0", "t1=add(x0,x1)->t1", "t0=add(x0,t0)->t0", "t0=add(x0,x2)->t0",
     "t0=add(x0,x1)->t1", "t0=add(x0,x1)->t0,t0", "->t0"],
)
def test_parse_rejects_malformed(bad):
    with pytest.raises(CodegenError):
        ew.parse_tree(bad)


def test_plan_layout_collapses_and_detects_broadcast():
    # contiguous (2,3,4) + broadcast (4,) + transposed: dims collapse where all agree
    lay = ew.plan_layout((2, 3, 4), [(2, 3, 4), (4,)], [(12, 4, 1), (1,)], [(12, 4, 1)])
    assert lay.sizes == (6, 4) and lay.in_linear == (True, False) and lay.in_strides[1] == (0, 1)
    lay = ew.plan_layout((5, 6), [(5, 6), (5, 6)], [(6, 1), (6, 1)], [(6, 1)])
    assert lay.sizes == (30,) and lay.all_linear
    assert ew.plan_layout((2, 3, 2, 3, 2), [(2, 3, 2, 3, 2)], [(1, 2, 6, 12, 36)], [(36, 12, 6, 2, 1)]) is None


# ----------------------------------------------------------------------------- Triton
def _run_triton(xs, tree):
    from fxopt.codegen.add_tree_launch import run_generated

    return run_generated(xs, tree, "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_specials_bit_equal(dtype):
    """inf, -inf, nan, -0.0, subnormals, overflow to inf, cancellation - every bit as eager."""
    sp = fst.special_values(dtype)
    vals = torch.stack(list(sp.values()))
    n = len(vals)
    # all pairs x all values: every (x0, x1, x2) combination over the specials
    x0 = vals.repeat_interleave(n * n)
    x1 = vals.repeat_interleave(n).repeat(n)
    x2 = vals.repeat(n * n)
    for tree in TREES[:2]:
        ref = ew.parse_tree(tree).evaluate([x0, x1, x2])
        out = _run_triton([x0, x1, x2], tree)
        for r, o in zip(ref, out):
            bitwise.check(r, o)
    # -0.0 + -0.0 = -0.0 and -0.0 - 0.0 = -0.0 (a kernel that adds 0.0 somewhere would lose the sign)
    z = torch.full((8,), -0.0, dtype=dtype)
    (o,) = _run_triton([z, z, z], "t0=add(x0,x1);t1=add(t0,x2)->t1")
    assert torch.equal(o.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       z.view(torch.int16 if dtype != torch.float32 else torch.int32))


@settings(max_examples=40)
@given(data=st.data())
def test_triton_bit_equal_hypothesis(data):
    """Random shapes, broadcast and non-contiguous operands, special values, 3 dtypes."""
    dtype = data.draw(fst.float_dtypes())
    tree = data.draw(st.sampled_from(TREES))
    t = ew.parse_tree(tree)
    shape = data.draw(fst.shapes(min_dims=1, max_dims=4, max_side=9))
    xs = []
    for i in range(t.n_inputs):
        if i > 0 and data.draw(st.booleans()):
            bshape = data.draw(fst.broadcastable_shapes(shape))
            xs.append(data.draw(fst.strided_tensors(bshape, dtype)))
        else:
            xs.append(data.draw(fst.strided_tensors(shape, dtype)))
    ref = t.evaluate(xs)
    out = _run_triton(xs, tree)
    for r, o in zip(ref, out):
        assert o.shape == r.shape and o.stride() == r.stride()
        bitwise.check(r, o)


def test_triton_through_op_helper_matches_assert_equivalent():
    from fxopt.codegen.add_tree_launch import run_generated

    x = torch.randn(4, 6, dtype=torch.float16)
    y = torch.randn(6, 4, dtype=torch.float16).t()  # non-contiguous
    z = torch.randn(1, 6, dtype=torch.float16)  # broadcast
    tree = TREES[0]
    assert_equivalent(lambda a, b, c: (a + b) + c, lambda a, b, c: run_generated([a, b, c], tree)[0], (x, y, z), bitwise)


def test_emitted_triton_source_shape():
    name, src = ew.emit_triton(ew.parse_tree(TREES[1]), torch.float16, (True, False, True), (True, True), 2)
    assert name in src and "@triton.jit" in src
    assert "x1_st_0" in src and "x0_st_0" not in src  # strides only for strided operands
    assert src.count("tl.store") == 2
    _, src_bf = ew.emit_triton(ew.parse_tree(TREES[0]), torch.bfloat16)
    assert "_f32_to_bf16_rne" in src_bf


def test_launcher_cached_per_specialisation(monkeypatch):
    """One cache, one key: new values share a launcher; other strides, alignment, dtype or backend
    get their own; the graph entry point and the op's CUDA impl both use it."""
    from fxopt.codegen import add_tree_launch as atl
    from fxopt.ops import fused_add

    atl.clear_launchers()
    xs = [torch.randn(5, 7) for _ in range(3)]
    l1 = atl.launcher_for(xs, TREES[0], "triton")
    assert atl.launcher_for([x.clone() for x in xs], TREES[0], "triton") is l1
    others = [
        [xs[0], xs[1], torch.randn(7, 5).t()],                     # strides
        [xs[0], xs[1], torch.randn(36)[1:36].view(5, 7)],         # alignment
        [xs[0].double(), xs[1].double(), xs[2].double()],          # dtype
    ]
    for ys in others:
        assert atl.launcher_for(ys, TREES[0], "triton") is not l1
    assert atl.launcher_for(xs, TREES[0], "torch") is not l1
    assert len(atl._LAUNCHERS) == 5
    monkeypatch.setattr(fused_add, "FAST_PATH_ON_CPU", True)
    with torch.no_grad():
        (out,) = fused_add.fused_add_tree(xs, TREES[0])  # FXOPT_BACKEND as configured (triton): l1's key
    assert len(atl._LAUNCHERS) == 5 and atl.launcher_for(xs, TREES[0]) is l1
    bitwise.check((xs[0] + xs[1]) + xs[2], out)
    with torch.no_grad():
        fused_add.fused_add_tree([x.clone() for x in xs], TREES[0])
    assert len(atl._LAUNCHERS) == 5


# ----------------------------------------------------------------------------- CUDA C
def _nvcc():
    from fxopt.codegen.cache import nvcc_path

    return nvcc_path()


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not installed: CUDA C compile check needs it")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    from fxopt.codegen.cache import nvcc_compile_check

    # two trees in one run (~5-10 s each): arity 3 with an extra output, arity 4
    for tree in (TREES[1], TREES[2]):
        sym, src = ew.emit_cuda(ew.parse_tree(tree))
        assert f'extern "C" int {sym}_launch' in src
        assert "__fadd_rn" in src and "torch" not in src  # standalone, no torch headers
        obj = nvcc_compile_check(src, arch="sm_80", workdir=tmp_path / sym)
        assert obj.exists() and obj.stat().st_size > 0


def test_cuda_binding_mentions_symbol():
    t = ew.parse_tree(TREES[0])
    cpp = ew.emit_cuda_binding(t)
    assert ew.cuda_symbol(t) + "_launch" in cpp and "getCurrentCUDAStream" in cpp


# ----------------------------------------------------------------------------- cache
def test_cache_atomic_write_and_key(tmp_path):
    from fxopt.codegen.cache import atomic_write, cache_key

    assert cache_key("a", "x") != cache_key("a", "y") != cache_key("b", "x")
    p = atomic_write(tmp_path / "k.py", "print(1)\n")
    assert p.read_text() == "print(1)\n"
    atomic_write(p, "print(2)\n")
    assert p.read_text() == "print(2)\n"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_cache_safe_with_several_processes(tmp_path):
    """Four processes write + import the same generated module at once."""
    code = textwrap.dedent(
        """
        import sys
        from fxopt.codegen import elementwise as ew
        from fxopt.codegen.cache import load_triton_module, file_lock
        import torch
        name, src = ew.emit_triton(ew.parse_tree("t0=add(x0,x1);t1=add(t0,x2)->t1"), torch.float16)
        with file_lock("test"):
            pass
        mod = load_triton_module(name, src)
        assert hasattr(mod, name)
        print("ok")
        """
    )
    env = dict(os.environ, FXOPT_CACHE_DIR=str(tmp_path), TRITON_INTERPRET="1")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "ok" in out
    files = list((tmp_path / "triton").iterdir())
    assert len([f for f in files if f.suffix == ".py"]) == 1
    assert not [f for f in files if f.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- inspection
def test_kernel_sources_of_rewritten_graph_and_providers(monkeypatch):
    import fxopt.codegen as cg
    from fxopt.passes.residual_add import ResidualAddPass

    class M(torch.nn.Module):
        def forward(self, a, b, c):
            return torch.relu((a + b) + c)

    xs = [torch.randn(2, 8) for _ in range(3)]
    gm = torch.export.export(M(), tuple(xs), strict=False).module()
    ResidualAddPass()(gm)
    srcs = cg.kernel_sources(gm)
    assert len(srcs) == 1
    (name, src), = srcs.items()
    assert name.startswith("fxopt_add_tree_") and "@triton.jit" in src
    monkeypatch.setenv("FXOPT_BACKEND", "cuda")
    (name_c, src_c), = cg.kernel_sources(gm).items()
    assert "__global__" in src_c
    # a provider for another op
    cg.register_source_provider(torch.ops.aten.relu.default, lambda n: ("relu_kernel", "// relu"))
    try:
        assert cg.kernel_sources(gm)["relu_kernel"] == "// relu"
    finally:
        cg._PROVIDERS.pop(torch.ops.aten.relu.default, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI is CPU-only; run on the device tool)")
def test_fused_add_cuda_launches_bit_equal(monkeypatch):
    """On the GPU, the graph entry point (cached launcher; from the second call the compiled
    kernel is launched with raw addresses) and the op give eager's bits for contiguous,
    broadcast, transposed and misaligned operands."""
    from fxopt.ops import fused_add

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compiled kernels, not the interpreter
    monkeypatch.delenv("FXOPT_BACKEND", raising=False)
    dev = "cuda"
    cases = [
        [torch.randn(3, 257, device=dev) for _ in range(3)],
        [torch.randn(4, 33, 65, device=dev), torch.randn(65, device=dev), torch.randn(65, 33, 4, device=dev).permute(2, 1, 0)],
        [torch.randn(4097, device=dev, dtype=torch.float16)[1:] for _ in range(3)],
        [torch.randn(1, 1, 2560, device=dev, dtype=torch.bfloat16) for _ in range(3)],
    ]
    for xs in cases:
        for tree in TREES[:2]:
            ref = ew.parse_tree(tree).evaluate(xs)
            with torch.no_grad():
                outs = [fused_add.fused_add_tree(xs, tree) for _ in range(3)]
            outs.append(fused_add.fused_add_tree_op(xs, tree))
            for out in outs:
                for r, o in zip(ref, out):
                    assert o.stride() == r.stride()
                    bitwise.check(r, o)
