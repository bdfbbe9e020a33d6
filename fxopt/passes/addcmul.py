"""The ``"addcmul"`` pass: a multiply feeding an add becomes one ``aten.addcmul``.

A rule table in the spirit of tinygrad's ``symbolic.py``: every ATen spelling is one
:class:`Spelling` entry with the algebra in its docstring-comment, the source location
where it is defined, and a hit counter (``ADDCMUL_RULES[i].hits``; the pass also reports
``stats["rule:<name>"]``).

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
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx
from torch.fx.node import Node

from ..graph_utils import mark_provenance, propagate_meta
from ..pass_base import Pass, PassResult

aten = torch.ops.aten
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MULS = (aten.mul.Tensor, aten.mul.Scalar)


@dataclass
class Rewrite:
    """What a spelling found: build ``target(*args, **kwargs)`` in place of ``add``."""

    target: object
    args: tuple
    kwargs: dict
    replaced: list[Node]


@dataclass
class Spelling:
    name: str
    algebra: str
    match: Callable[[Node], Optional[Rewrite]]
    source: str = ""
    hits: int = 0

    def __post_init__(self):
        if not self.source:
            frame = sys._getframe(2)  # the line that constructed this entry
            self.source = f"{frame.f_code.co_filename}:{frame.f_lineno}"


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


def _same_float(out: Node, *operands: Node) -> bool:
    """All tensor operands and the result share one floating dtype and device."""
    ov = _val(out)
    if not isinstance(ov, torch.Tensor) or ov.dtype not in _FLOATS:
        return False
    for o in operands:
        v = _val(o)
        if not isinstance(v, torch.Tensor) or v.dtype != ov.dtype or v.device != ov.device:
            return False
    return True


def _sole_product(add: Node, m) -> bool:
    """``m`` is a mul node whose only use is one argument of ``add``."""
    return (
        isinstance(m, Node)
        and m.op == "call_function"
        and m.target in _MULS
        and len(m.users) == 1
        and sum(1 for a in add.args if a is m) == 1
        and not m.kwargs
    )


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


def _is(node: Node, target) -> bool:
    return node.op == "call_function" and node.target is target and len(node.args) == 2


# --------------------------------------------------------------------------- the table
def _add_c_mul(node: Node):
    """add(c, mul(a, b), alpha=s) -> addcmul(c, a, b, value=s);  s = ±1."""
    if not _is(node, aten.add.Tensor):
        return None
    c, m = node.args
    alpha = _alpha(node)
    if not (_tensor_node(c) and _sole_product(node, m) and _unit(alpha)):
        return None
    ab = _tensor_product(m)
    if ab is None or not _same_float(node, c, m, *ab):
        return None
    kw = {} if alpha == 1 else {"value": alpha}
    return Rewrite(aten.addcmul.default, (c, *ab), kw, [m, node])


def _add_mul_c(node: Node):
    """add(mul(a, b), c) -> addcmul(c, a, b)   (alpha must be 1: it would scale c)."""
    if not _is(node, aten.add.Tensor):
        return None
    m, c = node.args
    if _alpha(node) != 1 or not (_tensor_node(c) and _sole_product(node, m)):
        return None
    ab = _tensor_product(m)
    if ab is None or not _same_float(node, c, m, *ab):
        return None
    return Rewrite(aten.addcmul.default, (c, *ab), {}, [m, node])


def _sub_c_mul(node: Node):
    """sub(c, mul(a, b), alpha=s) -> addcmul(c, a, b, value=-s);  s = ±1."""
    if not _is(node, aten.sub.Tensor):
        return None
    c, m = node.args
    alpha = _alpha(node)
    if not (_tensor_node(c) and _sole_product(node, m) and _unit(alpha)):
        return None
    ab = _tensor_product(m)
    if ab is None or not _same_float(node, c, m, *ab):
        return None
    return Rewrite(aten.addcmul.default, (c, *ab), {"value": -alpha}, [m, node])


def _scaled(op, product_first: bool, sign: int):
    """Matcher for ``op(c, mul(a, s))`` (or ``op(mul(a, s), c)`` when ``product_first``)
    -> ``add(c, a, alpha=sign*s)``: a scalar factor needs one rounding fewer, IEEE add is
    commutative and negation is exact."""

    def match(node: Node):
        if not _is(node, op) or _alpha(node) != 1:
            return None
        m, c = node.args if product_first else node.args[::-1]
        if not (_tensor_node(c) and _sole_product(node, m)):
            return None
        a_s = _scalar_product(m)
        if a_s is None or not _same_float(node, c, m, a_s[0]):
            return None
        return Rewrite(aten.add.Tensor, (c, a_s[0]), {"alpha": sign * a_s[1]}, [m, node])

    operands = "mul(a, s), c" if product_first else "c, mul(a, s)"
    match.__doc__ = f"{op._schema.name.split('::')[-1]}({operands}) -> add(c, a, alpha={'-' if sign < 0 else ''}s)"
    return match


# Order matters only when both add operands are products (e.g. rotary q*cos + rot(q)*sin):
# the first entry folds the right-hand product.
ADDCMUL_RULES: list[Spelling] = [
    Spelling("add(c,mul(a,b))", "c + s*(a*b) == addcmul(c, a, b, value=s)", _add_c_mul),
    Spelling("add(mul(a,b),c)", "(a*b) + c == addcmul(c, a, b)", _add_mul_c),
    Spelling("sub(c,mul(a,b))", "c - s*(a*b) == addcmul(c, a, b, value=-s)", _sub_c_mul),
    Spelling("add(c,mul(a,s))", "c + a*s == add(c, a, alpha=s)", _scaled(aten.add.Tensor, False, 1)),
    Spelling("add(mul(a,s),c)", "a*s + c == add(c, a, alpha=s)", _scaled(aten.add.Tensor, True, 1)),
    Spelling("sub(c,mul(a,s))", "c - a*s == add(c, a, alpha=-s)", _scaled(aten.sub.Tensor, False, -1)),
]
# Not rewritten on purpose (negative entries, tested): sub(mul(a,b), c) would need neg(c);
# add(mul(a,b), c, alpha=s) scales c, not the product; a non-power-of-two alpha on a
# tensor product (value*a would round); mixed or integer dtypes (type promotion).


class AddcmulPass(Pass):
    """mul + add -> addcmul (or add with alpha for a scalar factor)."""

    name = "addcmul"

    def __init__(self, rules: list[Spelling] | None = None):
        self.rules = rules if rules is not None else ADDCMUL_RULES

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        stats: dict[str, int] = {"matches": 0}
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in (aten.add.Tensor, aten.sub.Tensor):
                continue
            if node.graph is None:  # erased earlier in this walk
                continue
            for rule in self.rules:
                rw = rule.match(node)
                if rw is None:
                    continue
                old_val = _val(node)
                with graph.inserting_before(node):
                    new = graph.call_function(rw.target, rw.args, rw.kwargs)
                if _static(old_val) and all(_static(_val(a)) for a in rw.args if isinstance(a, Node)):
                    propagate_meta(graph_module, [new])
                    nv = _val(new)
                    if (
                        not isinstance(nv, torch.Tensor)
                        or nv.dtype != old_val.dtype
                        or tuple(nv.shape) != tuple(old_val.shape)
                    ):
                        graph.erase_node(new)  # never change shape or dtype
                        continue
                else:  # symbolic shapes: same broadcast shape and dtype by construction
                    new.meta["val"] = old_val
                mark_provenance([new], rule=f"addcmul.{rule.name}", pass_name=self.name,
                                replaced=rw.replaced, source=rule.source)
                node.replace_all_uses_with(new)
                for old in reversed(rw.replaced):
                    graph.erase_node(old)
                rule.hits += 1
                stats["matches"] += 1
                stats[f"rule:{rule.name}"] = stats.get(f"rule:{rule.name}", 0) + 1
                break
        if stats["matches"]:
            graph.lint()
            graph_module.recompile()
        return PassResult(graph_module, stats["matches"] > 0, stats)


