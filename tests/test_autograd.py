"""Training through fxopt's custom ops and optimized models: gradients are eager's (under each op's
contract) and no path drops them silently.

* ``fxopt::fused_add_tree``: gradcheck in fp64 (broadcast leaves, extra outputs, sub, reused leaf);
  backward bit-equal to eager autograd on the unfused adds (Hypothesis: dtypes, broadcast, strided
  leaves, specials in the incoming gradients, unused outputs); the graph entry point's launcher fast
  path (driven with CPU tensors under TRITON_INTERPRET=1) is taken only when no gradient can flow.
* ``fxopt::selective_scan`` / ``fxopt::linear_scan``: gradcheck in fp64 with and without the optional
  inputs, both outputs (``h_last`` included), broadcast operands, several backward chunks; 16-bit
  inputs get the gradient of the fp32 computation rounded once; the backward recomputes bounded chunks.
* forward-mode AD is refused with an FxoptError instead of zero tangents.
* end to end: HF Mamba, the seed Mamba and GPTNeoX optimized with ``fxopt.optimize``: ``backward()``
  gives eager's parameter (and ``inputs_embeds``) gradients.
"""
from __future__ import annotations

import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import fxopt
from fxopt.codegen import elementwise as ew
from fxopt.codegen import add_tree_launch
from fxopt.ops import fused_add as fa
from fxopt.ops import scan_grad
from fxopt.ops.scan import LINEAR_SCAN, SELECTIVE_SCAN, linear_scan_ref, selective_scan_ref
from fxopt.testing import bitwise
from fxopt.testing import strategies as fst

# the Triton interpreter computes with numpy, which warns on inf/nan arithmetic
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

F64 = torch.float64

TREES = [
    "t0=add(x0,x1);t1=add(t0,x2)->t1",  # GPTNeoX (mlp + attn) + hidden
    "t0=add(x0,x1);t1=sub(t0,x2)->t1,t0",  # sub, and an intermediate that is also an output
    "t0=add(x0,x1);t1=add(x2,x3);t2=sub(t1,t0)->t2",  # balanced, sub of a subtree
    "t0=add(x0,x0);t1=add(t0,x1)->t1",  # reused leaf
    "t0=sub(x0,x1);t1=add(t0,x1);t2=sub(t1,x0)->t2,t1,t0",  # every temp an output, leaves reused twice
]


def _n_inputs(tree: str) -> int:
    return ew.parse_tree(tree).n_inputs


def _eager_tree(xs, tree):
    return ew.parse_tree(tree).evaluate(list(xs))


# ============================================================================ fused_add_tree
@pytest.mark.parametrize("tree", TREES)
def test_fused_add_gradcheck_fp64_broadcast_leaves(tree):
    g = torch.Generator().manual_seed(0)
    # leaves of different ranks and size-1 dims: every edge of the backward has a sum_to_size
    shapes = [(3, 5), (5,), (3, 1), (1, 1, 5)]
    xs = [torch.randn(s, generator=g, dtype=F64, requires_grad=True) for s in shapes[:_n_inputs(tree)]]
    op = lambda *x: tuple(fa.fused_add_tree_op(list(x), tree))  # noqa: E731
    assert gradcheck(op, xs)
    assert gradgradcheck(op, xs)  # the backward is made of ATen ops: differentiable again


@pytest.mark.parametrize("tree", TREES)
def test_fused_add_entry_point_gradcheck_fp64(tree):
    """What rewritten graphs call (fused_add_tree), not only the op."""
    xs = [torch.randn(4, 3, dtype=F64, requires_grad=True) for _ in range(_n_inputs(tree))]
    assert gradcheck(lambda *x: tuple(fa.fused_add_tree(list(x), tree)), xs)


def _leaf(x):
    return x.detach().requires_grad_(True)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fused_add_backward_bit_equal_to_eager(data):
    """Same sum_to_size per edge, same cast, same accumulation order as eager autograd: same bits,
    also with inf/nan/-0.0/subnormals in the incoming gradients and for unused outputs."""
    tree = data.draw(st.sampled_from(TREES))
    t = ew.parse_tree(tree)
    dtype = data.draw(fst.float_dtypes())
    shape = data.draw(fst.shapes(min_dims=1, max_dims=3, max_side=6))
    xs = []
    for i in range(t.n_inputs):
        # every leaf broadcasts to ``shape`` but may be smaller: temps differ in shape (x0 (1, 3)
        # + x1 (2, 1) -> (2, 3)), so inner edges of the backward reduce too
        s = data.draw(fst.broadcastable_shapes(shape))
        # one leaf in float32 among 16-bit ones: promotion and the engine's cast back
        d = torch.float32 if (i == t.n_inputs - 1 and dtype != torch.float32 and data.draw(st.booleans())) else dtype
        xs.append(data.draw(fst.strided_tensors(s, d, special=False)))
    ref_leaves = [_leaf(x) for x in xs]
    our_leaves = [_leaf(x) for x in xs]
    ref_out = _eager_tree(ref_leaves, tree)
    our_out = fa.fused_add_tree_op(our_leaves, tree)
    used = data.draw(st.lists(st.booleans(), min_size=t.n_outputs, max_size=t.n_outputs).filter(any))
    outs_r, outs_o, grads = [], [], []
    for k, (r, o) in enumerate(zip(ref_out, our_out)):
        if used[k]:
            grads.append(data.draw(fst.tensors(tuple(r.shape), r.dtype)))
            outs_r.append(r)
            outs_o.append(o)
    gr = torch.autograd.grad(outs_r, ref_leaves, grads, allow_unused=True)
    go = torch.autograd.grad(outs_o, our_leaves, grads, allow_unused=True)
    for a, b in zip(gr, go):
        assert (a is None) == (b is None)
        if a is not None:
            bitwise.check(a, b)


def test_fused_add_history_is_the_ops_own_backward():
    """The op's registered backward, not torch's autograd fallback (which on CPU happened to trace the
    ATen adds inside the kernel, with a warning, and on CUDA sees a generated kernel: no history)."""
    import warnings

    x0 = torch.randn(4, 3, requires_grad=True)
    x1 = torch.randn(3)  # constant: no gradient computed or returned
    x2 = torch.randn(4, 1, requires_grad=True)
    (out,) = fa.fused_add_tree_op([x0, x1, x2], TREES[0])
    assert "fused_add_tree" in type(out.grad_fn).__name__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out.sum().backward()
    assert torch.equal(x0.grad, torch.ones(4, 3)) and torch.equal(x2.grad, torch.full((4, 1), 3.0))
    assert x1.grad is None


# ----------------------------------------------------------------------------- the launcher fast path
@pytest.fixture
def cpu_fast_path(monkeypatch, tmp_path_factory):
    """fused_add_tree's CUDA fast path, driven with CPU tensors: the Triton interpreter runs the
    generated kernel; counts the calls that went to the op instead."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fxopt_cache"))
    monkeypatch.setattr(fa, "FAST_PATH_ON_CPU", True)
    calls = {"op": 0, "launcher": 0}
    real_op, real_call = fa.fused_add_tree_op, add_tree_launch.Launcher.__call__

    def counting_op(xs, tree):
        calls["op"] += 1
        return real_op(xs, tree)

    def counting_launch(self, xs):
        calls["launcher"] += 1
        return real_call(self, xs)

    monkeypatch.setattr(fa, "fused_add_tree_op", counting_op)
    monkeypatch.setattr(add_tree_launch.Launcher, "__call__", counting_launch)
    return calls


def test_fast_path_with_requires_grad_keeps_history(cpu_fast_path):
    x0 = torch.randn(5, 7, requires_grad=True)
    x1, x2 = torch.randn(5, 7), torch.randn(7)
    tree = TREES[1]
    out, extra = fa.fused_add_tree([x0, x1, x2], tree)
    assert out.grad_fn is not None and extra.grad_fn is not None
    assert cpu_fast_path == {"op": 1, "launcher": 0}
    (out.sum() + 2 * extra.sum()).backward()
    assert torch.equal(x0.grad, torch.full((5, 7), 3.0))


def test_fast_path_taken_when_no_gradient_can_flow(cpu_fast_path):
    x0 = torch.randn(5, 7, requires_grad=True)
    x1, x2 = torch.randn(5, 7), torch.randn(7)
    ref = _eager_tree([x0.detach(), x1, x2], TREES[0])[0]
    with torch.no_grad():
        (a,) = fa.fused_add_tree([x0, x1, x2], TREES[0])
    (b,) = fa.fused_add_tree([x0.detach(), x1, x2], TREES[0])  # grad mode on, nothing requires grad
    with torch.inference_mode():
        (c,) = fa.fused_add_tree([x0, x1, x2], TREES[0])
    assert cpu_fast_path == {"op": 0, "launcher": 3}
    for o in (a, b, c):
        assert o.grad_fn is None and not o.requires_grad
        bitwise.check(ref, o)


def test_fast_path_in_an_optimized_model_keeps_gradients(cpu_fast_path):
    """GPTNeoX's fused residual adds through the launcher path: backward reaches every parameter with
    eager's gradient (the rewrite is bitwise, so its backward is too); under no_grad the launcher
    serves every call."""
    from fxopt.models.hf import tiny_gpt_neox

    model = tiny_gpt_neox(parallel_residual=True).train()
    ids = torch.randint(0, 128, (2, 9))
    opt = fxopt.optimize(model, (ids,), passes=["residual_add"])
    assert opt.report().matches == {"residual_add": 2}
    eager = _param_grads(model, lambda: model(ids).logits)
    cpu_fast_path.update(op=0, launcher=0)
    ours = _param_grads(model, lambda: opt(ids).logits)
    assert cpu_fast_path == {"op": 2, "launcher": 0}
    for name in eager:
        assert ours[name] is not None, f"{name}: no gradient"
        bitwise.check(eager[name], ours[name])
    with torch.no_grad():
        logits = opt(ids).logits
    assert cpu_fast_path == {"op": 2, "launcher": 2}
    bitwise.check(model(ids).logits, logits)


# ============================================================================ selective_scan
def _scan_inputs(b, d, L, n, dtype=F64, seed=0, h0_shape=None):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(
        u=r(b, d, L).to(dtype),
        delta=(torch.rand(b, d, L, generator=g, dtype=torch.float64) + 0.05).to(dtype),
        A=-(torch.rand(d, n, generator=g, dtype=torch.float64) + 0.1),
        B=r(b, n, L).to(dtype),
        C=r(b, n, L).to(dtype),
        D=r(d),
        z=r(b, d, L).to(dtype),
        h0=r(*(h0_shape or (b, d, n))),
    )


_SEL_ORDER = ("u", "delta", "A", "B", "C", "D", "z", "h0")


def _sel_call(inp, use):
    """(fn, tensors) for gradcheck: the op with the optional inputs in ``use`` (others None)."""
    names = [k for k in _SEL_ORDER if k in ("u", "delta", "A", "B", "C") or k in use]
    tensors = [inp[k].requires_grad_() for k in names]

    def fn(*ts):
        kw = dict(zip(names, ts))
        return SELECTIVE_SCAN(*(kw.get(k) for k in _SEL_ORDER))

    return fn, tensors


@pytest.mark.parametrize("use", [(), ("D",), ("z",), ("h0",), ("D", "z", "h0")])
@pytest.mark.parametrize("L", [1, 5, 11])  # 11: four backward chunks of 3
def test_selective_scan_gradcheck_fp64(use, L):
    fn, ts = _sel_call(_scan_inputs(2, 3, L, 4, seed=L), use)
    assert len(scan_grad.grad_chunks(L)) == {1: 1, 5: 3, 11: 4}[L]
    assert gradcheck(fn, ts)  # every output: y and h_last


@pytest.mark.parametrize("h0_shape", [(1, 3, 4), (3, 4), (4,)])
def test_selective_scan_gradcheck_broadcast_h0(h0_shape):
    fn, ts = _sel_call(_scan_inputs(2, 3, 6, 4, seed=1, h0_shape=h0_shape), ("D", "h0"))
    assert gradcheck(fn, ts)


def test_selective_scan_gradient_of_each_output_alone():
    """h_last's gradient reaches u, delta, A, B and h0 (not C, D, z); y's alone reaches everything."""
    inp = _scan_inputs(1, 2, 7, 3)
    fn, ts = _sel_call(inp, ("D", "z", "h0"))
    assert gradcheck(lambda *t: fn(*t)[1], ts)
    assert gradcheck(lambda *t: fn(*t)[0], ts)
    ts = [t.detach().requires_grad_() for t in ts]
    _, h = fn(*ts)
    grads = torch.autograd.grad(h.sum(), ts, allow_unused=True)
    reached = {k for k, g in zip(("u", "delta", "A", "B", "C", "D", "z", "h0"), grads) if g is not None and g.abs().sum() > 0}
    assert reached == {"u", "delta", "A", "B", "h0"}


def test_selective_scan_zero_length():
    inp = _scan_inputs(2, 3, 0, 4)
    fn, ts = _sel_call(inp, ("D", "z", "h0"))
    y, h = fn(*ts)
    assert y.shape == (2, 3, 0)
    (h * 2).sum().backward()
    assert torch.equal(ts[-1].grad, torch.full((2, 3, 4), 2.0, dtype=F64)) and ts[0].grad.shape == (2, 3, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_selective_scan_16bit_gradients_are_the_fp32_computations_rounded(dtype):
    """The op's state-dtype semantics: 16-bit inputs are computed on in fp32. Their gradients are
    the gradients of that fp32 computation (autograd of the reference, unchunked, on upcast copies),
    rounded once to the input dtype: within 1 ulp (the chunked recompute re-associates sums)."""
    inp = _scan_inputs(2, 4, 13, 5, dtype=dtype, seed=3)
    inp["A"], inp["D"], inp["h0"] = inp["A"].float(), inp["D"].float(), inp["h0"].float()
    ts = [inp[k].clone().requires_grad_() for k in _SEL_ORDER]
    y, h = SELECTIVE_SCAN(*ts)
    assert y.dtype == dtype and h.dtype == torch.float32
    g = torch.Generator().manual_seed(5)
    gy = torch.randn(y.shape, generator=g).to(dtype)
    gh = torch.randn(h.shape, generator=g)
    ours = torch.autograd.grad((y, h), ts, (gy, gh))
    up = [t.detach().float().requires_grad_() for t in ts]
    y32, h32 = selective_scan_ref(*up)
    ref = torch.autograd.grad((y32, h32), up, (gy.float(), gh))
    for name, t, a, b in zip(_SEL_ORDER, ts, ref, ours):
        assert b.dtype == t.dtype, name
        tol = 2 * torch.finfo(t.dtype).eps * a.abs() + 1e-6 * a.abs().max()
        assert ((a.to(t.dtype).float() - b.float()).abs() <= tol).all(), name


def test_selective_scan_backward_recomputes_bounded_chunks(monkeypatch):
    """Memory: the backward never re-runs the reference on more than MAX_GRAD_CHUNK steps at once
    (here isqrt(200) = 14), so no (b, d, l, n) tensor is built for the whole sequence."""
    seen = []
    real = scan_grad.selective_scan_ref

    def spy(u, *args, **kw):
        seen.append(u.shape[2])
        return real(u, *args, **kw)

    monkeypatch.setattr(scan_grad, "selective_scan_ref", spy)
    inp = _scan_inputs(1, 2, 200, 3, dtype=torch.float32)
    ts = [inp[k].float().requires_grad_() for k in _SEL_ORDER]
    y, h = SELECTIVE_SCAN(*ts)
    torch.autograd.grad((y.sum() + h.sum()), ts)
    assert max(seen) == 14 and sum(seen) == 200


@pytest.mark.parametrize("loss", ["sum", "square"])  # incoming gradient constant / requiring grad
def test_scan_double_backward_is_refused(loss):
    inp = _scan_inputs(1, 2, 4, 3)
    fn, ts = _sel_call(inp, ())
    y, _ = fn(*ts)
    out = y.sum() if loss == "sum" else (y ** 2).sum()
    (gu,) = torch.autograd.grad(out, ts[0], create_graph=True)
    assert gu.requires_grad  # not a constant: a gradient penalty on it cannot silently lose a term
    with pytest.raises(RuntimeError, match="double backward"):
        (gu ** 2).sum().backward()
    # first-order use of the same graph is unaffected
    y, _ = fn(*ts)
    torch.autograd.grad(y.sum(), ts)


def test_linear_scan_double_backward_is_refused():
    a = torch.rand(5, 3, dtype=F64, requires_grad=True)
    b = torch.randn(5, 3, dtype=F64, requires_grad=True)
    y, _ = LINEAR_SCAN(a, b)
    (ga,) = torch.autograd.grad(y.sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        ga.sum().backward()


# ============================================================================ linear_scan
@pytest.mark.parametrize(
    "a_shape,b_shape,h0_shape",
    [((6, 3, 4), (6, 3, 4), None), ((6, 3, 1), (6, 1, 4), (4,)), ((6, 1, 4), (6, 3, 4), (3, 1)),
     ((1, 2), (1, 2), (2,)), ((9, 5), (9, 1), (1,))],
)
@pytest.mark.parametrize("with_c", [False, True])
def test_linear_scan_gradcheck_fp64(a_shape, b_shape, h0_shape, with_c):
    g = torch.Generator().manual_seed(sum(a_shape))
    S = torch.broadcast_shapes(a_shape[1:], b_shape[1:], h0_shape or ())
    ts = [torch.rand(a_shape, generator=g, dtype=F64) * 1.5 - 0.5, torch.randn(b_shape, generator=g, dtype=F64)]
    names = ["a", "b"]
    if h0_shape:
        ts.append(torch.randn(h0_shape, generator=g, dtype=F64))
        names.append("h0")
    if with_c:
        ts.append(torch.randn((a_shape[0], *S), generator=g, dtype=F64))
        names.append("C")
    ts = [t.requires_grad_() for t in ts]

    def fn(*xs):
        kw = dict(zip(names, xs))
        return LINEAR_SCAN(kw["a"], kw["b"], kw.get("h0"), kw.get("C"))

    assert gradcheck(fn, ts)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", [None, torch.float32])
def test_linear_scan_16bit_gradients_are_the_fp32_computations_rounded(dtype, state_dtype):
    g = torch.Generator().manual_seed(7)
    a = (torch.rand(17, 3, 4, generator=g) * 0.9).to(dtype).requires_grad_()
    b = torch.randn(17, 1, 4, generator=g).to(dtype).requires_grad_()
    h0 = torch.randn(3, 4, generator=g).to(dtype).requires_grad_()
    C = torch.randn(17, 3, 4, generator=g).to(dtype).requires_grad_()
    y, h = LINEAR_SCAN(a, b, h0, C, None, state_dtype)
    gy, gh = torch.randn(y.shape, generator=g).to(y.dtype), torch.randn(h.shape, generator=g).to(h.dtype)
    ours = torch.autograd.grad((y, h), (a, b, h0, C), (gy, gh))
    up = [t.detach().float().requires_grad_() for t in (a, b, h0, C)]
    y32, h32 = linear_scan_ref(*up)
    ref = torch.autograd.grad((y32, h32), up, (gy.float(), gh.float()))
    for t, r, o in zip((a, b, h0, C), ref, ours):
        assert o.dtype == t.dtype
        tol = 2 * torch.finfo(t.dtype).eps * r.abs() + 1e-6 * r.abs().max()
        assert ((r.to(t.dtype).float() - o.float()).abs() <= tol).all()


_KERNEL_STATES = textwrap.dedent("""
    import functools, torch
    from fxopt.codegen import scan_launch, scan_triton as st
    from fxopt.codegen.scan_config import TritonScanConfig
    from fxopt.ops import scan_grad
    from fxopt.ops.scan import SELECTIVE_SCAN, LINEAR_SCAN
    g = torch.Generator().manual_seed(0)
    def grads(fn, ts):
        ts = [t.detach().clone().requires_grad_() for t in ts]
        y, h = fn(*ts)
        return torch.autograd.grad((y, h), ts, (torch.ones_like(y), torch.ones_like(h)))
    for dt in (torch.float32, torch.bfloat16):
        b, d, L, n = 2, 3, 19, 4  # 5 chunks of 4: four kernel calls on time slices (strided views)
        u = torch.randn(b, d, L, generator=g).to(dt); delta = (torch.rand(b, d, L, generator=g) + .1).to(dt)
        A = -torch.rand(d, n, generator=g); B = torch.randn(b, n, L, generator=g).to(dt)
        C = torch.randn(b, n, L, generator=g).to(dt); D = torch.randn(d, generator=g)
        z = torch.randn(b, d, L, generator=g).to(dt); h0 = torch.randn(1, d, n, generator=g)  # broadcast h0
        ts = [u, delta, A, B, C, D, z, h0]
        tol = 1e-4 if dt == torch.float32 else 2e-2  # bf16: gradients 1 ulp apart (states differ in the last fp32 bits)
        def close(ref, got):
            for r, o in zip(ref, got):
                assert r.dtype == o.dtype and (r.float() - o.float()).abs().max() <= tol * (1 + r.float().abs().max()), (dt, r, o)
        ref = grads(SELECTIVE_SCAN, ts)
        calls = []
        def kernel(*a):
            calls.append(a[0].shape[2])
            return scan_launch.selective_scan(*a, config=TritonScanConfig(BD=2, K=2, G=2, PF2=False, num_warps=1))
        scan_grad.forward_ops["selective_scan"], saved = kernel, scan_grad.forward_ops["selective_scan"]
        close(ref, grads(SELECTIVE_SCAN, ts))
        scan_grad.forward_ops["selective_scan"] = saved
        assert calls == [4, 4, 4, 4], calls
        a = torch.rand(13, 3, 1, generator=g).to(dt); bb = torch.randn(13, 1, 4, generator=g).to(dt)
        hl0 = torch.randn(4, generator=g); CC = torch.randn(13, 3, 4, generator=g).to(dt)
        for args in ((a, bb), (a, bb, hl0, CC)):
            ref = grads(LINEAR_SCAN, args)
            scan_grad.forward_ops["linear_scan"], saved = st.linear_scan_triton, scan_grad.forward_ops["linear_scan"]
            close(ref, grads(LINEAR_SCAN, args))
            scan_grad.forward_ops["linear_scan"] = saved
    print("OK")
""")


def test_backward_with_states_from_the_triton_kernels_interpreted():
    """On a GPU the backward's state pass runs the ops' CUDA kernels on time slices (strided views,
    broadcast h0, fp32 states for bf16 inputs): the same gradients as with the reference's states."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _KERNEL_STATES], env=env, capture_output=True, text=True, timeout=600,
                       cwd=root)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


# ============================================================================ forward mode: refused
def test_forward_mode_ad_is_refused_not_zero():
    import torch.autograd.forward_ad as fwad

    x, y = torch.randn(3), torch.randn(3)
    delta, A, B, C = torch.rand(1, 3, 1), -torch.rand(3, 2), torch.randn(1, 2, 1), torch.randn(1, 2, 1)
    calls = [
        lambda u: fa.fused_add_tree([u, y], "t0=add(x0,x1)->t0")[0],
        lambda u: SELECTIVE_SCAN(u.reshape(1, 3, 1), delta, A, B, C)[0],
        lambda u: LINEAR_SCAN(u[:, None], u[:, None])[0],
    ]
    for f in calls:
        with fwad.dual_level():
            with pytest.raises(fxopt.FxoptError, match="forward-mode AD"):
                f(fwad.make_dual(x, torch.ones(3)))
        with pytest.raises(fxopt.FxoptError, match="forward-mode AD"):
            torch.func.jvp(f, (x,), (torch.ones(3),))


# ============================================================================ end to end
def _param_grads(model, forward, loss=lambda out: (out.float() ** 2).mean()):
    model.zero_grad(set_to_none=True)
    loss(forward()).backward()
    return {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}


# fp32 tolerance, per parameter: |g_opt - g_eager| <= GRAD_RTOL * max|g_eager|. The forward differs
# from eager within its contracts (the scan's re-associated fp32 readout, addcmul's single rounding:
# a few ulp per value), and backward propagates those differences through two layers; measured
# worst case 2.3e-6. 1e-4 leaves 40x margin, while a dropped or mis-signed gradient contribution
# is an O(1) relative error.
GRAD_RTOL = 1e-4


def _assert_grads_close(eager, ours, what):
    for name, ge in eager.items():
        go = ours[name]
        assert (ge is None) == (go is None), f"{what}: {name}: gradient is None: eager {ge is None}, fxopt {go is None}"
        if ge is None:  # unused by this call (the embedding when inputs_embeds is given)
            continue
        err = (go - ge).abs().max().item()
        scale = ge.abs().max().item()
        assert err <= GRAD_RTOL * scale + 1e-12, f"{what}: {name}: max |diff| {err:.3g} vs max |grad| {scale:.3g}"


def _family(name):
    from fxopt.models.hf import tiny_gpt_neox, tiny_hf_mamba
    from fxopt.models.seed_mamba import seed_mamba

    return {"hf_mamba": (tiny_hf_mamba, 128), "seed_mamba": (seed_mamba, 256),
            "gpt_neox": (tiny_gpt_neox, 128), "gpt_neox_serial": (lambda: tiny_gpt_neox(False), 128)}[name]


@pytest.mark.parametrize("name,expect", [("hf_mamba", {"scan": 2}), ("seed_mamba", {"scan": 2}),
                                         ("gpt_neox", {"addcmul": 4, "residual_add": 2}),
                                         ("gpt_neox_serial", {"addcmul": 4})])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_optimized_model_parameter_gradients_equal_eager(name, expect, mode):
    build, vocab = _family(name)
    model = getattr(build(), mode)()
    ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    opt = fxopt.optimize(model, (ids,))
    matches = {k: v for k, v in opt.report().matches.items() if v and k != "cleanup"}
    assert matches == expect  # the fxopt ops are really in the graph being differentiated
    logits = lambda out: out.logits if hasattr(out, "logits") else out  # noqa: E731
    eager = _param_grads(model, lambda: logits(model(ids)))
    ours = _param_grads(model, lambda: logits(opt(ids)))
    _assert_grads_close(eager, ours, f"{name} ({mode})")


@pytest.mark.parametrize("name", ["hf_mamba", "gpt_neox"])
def test_optimized_model_input_gradients_equal_eager(name):
    """Gradients w.r.t. the model's float input (inputs_embeds) as well as its parameters."""
    build, _ = _family(name)
    model = build().train()
    emb = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    opt = fxopt.optimize(model, kwargs={"inputs_embeds": emb.clone().requires_grad_()})
    assert sum(v for k, v in opt.report().matches.items() if k != "cleanup") > 0

    def run(fn):
        x = emb.clone().requires_grad_()
        grads = _param_grads(model, lambda: fn(inputs_embeds=x).logits)
        return x.grad, grads

    gx_e, eager = run(model)
    gx_o, ours = run(opt)
    assert sum(g is not None for g in eager.values()) >= len(eager) - 1  # all but the embedding
    _assert_grads_close(eager, ours, name)
    _assert_grads_close({"inputs_embeds": gx_e}, {"inputs_embeds": gx_o}, name)


def test_templated_deep_long_mamba_gradients_equal_eager():
    """Layer and length templates (4 layers, L = 40) build graphs that train like direct captures."""
    from fxopt.models.hf import tiny_hf_mamba

    model = tiny_hf_mamba(num_hidden_layers=4).train()
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    opt = fxopt.optimize(model, (ids,))
    notes = " ".join(opt.report().notes)
    assert "layer-generic" in notes and "length-generic" in notes
    eager = _param_grads(model, lambda: model(ids).logits)
    ours = _param_grads(model, lambda: opt(ids).logits)
    _assert_grads_close(eager, ours, "hf_mamba 4 layers L=40")


def test_gpt_neox_residual_add_gradients_bitwise():
    """The residual_add rewrite is bitwise, and so is its backward: parameter gradients identical."""
    build, vocab = _family("gpt_neox")
    model = build().train()
    ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(3))
    opt = fxopt.optimize(model, (ids,), passes=["residual_add"])
    eager = _param_grads(model, lambda: model(ids).logits)
    ours = _param_grads(model, lambda: opt(ids).logits)
    for name in eager:
        bitwise.check(eager[name], ours[name])
