"""Region IR: a DAG of pointwise ops plus row reductions over the last dim, as one fused kernel.

A *region* is what a fusion rule hands to code generation: the ops of a connected piece of an
ATen graph (a residual add and the LayerNorms that read it, an RMSNorm spelled out as
``pow/mean/add/rsqrt/mul``, a bias add and a GELU, the rotary embedding's slice/neg/cat/mul/add
chain) written as a tiny SSA program. Its text form is the only description of the computation
(it is the ``str`` argument of ``fxopt::fused_region`` in rewritten graphs)::

    x0:f16,x1:f16,x2:f16,x3:f16,x4:f16|t0=add(x0,x1):f16;t1=add(t0,x2):f16;
        t2=layer_norm(t1,x3,x4,eps=1e-05):f16->t1,t2

(one line; wrapped here). ``xI`` are the inputs with their storage dtypes, ``tK`` the statements
in order, each ONE ATen op whose result has the declared dtype, and after ``->`` the outputs.

Iteration space (glossary: ``r`` rows, ``n`` columns). Every value is a tensor whose last dim is
its *width*; all leading dims together are the rows. The outputs share one row shape (the
iteration space); inputs broadcast against it like eager tensors (stride 0) and are read in
place whatever their strides. Row ops (``sum``, ``mean``, ``var``, ``layer_norm``) reduce over the
last dim; ``slice``/``cat`` move along it. Nothing crosses rows, so one program per row (or per
block of rows) computes everything.

Rounding points are the statements: each statement is evaluated like the one eager kernel it
stands for (operands widened to the op-math type - fp32, or fp64 for fp64 - computed, rounded
once to the declared dtype). :meth:`Region.evaluate` *is* the reference: it calls exactly those
ATen ops in order, so on the CPU it is bit-equal to the unfused graph by construction, and its
output layouts (sizes, strides, dtypes) are eager's.

Op set (:data:`OPS`), by numerics class (:func:`Region.numerics`):

* exact - the same correctly rounded IEEE operation on every device: ``add sub mul`` (tensor or
  Python-number operands), ``div`` (two tensors), ``neg``, ``to`` (casts between f16/bf16/f32/f64),
  ``pow`` by 2 (``x*x``), the views ``slice``/``cat`` on the last dim;
* transcendental - ``exp tanh erf rsqrt sigmoid silu gelu(approximate=none|tanh)``, and ``sqrt``
  / ``pow`` by 0.5: eager's CPU and CUDA kernels use different libm code (CPU eager's fp32/fp64
  ``sqrt`` is not even correctly rounded; CUDA's is), so these are within an ulp, not bitwise;
* row reductions - ``sum mean var(correction) layer_norm(x, w|none, b|none, eps)``: summation
  order is the kernel's, so these hold an ``fp64_relative`` contract.

Division by a Python number is refused on purpose: eager's CUDA kernel multiplies by the
reciprocal, its CPU kernel divides, so no single kernel matches both.

Build regions with :class:`RegionBuilder` (or :func:`region_from_nodes` from ATen FX nodes,
which is what a fusion rule calls); :func:`parse_region` / :meth:`Region.text` round-trip.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Sequence

import torch

from ..errors import CodegenError

DTYPE_CODES: dict[str, torch.dtype] = {
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f32": torch.float32,
    "f64": torch.float64,
}
CODE_OF: dict[torch.dtype, str] = {v: k for k, v in DTYPE_CODES.items()}


@dataclass(frozen=True)
class OpDef:
    """One op of the IR: ``kind`` says how it moves over the iteration space, ``numerics``
    which contract class it belongs to, ``params`` its keyword parameters
    ``name -> (type, allowed values or None)``."""

    name: str
    kind: str  # "pointwise" | "reduce" | "row" | "view"
    numerics: str  # "exact" | "transcendental" | "reduction" | "view"
    n_args: tuple[int, int]  # min, max positional operands (max -1: any number)
    scalar_ok: bool = False  # an operand may be a Python number
    optional_ok: bool = False  # an operand after the first may be absent ("none")
    params: dict = field(default_factory=dict)


def _op(name, kind, numerics, n_args, **kw) -> OpDef:
    return OpDef(name, kind, numerics, n_args, **kw)


OPS: dict[str, OpDef] = {
    o.name: o
    for o in (
        _op("add", "pointwise", "exact", (2, 2), scalar_ok=True),
        _op("sub", "pointwise", "exact", (2, 2), scalar_ok=True),
        _op("mul", "pointwise", "exact", (2, 2), scalar_ok=True),
        _op("div", "pointwise", "exact", (2, 2)),
        _op("neg", "pointwise", "exact", (1, 1)),
        _op("to", "pointwise", "exact", (1, 1)),
        _op("sqrt", "pointwise", "transcendental", (1, 1)),
        _op("pow", "pointwise", "exact", (1, 1), params={"exponent": ((int, float), (2, 0.5))}),
        _op("exp", "pointwise", "transcendental", (1, 1)),
        _op("tanh", "pointwise", "transcendental", (1, 1)),
        _op("erf", "pointwise", "transcendental", (1, 1)),
        _op("rsqrt", "pointwise", "transcendental", (1, 1)),
        _op("sigmoid", "pointwise", "transcendental", (1, 1)),
        _op("silu", "pointwise", "transcendental", (1, 1)),
        _op("gelu", "pointwise", "transcendental", (1, 1), params={"approximate": (str, ("none", "tanh"))}),
        _op("sum", "reduce", "reduction", (1, 1)),
        _op("mean", "reduce", "reduction", (1, 1)),
        _op("var", "reduce", "reduction", (1, 1), params={"correction": (int, None)}),
        _op("layer_norm", "row", "reduction", (1, 3), optional_ok=True, params={"eps": (float, None)}),
        _op("slice", "view", "view", (1, 1), params={"start": (int, None), "stop": (int, None)}),
        _op("cat", "view", "view", (2, -1)),
    )
}

Arg = Any  # "x3" | "t1" (value names), a float (Python number), or None (absent optional operand)


@dataclass(frozen=True)
class Stmt:
    """``t{k} = op(*args, **params) : dtype`` - one eager op, rounded once to ``dtype``."""

    op: str
    args: tuple
    params: tuple  # sorted ((name, value), ...)
    dtype: torch.dtype

    def param(self, name: str, default=None):
        for k, v in self.params:
            if k == name:
                return v
        return default

    @property
    def operands(self) -> tuple[str, ...]:
        """The value names this statement reads."""
        return tuple(a for a in self.args if isinstance(a, str))


def _fmt_num(v) -> str:
    if isinstance(v, bool):
        raise CodegenError(f"region: booleans are not operands ({v!r})")
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


def _fmt_arg(a) -> str:
    if a is None:
        return "none"
    if isinstance(a, str):
        return a
    return _fmt_num(a)


def stmt_numerics(s: Stmt) -> str:
    """The numerics class of one statement (``pow`` by 0.5 is a square root)."""
    if s.op == "pow" and float(s.param("exponent")) == 0.5:
        return "transcendental"
    return OPS[s.op].numerics


def format_stmt(k: int, s: Stmt) -> str:
    parts = [_fmt_arg(a) for a in s.args]
    parts += [f"{name}={v if isinstance(v, str) else _fmt_num(v)}" for name, v in s.params]
    return f"t{k}={s.op}({','.join(parts)}):{CODE_OF[s.dtype]}"


def format_region(inputs: Sequence[torch.dtype], stmts: Sequence[Stmt], outputs: Sequence[str]) -> str:
    """The canonical text of a region (inverse of :func:`parse_region`)."""
    ins = ",".join(f"x{i}:{CODE_OF[d]}" for i, d in enumerate(inputs))
    body = ";".join(format_stmt(k, s) for k, s in enumerate(stmts))
    return f"{ins}|{body}->{','.join(outputs)}"


@dataclass(frozen=True)
class Region:
    """A parsed, validated region. Build with :func:`parse_region` or :class:`RegionBuilder`."""

    text: str
    inputs: tuple[torch.dtype, ...]
    stmts: tuple[Stmt, ...]
    outputs: tuple[str, ...]

    @property
    def n_inputs(self) -> int:
        return len(self.inputs)

    @property
    def n_outputs(self) -> int:
        return len(self.outputs)

    def short_hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]

    def stmt(self, name: str) -> Stmt:
        return self.stmts[int(name[1:])]

    def dtype_of(self, name: str) -> torch.dtype:
        return self.inputs[int(name[1:])] if name[0] == "x" else self.stmt(name).dtype

    # -- numerics ------------------------------------------------------------------
    def numerics(self) -> str:
        """``"exact"`` (every statement an exact op or a view: bit-equal to eager on every
        device), ``"transcendental"`` (some transcendental, no reduction) or ``"reduction"``."""
        classes = {stmt_numerics(s) for s in self.stmts}
        if "reduction" in classes:
            return "reduction"
        if "transcendental" in classes:
            return "transcendental"
        return "exact"

    # -- reference semantics --------------------------------------------------------
    def evaluate(self, xs: Sequence[torch.Tensor], *, all_values: bool = False):
        """Evaluate with the eager ATen ops, in statement order: the reference.

        Returns the outputs (fresh tensors: an output that would alias an input is
        cloned), or with ``all_values`` the dict of every value by name. Works on any
        device and on meta / fake tensors (then it yields eager's output layouts)."""
        if len(xs) != self.n_inputs:
            raise CodegenError(f"region takes {self.n_inputs} inputs, got {len(xs)}: {self.text}")
        env: dict[str, torch.Tensor] = {}
        for i, (x, dt) in enumerate(zip(xs, self.inputs)):
            if not isinstance(x, torch.Tensor):
                raise CodegenError(f"region input x{i} is a {type(x).__name__}, not a tensor")
            if x.dtype != dt:
                raise CodegenError(
                    f"region input x{i} is {x.dtype}, the region declares {dt}: {self.text}")
            env[f"x{i}"] = x
        for k, s in enumerate(self.stmts):
            args = [env[a] if isinstance(a, str) else a for a in s.args]
            out = _EVAL[s.op](s, *args)
            if out.dtype != s.dtype:
                raise CodegenError(
                    f"region statement {format_stmt(k, s)}: eager computes {out.dtype}, the region "
                    f"declares {s.dtype} (fix the declared dtype or add a 'to')")
            env[f"t{k}"] = out
        if all_values:
            return env
        outs = [env[o] for o in self.outputs]
        return [o.clone() if any(_same_storage(o, x) for x in xs) else o for o in outs]

    def in_fp64(self) -> "Region":
        """The same computation with every dtype float64 (casts become identities): the
        "exact" evaluation that ``fp64_relative`` contracts measure errors against."""
        stmts = tuple(Stmt(s.op, s.args, s.params, torch.float64) for s in self.stmts)
        return _build((torch.float64,) * self.n_inputs, stmts, self.outputs)

    def describe(self) -> str:
        """One statement per line (for comments in generated kernels and inspection)."""
        lines = [f"inputs: {', '.join(f'x{i}:{CODE_OF[d]}' for i, d in enumerate(self.inputs))}"]
        lines += [format_stmt(k, s) for k, s in enumerate(self.stmts)]
        lines.append(f"outputs: {', '.join(self.outputs)}")
        return "\n".join(lines)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    # outputs are never views (slices are refused as outputs); the only way an output can
    # alias an input is a statement that returns its operand itself (a same-dtype ``to``)
    return a is b or (a._base is not None and (a._base is b or a._base is b._base))


# ----------------------------------------------------------------------------------
# the reference: one eager ATen op per statement
# ----------------------------------------------------------------------------------
def _binary(fn, rfn):
    def ev(s, a, b):
        if isinstance(a, torch.Tensor):
            return fn(a, b)
        if not isinstance(b, torch.Tensor):
            raise CodegenError(f"region {s.op}: at least one operand must be a tensor")
        return rfn(b, a)

    return ev


def _ev_div(s, a, b):
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise CodegenError(
            "region div by a Python number is not fused: eager's CUDA kernel multiplies by the "
            "reciprocal while its CPU kernel divides; keep it out of the region or write mul")
    return torch.div(a, b)


def _reduce_dtype(s, a):
    return None if s.dtype == a.dtype else s.dtype


def _ev_layer_norm(s, x, w=None, b=None):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, s.param("eps"))


def _ev_slice(s, a):
    if a.dim() == 0:
        raise CodegenError("region slice of a 0-dim value")
    return a[..., s.param("start"):s.param("stop")]


_EVAL = {
    "add": _binary(torch.add, lambda t, c: torch.add(t, c)),
    "sub": _binary(torch.sub, lambda t, c: torch.rsub(t, c)),
    "mul": _binary(torch.mul, lambda t, c: torch.mul(t, c)),
    "div": _ev_div,
    "neg": lambda s, a: torch.neg(a),
    "to": lambda s, a: a.to(s.dtype),
    "sqrt": lambda s, a: torch.sqrt(a),
    "pow": lambda s, a: torch.pow(a, s.param("exponent")),
    "exp": lambda s, a: torch.exp(a),
    "tanh": lambda s, a: torch.tanh(a),
    "erf": lambda s, a: torch.erf(a),
    "rsqrt": lambda s, a: torch.rsqrt(a),
    "sigmoid": lambda s, a: torch.sigmoid(a),
    "silu": lambda s, a: torch.nn.functional.silu(a),
    "gelu": lambda s, a: torch.nn.functional.gelu(a, approximate=s.param("approximate")),
    "sum": lambda s, a: torch.sum(a, dim=-1, keepdim=True, dtype=_reduce_dtype(s, a)),
    "mean": lambda s, a: torch.mean(a, dim=-1, keepdim=True, dtype=_reduce_dtype(s, a)),
    "var": lambda s, a: torch.var(a, dim=-1, correction=s.param("correction"), keepdim=True),
    "layer_norm": _ev_layer_norm,
    "slice": _ev_slice,
    "cat": lambda s, *vs: torch.cat(list(vs), dim=-1),
}
assert set(_EVAL) == set(OPS)


# ----------------------------------------------------------------------------------
# parsing and validation
# ----------------------------------------------------------------------------------
_STMT_RE = re.compile(r"^t(\d+)=([a-z_]+)\((.*)\):([a-z0-9]+)$")
_INT_RE = re.compile(r"^-?\d+$")
_NAME_RE = re.compile(r"^[xt]\d+$")


def _parse_num(text: str, where: str):
    if _INT_RE.match(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        raise CodegenError(f"region {where}: cannot read {text!r} as a value name or a number") from None


def _check_stmt(k: int, s: Stmt, defined: set[str], n_inputs: int, where: str) -> None:
    od = OPS.get(s.op)
    if od is None:
        raise CodegenError(f"region {where}: unknown op {s.op!r} (known: {', '.join(sorted(OPS))})")
    lo, hi = od.n_args
    if len(s.args) < lo or (hi >= 0 and len(s.args) > hi):
        raise CodegenError(f"region {where}: {s.op} takes {lo}..{'any' if hi < 0 else hi} operands, got {len(s.args)}")
    for i, a in enumerate(s.args):
        if a is None:
            if not (od.optional_ok and i > 0):
                raise CodegenError(f"region {where}: operand {i} of {s.op} cannot be absent")
        elif isinstance(a, str):
            if not _NAME_RE.match(a):
                raise CodegenError(f"region {where}: bad value name {a!r}")
            if a[0] == "x" and int(a[1:]) >= n_inputs:
                raise CodegenError(f"region {where}: {a} is not a declared input (there are {n_inputs})")
            if a[0] == "t" and a not in defined:
                raise CodegenError(f"region {where}: t{k} uses {a} before it is defined")
        elif isinstance(a, (int, float)) and not isinstance(a, bool):
            if not od.scalar_ok:
                raise CodegenError(f"region {where}: {s.op} takes no Python-number operands")
        else:
            raise CodegenError(f"region {where}: operand {a!r} of {s.op} is not a value name or number")
    if not any(isinstance(a, str) for a in s.args):
        raise CodegenError(f"region {where}: {s.op} needs at least one tensor operand")
    if not isinstance(s.args[0], str) and s.op not in ("add", "sub", "mul"):
        raise CodegenError(f"region {where}: the first operand of {s.op} must be a tensor")
    given = dict(s.params)
    for name in given:
        if name not in od.params:
            raise CodegenError(f"region {where}: {s.op} has no parameter {name!r}")
    for name, (typ, allowed) in od.params.items():
        if name not in given:
            raise CodegenError(f"region {where}: {s.op} needs parameter {name}=")
        v = given[name]
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, typ) or isinstance(v, bool):
            raise CodegenError(f"region {where}: {s.op} parameter {name}={v!r} has the wrong type")
        if allowed is not None and v not in allowed:
            raise CodegenError(f"region {where}: {s.op} parameter {name}={v!r} not supported (allowed: {allowed})")
    if s.dtype not in CODE_OF:
        raise CodegenError(f"region {where}: dtype {s.dtype} not supported")


def _build(inputs, stmts, outputs) -> Region:
    inputs, stmts, outputs = tuple(inputs), tuple(stmts), tuple(outputs)
    if not stmts:
        raise CodegenError("region has no statements")
    defined: set[str] = set()
    for k, s in enumerate(stmts):
        _check_stmt(k, s, defined, len(inputs), f"statement t{k}")
        defined.add(f"t{k}")
    if not outputs:
        raise CodegenError("region names no outputs")
    for o in outputs:
        if o not in defined:
            raise CodegenError(f"region output {o!r} is not a defined statement")
        if stmts[int(o[1:])].op == "slice":
            raise CodegenError(
                f"region output {o} is a slice (a view in eager): a fused op returns fresh tensors, "
                f"so leave the view outside the region")
    if len(set(outputs)) != len(outputs):
        raise CodegenError(f"region names an output twice: {outputs}")
    used = {a for s in stmts for a in s.operands if a[0] == "x"}
    missing = [f"x{i}" for i in range(len(inputs)) if f"x{i}" not in used]
    if missing:
        raise CodegenError(f"region inputs {missing} are never used")
    return Region(format_region(inputs, stmts, outputs), inputs, stmts, outputs)


@lru_cache(maxsize=4096)
def parse_region(text: str) -> Region:
    """Parse and validate a region text (cached: the op calls this on every call)."""
    if "|" not in text or "->" not in text:
        raise CodegenError(f"region text {text!r} needs 'inputs|statements->outputs'")
    ins_text, rest = text.split("|", 1)
    body, outs_text = rest.rsplit("->", 1)
    inputs = []
    for i, part in enumerate(p for p in ins_text.split(",") if p):
        m = re.fullmatch(r"x(\d+):([a-z0-9]+)", part.strip())
        if m is None or int(m.group(1)) != i or m.group(2) not in DTYPE_CODES:
            raise CodegenError(f"region text: input declaration {part!r} should be x{i}:<f16|bf16|f32|f64>")
        inputs.append(DTYPE_CODES[m.group(2)])
    stmts = []
    for k, raw in enumerate(p for p in body.split(";") if p):
        m = _STMT_RE.match(raw.strip())
        if m is None:
            raise CodegenError(f"region text: cannot parse statement {raw!r} (expected tK=op(args):dtype)")
        if int(m.group(1)) != k:
            raise CodegenError(f"region text: statement {k} defines t{m.group(1)}, expected t{k}")
        if m.group(4) not in DTYPE_CODES:
            raise CodegenError(f"region text: statement t{k} has unknown dtype {m.group(4)!r}")
        args, params = [], []
        for tok in (t.strip() for t in m.group(3).split(",") if t.strip()):
            if "=" in tok:
                name, val = tok.split("=", 1)
                typ = OPS[m.group(2)].params.get(name, (None,))[0] if m.group(2) in OPS else None
                params.append((name, val if typ is str else _parse_num(val, f"statement t{k}")))
            elif tok == "none":
                args.append(None)
            elif _NAME_RE.match(tok):
                args.append(tok)
            else:
                args.append(float(_parse_num(tok, f"statement t{k}")))
        stmts.append(Stmt(m.group(2), tuple(args), tuple(sorted(params)), DTYPE_CODES[m.group(4)]))
    outputs = [o.strip() for o in outs_text.split(",") if o.strip()]
    region = _build(inputs, stmts, outputs)
    return region


# ----------------------------------------------------------------------------------
# builder
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Value:
    """A value of a :class:`RegionBuilder`: an input ``xI`` or a statement ``tK``."""

    name: str
    dtype: torch.dtype
    owner: int = field(compare=False, repr=False)


def _promote(*dts: torch.dtype) -> torch.dtype:
    out = dts[0]
    for d in dts[1:]:
        out = torch.promote_types(out, d)
    return out


class RegionBuilder:
    """Builds a region op by op, with eager's dtype rules and common-subexpression sharing::

        b = RegionBuilder()
        mlp, attn, h, w, bias = (b.input(torch.float16) for _ in range(5))
        s = b.add(b.add(mlp, attn), h)
        b.output(s, b.layer_norm(s, w, bias, eps=1e-5))
        region = b.build()            # region.text is the op's argument

    Every method mirrors the ATen op of the same name; ``dtype`` defaults to what eager's
    type promotion gives. Python numbers are accepted where eager takes a Scalar."""

    def __init__(self):
        self._inputs: list[torch.dtype] = []
        self._stmts: list[Stmt] = []
        self._outputs: list[str] = []
        self._memo: dict[Stmt, Value] = {}

    # values
    def input(self, dtype: torch.dtype) -> Value:
        if dtype not in CODE_OF:
            raise CodegenError(f"region input dtype {dtype} not supported (f16, bf16, f32, f64)")
        self._inputs.append(dtype)
        return Value(f"x{len(self._inputs) - 1}", dtype, id(self))

    def _arg(self, a):
        if isinstance(a, Value):
            if a.owner != id(self):
                raise CodegenError(f"value {a.name} belongs to another RegionBuilder")
            return a.name
        if a is None or (isinstance(a, (int, float)) and not isinstance(a, bool)):
            return a if a is None else float(a)
        raise CodegenError(f"region operand {a!r} is not a Value or a Python number")

    def op(self, name: str, *args, dtype: torch.dtype | None = None, **params) -> Value:
        """Append ``name(*args, **params)``; ``dtype`` defaults to eager's result dtype."""
        od = OPS.get(name)
        if od is None:
            raise CodegenError(f"unknown region op {name!r} (known: {', '.join(sorted(OPS))})")
        if dtype is None:
            tens = [a.dtype for a in args if isinstance(a, Value)]
            if not tens:
                raise CodegenError(f"region {name} needs at least one tensor operand")
            if name == "layer_norm":
                dtype = args[0].dtype
            else:
                dtype = _promote(*tens)
        if "eps" in params:
            params["eps"] = float(params["eps"])
        s = Stmt(name, tuple(self._arg(a) for a in args), tuple(sorted(params.items())), dtype)
        hit = self._memo.get(s)
        if hit is not None:
            return hit
        _check_stmt(len(self._stmts), s, {f"t{k}" for k in range(len(self._stmts))}, len(self._inputs),
                    f"statement t{len(self._stmts)}")
        self._stmts.append(s)
        v = Value(f"t{len(self._stmts) - 1}", dtype, id(self))
        self._memo[s] = v
        return v

    def add(self, a, b): return self.op("add", a, b)  # noqa: E704
    def sub(self, a, b): return self.op("sub", a, b)  # noqa: E704
    def mul(self, a, b): return self.op("mul", a, b)  # noqa: E704
    def div(self, a, b): return self.op("div", a, b)  # noqa: E704
    def neg(self, a): return self.op("neg", a)  # noqa: E704
    def exp(self, a): return self.op("exp", a)  # noqa: E704
    def tanh(self, a): return self.op("tanh", a)  # noqa: E704
    def erf(self, a): return self.op("erf", a)  # noqa: E704
    def sqrt(self, a): return self.op("sqrt", a)  # noqa: E704
    def rsqrt(self, a): return self.op("rsqrt", a)  # noqa: E704
    def sigmoid(self, a): return self.op("sigmoid", a)  # noqa: E704
    def silu(self, a): return self.op("silu", a)  # noqa: E704

    def to(self, a: Value, dtype: torch.dtype) -> Value:
        return self.op("to", a, dtype=dtype)

    def pow(self, a: Value, exponent) -> Value:
        return self.op("pow", a, exponent=exponent)

    def gelu(self, a: Value, approximate: str = "none") -> Value:
        return self.op("gelu", a, approximate=approximate)

    def sum(self, a: Value, dtype: torch.dtype | None = None) -> Value:
        return self.op("sum", a, dtype=dtype or a.dtype)

    def mean(self, a: Value, dtype: torch.dtype | None = None) -> Value:
        return self.op("mean", a, dtype=dtype or a.dtype)

    def var(self, a: Value, correction: int = 1) -> Value:
        return self.op("var", a, correction=int(correction))

    def layer_norm(self, x: Value, weight: Value | None = None, bias: Value | None = None, eps: float = 1e-5) -> Value:
        return self.op("layer_norm", x, weight, bias, eps=eps)

    def slice(self, a: Value, start: int, stop: int) -> Value:
        return self.op("slice", a, start=int(start), stop=int(stop))

    def cat(self, *vs: Value) -> Value:
        return self.op("cat", *vs)

    def output(self, *vs: Value) -> None:
        for v in vs:
            if not isinstance(v, Value) or v.owner != id(self):
                raise CodegenError(f"region output {v!r} is not a value of this builder")
            if v.name[0] == "x":
                raise CodegenError(f"region output {v.name} is an input: a fused op returns computed values only")
            self._outputs.append(v.name)

    def build(self) -> Region:
        """The region of the outputs: statements no output depends on are dropped."""
        live: set[str] = set(self._outputs)
        for k in range(len(self._stmts) - 1, -1, -1):
            if f"t{k}" in live:
                live.update(self._stmts[k].operands)
        rename, stmts = {}, []
        for k, s in enumerate(self._stmts):
            if f"t{k}" in live:
                rename[f"t{k}"] = f"t{len(stmts)}"
                args = tuple(rename.get(a, a) if isinstance(a, str) else a for a in s.args)
                stmts.append(Stmt(s.op, args, s.params, s.dtype))
        region = _build(self._inputs, stmts, [rename.get(o, o) for o in self._outputs])
        return parse_region(region.text)  # the canonical, cached instance


# ----------------------------------------------------------------------------------
# specialisation: widths, rows and strides of one call
# ----------------------------------------------------------------------------------
MAX_LEAD_DIMS = 4


@dataclass(frozen=True)
class Operand:
    """How the kernel addresses one input or output: ``width`` its last-dim size (1 = one
    value per row, broadcast along the row), ``row_strides`` over the collapsed row dims,
    ``col_stride`` along the last dim (elements; irrelevant for width 1)."""

    dtype: torch.dtype
    width: int
    row_strides: tuple[int, ...]
    col_stride: int


@dataclass(frozen=True)
class Spec:
    """One call's specialisation of a region: everything the emitter and the launcher need.

    ``rows`` = product of ``row_sizes`` (the collapsed leading dims of the outputs);
    ``widths`` maps every value name to its width; ``out_shapes`` / ``out_strides`` are eager's
    output layouts (the kernel writes them in place)."""

    region: Region
    rows: int
    row_sizes: tuple[int, ...]
    widths: dict
    inputs: tuple[Operand, ...]
    outputs: tuple[Operand, ...]
    out_shapes: tuple[tuple[int, ...], ...]
    out_strides: tuple[tuple[int, ...], ...]

    @property
    def max_width(self) -> int:
        return max(self.widths.values())


def _widens_exactly(src: torch.dtype, dst: torch.dtype) -> bool:
    """Every ``src`` value is a ``dst`` value."""
    return src == dst or dst == torch.float64 or (dst == torch.float32 and src in (torch.float16, torch.bfloat16))


def _meta_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(tuple(x.shape), tuple(x.stride()), dtype=x.dtype, device="meta")


def output_layouts(region: Region, xs: Sequence[torch.Tensor]):
    """``[(shape, stride, dtype)]`` of the outputs eager would produce for ``xs``."""
    outs = region.evaluate([_meta_like(x) for x in xs])
    return [(tuple(o.shape), tuple(o.stride()), o.dtype) for o in outs]


def plan(region: Region, xs: Sequence[torch.Tensor]) -> tuple[list, Spec | None, str]:
    """``(output layouts, Spec or None, reason)``: None (with the reason) when the generated
    kernel cannot take this call and the caller should evaluate the reference instead."""
    metas = [_meta_like(x) for x in xs]
    env = region.evaluate(metas, all_values=True)
    outs = [env[o] for o in region.outputs]
    layouts = [(tuple(o.shape), tuple(o.stride()), o.dtype) for o in outs]
    if any(o.dim() == 0 for o in outs):
        return layouts, None, "a 0-dim output"
    lead = tuple(outs[0].shape[:-1])
    if any(tuple(o.shape[:-1]) != lead for o in outs):
        return layouts, None, "outputs with different row shapes"
    for k, s in enumerate(region.stmts):
        if s.op in ("add", "sub", "mul", "div") and any(
                not _widens_exactly(region.dtype_of(a), s.dtype) for a in s.operands):
            # only a 0-dim operand can be wider than the result (eager's promotion); CPU eager
            # uses its value as is, CUDA eager rounds it to the result dtype first
            return layouts, None, f"statement t{k} has a 0-dim operand wider than its result"
    widths = {n: (int(v.shape[-1]) if v.dim() else 1) for n, v in env.items()}
    rows = math.prod(lead)
    if rows == 0 or any(w == 0 for w in widths.values()):
        return layouts, None, "an empty tensor"
    nd = len(lead)
    per_op_strides: list[list[int]] = []
    operands: list[tuple[torch.dtype, int, int]] = []
    for x in xs:
        shape, stride = (tuple(x.shape), tuple(x.stride())) if x.dim() else ((1,), (0,))
        lead_shape, lead_stride = shape[:-1], stride[:-1]
        if len(lead_shape) > nd:
            return layouts, None, "an input with more row dims than the outputs"
        pad = nd - len(lead_shape)
        rs = [0] * nd
        for d, (sz, st) in enumerate(zip(lead_shape, lead_stride)):
            if sz != 1:
                if sz != lead[pad + d]:
                    return layouts, None, "an input whose rows do not broadcast to the outputs'"
                rs[pad + d] = st
        w = shape[-1]
        per_op_strides.append(rs)
        operands.append((x.dtype, w, stride[-1] if w != 1 else 0))
    for o, (shape, stride, dt) in zip(outs, layouts):
        per_op_strides.append(list(stride[:-1]))
        operands.append((dt, shape[-1], stride[-1] if shape[-1] != 1 else 0))
    # drop size-1 row dims, then merge a dim into the next inner one where every operand is
    # contiguous across the pair
    dims = [d for d in range(nd) if lead[d] != 1]
    sizes = [lead[d] for d in dims]
    strides = [[st[d] for d in dims] for st in per_op_strides]
    i = len(sizes) - 2
    while i >= 0:
        if all(st[i] == st[i + 1] * sizes[i + 1] for st in strides):
            sizes[i + 1] *= sizes[i]
            del sizes[i]
            for st in strides:
                del st[i]
        i -= 1
    if not sizes:
        sizes, strides = [1], [[0] for _ in strides]
    if len(sizes) > MAX_LEAD_DIMS:
        return layouts, None, f"more than {MAX_LEAD_DIMS} row dims after collapsing"
    ops = [Operand(dt, w, tuple(st), cs) for (dt, w, cs), st in zip(operands, strides)]
    nin = len(xs)
    spec = Spec(region, rows, tuple(sizes), widths, tuple(ops[:nin]), tuple(ops[nin:]),
                tuple(l[0] for l in layouts), tuple(l[1] for l in layouts))
    return layouts, spec, ""


# ----------------------------------------------------------------------------------
# from ATen FX nodes (what a fusion rule calls)
# ----------------------------------------------------------------------------------
def _aten_table():
    aten = torch.ops.aten
    prims = torch.ops.prims
    return {
        aten.add.Tensor: "add", aten.add.Scalar: "add",
        aten.sub.Tensor: "sub", aten.sub.Scalar: "sub", aten.rsub.Scalar: "rsub",
        aten.mul.Tensor: "mul", aten.mul.Scalar: "mul",
        aten.div.Tensor: "div",
        aten.neg.default: "neg", aten.exp.default: "exp", aten.tanh.default: "tanh",
        aten.erf.default: "erf", aten.sqrt.default: "sqrt", aten.rsqrt.default: "rsqrt",
        aten.sigmoid.default: "sigmoid", aten.silu.default: "silu", aten.gelu.default: "gelu",
        aten.pow.Tensor_Scalar: "pow",
        aten.to.dtype: "to", aten._to_copy.default: "to", prims.convert_element_type.default: "to",
        aten.clone.default: "identity", aten.alias.default: "identity", aten.dropout.default: "dropout",
        aten.sum.dim_IntList: "sum", aten.mean.dim: "mean", aten.var.correction: "var",
        aten.layer_norm.default: "layer_norm",
        aten.slice.Tensor: "slice", aten.cat.default: "cat",
    }


_ATEN: dict | None = None


def _last_dim(dim, ndim: int, what: str) -> None:
    d = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    if isinstance(d, (list, tuple)) or not isinstance(d, int) or (d != -1 and d != ndim - 1):
        raise CodegenError(f"{what} is not over the last dim only (dim={dim!r})")


def region_from_nodes(nodes: Iterable[torch.fx.Node], outputs: Sequence[torch.fx.Node]):
    """Translate a connected set of ATen nodes into a region.

    ``nodes``: the nodes the fused op replaces (any order); ``outputs``: those of them whose
    values the rest of the graph reads, in the order the op will return them. Returns
    ``(region, input_nodes_or_literals)`` - call ``fused_region(inputs, region.text)`` and
    replace ``outputs[i]`` by item ``i``. Raises :class:`CodegenError` naming the node that
    the IR cannot express (an op outside :data:`OPS`, a reduction over another dim, a
    non-unit slice step, a node used outside the region that is not an output, an input
    computed from the region itself, ...): a rule should decline the match then.

    ``clone``/``alias``/``dropout`` in eval mode and same-dtype ``to`` are identities here;
    ``layer_norm`` must normalise the last dim only."""
    global _ATEN
    if _ATEN is None:
        _ATEN = _aten_table()
    order = sorted(set(nodes))
    members = set(order)
    if not members:
        raise CodegenError("region_from_nodes: no nodes")
    for o in outputs:
        if o not in members:
            raise CodegenError(f"region_from_nodes: output {o.name} is not one of the nodes")
    b = RegionBuilder()
    env: dict[torch.fx.Node, Any] = {}
    inputs: list = []

    def val(n) -> torch.Tensor:
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor):
            raise CodegenError(f"node {n.name} has no tensor meta['val']")
        return v

    def operand(a, who):
        if isinstance(a, torch.fx.Node):
            if a in env:
                return env[a]
            if a in members:
                raise CodegenError(f"node {who.name} reads {a.name} before it is computed")
            v = val(a)
            if v.dtype not in CODE_OF:
                raise CodegenError(f"node {who.name}: input {a.name} has dtype {v.dtype}")
            inputs.append(a)
            env[a] = b.input(v.dtype)
            return env[a]
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return float(a)
        raise CodegenError(f"node {who.name}: operand {a!r} is neither a node nor a number")

    for n in order:
        if n.op != "call_function" or n.target not in _ATEN:
            raise CodegenError(f"node {n.name} ({n.target}) has no region op")
        kind = _ATEN[n.target]
        out_v = val(n)
        args, kw = list(n.args), dict(n.kwargs)
        if kind in ("add", "sub"):
            if kw.get("alpha", 1) != 1 or len(args) > 2:
                raise CodegenError(f"node {n.name}: {kind} with alpha != 1")
            res = b.op(kind, operand(args[0], n), operand(args[1], n), dtype=out_v.dtype)
        elif kind == "rsub":
            if kw.get("alpha", 1) != 1 or len(args) > 2:
                raise CodegenError(f"node {n.name}: rsub with alpha != 1")
            res = b.op("sub", operand(args[1], n), operand(args[0], n), dtype=out_v.dtype)
        elif kind in ("mul", "div"):
            if kw.get("rounding_mode") is not None:
                raise CodegenError(f"node {n.name}: div with rounding_mode")
            res = b.op(kind, operand(args[0], n), operand(args[1], n), dtype=out_v.dtype)
        elif kind in ("neg", "exp", "tanh", "erf", "sqrt", "rsqrt", "sigmoid", "silu"):
            res = b.op(kind, operand(args[0], n), dtype=out_v.dtype)
        elif kind == "gelu":
            res = b.op("gelu", operand(args[0], n), dtype=out_v.dtype, approximate=kw.get("approximate", "none"))
        elif kind == "pow":
            e = args[1]
            if isinstance(e, bool) or not isinstance(e, (int, float)) or float(e) not in (2.0, 0.5):
                raise CodegenError(f"node {n.name}: pow exponent {e!r} (the region supports 2 and 0.5)")
            res = b.op("pow", operand(args[0], n), dtype=out_v.dtype, exponent=e)
        elif kind == "to":
            x_val = val(args[0])
            opts = dict(zip(("dtype", "non_blocking", "copy", "memory_format"), args[1:])) \
                if n.target is torch.ops.aten.to.dtype else {}
            opts.update(kw)
            if out_v.device != x_val.device or opts.get("layout") not in (None, torch.strided):
                raise CodegenError(f"node {n.name}: to() moves device or layout")
            if opts.get("memory_format") not in (None, torch.preserve_format):
                raise CodegenError(f"node {n.name}: to() with a memory format")
            if opts.get("pin_memory"):
                raise CodegenError(f"node {n.name}: to() with pin_memory")
            x = operand(args[0], n)
            res = x if out_v.dtype == x.dtype else b.to(x, out_v.dtype)
        elif kind == "identity":
            if kw.get("memory_format") not in (None, torch.preserve_format):
                raise CodegenError(f"node {n.name}: clone with a memory format")
            res = operand(args[0], n)
        elif kind == "dropout":
            p = args[1] if len(args) > 1 else kw.get("p", 0.5)
            train = args[2] if len(args) > 2 else kw.get("train", True)
            if p != 0 and train:
                raise CodegenError(f"node {n.name}: dropout in training mode")
            res = operand(args[0], n)
        elif kind in ("sum", "mean"):
            x_val = val(args[0])
            dim = args[1] if len(args) > 1 else kw.get("dim")
            keep = args[2] if len(args) > 2 else kw.get("keepdim", False)
            _last_dim(dim, x_val.dim(), f"node {n.name} ({kind})")
            if not keep:
                raise CodegenError(f"node {n.name}: {kind} without keepdim (the region keeps the reduced dim)")
            res = b.op(kind, operand(args[0], n), dtype=out_v.dtype)
        elif kind == "var":
            x_val = val(args[0])
            dim = args[1] if len(args) > 1 else kw.get("dim")
            corr = kw.get("correction", 1)
            if not kw.get("keepdim", False):
                raise CodegenError(f"node {n.name}: var without keepdim")
            _last_dim(dim, x_val.dim(), f"node {n.name} (var)")
            if isinstance(corr, float) and corr.is_integer():
                corr = int(corr)
            res = b.op("var", operand(args[0], n), dtype=out_v.dtype, correction=corr)
        elif kind == "layer_norm":
            x_val = val(args[0])
            shape = list(args[1])
            if shape != [x_val.shape[-1]]:
                raise CodegenError(f"node {n.name}: layer_norm over {shape}, not the last dim only")
            w = args[2] if len(args) > 2 else kw.get("weight")
            bias = args[3] if len(args) > 3 else kw.get("bias")
            eps = args[4] if len(args) > 4 else kw.get("eps", 1e-5)
            res = b.op("layer_norm", operand(args[0], n), None if w is None else operand(w, n),
                       None if bias is None else operand(bias, n), dtype=out_v.dtype, eps=eps)
        elif kind == "slice":
            x_val = val(args[0])
            dim = args[1] if len(args) > 1 else 0
            start = args[2] if len(args) > 2 else 0
            stop = args[3] if len(args) > 3 else None
            step = args[4] if len(args) > 4 else 1
            _last_dim(dim, x_val.dim(), f"node {n.name} (slice)")
            if step != 1 or not all(isinstance(v, int) for v in (start, 0 if stop is None else stop)):
                raise CodegenError(f"node {n.name}: slice with a step or symbolic bounds")
            w = x_val.shape[-1]
            start, stop, _ = slice(start, stop).indices(w)
            stop = max(stop, start)
            x = operand(args[0], n)
            res = x if (start, stop) == (0, w) else b.slice(x, start, stop)
        elif kind == "cat":
            tensors = args[0]
            dim = args[1] if len(args) > 1 else kw.get("dim", 0)
            _last_dim(dim, out_v.dim(), f"node {n.name} (cat)")
            parts = [operand(t, n) for t in tensors if not (isinstance(t, torch.fx.Node) and val(t).shape[-1] == 0)]
            res = parts[0] if len(parts) == 1 else b.op("cat", *parts, dtype=out_v.dtype)
        else:  # pragma: no cover - table and branches agree
            raise CodegenError(f"node {n.name}: unhandled {kind}")
        env[n] = res
    for n in order:
        for u in n.users:
            if u not in members and n not in outputs:
                raise CodegenError(f"node {n.name} is used by {u.name} outside the region but is not an output")
    out_vals = []
    for o in outputs:
        v = env[o]
        if not isinstance(v, Value) or v.name[0] == "x":
            raise CodegenError(f"output {o.name} is one of the region's inputs (an identity): nothing to compute")
        if v.name in out_vals:
            raise CodegenError(f"outputs {o.name} and another output are the same value")
        out_vals.append(v.name)
        b.output(v)
    # an input computed from the region would make the fused node its own ancestor
    first = order[0]
    stack = [a for a in inputs]
    seen: set = set()
    while stack:
        m = stack.pop()
        if m in seen or m < first:
            continue
        seen.add(m)
        if m in members:
            raise CodegenError(f"input {m.name} depends on the region itself (the nodes are not convex)")
        stack.extend(m.all_input_nodes)
    return b.build(), inputs
