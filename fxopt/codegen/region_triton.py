"""Triton emitter for regions (:mod:`fxopt.codegen.region`): one kernel per specialisation.

Glossary: ``r`` rows (all leading dims of the outputs, collapsed), ``n`` columns (the last dim).
A program owns ``BLOCK_M`` rows and, in a region with row reductions, all ``BLOCK_N >= n``
columns of them (masked when ``n`` is not a power of two), so a row reduction is a register
reduction inside the program and every output is written once; a purely pointwise region
tiles the columns too (``BLOCK_N <= 1024``, grid ``(row blocks, column tiles)``). Per operand the kernel gets its row strides over the collapsed row
dims and its column stride, so broadcast (stride 0) and non-contiguous operands are read in
place; a width-1 operand is one value per row.

Column parts (``emission="parts"``, the default; FXOPT_REGION_EMIT). Where a region moves
along the row (``slice``/``cat``) and a program covers all columns of its rows, each output is
split at every column where a ``cat`` changes parts (followed through slices and pointwise ops:
:func:`column_breaks`) and each contiguous part is computed and stored as its own tile
``[BLOCK_M, next_pow2(part width)]`` at a constant column offset: inside one part every ``cat``
is one of its operands (no select) and every load is a dense, constant-offset read of only the
columns that part needs, memoised per (value, offset, width) so each input column range is
loaded once. ``emission="rows"`` is the earlier scheme (every value over the whole ``BLOCK_N``
row, slices as loads at shifted offsets, cats as ``tl.where`` over all parts), kept so the two
can be timed side by side; both compute the same statements in the same order (bit-equal).

Numerics (what makes the kernel match eager):

* values live in registers in the op-math type (fp32; fp64 for fp64) and are rounded to the
  declared dtype after every statement, exactly where eager's kernels round;
* add/sub/mul are single IEEE operations, ``div`` and ``sqrt`` the correctly rounded ones
  (``div_rn``/``sqrt_rn``; Triton's ``/`` and ``tl.sqrt`` are approximate), ``neg`` a multiply
  by -1 (exact, keeps -0.0), casts round to nearest even (bf16 by bit manipulation);
* the kernel is compiled without floating-point contraction (``enable_fp_fusion=False``), so
  no ``a*b+c`` becomes an fma behind our back; where ATen's CUDA kernel *is* contracted by nvcc
  (GELU-tanh's ``x + k*x^3``) the emitter writes the fma explicitly;
* transcendentals call libdevice (``__nv_expf`` ...) without flush-to-zero
  (``enable_reflect_ftz=False``) - the functions nvcc compiles ATen's ``expf``/``tanhf``/
  ``erff``/``rsqrtf`` to - with ATen's CUDA formulas for sigmoid, silu and gelu (fp32
  op-math, one rounding at the end);
* reductions accumulate in fp32 (fp64 for fp64); ``mean`` multiplies by ``1/n`` like ATen's
  CUDA mean; ``var`` and ``layer_norm`` use two passes over the registers (mean, then the
  squared deviations) with power-of-two rescaling where the sums could overflow, so they
  overflow only where the true result does (eager's Welford does the same in one pass).

Under ``TRITON_INTERPRET=1`` the same kernel runs with the libdevice calls replaced by
:mod:`fxopt.codegen.region_interp` (float64 numpy, rounded once).
"""
from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import torch

from ..errors import CodegenError
from .elementwise import TRITON_BF16_HELPERS
from .region import OPS, Region, Spec

MAX_BLOCK_N = 16384
MAX_TILE_N = 1024  # column tile of regions without row reductions
VEC0 = ("v", 0)  # position of a value: the whole row, lane c holding column c
EMISSIONS = ("parts", "rows")
# <cmath>'s constants, as the doubles ATen's GELU kernels start from
_M_SQRT2 = float("1.41421356237309504880")
_M_2_SQRTPI = float("1.12837916709551257390")
_M_SQRT1_2 = float("0.70710678118654752440")


def _opmath(dt: torch.dtype) -> torch.dtype:
    return torch.float64 if dt == torch.float64 else torch.float32


_TL = {torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16", torch.float32: "tl.float32",
       torch.float64: "tl.float64"}


def _f32(v: float) -> float:
    """``v`` rounded to fp32 (round to nearest even), as a Python float."""
    if math.isnan(v) or math.isinf(v):
        return v
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


def _lit(v: float) -> str:
    if math.isnan(v):
        return "float('nan')"
    if math.isinf(v):
        return "float('inf')" if v > 0 else "float('-inf')"
    return repr(float(v))


@dataclass(frozen=True)
class KernelConfig:
    """Launch shape of one specialisation (the emitted source does not depend on it): the
    grid is ``(cdiv(rows, block_m), col_blocks)``."""

    block_m: int
    block_n: int
    num_warps: int
    i64: bool
    col_blocks: int = 1


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def tiles_columns(region: Region) -> bool:
    """Regions without row reductions need not see a whole row: their programs tile the
    columns too (blocks of at most :data:`MAX_TILE_N`), so wide rows (the MLP's 4d) keep a
    small register footprint."""
    return all(OPS[s.op].kind not in ("reduce", "row") for s in region.stmts)


def kernel_config(spec: Spec, interpret: bool = False) -> KernelConfig:
    block_n = _next_pow2(spec.max_width)
    col_blocks = 1
    if tiles_columns(spec.region) and block_n > MAX_TILE_N:
        block_n = MAX_TILE_N
        col_blocks = -(-spec.max_width // block_n)
    if block_n > MAX_BLOCK_N:
        raise CodegenError(f"region rows of {spec.max_width} columns exceed the kernel's limit {MAX_BLOCK_N}")
    target = 1024 if interpret else 2048
    block_m = max(1, min(target // block_n, _next_pow2(spec.rows)))
    elems = block_m * block_n
    num_warps = 4 if elems <= 2048 else (8 if elems <= 4096 else 16)
    extent = 0
    for op in (*spec.inputs, *spec.outputs):
        rs_max = max((abs(s) for s in op.row_strides), default=0)
        span = sum(abs(s) * (n - 1) for s, n in zip(op.row_strides, spec.row_sizes))
        span += abs(op.col_stride) * (block_n + spec.max_width) + rs_max * block_m
        extent = max(extent, span)
    i64 = max(extent, spec.rows + block_m) >= 2**31 - 1
    return KernelConfig(block_m, block_n, num_warps, i64, col_blocks)


def resolve_emission(emission: str | None) -> str:
    """``emission`` or, when None, FXOPT_REGION_EMIT (the process snapshot)."""
    if emission is None:
        from .. import config

        emission = config.region_emit_raw()
    if emission not in EMISSIONS:
        raise CodegenError(f"unknown region emission {emission!r}; use one of {', '.join(EMISSIONS)}")
    return emission


def uses_parts(spec: Spec, emission: str | None = None) -> bool:
    """Whether the kernel is emitted per column part (see the module docstring): asked for, the
    region moves along rows (a slice or cat; without one the two emissions are the same code),
    and one program covers every column of its rows (no column tiles)."""
    if resolve_emission(emission) != "parts":
        return False
    if not any(OPS[s.op].kind == "view" for s in spec.region.stmts):
        return False
    return not tiles_columns(spec.region) or _next_pow2(spec.max_width) <= MAX_TILE_N


def static_key(spec: Spec, emission: str | None = None) -> tuple:
    """What the emitted source depends on (besides the region): widths, per operand whether
    it is one value per row, has unit column stride, and which row strides are zero, and
    whether it is emitted per column part."""
    ops = []
    for op in (*spec.inputs, *spec.outputs):
        ops.append((op.width == 1, op.col_stride == 1, tuple(s == 0 for s in op.row_strides)))
    widths = tuple(sorted(spec.widths.items()))
    return (spec.region.text, widths, tuple(ops), len(spec.row_sizes), uses_parts(spec, emission))


def kernel_name(spec: Spec, emission: str | None = None) -> str:
    h = hashlib.sha256(repr(static_key(spec, emission)).encode()).hexdigest()[:10]
    return f"fxopt_region_{spec.region.short_hash()}_{h}"


def column_breaks(region: Region, widths: dict, name: str, lo: int, hi: int) -> set[int]:
    """Columns ``c`` with ``lo < c < hi`` of value ``name`` where some ``cat`` it is computed from
    switches from one operand to the next (followed through slices, pointwise ops and
    LayerNorm's operands; width-1 operands and row reductions are one value per row and
    break nothing). Between two consecutive breaks every cat is a single operand."""
    if hi - lo <= 1 or widths[name] == 1 or name[0] == "x":
        return set()
    s = region.stmt(name)
    kind = OPS[s.op].kind
    if kind == "reduce":
        return set()
    if s.op == "slice":
        st = int(s.param("start"))
        return {c - st for c in column_breaks(region, widths, s.args[0], lo + st, hi + st)}
    if s.op == "cat":
        out, off = set(), 0
        for p in s.args:
            wp = widths[p]
            a, b = max(lo, off), min(hi, off + wp)
            if a < b:
                out |= {c + off for c in column_breaks(region, widths, p, a - off, b - off)}
            if lo < off < hi:
                out.add(off)
            off += wp
        return out
    out = set()
    for a in s.operands:
        if widths[a] != 1:
            out |= column_breaks(region, widths, a, lo, hi)
    return out


class _Emitter:
    def __init__(self, spec: Spec, interpret: bool, emission: str | None = None):
        self.spec = spec
        self.region: Region = spec.region
        self.interpret = interpret
        self.emission = resolve_emission(emission)
        self.parts = uses_parts(spec, self.emission)
        self.lanes_of: dict[int, str] = {}
        self.lines: list[str] = []
        self.memo: dict[tuple[str, int], str] = {}
        self.n = 0
        self.colmasks: dict[int, str] = {}
        self.mom: dict = {}
        self.rstd: dict = {}
        self.uses_bf16 = any(d == torch.bfloat16 for d in spec.region.inputs) or any(
            s.dtype == torch.bfloat16 for s in spec.region.stmts)

    # -- helpers --------------------------------------------------------------------
    def w(self, line: str) -> None:
        self.lines.append("    " + line)

    def tmp(self, prefix: str = "v") -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def width(self, name: str) -> int:
        return self.spec.widths[name]

    def dtype(self, name: str) -> torch.dtype:
        return self.region.dtype_of(name)

    def const(self, v: float, om: torch.dtype) -> str:
        v = float(v)
        if om == torch.float32:
            v = _f32(v)
        return f"tl.full([1, 1], {_lit(v)}, {_TL[om]})"

    def colmask(self, w: int) -> str:
        if w not in self.colmasks:
            name = f"cm{w}"
            self.w(f"{name} = cols < {w}")
            self.colmasks[w] = name
        return self.colmasks[w]

    def lanes(self, t: int) -> str:
        """``[1, t]`` lane indices of a part tile (``t`` a power of two)."""
        if t not in self.lanes_of:
            name = f"ln{t}"
            self.w(f"{name} = tl.arange(0, {t})[None, :]")
            self.lanes_of[t] = name
        return self.lanes_of[t]

    def widen(self, var: str, src: torch.dtype, om: torch.dtype) -> str:
        """A value held in opmath(src) as opmath ``om``."""
        if _opmath(src) == om:
            return var
        return f"{var}.to({_TL[om]})"

    def round_to(self, expr: str, om: torch.dtype, dt: torch.dtype) -> str:
        """``expr`` (in op-math ``om``) rounded to storage ``dt``, held in opmath(dt)."""
        if dt == torch.float16:
            return f"({expr}).to(tl.float16).to(tl.float32)"
        if dt == torch.bfloat16:
            if om == torch.float64:
                raise CodegenError("region: a cast from fp64 to bf16 is not generated (double rounding)")
            return f"_bf16_to_f32(_f32_to_bf16_rne({expr}))"
        if dt == torch.float32 and om == torch.float64:
            return f"({expr}).to(tl.float32)"
        return expr

    # -- values -----------------------------------------------------------------------
    def value(self, name: str, pos: tuple = VEC0) -> str:
        """Variable holding value ``name`` at position ``pos``: ``("v", s)`` a vector whose lane
        c holds column c + s, ``("c", k)`` one register per row holding column k,
        ``("p", a, t, n)`` a part tile of ``t`` lanes whose lane c < n holds column a + c (lanes
        from n on are padding, never stored). A width-1 value is always its column 0 (one
        register per row, broadcast along the row)."""
        if self.width(name) == 1:
            pos = ("c", 0)
        key = (name, pos)
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        if name[0] == "x":
            var = self.load(int(name[1:]), pos)
        else:
            var = self.stmt(int(name[1:]), pos)
        self.memo[key] = var
        return var

    def load(self, i: int, pos: tuple) -> str:
        op = self.spec.inputs[i]
        dt = op.dtype
        mode, n = pos[:2]
        per_row = any(s != 0 for s in op.row_strides)  # else the same values for every row
        base = f"x{i}_ptr + xo{i}" if per_row else f"x{i}_ptr + tl.zeros([1, 1], tl.int32)"
        rmask = "rmask" if per_row else None
        if op.width != 1 and mode == "p":
            _, a, t, nv = pos
            if a < 0 or a + nv > op.width:  # pragma: no cover - parts lie inside their values
                raise CodegenError(f"region: part [{a}, {a + nv}) outside input x{i} of width {op.width}")
            var = self.tmp(f"x{i}_")
            ln = self.lanes(t)
            c = ln if a == 0 else f"({ln} + {a})"
            addr = c if op.col_stride == 1 else f"{c} * x{i}_cs"
            cmask = f"({ln} < {nv})" if nv < t else None
            masks = [m for m in (rmask, cmask) if m]
            mask = f", mask={' & '.join(masks)}, other=0.0" if masks else ""
            self.w(f"{var} = tl.load({base} + {addr}{mask})")
        elif op.width == 1 or mode == "c":
            col = 0 if op.width == 1 else n
            if not 0 <= col < op.width:  # a column this input does not have: never selected
                return self.const(0.0, _opmath(dt))
            var = self.tmp(f"x{i}_")
            off = "" if col == 0 else (f" + {col}" if op.col_stride == 1 else f" + {col} * x{i}_cs")
            mask = f", mask={rmask}, other=0.0" if rmask else ""
            self.w(f"{var} = tl.load({base}{off}{mask})")
        else:
            var = self.tmp(f"x{i}_")
            c = "cols" if n == 0 else f"(cols + {n})"
            addr = c if op.col_stride == 1 else f"{c} * x{i}_cs"
            mask = f"({c} < {op.width})"
            if n < 0:
                mask += f" & ({c} >= 0)"
            if per_row:
                self.w(f"{var} = tl.load(x{i}_ptr + xo{i} + {addr}, mask=rmask & {mask}, other=0.0)")
            else:
                self.w(f"{var} = tl.load(x{i}_ptr + {addr}, mask={mask}, other=0.0)")
        if dt == torch.bfloat16:
            self.w(f"{var} = _bf16_to_f32({var})")
        elif dt == torch.float16:
            self.w(f"{var} = {var}.to(tl.float32)")
        return var

    def full(self, var: str) -> str:
        return f"tl.broadcast_to({var}, [BLOCK_M, BLOCK_N])"

    def stmt(self, k: int, pos: tuple) -> str:
        s = self.region.stmts[k]
        dt = s.dtype
        om = _opmath(dt)
        od = OPS[s.op]
        if od.kind == "view":
            return self.view(k, pos)

        def arg(a) -> str:
            if isinstance(a, str):
                return self.widen(self.value(a, pos), self.dtype(a), om)
            return self.const(a, om)

        var = self.tmp("t")
        if s.op in ("add", "sub", "mul"):
            sym = {"add": "+", "sub": "-", "mul": "*"}[s.op]
            expr = f"{arg(s.args[0])} {sym} {arg(s.args[1])}"
        elif s.op == "div":
            expr = f"_div({arg(s.args[0])}, {arg(s.args[1])})"
        elif s.op == "neg":
            expr = f"{arg(s.args[0])} * {self.const(-1.0, om)}"
        elif s.op == "to":
            src = s.args[0]
            x = self.value(src, pos)
            if _opmath(self.dtype(src)) == torch.float64 and dt != torch.float64:
                # straight from fp64 to the target (one rounding, as eager's cast)
                if dt == torch.bfloat16:
                    raise CodegenError("region: a cast from fp64 to bf16 is not generated (double rounding)")
                expr = f"{x}.to({_TL[dt]}).to(tl.float32)" if dt == torch.float16 else f"{x}.to(tl.float32)"
                self.w(f"{var} = {expr}")
                return var
            expr = self.widen(x, self.dtype(src), om)
        elif s.op == "sqrt":
            expr = f"_sqrt({arg(s.args[0])})"
        elif s.op == "pow":
            x = arg(s.args[0])
            expr = f"{x} * {x}" if float(s.param("exponent")) == 2.0 else f"_sqrt({x})"
        elif s.op in ("exp", "tanh", "erf", "rsqrt"):
            expr = f"_{s.op}({arg(s.args[0])})"
        elif s.op in ("sigmoid", "silu"):
            x = arg(s.args[0])
            one = self.const(1.0, om)
            den = f"({one} + _exp({x} * {self.const(-1.0, om)}))"
            expr = f"_div({one if s.op == 'sigmoid' else x}, {den})"
        elif s.op == "gelu":
            x = arg(s.args[0])
            xv = self.tmp("g")
            self.w(f"{xv} = {x}")
            one, half = self.const(1.0, om), self.const(0.5, om)
            if s.param("approximate") == "tanh":
                # ATen: kBeta * (x + kKappa * x^3), nvcc contracts the inner sum into an fma
                beta = _M_SQRT2 * _M_2_SQRTPI * 0.5  # in double, as the C++ constexpr
                cube = self.tmp("g")
                self.w(f"{cube} = ({xv} * {xv}) * {xv}")
                inner = f"{self.const(beta, om)} * _fma({self.const(0.044715, om)}, {cube}, {xv})"
                expr = f"({half} * {xv}) * ({one} + _tanh({inner}))"
            else:
                expr = f"({xv} * {half}) * ({one} + _erf({xv} * {self.const(_M_SQRT1_2, om)}))"
        elif s.op in ("sum", "mean"):
            a = s.args[0]
            wa = self.width(a)
            x = self.widen(self.value(a, VEC0), self.dtype(a), om)
            red = self.tmp("s")
            self.w(f"{red} = tl.sum(tl.where({self.colmask(wa)}, {self.full(x)}, 0.0), axis=1)[:, None] + 0.0")
            expr = red if s.op == "sum" else f"{red} * {self.const(1.0 / wa, om)}"
        elif s.op == "var":
            a = s.args[0]
            _, m2s, sc2 = self.moments(a, om)
            denom = max(0, self.width(a) - int(s.param("correction")))
            inv = f"_div({self.const(1.0, om)}, {sc2})"  # a power of two: exact
            expr = f"_div({m2s}, {self.const(float(denom), om)}) * {inv} * {inv}"
        elif s.op == "layer_norm":
            a = s.args[0]
            key = (a, s.param("eps"))
            if key not in self.rstd:
                mean, m2s, sc2 = self.moments(a, om)
                # normalise in the rescaled domain: (x - mean) * rsqrt(var + eps) equals
                # ((x - mean) * sc2) * rsqrt(var * sc2^2 + eps * sc2^2), which stays finite when
                # only the variance would overflow (sc2 = 1: the plain formula, bit for bit)
                rstd = self.tmp("rstd")
                eps = self.const(s.param("eps"), om)
                self.w(f"{rstd} = _rsqrt(_div({m2s}, {self.const(float(self.width(a)), om)}) + {eps} * {sc2} * {sc2})")
                self.rstd[key] = (mean, sc2, rstd)
            mean, sc2, rstd = self.rstd[key]
            # (x - mean) * rstd * w + b, in ATen's CUDA order; at a column offset the deviation
            # is recomputed from the operand at that offset
            x = self.widen(self.value(a, pos), self.dtype(a), om)
            y = f"(({x} - {mean}) * {sc2}) * {rstd}"
            if s.args[1] is not None:
                y = f"({y}) * {arg(s.args[1])}"
            if len(s.args) > 2 and s.args[2] is not None:
                y = f"({y}) + {arg(s.args[2])}"
            expr = y
        else:  # pragma: no cover - OPS and the emitter agree (tested)
            raise CodegenError(f"region op {s.op} has no Triton emission")
        self.w(f"{var} = {self.round_to(expr, om, dt)}")
        return var

    def moments(self, a: str, om: torch.dtype):
        """(mean, rescaled sum of squared deviations ``sum((d * sc2)^2)``, ``sc2``) of value ``a`` over
        its columns: two passes over the registers, with power-of-two rescaling (exact) where
        a sum could overflow although the result would not. Memoised per operand."""
        key = (a, om)
        if key in self.mom:
            return self.mom[key]
        x = self.widen(self.value(a, VEC0), self.dtype(a), om)
        w = self.width(a)
        emax = 128 if om == torch.float32 else 1024
        k1 = max(0, (w - 1).bit_length())  # 2**k1 >= w
        h = (k1 + 1) // 2
        # sum(x): |x| <= t1 keeps w*|x| < 2**emax; above, scale by 2**-k1 first
        t1, s1 = 2.0 ** (emax - 1 - k1), 2.0 ** -k1
        # sum(d*d): |d| <= t2 keeps w*d*d < 2**emax; above, scale d by s2 first
        t2, s2 = 2.0 ** (emax // 2 - 1 - h), 2.0 ** -(emax // 2 + 2 + h)
        cm = self.colmask(w)
        xm, amax, big, mean, d, dmax, big2, sc2, m2 = (self.tmp(p) for p in (
            "xm", "amax", "big", "mean", "d", "dmax", "big2", "sc2", "m2s"))
        c = lambda v: self.const(v, om)  # noqa: E731
        self.w(f"{xm} = tl.where({cm}, {self.full(x)}, 0.0)")
        self.w(f"{amax} = tl.max(tl.abs({xm}), axis=1)[:, None]")
        self.w(f"{big} = {amax} > {c(t1)}")
        self.w(f"{mean} = _div(tl.sum({xm} * tl.where({big}, {c(s1)}, {c(1.0)}), axis=1)[:, None], {c(float(w))})"
               f" * tl.where({big}, {c(1.0 / s1)}, {c(1.0)})")
        self.w(f"{d} = tl.where({cm}, {xm} - {mean}, 0.0)")
        self.w(f"{dmax} = tl.max(tl.abs({d}), axis=1)[:, None]")
        self.w(f"{big2} = {dmax} > {c(t2)}")
        self.w(f"{sc2} = tl.where({big2}, {c(s2)}, {c(1.0)})")
        self.w(f"{m2} = tl.sum(({d} * {sc2}) * ({d} * {sc2}), axis=1)[:, None]")
        self.mom[key] = (mean, m2, sc2)
        return self.mom[key]

    def view(self, k: int, pos: tuple) -> str:
        s = self.region.stmts[k]
        mode, n = pos[:2]
        if s.op == "slice":
            return self.value(s.args[0], (mode, n + int(s.param("start")), *pos[2:]))
        parts, offsets, off = list(s.args), [], 0
        for p in parts:
            offsets.append(off)
            off += self.width(p)
        om = _opmath(s.dtype)

        def part(p, o):
            v = self.widen(self.value(p, (mode, n - o, *pos[2:])), self.dtype(p), om)
            return v if self.dtype(p) == s.dtype else self.round_to(v, om, s.dtype)

        if mode == "p":  # a part tile lies inside one operand (column_breaks cut there)
            nv = pos[3]
            for p, o in zip(parts, offsets):
                if o <= n and n + nv <= o + self.width(p):
                    return part(p, o)
            raise CodegenError(f"region: part [{n}, {n + nv}) of t{k} spans cat operands")  # pragma: no cover

        if mode == "c":  # one column: the part that holds it
            for p, o in zip(parts, offsets):
                if o <= n < o + self.width(p):
                    return part(p, o)
            return self.const(0.0, om)  # outside the concatenation: never selected
        # lane c holds column c + n of the concatenation
        vals = [part(p, o) for p, o in zip(parts, offsets)]
        var = self.tmp("cat")
        c = "cols" if n == 0 else f"(cols + {n})"
        expr = vals[-1]
        for v, o in zip(reversed(vals[:-1]), reversed(offsets[1:])):
            expr = f"tl.where({c} < {o}, {v}, {expr})"
        self.w(f"{var} = {expr}")
        return var

    # -- the kernel -----------------------------------------------------------------
    def emit(self) -> tuple[str, str]:
        spec = self.spec
        region = self.region
        nd = len(spec.row_sizes)
        name = kernel_name(spec, self.emission)
        params = [f"x{i}_ptr" for i in range(region.n_inputs)] + [f"o{j}_ptr" for j in range(region.n_outputs)]
        params += ["R"] + [f"sz_{d}" for d in range(1, nd)]
        for prefix, ops in (("x", spec.inputs), ("o", spec.outputs)):
            for i, op in enumerate(ops):
                params += [f"{prefix}{i}_rs_{d}" for d in range(nd) if op.row_strides[d] != 0]
                if op.width != 1 and op.col_stride != 1:
                    params.append(f"{prefix}{i}_cs")
        params += ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr", "I64: tl.constexpr"]
        w = self.w
        w("pid = tl.program_id(0)")
        tiled = tiles_columns(region)
        w("if I64:")
        w("    rows = (pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64))[:, None]")
        if tiled:
            w("    cols = (tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64))[None, :]")
        else:
            w("    cols = tl.arange(0, BLOCK_N).to(tl.int64)[None, :]")
        w("else:")
        w("    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]")
        if tiled:
            w("    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]")
        else:
            w("    cols = tl.arange(0, BLOCK_N)[None, :]")
        w("rmask = rows < R")
        if nd == 1:
            w("i0 = rows")
        else:
            w("rem = rows")
            for d in range(nd - 1, 0, -1):
                w(f"i{d} = rem % sz_{d}")
                w(f"rem = rem // sz_{d}")
            w("i0 = rem")
        for prefix, ops in (("x", spec.inputs), ("o", spec.outputs)):
            for i, op in enumerate(ops):
                terms = [f"i{d} * {prefix}{i}_rs_{d}" for d in range(nd) if op.row_strides[d] != 0]
                if terms:
                    w(f"{prefix}o{i} = {' + '.join(terms)}")
                elif prefix == "o":  # a single row (every row stride dropped): row 0
                    w(f"oo{i} = rows * 0")
        for j, (oname, op) in enumerate(zip(region.outputs, spec.outputs)):
            dt = op.dtype

            def stored(v):
                if dt == torch.bfloat16:
                    return f"_f32_to_bf16_rne({v})"
                if dt == torch.float16:
                    return f"{v}.to(tl.float16)"
                if dt == torch.float32 and _opmath(self.dtype(oname)) != torch.float32:
                    return f"{v}.to(tl.float32)"
                return v

            if self.parts and op.width != 1:
                # one dense store per contiguous part (see column_breaks)
                cuts = sorted(column_breaks(region, spec.widths, oname, 0, op.width))
                for a, b in zip([0, *cuts], [*cuts, op.width]):
                    t = _next_pow2(b - a)
                    sv = stored(self.value(oname, ("p", a, t, b - a)))
                    ln = self.lanes(t)
                    c = ln if a == 0 else f"({ln} + {a})"
                    addr = c if op.col_stride == 1 else f"{c} * o{j}_cs"
                    mask = "rmask" + (f" & ({ln} < {b - a})" if b - a < t else "")
                    w(f"tl.store(o{j}_ptr + oo{j} + {addr}, tl.broadcast_to({sv}, [BLOCK_M, {t}]), mask={mask})")
                continue
            sv = stored(self.value(oname, VEC0))
            if op.width == 1:
                # one value per row: written by the first column tile only
                first = " & (tl.program_id(1) == 0)" if tiled else ""
                w(f"tl.store(o{j}_ptr + oo{j}, {sv}, mask=rmask{first})")
            else:
                addr = "cols" if op.col_stride == 1 else f"cols * o{j}_cs"
                w(f"tl.store(o{j}_ptr + oo{j} + {addr}, {self.full(sv)}, mask=rmask & ({self.colmask(op.width)}))")
        head = [
            "# generated by fxopt.codegen.region_triton - do not edit",
            *[f"# {line}" for line in region.describe().splitlines()],
            f"# widths: {', '.join(f'{k}={v}' for k, v in sorted(spec.widths.items(), key=lambda kv: (kv[0][0], int(kv[0][1:]))))}",
            "import triton",
            "import triton.language as tl",
        ]
        if self.interpret:
            head.append("from fxopt.codegen.region_interp import exp as _exp, tanh as _tanh, erf as _erf, "
                        "rsqrt as _rsqrt, sqrt as _sqrt, div as _div, fma as _fma")
        else:
            head.append("from triton.language.extra import libdevice")
            for fn, lib in (("_exp", "exp"), ("_tanh", "tanh"), ("_erf", "erf"), ("_rsqrt", "rsqrt"),
                            ("_sqrt", "sqrt_rn"), ("_div", "div_rn"), ("_fma", "fma")):
                nargs = {"_div": 2, "_fma": 3}.get(fn, 1)
                a = ", ".join("abc"[:nargs])
                head += ["", "", "@triton.jit", f"def {fn}({a}):", f"    return libdevice.{lib}({a})"]
        if self.uses_bf16:
            head.extend(TRITON_BF16_HELPERS)
        head += ["", "", "@triton.jit", f"def {name}({', '.join(params)}):"]
        return name, "\n".join(head + self.lines) + "\n"


def emit_triton(spec: Spec, interpret: bool = False, emission: str | None = None) -> tuple[str, str]:
    """``(kernel_name, source)`` of the Triton kernel for this specialisation (``emission``:
    "parts" or "rows", None: FXOPT_REGION_EMIT; see the module docstring).

    Signature: ``(x0_ptr.., o0_ptr.., R, sz_1..sz_{D-1}, per operand its non-zero row strides
    and (when not 1) its column stride, BLOCK_M, BLOCK_N, I64)``; launch it on
    ``(cdiv(R, BLOCK_M),)`` with ``enable_fp_fusion=False, enable_reflect_ftz=False``."""
    return _Emitter(spec, interpret, emission).emit()


def scalar_args(spec: Spec) -> list[int]:
    """The runtime integer arguments, in signature order (after the pointers)."""
    nd = len(spec.row_sizes)
    out = [spec.rows] + [spec.row_sizes[d] for d in range(1, nd)]
    for ops in (spec.inputs, spec.outputs):
        for op in ops:
            out += [op.row_strides[d] for d in range(nd) if op.row_strides[d] != 0]
            if op.width != 1 and op.col_stride != 1:
                out.append(op.col_stride)
    return out
