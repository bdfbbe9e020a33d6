"""Region IR (fxopt.codegen.region): text form, builder, reference evaluator, planning, and
the translation from captured GPTNeoX / HF Mamba graphs (region_from_nodes)."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx

from fxopt.codegen import region as rg
from fxopt.codegen import region_blocks as rb
from fxopt.errors import CodegenError, FxoptError
from fxopt.ops import fused_region as fr
from fxopt.testing import bitwise, fp64_relative

BLOCKS = [
    rb.neox_residual_two_layernorms(torch.float16),
    rb.neox_serial_residual_layernorm(torch.bfloat16),
    rb.mamba_residual_rmsnorm(torch.bfloat16),
    rb.mamba_residual_rmsnorm(torch.float32, torch.float32),
    rb.bias_gelu(torch.float16, "tanh"),
    rb.rotary_qk(torch.float16, 16, 4),
    rb.rotary_qk(torch.float32, 8, 8),
    rb.mamba_conv_step_silu(torch.float32),
]


# ----------------------------------------------------------------------------- text form
@pytest.mark.parametrize("region", BLOCKS, ids=lambda r: r.short_hash())
def test_text_roundtrip(region):
    again = rg.parse_region(region.text)
    assert again is region  # canonical text, cached parse
    assert rg.format_region(region.inputs, region.stmts, region.outputs) == region.text
    assert len(region.describe().splitlines()) == len(region.stmts) + 2


def test_text_example():
    r = rb.neox_residual_two_layernorms(torch.float16)
    assert r.text == (
        "x0:f16,x1:f16,x2:f16,x3:f16,x4:f16,x5:f16,x6:f16|t0=add(x0,x1):f16;t1=add(t0,x2):f16;"
        "t2=layer_norm(t1,x3,x4,eps=1e-05):f16;t3=layer_norm(t1,x5,x6,eps=1e-05):f16->t1,t2,t3")


@pytest.mark.parametrize("bad", [
    "x0:f16|t0=add(x0,x0):f16",                      # no outputs part
    "x0:f16|t0=mul(x0,x0):f16->t1",                  # output not defined
    "x0:f16|t1=add(x0,x0):f16->t1",                  # numbering
    "x0:f16|t0=add(x0,t0):f16->t0",                  # use before definition
    "x0:f16|t0=add(x0,x1):f16->t0",                  # undeclared input
    "x0:f16,x1:f16|t0=neg(x0):f16->t0",              # unused input
    "x0:f16|t0=matmul(x0,x0):f16->t0",               # unknown op
    "x0:f16|t0=gelu(x0,approximate=fast):f16->t0",   # bad parameter value
    "x0:f16|t0=layer_norm(x0):f16->t0",              # missing parameter
    "x0:f16|t0=neg(x0,x0):f16->t0",                  # arity
    "x0:f16|t0=slice(x0,start=0,stop=1):f16->t0",    # a view as an output
    "x0:f16|t0=neg(x0):f16->t0,t0",                  # output twice
    "x0:i32|t0=neg(x0):f16->t0",                     # dtype
    "x0:f16|t0=div(x0,2.0):f16->t0",                 # a number as div operand
    "x0:f16|t0=neg(x0):f8->t0",                      # statement dtype
])
def test_parse_rejects_malformed(bad):
    with pytest.raises(CodegenError):
        rg.parse_region(bad)


def test_builder_cse_and_dtype_promotion():
    b = rg.RegionBuilder()
    x, y = b.input(torch.float16), b.input(torch.float32)
    s1, s2 = b.add(x, y), b.add(x, y)
    assert s1 == s2 and s1.dtype == torch.float32  # shared statement, eager's promotion
    assert b.mul(x, 2).dtype == torch.float16  # a Python number does not promote
    b.output(b.to(s1, torch.bfloat16))
    r = b.build()
    assert len(r.stmts) == 2 and r.stmts[1].dtype == torch.bfloat16
    other = rg.RegionBuilder()
    with pytest.raises(CodegenError):
        other.neg(x)  # a value of another builder
    with pytest.raises(CodegenError):
        b.output(x)  # an input is not an output


# ----------------------------------------------------------------------------- evaluator
def test_evaluate_checks_dtypes():
    r = rb.bias_gelu(torch.float16)
    with pytest.raises(CodegenError, match="declares"):
        r.evaluate([torch.randn(3, 4), torch.randn(4)])  # fp32 inputs to an f16 region
    bad = rg.parse_region("x0:f16,x1:f32|t0=add(x0,x1):f16->t0")  # eager gives f32
    with pytest.raises(CodegenError, match="eager computes"):
        bad.evaluate([torch.randn(3).half(), torch.randn(3)])
    with pytest.raises(FxoptError):
        r.evaluate([torch.randn(3).half()])  # input count


def test_evaluate_is_the_eager_computation():
    """The reference calls the ATen ops: bit-equal to writing them out by hand."""
    g = torch.Generator().manual_seed(0)
    m, a, h = (torch.randn(2, 5, 48, generator=g).half() for _ in range(3))
    w1, b1, w2, b2 = (torch.randn(48, generator=g).half() for _ in range(4))
    outs = rb.neox_residual_two_layernorms(torch.float16).evaluate([m, a, h, w1, b1, w2, b2])
    s = (m + a) + h
    ln = torch.nn.functional.layer_norm
    for got, want in zip(outs, (s, ln(s, (48,), w1, b1, 1e-5), ln(s, (48,), w2, b2, 1e-5))):
        bitwise.check(want, got)
    # output that would alias an input is a fresh tensor
    r = rg.parse_region("x0:f32|t0=to(x0):f32;t1=neg(t0):f32->t0,t1")
    x = torch.randn(3)
    o = r.evaluate([x])
    assert o[0] is not x and torch.equal(o[0], x)


def test_in_fp64_evaluates_in_double():
    r = rb.mamba_residual_rmsnorm(torch.bfloat16)
    r64 = r.in_fp64()
    assert set(s.dtype for s in r64.stmts) == {torch.float64} and r64.inputs == (torch.float64,) * 3
    xs = [torch.randn(2, 3, 8, dtype=torch.float64) for _ in range(2)] + [torch.randn(8, dtype=torch.float64)]
    outs = r64.evaluate(xs)
    s = xs[0] + xs[1]
    want = xs[2] * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(outs[1], want, rtol=1e-14, atol=0)


def test_numerics_and_contracts():
    assert rb.rotary_qk(torch.float16, 16, 4).numerics() == "exact"
    assert fr.contract(rb.rotary_qk(torch.float16, 16, 4)) is bitwise
    assert rb.bias_gelu().numerics() == "transcendental"
    assert rb.neox_residual_two_layernorms().numerics() == "reduction"
    assert rg.parse_region("x0:f32|t0=pow(x0,exponent=0.5):f32->t0").numerics() == "transcendental"
    assert rg.parse_region("x0:f32|t0=pow(x0,exponent=2):f32->t0").numerics() == "exact"
    for r in (rb.bias_gelu(), rb.mamba_residual_rmsnorm()):
        c = fr.contract(r)
        assert c.name == fp64_relative(2).name


# ----------------------------------------------------------------------------- planning
def test_plan_collapses_rows_and_reads_in_place():
    r = rb.rotary_qk(torch.float16, 16, 4)
    qkv = torch.empty(2, 8, 4, 48, dtype=torch.float16, device="meta").transpose(1, 2)  # (b h l 3e)
    q, k = qkv[..., :16], qkv[..., 16:32]
    cos = torch.empty(1, 1, 8, 4, dtype=torch.float16, device="meta")
    layouts, spec, why = rg.plan(r, [q, k, cos, cos])
    assert why == "" and spec.rows == 2 * 4 * 8
    assert spec.row_sizes == (2, 4, 8)  # q's b, h, l strides 1536, 48, 192: nothing merges
    assert spec.inputs[0].row_strides == (1536, 48, 192) and spec.inputs[2].row_strides == (0, 0, 4)
    assert layouts[0][1] == (512, 128, 16, 1)  # cat's contiguous output, as eager
    x = torch.empty(6, 5, 33, device="meta")
    _, spec, _ = rg.plan(rb.bias_gelu(torch.float32), [x, torch.empty(33, device="meta")])
    assert spec.row_sizes == (30,) and spec.inputs[1].row_strides == (0,)


def test_plan_declines_with_reason():
    r = rb.bias_gelu(torch.float32)
    x = torch.empty(2, 3, 2, 3, 2, 5, device="meta").permute(0, 2, 4, 1, 3, 5)  # 5 row dims that cannot merge
    _, spec, why = rg.plan(r, [x, torch.empty(5, device="meta")])
    assert spec is None and "row dims" in why
    _, spec, why = rg.plan(r, [torch.empty(0, 5, device="meta"), torch.empty(5, device="meta")])
    assert spec is None and "empty" in why


# ----------------------------------------------------------------------------- from graphs
def _capture(model, ids):
    import fxopt

    gm = fxopt.capture(model, (ids,))
    for n in list(gm.graph.nodes):  # export's metadata checks (the cleanup pass drops them)
        if n.op == "call_function" and n.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(n)
    gm.recompile()
    return gm


def _record(gm, args):
    """Every node's value from one eager run of the graph."""
    vals = {}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            vals[n] = out
            return out

    Rec(gm).run(*args)
    return vals


def _by_name(gm):
    return {n.name: n for n in gm.graph.nodes}


def _check_region_matches_graph(nodes, outputs, vals):
    region, inputs = rg.region_from_nodes(nodes, outputs)
    outs = region.evaluate([vals[i] for i in inputs])
    for o, got in zip(outputs, outs):
        bitwise.check(vals[o], got)
    return region, inputs


@pytest.fixture(scope="module")
def neox_graph():
    from fxopt.models.hf import tiny_gpt_neox

    model = tiny_gpt_neox(parallel_residual=True, num_hidden_layers=2).to(torch.float16)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    gm = _capture(model, ids)
    return gm, _record(gm, (ids, False))


def test_from_nodes_neox_residual_and_two_layernorms(neox_graph):
    gm, vals = neox_graph
    nodes = [n for n in gm.graph.nodes if n.target is torch.ops.aten.layer_norm.default]
    # the residual add whose result feeds two LayerNorms of the next layer
    h = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor
             and sum(u.target is torch.ops.aten.layer_norm.default for u in n.users) == 2)
    inner = h.args[0]
    lns = [u for u in nodes if u.args[0] is h]
    region, inputs = _check_region_matches_graph([inner, h, *lns], [h, *lns], vals)
    assert region.text == rb.neox_residual_two_layernorms(torch.float16).text
    assert [n.name for n in inputs][3:] == [str(a) for ln in lns for a in ln.args[2:4]]


def test_from_nodes_neox_rotary(neox_graph):
    gm, vals = neox_graph
    byname = _by_name(gm)
    sdpa = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default)
    q_emb, k_emb = sdpa.args[0], sdpa.args[1]
    # everything between the q/k chunks and the two cats
    region_nodes, stack = set(), [q_emb, k_emb]
    while stack:
        n = stack.pop()
        if n in region_nodes or n.target in (operator.getitem, torch.ops.aten.unsqueeze.default):
            continue
        region_nodes.add(n)
        stack.extend(n.all_input_nodes)
    ops = {n.target for n in region_nodes}
    assert ops == {torch.ops.aten.slice.Tensor, torch.ops.aten.neg.default, torch.ops.aten.cat.default,
                   torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor}
    region, inputs = _check_region_matches_graph(region_nodes, [q_emb, k_emb], vals)
    assert region.numerics() == "exact" and len(inputs) == 4
    assert "slice_2" in byname  # the spelling the report documents


@pytest.fixture(scope="module")
def mamba_graph():
    from fxopt.models.hf import tiny_hf_mamba

    model = tiny_hf_mamba(num_hidden_layers=2).to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    gm = _capture(model, ids)
    return gm, _record(gm, (ids, False))


def test_from_nodes_mamba_residual_rmsnorm(mamba_graph):
    """bf16 HF Mamba: the fp32 residual add, the casts, and the next block's RMSNorm."""
    gm, vals = mamba_graph
    mean = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mean.dim][1]  # the second block's norm
    pow_ = mean.args[0]
    x32 = pow_.args[0]
    x16 = x32.args[0]
    add = x16.args[0]
    assert [n.target for n in (x32, x16, add)] == [torch.ops.aten.to.dtype] * 2 + [torch.ops.aten.add.Tensor]
    chain = [mean]
    for _ in range(5):  # add eps, rsqrt, mul, to(bf16), mul by the weight
        chain.append(next(iter(chain[-1].users)))
    members = {add, x16, x32, pow_, *chain}
    region, inputs = _check_region_matches_graph(members, [add, chain[-1]], vals)
    assert region.text == rb.mamba_residual_rmsnorm(torch.bfloat16).text
    assert inputs[2].op == "get_attr"  # the norm weight


def test_from_nodes_refuses_what_it_cannot_express(neox_graph):
    gm, vals = neox_graph
    lns = [n for n in gm.graph.nodes if n.target is torch.ops.aten.layer_norm.default]
    h = lns[2].args[0]
    inner = h.args[0]
    with pytest.raises(CodegenError, match="outside the region"):
        rg.region_from_nodes([inner, h, lns[2]], [lns[2]])  # h feeds another LayerNorm
    linear = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    with pytest.raises(CodegenError, match="no region op"):
        rg.region_from_nodes([linear], [linear])
    dropout = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.dropout.default)
    with pytest.raises(CodegenError, match="identity"):
        rg.region_from_nodes([dropout], [dropout])


def test_from_nodes_refuses_other_dims_and_steps():
    def graph(fn, *shapes):
        import fxopt

        return fxopt.capture_function(fn, tuple(torch.randn(*s) for s in shapes))

    for fn, match in ((lambda x: x.mean(0, keepdim=True) + 1.0, "last dim"),
                      (lambda x: x.sum(-1) + 1.0, "keepdim"),
                      (lambda x: x[:, ::2] * 2.0, "step|last dim"),
                      (lambda x: torch.cat([x, x], 0) * 2.0, "last dim")):
        gm = graph(fn, (4, 6))
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"
                 and n.target is not torch.ops.aten._assert_tensor_metadata.default]
        with pytest.raises(CodegenError, match=match):
            rg.region_from_nodes(nodes, [nodes[-1]])
    # the convexity check: an input computed from the region itself
    def reuse(x):
        y = x * 2.0
        return y.exp() + y

    gm = graph(reuse, (4, 6))
    mul, exp, add = [n for n in gm.graph.nodes if n.op == "call_function"][-3:]
    with pytest.raises(CodegenError, match="convex"):
        rg.region_from_nodes([mul, add], [mul, add])
