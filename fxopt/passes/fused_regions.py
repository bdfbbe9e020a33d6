"""The ``"fused_regions"`` pass: connected pointwise work (plus row reductions) -> one kernel.

A *region* is a set of ATen nodes the region IR (:mod:`fxopt.codegen.region`) can express -
pointwise ops, casts, row reductions over the last dim (``sum mean var layer_norm``), slices and
cats on the last dim - that is *convex* (no path leaves it and comes back) and whose outputs
share one row shape. The pass grows, at every such node from the last one back, the largest
region around it and replaces it by one ``fxopt::fused_region`` call (through its graph entry
point :func:`fxopt.ops.fused_region.fused_region`); a member whose value is read outside the
region becomes an extra output, every other intermediate stays in registers.

What it finds in transformers' graphs (labels of ``rule:fused_regions.<label>``):

* ``residual_layer_norm`` - GPTNeoX's residual adds and the LayerNorm(s) reading the new hidden
  state (parallel residual: ``(mlp + attn) + h`` read by the next layer's two LayerNorms, one
  kernel with three outputs; serial: ``attn + h`` and ``post_attention_layernorm``);
* ``layer_norms`` - LayerNorms of one value and nothing else (GPTNeoX layer 0's two norms of the
  embedding: 2 launches -> 1);
* ``residual_rms_norm`` / ``rms_norm`` - HF Mamba's residual add and ``MambaRMSNorm`` as it is
  spelled (``pow mean add rsqrt mul mul`` with its casts);
* ``rotary`` - the rotate-half chain (``slice neg cat mul add``) on q and k, one kernel for both
  (they share cos and sin, so growing through shared inputs joins them);
* ``bias_gelu`` - a bias add and the GELU after it; with ``split_linear_bias=True`` also
  ``linear(x, w, b) -> gelu``, split into ``linear(x, w)`` and the region (off by default: the
  GEMM adds the bias in its epilogue for free, so the split saves no launch and rounds once more);
* ``conv_silu`` - Mamba's decode-step convolution where it is spelled pointwise
  (``sum(state * w) + b`` then ``silu``);
* ``pointwise`` - any other region (e.g. Mamba's ``-exp(A_log)``).

Launch accounting: a region is only formed where it removes launches - at least
:data:`MIN_LAUNCHES` of its members launch a kernel in eager (slices, same-dtype casts, eval
dropout and aliases launch nothing); "a region of one op is not a region". Decode-size calls of
the op skip the dispatcher (see :mod:`fxopt.ops.fused_region`), so one fused launch is cheaper
than the two or more eager launches it replaces.

Contract (:func:`fxopt.ops.fused_region.contract` of each region): ``bitwise`` where every
member is an exact op (the region keeps eager's association and rounds where eager rounds);
``fp64_relative(2)`` where it holds a transcendental or a row reduction (the factor is justified
in the op's docstring and proven by ``tests/test_region_kernel.py``). On the CPU the op evaluates
the very ATen ops it replaced, so CPU results are bit-equal to the unfused graph either way.

Export's ``_assert_tensor_metadata`` checks on values a region computes cannot fail (the trace
fixed that metadata) and would otherwise pin intermediates as outputs: a first phase drops the
checks on values computed by region ops (rule ``fused_regions.drop_checks``, bitwise; the same
as cleanup's ``assert_on_computed_value``, limited to those values).

``fxopt.explain(gm, "fused_regions")`` says for every candidate left alone why: a single op, an
output that is a view (slice), outputs of different row shapes, a node the IR cannot express
(named), a region that would not be convex, symbolic shapes.
"""
from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.fx
from torch.fx.node import Node

from ..codegen import region as rg
from ..errors import CodegenError
from ..graph_utils import op_name
from ..rewrite import NodeRule, Phase, RewritePass, RuleSet, decline, emit, erase
from ..rewrite.graph_ops import is_assert
from ..testing.contracts import bitwise

aten = torch.ops.aten
_ASSERT = getattr(aten, "_assert_tensor_metadata", None)
_ASSERT = _ASSERT.default if _ASSERT is not None else None

MIN_LAUNCHES = 2
MAX_MEMBERS = 64  # bounds the growth (and the generated kernel's size)
LABELS = ("residual_layer_norm", "layer_norms", "residual_rms_norm", "rms_norm", "rotary", "bias_gelu",
          "conv_silu", "pointwise")
_FLOATS = tuple(rg.CODE_OF)
_TABLE = rg._aten_table()  # the ATen targets region_from_nodes translates
_IDENTITY_KINDS = ("identity", "dropout")


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def _static(v) -> bool:
    return all(type(s) is int for s in v.shape)


def _kind(n: Node) -> str | None:
    return _TABLE.get(n.target) if n.op == "call_function" else None


def _fusable_problem(n) -> str | None:
    """Why ``n`` cannot be a region member (None: it can, as far as its own node goes)."""
    if not isinstance(n, Node) or n.op != "call_function":
        return "not a call"
    if n.target not in _TABLE:
        return f"{op_name(n)} has no region op"
    v = _val(n)
    if not isinstance(v, torch.Tensor):
        return "no fake tensor value"
    if v.dtype not in _FLOATS:
        return f"dtype {v.dtype}"
    if v.dim() == 0:
        return "a 0-dim value"
    if not _static(v):
        return "symbolic shape"
    for a in n.all_input_nodes:
        av = _val(a)
        if isinstance(av, torch.Tensor) and not _static(av):
            return f"operand {a.name} has a symbolic shape"
    return None


def _launches(n: Node) -> bool:
    """Whether eager launches a kernel for ``n`` (views and identities launch none)."""
    kind = _kind(n)
    if kind in _IDENTITY_KINDS or kind == "slice":
        return False
    if kind == "to":
        return _val(n).dtype != _val(n.args[0]).dtype
    return True


def _real_users(n: Node) -> list[Node]:
    return [u for u in n.users if not is_assert(u)]


def _outputs(members: set[Node]) -> list[Node]:
    """Members read outside the region (or by the graph's output), in graph order."""
    return [n for n in sorted(members) if any(u not in members for u in _real_users(n))]


def _neighbours(n: Node):
    """Producers, consumers and siblings (other readers of ``n``'s inputs: q and k share cos/sin)."""
    for a in n.all_input_nodes:
        yield a
        yield from a.users
    yield from n.users


def _validate(members: set[Node]):
    """``(region, inputs, outputs)`` or raise CodegenError saying why ``members`` is no region."""
    outs = _outputs(members)
    if not outs:
        raise CodegenError("nothing outside reads the region")
    lead = {tuple(_val(o).shape[:-1]) for o in outs}
    if len(lead) > 1:
        raise CodegenError(f"outputs of different row shapes {sorted(lead)} (one kernel needs one iteration space)")
    for o in outs:
        if _kind(o) == "slice":
            raise CodegenError(f"output {o.name} is a slice (a view in eager; the fused op returns fresh tensors)")
    region, inputs = rg.region_from_nodes(members, outs)
    return region, inputs, outs


def _candidates(members: set[Node], m: Node, claimed):
    """``members + m``, then (for an identity ``m``: eval dropout, alias, a cast to its own
    dtype) ``members + m`` and the identities above it up to the value they pass on, which an
    identity alone cannot join as an output."""
    yield members | {m}
    chain, cur = {m}, m
    while _kind(cur) in _IDENTITY_KINDS or (_kind(cur) == "to" and not _launches(cur)):
        up = cur.args[0] if cur.args else None
        if not isinstance(up, Node) or up in members or up in claimed or _fusable_problem(up) is not None:
            return
        chain.add(up)
        cur = up
    if len(chain) > 1:
        yield members | chain


def _grow(seed: Node, claimed: set[Node]):
    """The largest valid region around ``seed`` (greedy, retried until nothing joins)."""
    members = {seed}
    best = None
    try:
        best = _validate(members)
    except CodegenError:
        pass
    rejected: dict[Node, str] = {}
    changed = True
    while changed and len(members) < MAX_MEMBERS:
        changed = False
        frontier = list(dict.fromkeys(m for n in sorted(members) for m in _neighbours(n)))
        for m in frontier:
            if m in members or m in claimed or len(members) >= MAX_MEMBERS:
                continue
            why = _fusable_problem(m)
            if why is not None:
                continue
            res = None
            for cand in _candidates(members, m, claimed):
                try:
                    res = _validate(cand)
                    break
                except CodegenError as exc:
                    rejected[m] = str(exc)
            if res is None:
                continue
            members, best, changed = cand, res, True
            rejected.pop(m, None)
    return members, best, rejected


def _label(members: set[Node]) -> str:
    kinds = Counter(_kind(n) for n in members)
    has_add = kinds["add"] + kinds["sub"] > 0
    if kinds["layer_norm"]:
        # residual adds feeding the norm; otherwise only norms (and what they need)
        return "residual_layer_norm" if has_add else "layer_norms"
    if kinds["rsqrt"] and kinds["mean"]:
        adds_on_rows = any(_kind(n) == "add" and all(isinstance(a, Node) and _val(a).shape[-1] > 1 for a in n.args)
                           for n in members)
        return "residual_rms_norm" if adds_on_rows else "rms_norm"
    if kinds["cat"] and kinds["slice"] and kinds["neg"]:
        return "rotary"
    if kinds["gelu"] and has_add:
        return "bias_gelu"
    if kinds["silu"] and kinds["sum"]:
        return "conv_silu"
    return "pointwise"


def _insertion(inputs, members) -> dict:
    """Where the fused node goes: right after its last input that is a call (then the driver
    restores topological order), or before the first member when all inputs are parameters."""
    calls = [i for i in inputs if isinstance(i, Node) and i.op == "call_function"]
    if calls:
        return {"after": max(calls)}
    return {"before": min(members)}


def _build(region, inputs, outs):
    text = region.text

    def build(b):
        from ..ops.fused_region import fused_region

        vals = [o.meta.get("val") for o in outs]
        fused = b.op(fused_region, (list(inputs), text), val=vals)
        fused.meta["fxopt_region"] = text
        return [b.op(operator.getitem, (fused, k), val=vals[k]) for k in range(len(outs))]

    return build


def _fuse_region(node: Node, ctx):
    """The largest region around this node -> one fused_region call (>= 2 launches removed)."""
    why = _fusable_problem(node)
    if why is not None:
        return decline(why, kind="op")
    if not _launches(node):
        return None  # views and identities only join regions that computing nodes start
    claimed = ctx.cache("fused_regions.claimed")
    members, best, rejected = _grow(node, set(claimed))
    launches = sum(1 for n in members if _launches(n))
    near = "; ".join(f"{m.name}: {w}" for m, w in list(rejected.items())[:3])
    if best is None:
        return decline(f"no valid region around {node.name}" + (f" ({near})" if near else ""), kind="region")
    if launches < MIN_LAUNCHES:
        hint = ""
        src = node.args[0] if node.target is aten.gelu.default and node.args else None
        if isinstance(src, Node) and src.target is aten.linear.default and len(src.args) > 2 and src.args[2] is not None:
            hint = (f"; its input {src.name} is a linear with a bias, which the GEMM adds in its epilogue: "
                    "FusedRegionsPass(split_linear_bias=True) splits it off into a bias_gelu region")
        return decline(f"a region of {launches} launching op ({', '.join(sorted(n.name for n in members))}) is not "
                       f"a region: fusing it would not remove a launch" + hint + (f"; left out: {near}" if near else ""),
                       kind="single op", progress=len(members))
    region, inputs, outs = best
    label = _label(members)
    claimed.update(dict.fromkeys(members))
    return emit(outs, _build(region, inputs, outs), matched=sorted(members), label=label,
                counts={"regions": 1, "region_outputs": len(outs), "launches_removed": launches - 1},
                info={"region": region.text, "numerics": region.numerics()}, **_insertion(inputs, members))


def _drop_check(node: Node):
    """assert_metadata(x) -> (nothing)   when x is computed by a region op (its metadata is the trace's)"""
    if node.users:
        return decline("its result is used")
    x = node.args[0] if node.args else node.kwargs.get("a")
    if not isinstance(x, Node) or x.op != "call_function":
        return decline("it checks a graph input or a literal: the caller may pass anything", kind="graph input")
    if _fusable_problem(x) is not None:
        return None  # not a value a region could hold: cleanup's business
    return erase(node)


def _split_linear_bias(node: Node):
    """gelu(linear(x, w, b)) -> gelu(add(linear(x, w), b))   when the linear has no other reader
    (the add then joins the GELU's region). fp64_relative: the product is rounded before the bias
    is added (one more rounding at the output's scale than a GEMM epilogue)."""
    x = node.args[0] if node.args else None
    if not isinstance(x, Node) or x.op != "call_function" or x.target is not aten.linear.default:
        return None
    if len(x.args) < 3 or x.args[2] is None:
        return decline(f"{x.name} has no bias", kind="bias")
    if _real_users(x) != [node]:
        return decline(f"{x.name} is also read by {[u.name for u in _real_users(x) if u is not node][0]}",
                       kind="users")
    xv, inp, w, b = _val(x), x.args[0], x.args[1], x.args[2]
    if not isinstance(xv, torch.Tensor) or xv.dtype not in _FLOATS:
        return decline("not a floating-point linear", kind="dtype")

    def build(bld):
        mm = bld.call(aten.linear.default, inp, w)
        return [bld.call(aten.add.Tensor, mm, b)]

    return emit([x], build, matched=[x], before=x)


def _contract_of_rule():
    from ..testing.contracts import fp64_relative

    # per region the op's contract applies (bitwise for exact regions); the rule as a whole
    # promises the weaker of the two
    return fp64_relative(2)


DROP_CHECKS = NodeRule("fused_regions.drop_checks", _drop_check, anchors=[_ASSERT] if _ASSERT is not None else [], contract=bitwise,
                       reach=0, source=f"{__file__}:{_drop_check.__code__.co_firstlineno}")
SPLIT_LINEAR_BIAS = NodeRule("fused_regions.split_linear_bias", _split_linear_bias, anchors=[aten.gelu.default],
                             contract=_contract_of_rule(), reach=0,
                             source=f"{__file__}:{_split_linear_bias.__code__.co_firstlineno}")
_ANCHORS = [t for t in _TABLE]
REGION_RULE = NodeRule("fused_regions.region", _fuse_region, anchors=_ANCHORS, contract=_contract_of_rule(),
                       labels=LABELS, source=f"{__file__}:{_fuse_region.__code__.co_firstlineno}")


class FusedRegionsPass(RewritePass):
    """Fuse maximal convex pointwise(+row reduction) regions into ``fxopt::fused_region`` calls.

    Options: ``split_linear_bias`` (default False) also splits ``linear(x, w, b)`` feeding a GELU
    into ``linear(x, w)`` and a ``bias_gelu`` region (see the module docstring for why it is off)."""

    def __init__(self, split_linear_bias: bool = False):
        from .cleanup import TO_SAME_DTYPE

        # casts to a value's own dtype would otherwise cut regions (cleanup's rule, bitwise)
        phases = [Phase(RuleSet([DROP_CHECKS, TO_SAME_DTYPE]), "forward", max_sweeps=1)]
        if split_linear_bias:
            phases.append(Phase(RuleSet([SPLIT_LINEAR_BIAS]), "forward", max_sweeps=1))
        phases.append(Phase(RuleSet([REGION_RULE]), "reverse", max_sweeps=2))
        super().__init__("fused_regions", phases=phases,
                         counters=("regions", "region_outputs", "launches_removed"))
