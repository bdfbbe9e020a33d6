"""Index algebra for the ``scan`` pass: express a node as ``sum_{contracted} prod_i leaf_i[...]``.

A value is an :class:`Expr`: a list of *factors* ``(leaf node, slots)`` -- one slot id per leaf
dimension, or ``None`` for a size-1 leaf dimension that only broadcasts -- and ``out``, the slot of
each output dimension. Slots that no output dimension names are summed over. Einsum, matmul, bmm,
broadcasting mul, sum, the views that move or add/remove size-1 dimensions, and floating-point
casts are followed; anything else is a leaf. This is how the pass reads readouts
(``einsum('bdn,bn->bd')``, ``matmul(h, C.unsqueeze(-1))[..., 0]``, ``(h * C[:, None]).sum(-1)``...)
and prologues (``exp(A[None, :, None] * dt[..., None])``, ``einsum('bld,dn->bldn')``) without a
table of spellings.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import Node

aten = torch.ops.aten

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# Static shapes are looked up many times per node on unrolled graphs; the cache is the one the
# rewrite run hands in (``ctx.cache``), active only inside ``with shape_cache(...)``, so it dies
# with the run and never keeps the nodes of a finished graph alive.
_ACTIVE_SHAPES: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("fxopt_scan_shapes", default=None)


@contextlib.contextmanager
def shape_cache(cache: dict):
    token = _ACTIVE_SHAPES.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE_SHAPES.reset(token)


def _static_shape(x: Node) -> Optional[tuple]:
    v = x.meta.get("val")
    if isinstance(v, torch.Tensor):
        try:
            return tuple(int(s) for s in v.shape)
        except TypeError:  # symbolic
            return None
    return None


def shape_of(x) -> Optional[tuple]:
    if not isinstance(x, Node):
        return None
    cache = _ACTIVE_SHAPES.get()
    if cache is None:
        return _static_shape(x)
    try:
        return cache[x]
    except KeyError:
        out = cache[x] = _static_shape(x)
        return out


def dtype_of(x):
    v = x.meta.get("val") if isinstance(x, Node) else None
    return v.dtype if isinstance(v, torch.Tensor) else None


class NotTracked(Exception):
    pass


@dataclass
class Expr:
    factors: list  # [(node, tuple[slot|None])]
    out: list  # [slot]
    size: dict = field(default_factory=dict)  # slot -> size

    def contracted(self) -> set:
        used = {s for _, sl in self.factors for s in sl if s is not None}
        return used - set(self.out)


class _Ctx:
    def __init__(self):
        self.n = 0

    def new(self, size: int, sizes: dict) -> int:
        self.n += 1
        sizes[self.n] = size
        return self.n


def _norm_dim(d: int, r: int) -> int:
    return d + r if d < 0 else d


def _is_float_cast(node: Node) -> bool:
    t = node.target
    if t in (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default):
        src, dst = dtype_of(node.args[0]) if isinstance(node.args[0], Node) else None, dtype_of(node)
        return src in _FLOATS and dst in _FLOATS
    return False


def _rename(e: Expr, mapping: dict) -> Expr:
    f = [(n, tuple(mapping.get(s, s) if s is not None else None for s in sl)) for n, sl in e.factors]
    return Expr(f, [mapping.get(s, s) for s in e.out], e.size)


def _drop_slot(e: Expr, slot: int) -> Expr:
    """Remove a size-1 slot from everything (factors that named it now broadcast)."""
    f = [(n, tuple(None if s == slot else s for s in sl)) for n, sl in e.factors]
    return Expr(f, [s for s in e.out if s != slot], e.size)


def _broadcast_mul(x: Expr, y: Expr, ctx: _Ctx) -> Expr:
    rx, ry = len(x.out), len(y.out)
    r = max(rx, ry)
    sizes = x.size
    sizes.update(y.size)
    mapping = {}
    out = []
    xo = [None] * (r - rx) + list(x.out)
    yo = [None] * (r - ry) + list(y.out)
    drop = []
    for sx, sy in zip(xo, yo):
        if sx is None:
            out.append(sy)
        elif sy is None:
            out.append(sx)
        else:
            zx, zy = sizes[sx], sizes[sy]
            if zx == zy:
                mapping[sy] = sx
                out.append(sx)
            elif zx == 1:
                drop.append(sx)
                out.append(sy)
            elif zy == 1:
                drop.append(sy)
                out.append(sx)
            else:
                raise NotTracked("broadcast mismatch")
    y2 = _rename(y, mapping)
    e = Expr(list(x.factors) + list(y2.factors), out, sizes)
    for s in drop:
        e = Expr([(n, tuple(None if q == s else q for q in sl)) for n, sl in e.factors], e.out, sizes)
    return e


def track(node, stop: dict, ctx: Optional[_Ctx] = None, depth: int = 0, follow_casts: bool = True) -> Expr:
    """Expr of ``node``. Nodes in ``stop`` (a dict/set) are always leaves."""
    ctx = ctx or _Ctx()
    if depth > 24:
        raise NotTracked("too deep")
    shp = shape_of(node)
    if shp is None:
        raise NotTracked(f"no static shape for {node}")

    def leaf():
        sizes = {}
        slots = tuple(ctx.new(s, sizes) for s in shp)
        return Expr([(node, slots)], list(slots), sizes)

    if not isinstance(node, Node) or node.op != "call_function" or node in stop:
        return leaf()
    t = node.target
    a = node.args
    try:
        if follow_casts and _is_float_cast(node):
            return track(a[0], stop, ctx, depth + 1)
        if t in (aten.alias.default, aten.clone.default, aten.contiguous.default, aten.expand.default, aten.expand_as.default):
            inner = track(a[0], stop, ctx, depth + 1)
            if t in (aten.expand.default, aten.expand_as.default):
                # broadcast size-1 dims to full: new slots where the size grows
                r0 = len(inner.out)
                pad = len(shp) - r0
                out = []
                e = inner
                for i, s in enumerate(shp):
                    if i < pad:
                        out.append(ctx.new(s, e.size))
                        continue
                    sl = inner.out[i - pad]
                    if e.size[sl] == s:
                        out.append(sl)
                    else:
                        e = _drop_slot(Expr(e.factors, e.out, e.size), sl)
                        out.append(ctx.new(s, e.size))
                return Expr(e.factors, out, e.size)
            return inner
        if t == aten.unsqueeze.default:
            inner = track(a[0], stop, ctx, depth + 1)
            d = _norm_dim(a[1], len(inner.out) + 1)
            out = list(inner.out)
            out.insert(d, ctx.new(1, inner.size))
            return Expr(inner.factors, out, inner.size)
        if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            inner = track(a[0], stop, ctx, depth + 1)
            r = len(inner.out)
            if t == aten.squeeze.default:
                dims = [i for i in range(r) if inner.size[inner.out[i]] == 1]
            else:
                dims = a[1] if isinstance(a[1], (list, tuple)) else [a[1]]
                dims = [_norm_dim(d, r) for d in dims]
            e = inner
            for d in dims:
                sl = inner.out[d]
                if inner.size[sl] == 1:
                    e = _drop_slot(e, sl)
            return e
        if t == aten.select.int:
            inner_shape = shape_of(a[0])
            d = _norm_dim(a[1], len(inner_shape))
            if inner_shape[d] != 1:
                return leaf()
            inner = track(a[0], stop, ctx, depth + 1)
            return _drop_slot(inner, inner.out[d])
        if t in (aten.permute.default,):
            inner = track(a[0], stop, ctx, depth + 1)
            r = len(inner.out)
            perm = [_norm_dim(p, r) for p in a[1]]
            return Expr(inner.factors, [inner.out[p] for p in perm], inner.size)
        if t in (aten.transpose.int, aten.swapaxes.default, aten.swapdims.default):
            inner = track(a[0], stop, ctx, depth + 1)
            r = len(inner.out)
            i, j = _norm_dim(a[1], r), _norm_dim(a[2], r)
            out = list(inner.out)
            out[i], out[j] = out[j], out[i]
            return Expr(inner.factors, out, inner.size)
        if t in (aten.t.default, aten.numpy_T.default) or t == getattr(aten, "mT", None):
            inner = track(a[0], stop, ctx, depth + 1)
            out = list(inner.out)
            if len(out) >= 2:
                out[-1], out[-2] = out[-2], out[-1]
            return Expr(inner.factors, out, inner.size)
        if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            inner = track(a[0], stop, ctx, depth + 1)
            non1_in = [s for s in inner.out if inner.size[s] != 1]
            if [inner.size[s] for s in non1_in] != [s for s in shp if s != 1]:
                raise NotTracked("reshape merges or splits dims")
            e = inner
            for s in inner.out:
                if inner.size[s] == 1:
                    e = _drop_slot(e, s)
            it = iter(non1_in)
            out = [next(it) if s != 1 else ctx.new(1, e.size) for s in shp]
            return Expr(e.factors, out, e.size)
        if t == aten.mul.Tensor and all(isinstance(x, Node) for x in a[:2]):
            return _broadcast_mul(track(a[0], stop, ctx, depth + 1), track(a[1], stop, ctx, depth + 1), ctx)
        if t in (aten.sum.dim_IntList, aten.sum.default):
            inner = track(a[0], stop, ctx, depth + 1)
            r = len(inner.out)
            if node.kwargs.get("dtype") is not None:
                pass
            dims = list(range(r)) if (t == aten.sum.default or a[1] is None) else [_norm_dim(d, r) for d in (a[1] if isinstance(a[1], (list, tuple)) else [a[1]])]
            keep = (a[2] if len(a) > 2 else node.kwargs.get("keepdim", False)) if t != aten.sum.default else False
            out = []
            for i, s in enumerate(inner.out):
                if i in dims:
                    if keep:
                        out.append(ctx.new(1, inner.size))
                else:
                    out.append(s)
            return Expr(inner.factors, out, inner.size)
        if t == aten.einsum.default:
            eq, ops = a[0], a[1]
            eq = eq.replace(" ", "")
            if "..." in eq or "->" not in eq:
                raise NotTracked("einsum form")
            lhs, rhs = eq.split("->")
            terms = lhs.split(",")
            if len(terms) != len(ops):
                raise NotTracked("einsum arity")
            sizes = {}
            letter = {}
            factors = []
            for term, op in zip(terms, ops):
                e = track(op, stop, ctx, depth + 1)
                sizes.update(e.size)
                if len(term) != len(e.out):
                    raise NotTracked("einsum rank")
                mapping = {}
                for ch, sl in zip(term, e.out):
                    if ch in letter:
                        other = letter[ch]
                        if sizes[other] == sizes[sl]:
                            mapping[sl] = other
                        elif sizes[sl] == 1:
                            mapping[sl] = None
                        elif sizes[other] == 1:
                            # re-point earlier factors' size-1 slot to broadcast
                            factors = [(n, tuple(None if q == other else q for q in sl2)) for n, sl2 in factors]
                            letter[ch] = sl
                        else:
                            raise NotTracked("einsum size mismatch")
                    else:
                        letter[ch] = sl
                e2 = Expr([(n, tuple((mapping[q] if q in mapping else q) if q is not None else None for q in sl2)) for n, sl2 in e.factors], e.out, sizes)
                factors.extend(e2.factors)
            # size-1 slots that were dropped (mapped to None) are fine
            out = [letter[ch] for ch in rhs]
            return Expr(factors, out, sizes)
        if t in (aten.matmul.default, aten.bmm.default, aten.mm.default):
            x, y = track(a[0], stop, ctx, depth + 1), track(a[1], stop, ctx, depth + 1)
            sizes = x.size
            sizes.update(y.size)
            xo, yo = list(x.out), list(y.out)
            if len(xo) == 1:
                xo = [ctx.new(1, sizes)] + xo
                x_vec = True
            else:
                x_vec = False
            y_vec = False
            if len(yo) == 1:
                yo = yo + [ctx.new(1, sizes)]
                y_vec = True
            kx, ky = xo[-1], yo[-2]
            if sizes[kx] != sizes[ky]:
                raise NotTracked("matmul k mismatch")
            y2 = _rename(Expr(y.factors, yo, sizes), {ky: kx})
            yo2 = y2.out
            bx, by = xo[:-2], yo2[:-2]
            # broadcast the batch dims (a mul of two empty-factor exprs)
            xb = Expr(list(x.factors), bx, sizes)
            yb = Expr(list(y2.factors), by, sizes)
            m = _broadcast_mul(xb, yb, ctx)
            out = list(m.out) + ([] if x_vec else [xo[-2]]) + ([] if y_vec else [yo2[-1]])
            return Expr(m.factors, out, m.size)
    except NotTracked:
        raise
    except Exception as exc:  # malformed args: treat as not trackable
        raise NotTracked(f"{node.target}: {exc}") from exc
    return leaf()


def strip_casts(node):
    while isinstance(node, Node) and node.op == "call_function" and _is_float_cast(node):
        node = node.args[0]
    return node
