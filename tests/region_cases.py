"""Hypothesis strategies for region tests (shared by the test_region_* files).

* :func:`region_inputs` - tensors for a region's inputs over a drawn iteration space: rows of
  0..3 leading dims (size-1 and non-power-of-two sides), widths 1..70 (non-powers of two),
  each input full / broadcast over rows / one value per row, in a drawn memory layout
  (transposed, sliced, misaligned, expanded), values from every distribution of
  :mod:`fxopt.testing.strategies` with inf/nan/-0.0/subnormals/max spliced in;
* :func:`exact_regions` - random DAGs of the exact ops (add/sub/mul/div/neg/casts/sqrt/pow/
  rotate-half slices and cats, Python-number operands, mixed dtypes) with 1-3 outputs.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from fxopt.codegen.region import RegionBuilder
from fxopt.testing import strategies as fst

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@st.composite
def row_shapes(draw, max_dims: int = 3, max_side: int = 5):
    return draw(fst.shapes(min_dims=0, max_dims=max_dims, max_side=max_side))


@st.composite
def widths(draw, max_width: int = 70):
    return draw(st.one_of(st.just(1), st.sampled_from([3, 5, 7, 12, 33, 64]), st.integers(1, max_width)))


@st.composite
def operand(draw, rows: tuple, width: int, dtype: torch.dtype, *, kind=None, special: bool = True,
            distributions=fst.DISTRIBUTIONS, allow_layouts: bool = True):
    """One input: ``kind`` "full" (rows x width), "bcast" (broadcast over rows, stride 0), "vec"
    (exactly ``(width,)``, e.g. a LayerNorm weight), "row" (rows x 1) or drawn."""
    kind = kind or draw(st.sampled_from(("full", "full", "bcast", "row")))
    if kind == "full":
        shape = (*rows, width)
    elif kind == "bcast":
        shape = draw(st.sampled_from([(width,), (*[1] * len(rows), width)]))
    elif kind == "vec":
        shape = (width,)
    else:
        shape = (*rows, 1)
    layouts = fst.LAYOUTS if allow_layouts else ("contiguous",)
    return draw(fst.strided_tensors(shape, dtype, special, layouts=layouts, distributions=distributions))


@st.composite
def region_inputs(draw, region, *, rows=None, width=None, kinds=None, special: bool = True,
                  distributions=fst.DISTRIBUTIONS, allow_layouts: bool = True):
    rows = draw(row_shapes()) if rows is None else rows
    width = draw(widths()) if width is None else width
    xs = []
    for i, dt in enumerate(region.inputs):
        kind = None if kinds is None else kinds[i]
        # parameters ("vec": LayerNorm/RMSNorm weights, biases) stay finite: with a non-finite
        # weight CPU eager (which folds the mean into the bias term) and ATen's CUDA formula,
        # which the kernel follows, disagree on inf vs nan
        sp = special and kind != "vec"
        xs.append(draw(operand(tuple(rows), width, dt, kind=kind, special=sp,
                               distributions=distributions, allow_layouts=allow_layouts)))
    return xs


_EXACT_BINARY = ("add", "sub", "mul", "div")
_EXACT_UNARY = ("neg", "pow2", "cast", "rotate")


@st.composite
def exact_regions(draw, max_stmts: int = 6):
    """``(region, xs)``: a random DAG of exact ops and matching inputs."""
    n_in = draw(st.integers(1, 4))
    base = draw(st.sampled_from(FLOATS))
    rows = tuple(draw(row_shapes()))
    width = draw(widths())
    b = RegionBuilder()
    kinds, dts = [], []
    for i in range(n_in):
        dts.append(base if draw(st.integers(0, 3)) else draw(st.sampled_from(FLOATS)))
        kinds.append("full" if i == 0 else draw(st.sampled_from(("full", "bcast", "row"))))
    vals = [b.input(dt) for dt in dts]
    is_full = {v.name: k != "row" for v, k in zip(vals, kinds)}  # full width vs one value per row
    for _ in range(draw(st.integers(1, max_stmts))):
        op = draw(st.sampled_from(_EXACT_BINARY + _EXACT_UNARY))
        a = draw(st.sampled_from(vals))
        operands = [a]
        if op in _EXACT_BINARY:
            if op != "div" and draw(st.integers(0, 4)) == 0:
                c = draw(st.sampled_from([0.5, -3.0, 1e-5, 1.1, 65504.0, 2.0 ** -20]))
                v = b.op(op, *((a, c) if draw(st.booleans()) else (c, a)))
            else:
                other = draw(st.sampled_from(vals))
                operands.append(other)
                v = b.op(op, a, other)
        elif op == "neg":
            v = b.neg(a)
        elif op == "pow2":
            v = b.pow(a, 2)
        elif op == "cast":
            v = b.to(a, draw(st.sampled_from([d for d in FLOATS if d != a.dtype])))
        else:  # rotate-half: slices + a cat of the same width
            fulls = [x for x in vals if is_full[x.name]]
            a = draw(st.sampled_from(fulls))
            operands = [a]
            if width < 2:
                v = b.neg(a)
            else:
                h = draw(st.integers(1, width - 1))
                v = b.cat(b.neg(b.slice(a, h, width)), b.slice(a, 0, h))
        is_full.setdefault(v.name, any(is_full[o.name] for o in operands))
        if v not in vals:
            vals.append(v)
    temps = vals[n_in:]
    if not temps:  # every drawn op hit the memo (same statement twice): one more
        temps = [b.neg(vals[0])]
    outs = [temps[-1]]
    extra = [v for v in temps[:-1] if v.name != outs[0].name]
    if extra and draw(st.booleans()):
        outs.append(draw(st.sampled_from(extra)))
    for x in vals[:n_in]:  # every input takes part in some output
        if x.name not in _deps(b, outs):
            outs[0] = b.add(outs[0], x)
    b.output(*outs)
    region = b.build()
    xs = draw(region_inputs(region, rows=rows, width=width, kinds=kinds))
    return region, xs


def _deps(b: RegionBuilder, outs) -> set:
    """Names of the values the outputs depend on (the builder's statements, transitively)."""
    live = {o.name for o in outs}
    for k in range(len(b._stmts) - 1, -1, -1):
        if f"t{k}" in live:
            live.update(b._stmts[k].operands)
    return live


@st.composite
def part_regions(draw):
    """``(region, xs)``: an output assembled by ``cat`` from pieces of one full-width input,
    each piece a slice (of width 1 too) that is negated, cast, multiplied by the matching slice
    of a second input (full, broadcast over rows or one value per row) or taken as is, in a
    drawn order; optionally a pointwise op over the whole cat and a second, nested cat (the
    rotate-half shape: a cat inside a product). Widths from 1 up, powers of two or not, so part
    boundaries fall at every alignment."""
    base = draw(st.sampled_from(FLOATS))
    rows = tuple(draw(row_shapes(max_dims=2, max_side=4)))
    width = draw(st.one_of(st.just(1), st.sampled_from([2, 3, 5, 12, 20, 33, 80]), st.integers(1, 40)))
    other_kind = draw(st.sampled_from(("full", "bcast", "row")))
    b = RegionBuilder()
    x, y = b.input(base), b.input(draw(st.sampled_from(FLOATS)))
    cuts = sorted(draw(st.sets(st.integers(1, width - 1), max_size=min(4, width - 1)))) if width > 1 else []
    pieces = []
    for lo, hi in zip([0, *cuts], [*cuts, width]):
        p = b.slice(x, lo, hi)
        how = draw(st.sampled_from(("as_is", "neg", "cast", "mul")))
        if how == "neg":
            p = b.neg(p)
        elif how == "cast":
            p = b.to(p, draw(st.sampled_from([d for d in FLOATS if d != base])))
            p = b.to(p, base)  # back: cat operands share one dtype
        elif how == "mul":
            yp = y if other_kind == "row" else b.slice(y, lo, hi)
            m = b.mul(p, yp)
            p = m if m.dtype == base else b.to(m, base)
        pieces.append(p)
    order = draw(st.permutations(range(len(pieces))))
    v = b.cat(*[pieces[i] for i in order]) if len(pieces) > 1 else pieces[0]
    if draw(st.booleans()):
        v = b.mul(v, y) if draw(st.booleans()) else b.add(v, 0.5)
        v = v if v.dtype == base else b.to(v, base)
    outs = [v]
    if width > 1 and draw(st.booleans()):
        h = draw(st.integers(1, width - 1))  # rotate-half of the assembled value, times x
        outs.append(b.mul(b.cat(b.neg(b.slice(v, h, width)), b.slice(v, 0, h)), x))
    if y.name not in _deps(b, outs):
        outs[0] = b.add(outs[0], y)  # every input takes part
        outs[0] = outs[0] if outs[0].dtype == base else b.to(outs[0], base)
    b.output(*outs)
    region = b.build()
    xs = draw(region_inputs(region, rows=rows, width=width, kinds=["full", other_kind]))
    return region, xs
