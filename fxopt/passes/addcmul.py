"""The ``"addcmul"`` pass: a multiply feeding an add becomes one ``aten.addcmul``.

A rule table in the spirit of tinygrad's ``symbolic.py``: every ATen spelling is one callable
rule of the rewrite engine (:class:`fxopt.NodeRule`, built by :func:`_spelling`) with its algebra,
the source line of its table entry and its contract; it returns the rewrite or declines with the
reason (``fxopt.explain(gm, "addcmul")`` shows them). Hits are counted per run
(``stats["rule:<name>"]``).

Contract - :func:`fxopt.testing.fma_rounding` checks it; tests/test_addcmul.py (cases,
properties, exact-arithmetic corollaries, a CUDA test) and tests/test_fuzz_elementwise.py.
Let x be the exact real value of the replaced pair: ``c + v*a*b`` (v = ±1), or ``c + s*a``
with the scalar ``s`` as the kernels see it (float32 for float32 and 16-bit tensors, s itself
for float64). RN is IEEE round-to-nearest-even in the result dtype, with ±inf from the
overflow threshold ``max + ulp(max)/2`` up. Per element, the rewrite computes

* float32 / float64: RN(x), or the original's bits. RN(x) wherever ATen fuses the multiply-add
  (its CPU addcmul and add-with-alpha kernels do, vector body and tail alike; recent CUDA
  addcmul with value=1 calls fma); the original's bits where a kernel rounds the product
  first (recent CUDA addcmul with value=-1 computes fma(value, t1*t2, self); older CUDA
  builds round the product for every value, pytorch#89764; CUDA add-with-alpha is contracted
  to an fma by nvcc or not). Either way never further from x than the original.
* float16 / bfloat16: RN(t) for a float32 t at most one float32 step from RN_fp32(x), or the
  original's bits (a kernel that rounds a bfloat16 product past float32's range to inf, as the
  original does). ATen computes 16-bit operands in float32 and rounds that result to the
  dtype: two roundings. So, where it is not the original's bits, the result is RN(x), except
  where x lies within 1.5 float32 ulps of the halfway point between two dtype values: there
  it may be the other dtype value next to x (1 ulp from RN(x)). It is always one of the two
  dtype values around x, within 0.5 + 1.5*2^-13 (fp16) / 0.5 + 1.5*2^-16 (bf16) ulp of x, and
  never further from x than the original by more than 3 float32 ulps of x (~0.0004 fp16 ulp).

What this does not promise: bit-equality with the original (the point is one rounding fewer:
a*b + c with a = b = 1 + 2^-12, c = -(a*b) is 0 originally and 2^-24 = x after); "never
further from x than the original" in 16-bit (fp16 a=39.5625, b=-384.5, c=-0.2185: x =
-15211.9998, original -15208 = RN(x), rewrite -15216 via the float32 value -15212, a tie);
finite where the original is finite: at the overflow threshold the rewrite is ±inf where the
original saturated (fp16 376*174.25 + 2.08: x = 65520.08 is past the threshold 65520, RN(x) =
inf; the original rounds the product 65518 to 65504 first and stays there), and the reverse
(300*300 - 60000: the original's product overflows, the rewrite gives 30000).

Measured (CPU, torch 2.13, 1 M elements per spelling and dtype drawn from
fxopt.testing.strategies' distributions - mixtures, products at the overflow threshold and
next to ties, values up to max, subnormals): 0 violations; float32 100 % RN(x); the other
neighbour in float16 0.035 % (value=1), 0.05 % (value=-1), 0.6 % (c + a*3), in bfloat16 0.5 %,
0.8 %, 3.4 %; 2 float16 elements further from x than the original, by 0.0001 ulp; the
original's own error up to 9.2e6 ulp (float32) / 1.9e3 ulp (float16) under cancellation.

Legality: the product has no other user; every tensor operand and the result have one
floating dtype (no type promotion; integer or mixed dtypes are left alone); ``alpha``
becomes ``value`` only when it is ±1 (ATen computes ``value * t1`` first: another alpha,
even a power of two, can round there through an underflow); a scalar factor (``mul(a, s)``)
becomes ``add(c, a, alpha=s)`` instead of an addcmul, in 16-bit dtypes only when the dtype
holds ``s`` exactly (ATen's CPU add rounds alpha to the tensor's dtype, its mul computes with
s in float32: fp16 ``c + a*0.1`` would multiply by 0.0999755859375, and a = 1000, c = -100
would give -0.0244 for an exact 1.5e-6). The result shape is the broadcast of the operands,
exactly the original's.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.fx
from torch.fx.node import Node

from ..rewrite import NodeRule, RewritePass, RuleSet, decline, replace_call

aten = torch.ops.aten
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MULS = (aten.mul.Tensor, aten.mul.Scalar)
CONTRACT = ("fma_rounding: fp32/fp64 RN(exact) or the original's bits; fp16/bf16 RN of a float32 within one step "
            "of RN_fp32(exact) or the original's bits (fxopt.testing.fma_rounding)")


# --------------------------------------------------------------------------- helpers
def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def _tensor_node(n) -> bool:
    return isinstance(n, Node) and isinstance(_val(n), torch.Tensor)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _unit(x) -> bool:
    """alpha = ±1: ``value * a`` is exact. (A power of two is *not* enough: ATen computes
    ``value * t1`` first, which can underflow into the subnormals and round - Hypothesis
    found ``c - 0.5*(a*b)`` with a = 1.9595e-38 in fp32; tests/test_addcmul.py keeps it.)"""
    return _number(x) and abs(x) == 1


def _scalar_fits(s, dtype: torch.dtype) -> bool:
    """A scalar factor of a 16-bit product must be exact in that dtype: ATen's CPU ``add``
    rounds ``alpha`` to the tensor's dtype where ``mul`` computes with ``s`` in float32, so
    ``c + a*0.1`` in float16 would become ``c + a*0.0999755859375`` (tests/test_addcmul.py).
    float32 / float64 kernels see ``s`` in their own dtype on both sides."""
    if dtype not in (torch.float16, torch.bfloat16):
        return True
    return float(torch.tensor(s, dtype=torch.float64).to(dtype)) == s


def _alpha(node: Node):
    extra = [k for k in node.kwargs if k != "alpha"]
    if extra:
        return None
    return node.kwargs.get("alpha", 1)


def _short(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _float_problem(out: Node, *operands: Node) -> str | None:
    """Why the tensor operands and the result do not share one floating dtype and device."""
    ov = _val(out)
    if not isinstance(ov, torch.Tensor) or ov.dtype not in _FLOATS:
        return "the result is not a floating-point tensor"
    for o in operands:
        v = _val(o)
        if not isinstance(v, torch.Tensor):
            return f"{o.name} has no tensor value"
        if v.dtype != ov.dtype or v.device != ov.device:
            return (f"{o.name} is {_short(v.dtype)} on {v.device}, the result {_short(ov.dtype)} on {ov.device}: "
                    "type promotion")
    return None


def _product_problem(add: Node, m) -> str | None:
    """Why ``m`` is not a mul node whose only use is one argument of ``add``."""
    if not (isinstance(m, Node) and m.op == "call_function" and m.target in _MULS):
        return f"operand {getattr(m, 'name', repr(m))} is not a mul"
    if m.kwargs:
        return f"the mul {m.name} has keyword arguments"
    if sum(1 for a in add.args if a is m) != 1:
        return f"the product {m.name} is both operands"
    if len(m.users) != 1:
        others = [u.name for u in m.users if u is not add][:3]
        return f"the product {m.name} is also used by {', '.join(others)}: it would still be needed"
    return None


def _tensor_product(m: Node):
    """(a, b) for ``mul(a, b)`` of two tensors, else None."""
    if m.target is aten.mul.Tensor and len(m.args) == 2 and all(_tensor_node(a) for a in m.args):
        return m.args[0], m.args[1]
    return None


def _scalar_product(m: Node):
    """(a, s) for ``mul(a, s)`` / ``mul(s, a)`` with a Python number ``s``, else None."""
    if len(m.args) != 2:
        return None
    x, y = m.args
    if _tensor_node(x) and _number(y):
        return x, y
    if m.target is aten.mul.Tensor and _number(x) and _tensor_node(y):
        return y, x
    return None


def _static(v) -> bool:
    return isinstance(v, torch.Tensor) and all(isinstance(d, int) for d in v.shape)


def _rewrite(node: Node, target, args: tuple, kwargs: dict, replaced: list):
    """``target(*args, **kwargs)`` in place of ``node``. With static shapes the engine propagates
    the new value and refuses a change of shape or dtype; with symbolic shapes the value is the
    original's (same broadcast shape and dtype by construction)."""
    old = _val(node)
    static = _static(old) and all(_static(_val(a)) for a in args if isinstance(a, Node))
    return replace_call(node, target, args, kwargs, matched=replaced, val=None if static else old)


def _two_operands(node: Node):
    if len(node.args) != 2:
        return decline(f"{len(node.args)} positional arguments")
    return None


# --------------------------------------------------------------------------- the table
def _add_c_mul(node: Node):
    """add(c, mul(a, b), alpha=s) -> addcmul(c, a, b, value=s);  s = ±1."""
    bad = _two_operands(node)
    if bad:
        return bad
    c, m = node.args
    why = _product_problem(node, m)
    if why:
        return decline(why, kind="no product")
    alpha = _alpha(node)
    if not _tensor_node(c):
        return decline(f"c ({c!r}) is not a tensor", progress=1)
    if not _unit(alpha):
        return decline(f"alpha={alpha!r}: only ±1 scales the product exactly", kind="alpha", progress=1)
    ab = _tensor_product(m)
    if ab is None:
        return decline(f"{m.name} has a scalar factor (another spelling)", kind="scalar", progress=1)
    why = _float_problem(node, c, m, *ab)
    if why:
        return decline(why, kind="dtype", progress=2)
    kw = {} if alpha == 1 else {"value": alpha}
    return _rewrite(node, aten.addcmul.default, (c, *ab), kw, [m, node])


def _add_mul_c(node: Node):
    """add(mul(a, b), c) -> addcmul(c, a, b)   (alpha must be 1: it would scale c)."""
    bad = _two_operands(node)
    if bad:
        return bad
    m, c = node.args
    why = _product_problem(node, m)
    if why:
        return decline(why, kind="no product")
    if _alpha(node) != 1:
        return decline(f"alpha={_alpha(node)!r} would scale c, not the product", kind="alpha", progress=1)
    if not _tensor_node(c):
        return decline(f"c ({c!r}) is not a tensor", progress=1)
    ab = _tensor_product(m)
    if ab is None:
        return decline(f"{m.name} has a scalar factor (another spelling)", kind="scalar", progress=1)
    why = _float_problem(node, c, m, *ab)
    if why:
        return decline(why, kind="dtype", progress=2)
    return _rewrite(node, aten.addcmul.default, (c, *ab), {}, [m, node])


def _sub_c_mul(node: Node):
    """sub(c, mul(a, b), alpha=s) -> addcmul(c, a, b, value=-s);  s = ±1."""
    bad = _two_operands(node)
    if bad:
        return bad
    c, m = node.args
    why = _product_problem(node, m)
    if why:
        return decline(why, kind="no product")
    alpha = _alpha(node)
    if not _tensor_node(c):
        return decline(f"c ({c!r}) is not a tensor", progress=1)
    if not _unit(alpha):
        return decline(f"alpha={alpha!r}: only ±1 scales the product exactly", kind="alpha", progress=1)
    ab = _tensor_product(m)
    if ab is None:
        return decline(f"{m.name} has a scalar factor (another spelling)", kind="scalar", progress=1)
    why = _float_problem(node, c, m, *ab)
    if why:
        return decline(why, kind="dtype", progress=2)
    return _rewrite(node, aten.addcmul.default, (c, *ab), {"value": -alpha}, [m, node])


def _scaled(op, product_first: bool, sign: int):
    """Matcher for ``op(c, mul(a, s))`` (or ``op(mul(a, s), c)`` when ``product_first``)
    -> ``add(c, a, alpha=sign*s)``: a scalar factor needs one rounding fewer, IEEE add is
    commutative and negation is exact."""

    def match(node: Node):
        bad = _two_operands(node)
        if bad:
            return bad
        m, c = node.args if product_first else node.args[::-1]
        why = _product_problem(node, m)
        if why:
            return decline(why, kind="no product")
        if _alpha(node) != 1:
            return decline(f"alpha={_alpha(node)!r}", kind="alpha", progress=1)
        if not _tensor_node(c):
            return decline(f"c ({c!r}) is not a tensor", progress=1)
        a_s = _scalar_product(m)
        if a_s is None:
            return decline(f"{m.name} multiplies two tensors (another spelling)", kind="tensor product", progress=1)
        why = _float_problem(node, c, m, a_s[0])
        if why:
            return decline(why, kind="dtype", progress=2)
        if not _scalar_fits(a_s[1], _val(node).dtype):
            return decline(f"the scalar {a_s[1]!r} is not exact in {_val(node).dtype} (ATen's add would round alpha)",
                           kind="scalar", progress=2)
        return _rewrite(node, aten.add.Tensor, (c, a_s[0]), {"alpha": sign * a_s[1]}, [m, node])

    operands = "mul(a, s), c" if product_first else "c, mul(a, s)"
    match.__doc__ = f"{op._schema.name.split('::')[-1]}({operands}) -> add(c, a, alpha={'-' if sign < 0 else ''}s)"
    return match


def _spelling(name: str, algebra: str, fn, anchor) -> NodeRule:
    """One table entry: a callable rule anchored at ``anchor``, its source the entry's line."""
    frame = sys._getframe(1)
    return NodeRule(name, fn, anchors=[anchor], contract=CONTRACT, reach=1, description=f"{algebra}\n{fn.__doc__}",
                    source=f"{frame.f_code.co_filename}:{frame.f_lineno}")


# Order matters only when both add operands are products (e.g. rotary q*cos + rot(q)*sin):
# the first entry folds the right-hand product.
ADDCMUL_RULES = RuleSet([
    _spelling("add(c,mul(a,b))", "c + s*(a*b) == addcmul(c, a, b, value=s)", _add_c_mul, aten.add.Tensor),
    _spelling("add(mul(a,b),c)", "(a*b) + c == addcmul(c, a, b)", _add_mul_c, aten.add.Tensor),
    _spelling("sub(c,mul(a,b))", "c - s*(a*b) == addcmul(c, a, b, value=-s)", _sub_c_mul, aten.sub.Tensor),
    _spelling("add(c,mul(a,s))", "c + a*s == add(c, a, alpha=s)", _scaled(aten.add.Tensor, False, 1), aten.add.Tensor),
    _spelling("add(mul(a,s),c)", "a*s + c == add(c, a, alpha=s)", _scaled(aten.add.Tensor, True, 1), aten.add.Tensor),
    _spelling("sub(c,mul(a,s))", "c - a*s == add(c, a, alpha=-s)", _scaled(aten.sub.Tensor, False, -1), aten.sub.Tensor),
], name="addcmul")
# Not rewritten on purpose (negative entries, tested): sub(mul(a,b), c) would need neg(c);
# add(mul(a,b), c, alpha=s) scales c, not the product; a non-power-of-two alpha on a
# tensor product (value*a would round); mixed or integer dtypes (type promotion).


class AddcmulPass(RewritePass):
    """mul + add -> addcmul (or add with alpha for a scalar factor)."""

    def __init__(self, rules=None):
        # one walk per run: the pass manager's rounds re-run it after the graph changed
        super().__init__("addcmul", list(rules) if rules is not None else ADDCMUL_RULES, max_iterations=1)
