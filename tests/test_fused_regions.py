"""The "fused_regions" pass: maximal convex pointwise(+row reduction) regions -> fused_region.

CPU: the op evaluates the ATen ops it replaced, so rewritten graphs are bit-equal to the
original; the generated Triton kernels (TRITON_INTERPRET=1, through the op's launcher path)
are checked against eager under each region's contract (bitwise for exact regions,
fp64_relative(2) otherwise)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fxopt
from fxopt.codegen import region as rg
from fxopt.ops import fused_region as fr
from fxopt.passes.fused_regions import FusedRegionsPass
from fxopt.registry import get_pass
from fxopt.rewrite import run_pass
from fxopt.testing import assert_equivalent, bitwise, fp64_relative
from fxopt.testing import strategies as fst

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:.*degrees of freedom is <= 0:UserWarning")]


@pytest.fixture(autouse=True)
def _interpret(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fxopt_cache"))


def _regions(res) -> dict:
    """label -> count of the regions a run fused (checks and casts dropped are not regions)."""
    out: dict[str, int] = {}
    for r in res.rewrites:
        if "region" in r.info:
            out[r.label] = out.get(r.label, 0) + 1
    return out


def _fused_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (fr.fused_region, fr.fused_region_op)]


def _export(fn, *args):
    class M(torch.nn.Module):
        def forward(self, *a):
            return fn(*a)

    return fxopt.capture(M(), args)


def _kernels_on(monkeypatch):
    """Route fused_region calls on CPU tensors through the launcher, i.e. the generated Triton
    kernel under the interpreter (no grad: the fast path is taken only without autograd)."""
    monkeypatch.setattr(fr, "FAST_PATH_ON_CPU", True)
    fr._FAST.clear()


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out.logits


# ----------------------------------------------------------------------------- GPTNeoX
@pytest.mark.parametrize("parallel,expected", [
    (True, {"residual_layer_norm": 2, "layer_norms": 1, "rotary": 2, "pointwise": 1}),
    (False, {"residual_layer_norm": 4, "rotary": 2, "pointwise": 1}),
])
def test_gpt_neox_regions_counts_bitwise_on_cpu(parallel, expected):
    from fxopt.models.hf import tiny_gpt_neox

    model = tiny_gpt_neox(parallel_residual=parallel)
    ids = torch.randint(0, 128, (2, 12))
    gm = fxopt.capture(model, (ids,))
    with torch.no_grad():
        ref = _logits(model(ids))
    rep = str(fxopt.explain(gm, "fused_regions"))
    # the look-alike left alone: the MLP's GELU after a linear with a bias, a single op
    assert "a region of 1 launching op (gelu)" in rep and "split_linear_bias=True" in rep, rep
    res = run_pass(FusedRegionsPass(), gm)
    assert _regions(res) == expected and res.stats["regions"] == sum(expected.values())
    assert res.stats["rule:layer_norms"] == expected.get("layer_norms", 0)
    fused = _fused_nodes(gm)
    assert len(fused) == sum(expected.values())
    # the parallel residual: (mlp + attn) + h and the next layer's two LayerNorms in one region, 3 outputs
    if parallel:
        texts = [n.args[1] for n in fused if "layer_norm" in n.args[1] and "add" in n.args[1]]
        assert any(rg.parse_region(t).n_outputs == 3 for t in texts), texts
    prov = fused[0].meta["fxopt_provenance"]
    assert prov["pass"] == "fused_regions" and prov["from"] and "fused_regions.py" in prov["source"]
    with torch.no_grad():
        bitwise.check(ref, _logits(gm(ids)))


@pytest.mark.parametrize("parallel", [True, False])
def test_gpt_neox_generated_kernels_against_eager(parallel, monkeypatch):
    """Every region of the model through its generated kernel: logits within the regions'
    contract (LayerNorm regions: fp64_relative(2) per region; end to end a tight bound)."""
    from fxopt.models.hf import tiny_gpt_neox

    model = tiny_gpt_neox(parallel_residual=parallel)
    ids = torch.randint(0, 128, (2, 12))
    gm = fxopt.capture(model, (ids,))
    run_pass(FusedRegionsPass(), gm)
    _kernels_on(monkeypatch)
    with torch.no_grad():
        ref = _logits(model(ids))
        out = _logits(gm(ids))
    # the kernels really ran (one launcher per distinct region and layout; none fell back)
    assert len(fr._FAST) >= 4 and all(launcher.launch is not None for launcher in fr._FAST.values())
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def test_gpt_neox_with_default_passes_and_regions_first():
    """The proposed order (regions before addcmul/residual_add): bit-equal to eager on CPU,
    133 -> <= 70 calls on the tiny model."""
    from fxopt.models.hf import tiny_gpt_neox

    model = tiny_gpt_neox(parallel_residual=True)
    ids = torch.randint(0, 128, (2, 16))
    opt = fxopt.optimize(model, (ids,), passes=["scan", "causal_sdpa", "fused_regions", "addcmul", "residual_add",
                                                "cleanup"])
    with torch.no_grad():
        bitwise.check(model(ids).logits, opt(ids).logits)
    calls = sum(1 for n in opt.graph_module.graph.nodes if n.op == "call_function")
    assert calls <= 70
    assert opt.report().matches["addcmul"] == 0  # the rotary adds went into exact regions


# ----------------------------------------------------------------------------- HF Mamba
@pytest.mark.parametrize("dtype,expected", [
    (torch.float32, {"residual_rms_norm": 2, "rms_norm": 1, "pointwise": 2}),
    (torch.bfloat16, {"residual_rms_norm": 2, "rms_norm": 1, "pointwise": 4}),
])
def test_hf_mamba_regions_after_scan(dtype, expected, monkeypatch):
    from fxopt.models.hf import tiny_hf_mamba

    model = tiny_hf_mamba().to(dtype)
    ids = torch.randint(0, 128, (2, 12))
    gm = fxopt.capture(model, (ids,))
    run_pass(get_pass("scan"), gm)
    with torch.no_grad():
        scanned = _logits(gm(ids))
    res = run_pass(FusedRegionsPass(), gm)
    assert _regions(res) == expected
    with torch.no_grad():
        bitwise.check(scanned, _logits(gm(ids)))  # CPU: the op is the reference
        _kernels_on(monkeypatch)
        out = _logits(gm(ids))
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), scanned.float(), rtol=tol, atol=tol)


PROPOSED_ORDER = ["scan", "causal_sdpa", "fused_regions", "addcmul", "residual_add", "cleanup"]


def _fp64_model(model):
    m64 = copy.deepcopy(model).double()
    return lambda x: _logits(m64(x)).double()


@pytest.mark.parametrize("build,length", [("mamba", 16), ("mamba", 48), ("neox_parallel", 48),
                                          ("neox_serial", 48), ("neox_deep", 16)])
def test_optimize_with_regions_logits_within_contract(build, length):
    """optimize() with the proposed pass order: the end-to-end contract of the default passes
    (fp64_relative(2) vs a float64 model), bit-equal on CPU to the default passes where they
    are bit-equal to eager (GPTNeoX), and the length / layer templates still apply."""
    from fxopt.models.hf import tiny_gpt_neox, tiny_hf_mamba

    model = {"mamba": tiny_hf_mamba, "neox_parallel": lambda: tiny_gpt_neox(True),
             "neox_serial": lambda: tiny_gpt_neox(False),
             "neox_deep": lambda: tiny_gpt_neox(True, num_hidden_layers=5)}[build]()
    ids = torch.randint(0, 128, (1, length))
    opt = fxopt.optimize(model, (ids,), passes=PROPOSED_ORDER)
    rep = opt.report()
    assert rep.matches["fused_regions"] > 0
    if length > 32:
        assert any(n.startswith(f"length-generic: graph instantiated at L={length}") for n in rep.notes), rep.notes
    if build == "neox_deep":
        assert any("layer" in n and "fall" not in n for n in rep.notes), rep.notes
    with torch.no_grad():
        got = _logits(opt(ids))
        if build.startswith("neox"):
            bitwise.check(_logits(model(ids)), got)
    assert_equivalent(lambda x: _logits(model(x)), lambda x: _logits(opt(x)), (ids,), fp64_relative(2.0),
                      reference_fp64_fn=_fp64_model(model), fp64_audit="off")


# ----------------------------------------------------------------------------- small spellings
def _ln_block(x, y, h, w1, b1, w2, b2):
    s = (x + y) + h
    return s, F.layer_norm(s, (s.shape[-1],), w1, b1, 1e-5), F.layer_norm(s, (s.shape[-1],), w2, b2, 1e-5)


def _rms_block(res, out, w):
    s = res + out
    h = s.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + 1e-5)
    return s, w * h.to(out.dtype)


def _bias_gelu(x, wt, b):
    return F.gelu(x @ wt + b)


def _rotary(q, k, cos, sin):
    def rot(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    r = cos.shape[-1]
    qr, qp, kr, kp = q[..., :r], q[..., r:], k[..., :r], k[..., r:]
    return torch.cat([qr * cos + rot(qr) * sin, qp], -1), torch.cat([kr * cos + rot(kr) * sin, kp], -1)


def _conv_step_silu(state, w, b):
    # Mamba's decode-step convolution spelled with a kept dim (HF's own spelling drops it: see
    # test_look_alikes_decline_with_reasons)
    return F.silu(torch.sum(state * w, dim=-1, keepdim=True) + b)


def _same(ref, out):
    """Bitwise on every leaf of two pytrees of tensors."""
    import torch.utils._pytree as pytree

    r, c = pytree.tree_leaves(ref), pytree.tree_leaves(out)
    assert len(r) == len(c)
    for a, b in zip(r, c):
        bitwise.check(a, b)


def _region_inputs(gm, node, args):
    """The values the fused ``node`` reads when ``gm`` runs on ``args``."""
    seen = {}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            seen[n] = v
            return v

    Rec(gm).run(*args)
    return [seen[i] for i in node.args[0]]


def _check_kernel_of(gm, fn, args, monkeypatch):
    """The single fused region of ``gm`` through its generated kernel vs eager, under the op's
    contract, on the values the region reads in this run."""
    (node,) = _fused_nodes(gm)
    region = rg.parse_region(node.args[1])
    xs = _region_inputs(gm, node, args)
    contract = fr.contract(region)
    f64 = region.in_fp64()
    assert_equivalent(lambda *a: region.evaluate(list(a)), lambda *a: fr.run_generated(list(a), region.text),
                      tuple(xs), contract, reference_fp64_fn=lambda *a: f64.evaluate(list(a)), check_inputs=False)
    return region


@pytest.mark.parametrize("name,fn,make,label", [
    ("add_2ln", _ln_block, lambda d: [torch.randn(2, 5, 48, dtype=d) for _ in range(3)] +
     [torch.randn(48, dtype=d) for _ in range(4)], "residual_layer_norm"),
    ("add_rms", _rms_block, lambda d: [torch.randn(2, 5, 48), torch.randn(2, 5, 48, dtype=d),
                                       torch.randn(48, dtype=d)], "residual_rms_norm"),
    ("bias_gelu", _bias_gelu, lambda d: [torch.randn(2, 5, 16, dtype=d), torch.randn(16, 40, dtype=d),
                                         torch.randn(40, dtype=d)], "bias_gelu"),
    ("rotary", _rotary, lambda d: [torch.randn(2, 4, 5, 16, dtype=d), torch.randn(2, 4, 5, 16, dtype=d),
                                   torch.randn(1, 1, 5, 8, dtype=d), torch.randn(1, 1, 5, 8, dtype=d)], "rotary"),
    ("conv_silu", _conv_step_silu, lambda d: [torch.randn(2, 24, 4, dtype=d), torch.randn(24, 4, dtype=d),
                                              torch.randn(24, 1, dtype=d)], "conv_silu"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_spellings_one_region(name, fn, make, label, dtype, monkeypatch):
    args = make(dtype)
    gm = _export(fn, *args)
    ref = fn(*args)
    res = run_pass(FusedRegionsPass(), gm)
    assert _regions(res) == {label: 1}, gm.code
    _same(ref, gm(*args))
    region = _check_kernel_of(gm, fn, args, monkeypatch)
    exact = label == "rotary"
    assert (region.numerics() == "exact") == exact
    assert (fr.contract(region) is bitwise) == exact


def test_split_linear_bias_option():
    """linear(x, w, b) -> gelu: off by default (declined as a single op, saying why); with
    split_linear_bias=True the bias joins the GELU's region, within fp64_relative(2)."""
    x, w, b = torch.randn(3, 7, 16), torch.randn(40, 16), torch.randn(40)

    def fn(x, w, b):
        return F.gelu(F.linear(x, w, b))

    gm = _export(fn, x, w, b)
    assert _regions(run_pass(FusedRegionsPass(), copy.deepcopy(gm))) == {}
    rep = fxopt.explain(gm, "fused_regions")
    assert "is not a region" in str(rep)
    res = run_pass(FusedRegionsPass(split_linear_bias=True), gm)
    assert _regions(res) == {"bias_gelu": 1} and res.stats["rule:fused_regions.split_linear_bias"] == 1
    assert_equivalent(fn, gm, (x, w, b), fp64_relative(2))


# ----------------------------------------------------------------------------- look-alikes
def _nonconvex(x, y, w):
    h = x + y
    return h * (h @ w)  # h's other reader is a matmul feeding the mul: {add, mul} would be its own ancestor


def _single_ops(x, y, w, b):
    h = x + y
    return F.layer_norm(h @ w, (w.shape[-1],), b, b, 1e-5)  # an add, a matmul, a LayerNorm: 1 + 1 launches


def _hf_conv_step(state, w, b):
    return F.silu(torch.sum(state * w, dim=-1) + b)  # HF's spelling: the sum drops the reduced dim


def _slice_out(x, y):
    s = x * y
    return s[..., :3], s.neg()  # a slice output: a view in eager


@pytest.mark.parametrize("fn,args,reason", [
    (_nonconvex, (torch.randn(4, 8), torch.randn(4, 8), torch.randn(8, 8)), "depends on the region itself"),
    (_single_ops, (torch.randn(4, 8), torch.randn(4, 8), torch.randn(8, 6), torch.randn(6)), "is not a region"),
])
def test_look_alikes_decline_with_reasons(fn, args, reason):
    gm = _export(fn, *args)
    before = gm.code
    res = run_pass(FusedRegionsPass(), copy.deepcopy(gm))
    assert _regions(res) == {}
    rep = fxopt.explain(gm, "fused_regions")
    assert reason in str(rep), str(rep)
    assert gm.code == before  # explain runs on a copy


def test_hf_conv_step_spelling_fuses_its_pointwise_tail():
    """HF's decode-step conv drops the reduced dim (``sum(state * w, -1)``), which the region IR
    cannot express: the bias + SiLU tail is fused, the product and sum stay, and explain says why."""
    args = (torch.randn(2, 6, 4), torch.randn(6, 4), torch.randn(6))
    gm = _export(_hf_conv_step, *args)
    rep = fxopt.explain(gm, "fused_regions")
    res = run_pass(FusedRegionsPass(), gm)
    assert _regions(res) == {"pointwise": 1}
    assert "without keepdim" in str(rep), str(rep)
    _same(_hf_conv_step(*args), gm(*args))


def test_slice_output_stays_outside():
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    gm = _export(_slice_out, x, y)
    res = run_pass(FusedRegionsPass(), gm)
    assert _regions(res) == {"pointwise": 1}
    (node,) = _fused_nodes(gm)
    assert "slice" not in node.args[1]  # the view stays a view of the region's output
    _same(_slice_out(x, y), gm(x, y))


def test_intermediate_read_elsewhere_becomes_an_output():
    """An add whose value another op reads is fused as an extra output (not recomputed)."""
    def fn(x, y, w, b):
        s = x + y
        return s @ w.t(), F.layer_norm(s, (8,), w[0], b, 1e-5)

    args = (torch.randn(3, 8), torch.randn(3, 8), torch.randn(8, 8), torch.randn(8))
    gm = _export(fn, *args)
    res = run_pass(FusedRegionsPass(), gm)
    assert _regions(res) == {"residual_layer_norm": 1}
    (node,) = _fused_nodes(gm)
    assert rg.parse_region(node.args[1]).n_outputs == 2
    _same(fn(*args), gm(*args))


# ----------------------------------------------------------------------------- property
_KINDS = ("add_2ln", "add_rms", "bias_gelu", "rotary")


@st.composite
def _cases(draw):
    kind = draw(st.sampled_from(_KINDS))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    rows = tuple(draw(fst.shapes(min_dims=1, max_dims=2, max_side=4)))
    width = draw(st.sampled_from([2, 6, 8, 17, 40]))
    exact = kind == "rotary"
    # exact regions see every special value; reductions and transcendentals see finite values
    # (eager's own LayerNorm overflows spuriously near max, see test_region_kernel._fp64_check)
    dists = fst.DISTRIBUTIONS if exact else ("normal", "uniform", "integer", "cancel", "tiny", "wide", "dyadic")

    def t(shape, dt=dtype, special=exact):
        return draw(fst.tensors(tuple(shape), dt, special, distributions=dists))

    if kind == "add_2ln":
        args = [t((*rows, width)) for _ in range(3)] + [t((width,), special=False) for _ in range(4)]
        return kind, _ln_block, args, "residual_layer_norm"
    if kind == "add_rms":
        return kind, _rms_block, [t((*rows, width), torch.float32), t((*rows, width)), t((width,), special=False)], \
            "residual_rms_norm"
    if kind == "bias_gelu":
        return kind, _bias_gelu, [t((*rows, 4)), t((4, width)), t((width,))], "bias_gelu"
    r = 2 * draw(st.integers(1, max(1, width // 2 - 1))) if width >= 4 else 2
    lead = (*rows[:1], 2, 3)
    return kind, _rotary, [t((*lead, max(width, r + 2))), t((*lead, max(width, r + 2))), t((1, 1, 3, r)),
                           t((1, 1, 3, r))], "rotary"


@settings(max_examples=24)
@given(_cases())
def test_property_blocks_fuse_and_hold_contract(case):
    kind, fn, args, label = case
    gm = _export(fn, *args)
    res = run_pass(FusedRegionsPass(), gm)
    assert _regions(res) == {label: 1}
    # CPU op: the reference ops themselves
    _same(fn(*args), gm(*args))
    # the generated kernel under the region's contract
    _check_kernel_of(gm, fn, args, None)


# ----------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("build", ["neox_parallel", "neox_serial", "mamba"])
def test_training_gradients_through_regions_equal_eager(build):
    """fused_region's backward recomputes the region's reference with autograd: parameter
    gradients of the optimized model (train mode, regions in the graph) match eager's within
    fp32 noise (|diff| <= 1e-4 * max|grad|, as tests/test_autograd.py)."""
    from fxopt.models.hf import tiny_gpt_neox, tiny_hf_mamba

    model = {"mamba": tiny_hf_mamba, "neox_parallel": lambda: tiny_gpt_neox(True),
             "neox_serial": lambda: tiny_gpt_neox(False)}[build]().train()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    opt = fxopt.optimize(model, (ids,), passes=PROPOSED_ORDER)
    assert opt.report().matches["fused_regions"] > 0

    def grads(forward):
        model.zero_grad(set_to_none=True)
        (_logits(forward()).float() ** 2).mean().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    eager, ours = grads(lambda: model(ids)), grads(lambda: opt(ids))
    assert eager.keys() == ours.keys()
    for k, ge in eager.items():
        err = (ours[k] - ge).abs().max().item()
        assert err <= 1e-4 * ge.abs().max().item() + 1e-12, (k, err)
