"""Hypothesis strategies for rewrite tests: shapes, dtypes, nasty tensors, odd memory layouts.

Tensors are generated from a drawn *seed* and a drawn *distribution* plus a short drawn list of
``(position, special value)`` pairs spliced in, so an example costs a handful of draws whatever
its size, and shrinking works (seed -> 0, distribution -> "normal", specials -> none,
shape -> all ones).

Public names:

* :func:`shapes` -- shapes biased to size-1 and non-power-of-two sides;
* :func:`float_dtypes` -- float32, float16, bfloat16 (optionally float64);
* :func:`tensors` -- values from several distributions (normal, integers, huge magnitudes,
  cancellation-prone ``big +- small``, subnormal range, wide dynamic range, the top of the
  finite range up to max, factors whose products straddle the overflow threshold, subnormal
  bit patterns, short dyadic numbers whose products and sums fall on rounding ties, factors
  and pushes that put ``c + a*b`` next to a tie, and an element-wise mixture of all of them)
  with inf, -inf, nan, -0.0, subnormals, max-finite spliced in;
* :data:`LAYOUTS`, :func:`layouts`, :func:`relayout` -- the same values in another memory layout
  (transposed, sliced with a step, misaligned storage offset, stride-0 broadcast);
* :func:`strided_tensors` -- a tensor of a given shape in a drawn layout (including expanded views);
* :func:`broadcastable_shapes` -- operand shapes that broadcast against a shape;
* :func:`special_values` -- the named special values of a dtype.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from torch import Tensor

__all__ = [
    "shapes",
    "float_dtypes",
    "tensors",
    "DISTRIBUTIONS",
    "SPECIAL_NAMES",
    "special_values",
    "LAYOUTS",
    "layouts",
    "relayout",
    "strided_tensors",
    "broadcastable_shapes",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# --------------------------------------------------------------------------- shapes and dtypes


def _side(min_side: int, max_side: int) -> SearchStrategy[int]:
    options: list[SearchStrategy[int]] = []
    if min_side <= 1 <= max_side:
        options.append(st.just(1))
    odd = [s for s in range(max(min_side, 2), max_side + 1) if s & (s - 1)]  # not a power of two
    if odd:
        options.append(st.sampled_from(odd))
    options.append(st.integers(min_side, max_side))
    if min_side == 0:
        options.append(st.just(0))
    return st.one_of(*options)


def shapes(min_dims: int = 0, max_dims: int = 4, max_side: int = 8, *, min_side: int = 1) -> SearchStrategy[tuple]:
    """Shapes with ``min_dims..max_dims`` dimensions and sides in ``min_side..max_side``.

    About a third of the sides are 1 and a third are non-powers of two (3, 5, 6, 7, ...); the
    rest uniform. Shrinks towards all-ones. ``min_side=0`` also allows empty dimensions."""
    if not 0 <= min_dims <= max_dims:
        raise ValueError(f"shapes: need 0 <= min_dims <= max_dims, got {min_dims}, {max_dims}")
    if not 0 <= min_side <= max_side:
        raise ValueError(f"shapes: need 0 <= min_side <= max_side, got {min_side}, {max_side}")
    return st.lists(_side(min_side, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


def float_dtypes(*, include_fp64: bool = False) -> SearchStrategy[torch.dtype]:
    """float32, float16, bfloat16 (and float64 when asked); shrinks towards float32."""
    return st.sampled_from(_FLOAT_DTYPES + ((torch.float64,) if include_fp64 else ()))


# --------------------------------------------------------------------------- special values

SPECIAL_NAMES = (
    "inf",
    "-inf",
    "nan",
    "-0.0",
    "0.0",
    "min_subnormal",
    "-min_subnormal",
    "max_subnormal",
    "mid_subnormal",
    "min_normal",
    "max",
    "-max",
    "half_max",
    "-half_max",
)


def _from_bits(bits: int, dtype: torch.dtype) -> Tensor:
    return torch.tensor([bits], dtype=_INT_VIEW[torch.finfo(dtype).bits // 8]).view(dtype)[0]


def special_values(dtype: torch.dtype) -> dict[str, Tensor]:
    """Named special values of a floating ``dtype`` as 0-d tensors of that dtype.

    Subnormals are built from their bit patterns (exact): ``min_subnormal`` has bits 0x..01,
    ``max_subnormal`` is the largest value below ``min_normal``, ``mid_subnormal`` in between."""
    fi = torch.finfo(dtype)
    min_normal = torch.tensor(fi.tiny, dtype=dtype)
    normal_bits = int(min_normal.reshape(1).view(_INT_VIEW[fi.bits // 8])[0])
    t = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
    return {
        "inf": t(math.inf),
        "-inf": t(-math.inf),
        "nan": t(math.nan),
        "-0.0": t(-0.0),
        "0.0": t(0.0),
        "min_subnormal": _from_bits(1, dtype),
        "-min_subnormal": -_from_bits(1, dtype),
        "max_subnormal": _from_bits(normal_bits - 1, dtype),
        "mid_subnormal": _from_bits(normal_bits // 2 + 1, dtype),
        "min_normal": min_normal,
        "max": t(fi.max),
        "-max": t(-fi.max),
        "half_max": t(fi.max / 2),
        "-half_max": t(-fi.max / 2),
    }


# --------------------------------------------------------------------------- value distributions

DISTRIBUTIONS = (
    "normal",
    "uniform",
    "integer",
    "large",
    "cancel",
    "tiny",
    "wide",
    "near_max",
    "sqrt_max",
    "subnormal",
    "dyadic",
    "overflow_edge",
    "tie_edge",
    "mixed",
)
_SIG_BITS = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24, torch.float64: 53}


def _values(dist: str, seed: int, numel: int, dtype: torch.dtype) -> Tensor:
    """``numel`` finite values of ``dtype`` drawn from distribution ``dist`` with a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    fi = torch.finfo(dtype)
    p = _SIG_BITS[dtype]
    if dist == "normal":
        v = torch.randn(numel, generator=g, dtype=f64)
    elif dist == "uniform":
        v = torch.rand(numel, generator=g, dtype=f64) * 2 - 1
    elif dist == "integer":  # exact arithmetic, many ties and exact zeros (-> signed-zero results)
        v = torch.randint(-8, 9, (numel,), generator=g).to(f64)
    elif dist == "large":  # |x| in [max/16, max/2]: sums and products overflow
        mag = fi.max / 16 * (1 + 7 * torch.rand(numel, generator=g, dtype=f64))
        v = mag * _signs(numel, g)
    elif dist == "cancel":  # big +- small: adding/subtracting two of them cancels catastrophically
        big = 2.0 ** (-math.log2(fi.eps))  # one ulp of `big` is ~1
        v = big * _signs(numel, g) + torch.randn(numel, generator=g, dtype=f64)
    elif dist == "tiny":  # subnormal range and the smallest normals
        v = (torch.rand(numel, generator=g, dtype=f64) * 2 - 1) * (4 * fi.tiny)
    elif dist == "wide":  # wide dynamic range, finite
        lim = min(60, int(math.log2(fi.max)) - 2)
        expo = torch.randint(-lim, lim + 1, (numel,), generator=g).to(f64)
        v = torch.randn(numel, generator=g, dtype=f64) * torch.exp2(expo)
    elif dist == "near_max":  # max itself, a few ulps below it, or anywhere in [max/2, max]
        ulp_max = 2.0 ** (math.floor(math.log2(fi.max)) - p + 1)
        steps = torch.randint(0, 16, (numel,), generator=g).to(f64)
        top = fi.max - steps * ulp_max  # exact: multiples of ulp(max) below max
        spread = fi.max * (0.5 + 0.5 * torch.rand(numel, generator=g, dtype=f64))
        v = torch.where(torch.rand(numel, generator=g) < 0.5, top, spread) * _signs(numel, g)
    elif dist == "sqrt_max":  # sqrt(max) * 2^[-1.5, 1.5]: a product of two is max * 2^[-3, 3]
        expo = torch.rand(numel, generator=g, dtype=f64) * 3 - 1.5
        v = math.sqrt(fi.max) * torch.exp2(expo) * _signs(numel, g)
    elif dist == "subnormal":  # every subnormal bit pattern equally likely, both signs
        pattern = torch.randint(1, 2 ** (p - 1), (numel,), generator=g)
        v = pattern.to(f64) * (fi.tiny * 2.0 ** -(p - 1)) * _signs(numel, g)  # exact: k * min_subnormal
    elif dist == "dyadic":  # m * 2^e with |m| < 2^(p//2 + 1): products have ~p+2 bits -> ties
        half = p // 2 + 1
        m = torch.randint(-(2**half), 2**half + 1, (numel,), generator=g).to(f64)
        top = min(p, int(math.log2(fi.max)) - half - 1)
        expo = torch.randint(-p, top + 1, (numel,), generator=g).to(f64)
        v = m * torch.exp2(expo)
    elif dist == "overflow_edge":  # factors from pairs whose products sit at the overflow threshold
        pool = _overflow_factors(dtype)
        v = pool[torch.randint(0, len(pool), (numel,), generator=g)] * _signs(numel, g)
    elif dist == "tie_edge":  # factors whose products sit next to a rounding tie, and small pushes
        pool = _tie_factors(dtype)
        v = pool[torch.randint(0, len(pool), (numel,), generator=g)] * _signs(numel, g)
    elif dist == "mixed":  # each element from a random one of the others: every pairing of regimes
        others = [d for d in DISTRIBUTIONS if d != "mixed"]
        pick = torch.randint(0, len(others), (1, numel), generator=g)
        seeds = torch.randint(0, 2**31 - 1, (len(others),), generator=g).tolist()
        pool = torch.stack([_values(d, sd, numel, dtype) for d, sd in zip(others, seeds)])
        return pool.gather(0, pick)[0]
    else:
        raise ValueError(f"unknown distribution {dist!r}; expected one of {DISTRIBUTIONS}")
    return v.to(dtype)


@functools.lru_cache(maxsize=None)
def _overflow_factors(dtype: torch.dtype) -> Tensor:
    """Values x and y with x*y within a few ulps of max, and small pushes c in (0, ulp(max)]:
    ``c + x*y`` then crosses the overflow threshold max + ulp(max)/2 where ``c + round(x*y)``
    may not (and the reverse). Sixteen x spread over [sqrt(max)/2, 2 sqrt(max)], each with the
    five dtype values nearest max/x; eight multiples of ulp(max)/8. Two independent tensors
    drawn from this pool pair such factors with probability ~1/70."""
    fi = torch.finfo(dtype)
    xs = (math.sqrt(fi.max) * torch.exp2(torch.arange(16, dtype=torch.float64) / 8 - 1)).to(dtype)
    out = [xs]
    for x in xs:
        y = torch.tensor(fi.max / float(x), dtype=torch.float64).to(dtype)
        for k in (-2, -1, 0, 1, 2):
            out.append(_step(y, k).reshape(1))
    ulp_max = 2.0 ** (math.floor(math.log2(fi.max)) - _SIG_BITS[dtype] + 1)
    out.append((ulp_max / 8 * torch.arange(1, 9, dtype=torch.float64)).to(dtype))
    return torch.cat(out).to(torch.float64)


@functools.lru_cache(maxsize=None)
def _tie_factors(dtype: torch.dtype) -> Tensor:
    """Factors a, b and pushes c for which ``c + a*b`` lies within a float32 ulp of the point
    halfway between two dtype values while ``a*b`` itself does not: rounding it once, twice
    (float32, then the dtype) or the product first all differ -- the double-rounding cases.

    float16 (products have 22 bits): four pairs with ``a*b = m - D`` for a tie m in
    [2^13, 2^14) and D = 0.21875, pushes ``D - u/4`` and ``D - 3u/4`` (u = float32's ulp
    there), as in 39.5625 * 384.5 + 0.2185. Other dtypes cannot hold such a push (bfloat16) or
    have no float32 step below them: products exactly on a tie and a few short pushes."""
    p = _SIG_BITS[dtype]
    if dtype == torch.float16:
        grid = torch.arange(2**10, dtype=torch.float64)
        a = 32 + grid / 32  # float16 values in [32, 64)
        b = 256 + grid / 4  # and in [256, 512)
        prod = a[:, None] * b[None, :]  # exact (22 bits)
        in_binade = (prod >= 2**13) & (prod < 2**14)
        hit = in_binade & (torch.remainder(prod, 8.0) == 4 - 0.21875)  # 8 = ulp there, 4 = half
        ia, ib = hit.nonzero(as_tuple=True)
        pick = torch.linspace(0, len(ia) - 1, 4).round().long()
        u = 2.0**-10
        pushes = torch.tensor([0.21875 - u / 4, 0.21875 - 3 * u / 4], dtype=torch.float64)
        return torch.cat([a[ia[pick]], b[ib[pick]], pushes])
    half = p // 2 + 1  # short significands: their products land on ties
    m = 2.0**half + torch.arange(min(256, 2**half), dtype=torch.float64)
    prod = m[:, None] * m[None, :]
    expo = torch.floor(torch.log2(prod))
    tie = torch.remainder(prod / torch.exp2(expo - p), 2.0) == 1
    ia, ib = tie.nonzero(as_tuple=True)
    if not len(ia):  # float64: such products are not exact in float64 itself; short dyadics instead
        return _values("dyadic", 0, 18, dtype).to(torch.float64)
    pick = torch.linspace(0, len(ia) - 1, 8).round().long()
    pushes = torch.tensor([2.0**-p, 3 * 2.0 ** -(p + 1)], dtype=torch.float64) * 2 ** (2 * half)
    return torch.cat([m[ia[pick]], m[ib[pick]], pushes]).to(dtype).to(torch.float64)


def _step(x: Tensor, k: int) -> Tensor:
    """``x`` moved ``k`` representable values (towards +inf for k > 0)."""
    target = torch.tensor(math.inf if k > 0 else -math.inf, dtype=x.dtype)
    for _ in range(abs(k)):
        x = torch.nextafter(x, target)
    return x


def _signs(numel: int, g: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (numel,), generator=g).to(torch.float64) * 2 - 1


def _resolve(draw, value, default: SearchStrategy):
    if value is None:
        return draw(default)
    if isinstance(value, SearchStrategy):
        return draw(value)
    return value


@st.composite
def tensors(
    draw,
    shape: Sequence[int] | SearchStrategy | None = None,
    dtype: torch.dtype | SearchStrategy | None = None,
    special: bool = True,
    *,
    device: str | torch.device = "cpu",
    distributions: Sequence[str] = DISTRIBUTIONS,
    max_specials: int = 8,
) -> Tensor:
    """A contiguous tensor of ``shape`` (default: drawn from :func:`shapes`) and ``dtype``
    (default: :func:`float_dtypes`); either may also be a strategy.

    Values: a distribution drawn from ``distributions`` (see :data:`DISTRIBUTIONS`) filled from a
    drawn seed, then, when ``special``, up to ``max_specials`` drawn positions overwritten with
    drawn :data:`SPECIAL_NAMES` (inf, -inf, nan, -0.0, subnormals, +-max, ...). With
    ``special=False`` every value is finite (but "near_max" reaches max and "sqrt_max"
    products straddle it, so one add or multiply may overflow)."""
    shape = tuple(_resolve(draw, shape, shapes()))
    dtype = _resolve(draw, dtype, float_dtypes())
    if not dtype.is_floating_point:
        raise ValueError(f"tensors() makes floating tensors, got {dtype}")
    numel = math.prod(shape)
    dist = draw(st.sampled_from(tuple(distributions)))
    seed = draw(st.integers(0, 2**32 - 1))
    flat = _values(dist, seed, numel, dtype)
    if special and numel and max_specials:
        specials = special_values(dtype)
        splices = draw(
            st.lists(
                st.tuples(st.integers(0, numel - 1), st.sampled_from(SPECIAL_NAMES)),
                max_size=min(max_specials, numel),
            )
        )
        for pos, name in splices:
            flat[pos] = specials[name]
    return flat.reshape(shape).to(device)


# --------------------------------------------------------------------------- layouts

LAYOUTS = ("contiguous", "transposed", "sliced", "offset", "expanded")


def layouts(*, include_expanded: bool = True) -> SearchStrategy[str]:
    """Layout names (see :func:`relayout`); shrinks towards ``"contiguous"``."""
    return st.sampled_from(LAYOUTS if include_expanded else LAYOUTS[:-1])


def _constant_dims(t: Tensor) -> list[int]:
    """Dims of size > 1 along which every slice has the same bits (NaNs of any payload equal)."""
    out = []
    if t.numel() == 0:
        return out
    bits = t.contiguous().view(_INT_VIEW[t.element_size()]) if t.is_floating_point() else t
    nan = t.isnan() if t.is_floating_point() else torch.zeros_like(t, dtype=torch.bool)
    bits = torch.where(nan, torch.zeros_like(bits), bits)
    for d in range(t.dim()):
        if t.shape[d] > 1 and bool((bits == bits.narrow(d, 0, 1)).all()):
            out.append(d)
    return out


def relayout(t: Tensor, layout: str, *, fill: float = 12345.0) -> Tensor:
    """The same values as ``t`` in a different memory layout (a new tensor; ``t`` is untouched).

    * ``"contiguous"``: a contiguous copy.
    * ``"transposed"``: a copy stored with the dimension order reversed, viewed back (non-contiguous
      when two or more dims are larger than 1).
    * ``"sliced"``: a view with step 2 along the innermost dim of size > 1 of a buffer whose
      skipped elements hold ``fill`` (a kernel that ignores strides reads visible garbage).
    * ``"offset"``: contiguous strides but storage offset 1 (misaligned for vector loads).
    * ``"expanded"``: stride 0 along every dim where the values are constant (a broadcast view);
      raises ValueError when there is no such dim (use :func:`strided_tensors` to *make*
      broadcast inputs).
    """
    src = t.detach()
    if layout == "contiguous":
        return src.contiguous().clone()
    if layout == "transposed":
        perm = list(reversed(range(src.dim())))
        return src.permute(perm).contiguous().permute(perm)  # reversal is its own inverse
    if layout == "sliced":
        if src.dim() == 0:
            return src.clone()
        big = [d for d in range(src.dim()) if src.shape[d] > 1]
        d = big[-1] if big else src.dim() - 1
        buf_shape = list(src.shape)
        buf_shape[d] *= 2
        buf = torch.full(buf_shape, fill, dtype=src.dtype, device=src.device)
        view = buf[(slice(None),) * d + (slice(None, None, 2),)]
        view.copy_(src)
        return view
    if layout == "offset":
        buf = torch.full((src.numel() + 1,), fill, dtype=src.dtype, device=src.device)
        view = buf[1:].view(src.shape)
        view.copy_(src)
        return view
    if layout == "expanded":
        dims = _constant_dims(src)
        if not dims:
            raise ValueError(f"relayout(expanded): values of shape {tuple(src.shape)} are not constant along any dim")
        small = src
        for d in dims:
            small = small.narrow(d, 0, 1)
        return small.contiguous().clone().expand(src.shape)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


@st.composite
def strided_tensors(
    draw,
    shape: Sequence[int] | SearchStrategy | None = None,
    dtype: torch.dtype | SearchStrategy | None = None,
    special: bool = True,
    *,
    layouts: Sequence[str] = LAYOUTS,
    device: str | torch.device = "cpu",
    distributions: Sequence[str] = DISTRIBUTIONS,
) -> Tensor:
    """A tensor of exactly ``shape`` in a drawn layout from ``layouts``.

    For ``"expanded"`` a smaller tensor (a drawn non-empty subset of the dims of size > 1 set to 1)
    is drawn and ``.expand``-ed to ``shape`` (stride 0); when no dim is larger than 1 the result is
    contiguous. Other layouts: :func:`tensors` then :func:`relayout`. Use ``relayout`` on the result
    (``relayout(x, "contiguous")``) to get the same values contiguously for a reference run."""
    shape = tuple(_resolve(draw, shape, shapes()))
    dtype = _resolve(draw, dtype, float_dtypes())
    layout = draw(st.sampled_from(tuple(layouts)))
    if layout == "expanded":
        big = [d for d, s in enumerate(shape) if s > 1]
        if not big:
            return draw(tensors(shape, dtype, special, device=device, distributions=distributions))
        keep = draw(st.lists(st.sampled_from(big), min_size=1, max_size=len(big), unique=True))
        small_shape = tuple(1 if d in keep else s for d, s in enumerate(shape))
        small = draw(tensors(small_shape, dtype, special, device=device, distributions=distributions))
        return small.expand(shape)
    base = draw(tensors(shape, dtype, special, device=device, distributions=distributions))
    return relayout(base, layout)


# --------------------------------------------------------------------------- broadcasting


@st.composite
def broadcastable_shapes(
    draw,
    shape: Sequence[int],
    *,
    allow_expand: bool = False,
    max_side: int = 8,
    max_dims: int = 4,
) -> tuple:
    """A shape that broadcasts against ``shape``.

    Default: broadcasting it with ``shape`` gives exactly ``shape`` (leading dims may be dropped,
    any side may be 1), i.e. an operand a rewrite of an op producing ``shape`` may see.
    ``allow_expand=True``: it may also be larger where ``shape`` has 1 and have extra leading dims
    (up to ``max_dims`` in total), so the broadcast result may be larger than ``shape``.
    Shrinks towards ``shape`` itself."""
    shape = tuple(shape)
    drop = draw(st.integers(0, len(shape)))
    kept = shape[drop:]
    out = []
    for side in kept:
        if side == 1:
            opts = [st.just(1)]
            if allow_expand and max_side > 1:
                opts.append(st.integers(2, max_side))
            out.append(draw(st.one_of(*opts)))
        else:
            out.append(draw(st.one_of(st.just(side), st.just(1))))
    if allow_expand and drop == 0 and len(shape) < max_dims:
        extra = draw(st.lists(_side(1, max_side), max_size=max_dims - len(shape)))
        out = list(extra) + out
    return tuple(out)
