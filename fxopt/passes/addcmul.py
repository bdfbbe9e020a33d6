"""The ``"addcmul"`` pass: a multiply feeding an add becomes one ``aten.addcmul``.

A rule table in the spirit of tinygrad's ``symbolic.py``: every ATen spelling is one callable
rule of the rewrite engine (:class:`fxopt.NodeRule`, built by :func:`_spelling`) with its algebra,
the source line of its table entry and its contract; it returns the rewrite or declines with the
reason (``fxopt.explain(gm, "addcmul")`` shows them). Hits are counted per run
(``stats["rule:<name>"]``).

Contract (measured: ``addcmul`` is *not* bit-equal to ``a*b + c`` - it rounds the product
once fewer): per element never further from a float64 evaluation than the original, and
within 1 ulp of the original wherever the original itself was correctly rounded up to
one product rounding - i.e. wherever no catastrophic cancellation or overflow of the
rounded product occurred. Where the original's rounded product cancelled against ``c``
(``c ~= -a*b``) or overflowed to inf, the original is many ulps off the true value and
``addcmul`` is closer to it; a 1-ulp bound relative to the *original* is then impossible
for any single-rounding implementation (tests/test_addcmul.py shows such inputs).

Legality: the product has no other user; every tensor operand and the result have one
floating dtype (no type promotion; integer or mixed dtypes are left alone); ``alpha``
becomes ``value`` only when it is ±1 (other alphas, powers of two included, can break the
fp64 clause through an underflowing ``value * a``); a scalar factor (``mul(a, s)``) becomes ``add(c, a, alpha=s)`` instead of an
addcmul. The result shape is the broadcast of the operands, exactly the original's.
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
CONTRACT = "no further from fp64 than the original per element; <= 1 ulp from it without cancellation/overflow"


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
