"""Expression-tree IR for fused elementwise add/sub trees, and the kernel emitters.

The *tree string* is the only description of a fused computation. It is a tiny SSA
program over the op's inputs ``x0..x{n-1}``::

    t0=add(x0,x1);t1=add(t0,x2)->t1          # GPTNeoX parallel residual (mlp + attn) + hidden
    t0=add(x0,x1);t1=sub(t0,x2)->t1,t0       # two outputs: the root and the intermediate t0

Every statement is one binary ``add`` or ``sub`` (alpha 1) whose result is rounded to
the storage dtype, exactly like one eager ``aten.add.Tensor``/``aten.sub.Tensor``: for
fp16/bf16 the operands are widened to fp32, added once, and rounded to nearest-even
back to the storage dtype; fp32/fp64 add in their own precision. Evaluating the
statements in order therefore reproduces eager bit for bit (same association, same
rounding after every add), whatever the backend.

From one :class:`Tree` the emitters produce

* :func:`emit_triton` - a Triton kernel (one program per ``BLOCK`` elements of the flat
  output index; per operand either linear offsets or an index unravelled over up to
  :data:`MAX_DIMS` collapsed dimensions with runtime sizes/strides, so broadcast and
  non-contiguous operands are read in place, never copied);
* :func:`emit_cuda` - standalone CUDA C (a templated grid-stride kernel over dtype and
  number of dimensions, a 16-byte vectorised kernel for the all-contiguous case, and an
  ``extern "C"`` launcher taking raw pointers), which compiles with plain ``nvcc -c``;
  :func:`emit_cuda_binding` is the small C++ file that binds it for
  ``torch.utils.cpp_extension.load_inline``.

Layout helpers (:func:`plan_layout`) compute the broadcast shape, collapse adjacent
dimensions that are contiguous for every operand, and decide per operand whether its
access is linear.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from ..errors import CodegenError

MAX_DIMS = 4
OPS = ("add", "sub")

_STMT_RE = re.compile(r"^t(\d+)=(add|sub)\(([xt]\d+),([xt]\d+)\)$")


@dataclass(frozen=True)
class Stmt:
    op: str  # "add" | "sub"
    a: str  # "x3" or "t0"
    b: str


@dataclass(frozen=True)
class Tree:
    """A parsed tree string: ``stmts[k]`` defines ``t{k}``; ``outputs`` name temps."""

    text: str
    n_inputs: int
    stmts: tuple[Stmt, ...]
    outputs: tuple[str, ...]

    @property
    def n_outputs(self) -> int:
        return len(self.outputs)

    def short_hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]

    # -- reference semantics ------------------------------------------------------
    def evaluate(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Evaluate with eager ATen ops in statement order: the bit-exact reference
        (this *is* what the unfused graph computed)."""
        if len(xs) != self.n_inputs:
            raise CodegenError(f"tree {self.text!r} takes {self.n_inputs} inputs, got {len(xs)}")
        env: dict[str, torch.Tensor] = {f"x{i}": x for i, x in enumerate(xs)}
        for k, s in enumerate(self.stmts):
            fn = torch.add if s.op == "add" else torch.sub
            env[f"t{k}"] = fn(env[s.a], env[s.b])
        return [env[o] for o in self.outputs]

    def expression(self, name: str | None = None) -> str:
        """The nested infix expression of a temp (for comments/inspection)."""
        name = name or self.outputs[0]
        if name.startswith("x"):
            return name
        s = self.stmts[int(name[1:])]
        sym = "+" if s.op == "add" else "-"
        return f"({self.expression(s.a)} {sym} {self.expression(s.b)})"

    def output_operands(self, k: int) -> set[int]:
        """Indices of the inputs that output ``k`` depends on."""
        deps: set[int] = set()

        def walk(n: str) -> None:
            if n.startswith("x"):
                deps.add(int(n[1:]))
            else:
                s = self.stmts[int(n[1:])]
                walk(s.a)
                walk(s.b)

        walk(self.outputs[k])
        return deps


@lru_cache(maxsize=4096)
def parse_tree(text: str) -> Tree:
    """Parse and validate a tree string (cached: the op calls this on every call)."""
    if "->" not in text:
        raise CodegenError(f"tree string {text!r} has no '->outputs' part")
    body, outs = text.split("->", 1)
    stmts: list[Stmt] = []
    max_x = -1
    for k, raw in enumerate(p for p in body.split(";") if p):
        m = _STMT_RE.match(raw.strip())
        if m is None:
            raise CodegenError(f"tree string {text!r}: cannot parse statement {raw!r} (expected tK=add(xI,tJ))")
        idx, op, a, b = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if idx != k:
            raise CodegenError(f"tree string {text!r}: statement {k} defines t{idx}, expected t{k}")
        for ref in (a, b):
            if ref.startswith("t") and int(ref[1:]) >= k:
                raise CodegenError(f"tree string {text!r}: t{k} uses {ref} before it is defined")
            if ref.startswith("x"):
                max_x = max(max_x, int(ref[1:]))
        stmts.append(Stmt(op, a, b))
    if not stmts:
        raise CodegenError(f"tree string {text!r} has no statements")
    outputs = tuple(o.strip() for o in outs.split(",") if o.strip())
    if not outputs:
        raise CodegenError(f"tree string {text!r} names no outputs")
    for o in outputs:
        if not re.fullmatch(r"t\d+", o) or int(o[1:]) >= len(stmts):
            raise CodegenError(f"tree string {text!r}: output {o!r} is not a defined temp")
    if len(set(outputs)) != len(outputs):
        raise CodegenError(f"tree string {text!r}: an output is named twice")
    used = {r for s in stmts for r in (s.a, s.b) if r.startswith("x")}
    n_inputs = max_x + 1
    missing = [f"x{i}" for i in range(n_inputs) if f"x{i}" not in used]
    if missing:
        raise CodegenError(f"tree string {text!r}: inputs {missing} are never used")
    return Tree(text=text, n_inputs=n_inputs, stmts=tuple(stmts), outputs=outputs)


def format_tree(stmts: Sequence[tuple[str, str, str]], outputs: Sequence[str]) -> str:
    """Inverse of :func:`parse_tree` for ``[(op, a, b), ...]`` statements."""
    body = ";".join(f"t{k}={op}({a},{b})" for k, (op, a, b) in enumerate(stmts))
    return f"{body}->{','.join(outputs)}"


# ----------------------------------------------------------------------------------
# layout planning
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """How one call's operands are addressed: ``sizes`` are the collapsed iteration
    dims (outermost first, ``len <= MAX_DIMS``); ``in_strides``/``out_strides`` per
    operand over those dims (elements); ``in_linear``/``out_linear`` tell which
    operands are addressed by the flat index itself."""

    numel: int
    sizes: tuple[int, ...]
    in_strides: tuple[tuple[int, ...], ...]
    out_strides: tuple[tuple[int, ...], ...]
    in_linear: tuple[bool, ...]
    out_linear: tuple[bool, ...]

    @property
    def ndim(self) -> int:
        return len(self.sizes)

    @property
    def all_linear(self) -> bool:
        return all(self.in_linear) and all(self.out_linear)


def _expand_strides(shape: Sequence[int], strides: Sequence[int], out_shape: Sequence[int]) -> list[int]:
    """Strides of a tensor broadcast to ``out_shape`` (0 on broadcast dims)."""
    nd = len(out_shape)
    pad = nd - len(shape)
    res = [0] * nd
    for d in range(len(shape)):
        if shape[d] != 1:
            res[pad + d] = strides[d]
    return res


def plan_layout(
    out_shape: Sequence[int],
    in_shapes: Sequence[Sequence[int]],
    in_strides: Sequence[Sequence[int]],
    out_strides: Sequence[Sequence[int]],
) -> Layout | None:
    """Collapse dims; ``None`` when more than :data:`MAX_DIMS` dims remain (callers then
    evaluate with ATen, which is bit-equal anyway)."""
    numel = 1
    for s in out_shape:
        numel *= int(s)
    ops = [_expand_strides(sh, st, out_shape) for sh, st in zip(in_shapes, in_strides)]
    ops += [_expand_strides(out_shape, st, out_shape) for st in out_strides]
    # drop size-1 dims
    dims = [d for d in range(len(out_shape)) if out_shape[d] != 1]
    sizes = [int(out_shape[d]) for d in dims]
    strides = [[st[d] for d in dims] for st in ops]
    # merge dim d into d+1 (inner) where every operand is contiguous across them
    i = len(sizes) - 2
    while i >= 0:
        if all(st[i] == st[i + 1] * sizes[i + 1] for st in strides):
            sizes[i + 1] *= sizes[i]
            del sizes[i]
            for st in strides:
                del st[i]
        i -= 1
    if not sizes:
        sizes = [1]
        strides = [[1] for _ in strides]
    if len(sizes) > MAX_DIMS:
        return None
    nin = len(in_shapes)
    linear = []
    for st in strides:
        # linear iff strides are the row-major strides of `sizes`
        expect, acc = [], 1
        for s in reversed(sizes):
            expect.append(acc)
            acc *= s
        expect.reverse()
        linear.append(all(a == b or sz == 1 for a, b, sz in zip(st, expect, sizes)))
    return Layout(
        numel=numel,
        sizes=tuple(sizes),
        in_strides=tuple(tuple(s) for s in strides[:nin]),
        out_strides=tuple(tuple(s) for s in strides[nin:]),
        in_linear=tuple(linear[:nin]),
        out_linear=tuple(linear[nin:]),
    )


# ----------------------------------------------------------------------------------
# Triton emitter
# ----------------------------------------------------------------------------------
_TL_DTYPE = {
    torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16",
    torch.float32: "tl.float32",
    torch.float64: "tl.float64",
}


# Triton source lines of the bf16 <-> fp32 helpers (shared with the region emitter).
TRITON_BF16_HELPERS: tuple[str, ...] = (
    "",
    "",
    "# bf16 <-> fp32 by bit manipulation: exact widening, and round-to-nearest-even with",
    "# NaN -> 0x7FC0 exactly like c10::BFloat16 (and the same on the GPU and under",
    "# TRITON_INTERPRET=1, whose own fp32->bf16 cast truncates and mishandles subnormals)",
    "@triton.jit",
    "def _bf16_to_f32(x):",
    "    return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)",
    "",
    "",
    "@triton.jit",
    "def _f32_to_bf16_rne(x):",
    "    b = x.to(tl.uint32, bitcast=True)",
    "    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16",
    "    r = tl.where(x != x, 0x7FC0, r)",
    "    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)",
)


def triton_kernel_name(tree: Tree, dtype: torch.dtype, in_linear: Sequence[bool], out_linear: Sequence[bool], ndim: int) -> str:
    access = "".join("l" if x else "s" for x in (*in_linear, *out_linear))
    dt = str(dtype).replace("torch.", "")
    return f"fxopt_add_tree_{tree.short_hash()}_{dt}_{access}_d{ndim}"


def emit_triton(
    tree: Tree,
    dtype: torch.dtype,
    in_linear: Sequence[bool] | None = None,
    out_linear: Sequence[bool] | None = None,
    ndim: int = 1,
) -> tuple[str, str]:
    """Triton source for ``tree`` in ``dtype``; returns ``(kernel_name, source)``.

    Signature: ``(x0_ptr.., o0_ptr.., n, size_0..size_{D-1}, x{i}_st_{d}.. (strided
    inputs only), o{j}_st_{d}.. (strided outputs only), BLOCK: constexpr,
    I64: constexpr)``.
    """
    if dtype not in _TL_DTYPE:
        raise CodegenError(f"fused add tree: unsupported dtype {dtype}")
    nin, nout = tree.n_inputs, tree.n_outputs
    in_linear = tuple(in_linear) if in_linear is not None else (True,) * nin
    out_linear = tuple(out_linear) if out_linear is not None else (True,) * nout
    name = triton_kernel_name(tree, dtype, in_linear, out_linear, ndim)
    tl_dt = _TL_DTYPE[dtype]
    narrow = dtype in (torch.float16, torch.bfloat16)
    bf16 = dtype == torch.bfloat16
    params = [f"x{i}_ptr" for i in range(nin)] + [f"o{j}_ptr" for j in range(nout)] + ["n"]
    params += [f"size_{d}" for d in range(ndim)]
    for i in range(nin):
        if not in_linear[i]:
            params += [f"x{i}_st_{d}" for d in range(ndim)]
    for j in range(nout):
        if not out_linear[j]:
            params += [f"o{j}_st_{d}" for d in range(ndim)]
    params += ["BLOCK: tl.constexpr", "I64: tl.constexpr"]
    L: list[str] = []
    w = L.append
    w("# generated by fxopt.codegen.elementwise.emit_triton - do not edit")
    w(f"# tree: {tree.text}")
    for k, o in enumerate(tree.outputs):
        w(f"# out{k} = {tree.expression(o)}")
    w(f"# dtype: {dtype}; every add rounds to the storage dtype (bit-equal to eager)")
    w("import triton")
    w("import triton.language as tl")
    if bf16:
        L.extend(TRITON_BF16_HELPERS)
    w("")
    w("")
    w("@triton.jit")
    w(f"def {name}({', '.join(params)}):")
    w("    pid = tl.program_id(0)")
    w("    if I64:")
    w("        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)")
    w("    else:")
    w("        offs = pid * BLOCK + tl.arange(0, BLOCK)")
    w("    mask = offs < n")
    if not (all(in_linear) and all(out_linear)):
        w("    # unravel the flat output index over the collapsed dims")
        w("    rem = offs")
        for d in range(ndim - 1, 0, -1):
            w(f"    i{d} = rem % size_{d}")
            w(f"    rem = rem // size_{d}")
        w("    i0 = rem")

    def addr(prefix: str, idx: int, linear: bool) -> str:
        if linear:
            return "offs"
        return " + ".join(f"i{d} * {prefix}{idx}_st_{d}" for d in range(ndim))

    for i in range(nin):
        w(f"    x{i} = tl.load(x{i}_ptr + ({addr('x', i, in_linear[i])}), mask=mask)")
    for k, s in enumerate(tree.stmts):
        op = "+" if s.op == "add" else "-"
        if bf16:
            w(f"    t{k} = _f32_to_bf16_rne(_bf16_to_f32({s.a}) {op} _bf16_to_f32({s.b}))")
        elif narrow:
            w(f"    t{k} = ({s.a}.to(tl.float32) {op} {s.b}.to(tl.float32)).to({tl_dt})")
        else:
            w(f"    t{k} = {s.a} {op} {s.b}")
    for j, o in enumerate(tree.outputs):
        w(f"    tl.store(o{j}_ptr + ({addr('o', j, out_linear[j])}), {o}, mask=mask)")
    return name, "\n".join(L) + "\n"


# ----------------------------------------------------------------------------------
# CUDA C emitter
# ----------------------------------------------------------------------------------
# dtype codes shared by the CUDA launcher and the Python side
CUDA_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def cuda_symbol(tree: Tree) -> str:
    return f"fxopt_add_tree_{tree.short_hash()}"


def emit_cuda(tree: Tree) -> tuple[str, str]:
    """Standalone CUDA C for ``tree`` (all dtypes, 1..MAX_DIMS dims); returns
    ``(symbol, source)``. The entry point is::

        extern "C" int <symbol>_launch(int dtype_code, int ndim, int all_linear,
            long long n, const void* const* ins, void* const* outs,
            const long long* sizes, const long long* in_strides /* nin*ndim */,
            const long long* out_strides /* nout*ndim */, void* stream);

    returning a ``cudaError_t``. It needs only the CUDA runtime headers.
    """
    sym = cuda_symbol(tree)
    nin, nout = tree.n_inputs, tree.n_outputs
    L: list[str] = []
    w = L.append
    w("// generated by fxopt.codegen.elementwise.emit_cuda - do not edit")
    w(f"// tree: {tree.text}")
    for k, o in enumerate(tree.outputs):
        w(f"// out{k} = {tree.expression(o)}")
    w("// every add rounds to the storage dtype (__fadd_rn: never contracted, no flush-to-zero)")
    w("#include <cuda_runtime.h>")
    w("#include <cuda_fp16.h>")
    w("#include <cuda_bf16.h>")
    w("#include <stdint.h>")
    w("")
    w(f"#define NIN {nin}")
    w(f"#define NOUT {nout}")
    w(f"#define MAXD {MAX_DIMS}")
    w("")
    w(f"namespace {sym}_ns {{")
    w("struct Params {")
    w("  const void* in[NIN];")
    w("  void* out[NOUT];")
    w("  long long n;")
    w("  long long sizes[MAXD];")
    w("  long long in_st[NIN][MAXD];")
    w("  long long out_st[NOUT][MAXD];")
    w("};")
    w("")
    w("// widen / round-to-storage; the arithmetic type is float for fp32/fp16/bf16, double for fp64")
    w("template <typename T> struct Arith { typedef float type; };")
    w("template <> struct Arith<double> { typedef double type; };")
    w("__device__ __forceinline__ float widen(float v) { return v; }")
    w("__device__ __forceinline__ double widen(double v) { return v; }")
    w("__device__ __forceinline__ float widen(__half v) { return __half2float(v); }")
    w("__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }")
    w("template <typename T> __device__ __forceinline__ T narrow(typename Arith<T>::type v);")
    w("template <> __device__ __forceinline__ float narrow<float>(float v) { return v; }")
    w("template <> __device__ __forceinline__ double narrow<double>(double v) { return v; }")
    w("template <> __device__ __forceinline__ __half narrow<__half>(float v) { return __float2half_rn(v); }")
    w("template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }")
    w("__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }")
    w("__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }")
    w("__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }")
    w("__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }")
    w("")
    w("// the tree: each statement one rounded add in the storage dtype")
    w("template <typename T>")
    args = ", ".join(f"T x{i}" for i in range(nin)) + ", " + ", ".join(f"T* o{j}" for j in range(nout))
    w(f"__device__ __forceinline__ void eval_tree({args}) {{")
    for k, s in enumerate(tree.stmts):
        fn = "add_rn" if s.op == "add" else "sub_rn"
        w(f"  T t{k} = narrow<T>({fn}(widen({s.a}), widen({s.b})));")
    for j, o in enumerate(tree.outputs):
        w(f"  *o{j} = {o};")
    w("}")
    w("")
    w("template <typename T, int D>")
    w("__global__ void strided_kernel(Params p) {")
    w("  long long stride = (long long)gridDim.x * blockDim.x;")
    w("  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {")
    w("    long long idx[D];")
    w("    long long rem = i;")
    w("    #pragma unroll")
    w("    for (int d = D - 1; d > 0; --d) { idx[d] = rem % p.sizes[d]; rem /= p.sizes[d]; }")
    w("    idx[0] = rem;")
    for i in range(nin):
        w(f"    long long a{i} = 0;")
        w("    #pragma unroll")
        w(f"    for (int d = 0; d < D; ++d) a{i} += idx[d] * p.in_st[{i}][d];")
        w(f"    T x{i} = ((const T*)p.in[{i}])[a{i}];")
    for j in range(nout):
        w(f"    long long b{j} = 0;")
        w("    #pragma unroll")
        w(f"    for (int d = 0; d < D; ++d) b{j} += idx[d] * p.out_st[{j}][d];")
        w(f"    T r{j};")
    w(f"    eval_tree<T>({', '.join(f'x{i}' for i in range(nin))}, {', '.join(f'&r{j}' for j in range(nout))});")
    for j in range(nout):
        w(f"    ((T*)p.out[{j}])[b{j}] = r{j};")
    w("  }")
    w("}")
    w("")
    w("// all operands linear and 16-byte aligned: 16-byte loads/stores, VEC elements per thread")
    w("template <typename T>")
    w("__global__ void vec_kernel(Params p) {")
    w("  constexpr int VEC = 16 / sizeof(T);")
    w("  union Pack { uint4 u; T v[VEC]; };")
    w("  long long nvec = p.n / VEC;")
    w("  long long stride = (long long)gridDim.x * blockDim.x;")
    w("  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < nvec; i += stride) {")
    for i in range(nin):
        w(f"    Pack x{i}; x{i}.u = ((const uint4*)p.in[{i}])[i];")
    for j in range(nout):
        w(f"    Pack r{j};")
    w("    #pragma unroll")
    w("    for (int k = 0; k < VEC; ++k)")
    w(f"      eval_tree<T>({', '.join(f'x{i}.v[k]' for i in range(nin))}, {', '.join(f'&r{j}.v[k]' for j in range(nout))});")
    for j in range(nout):
        w(f"    ((uint4*)p.out[{j}])[i] = r{j}.u;")
    w("  }")
    w("  // tail (n % VEC elements), done by the first threads of block 0")
    w("  long long t = nvec * VEC + (long long)blockIdx.x * blockDim.x + threadIdx.x;")
    w("  if (t < p.n && t < nvec * VEC + VEC) {")
    for i in range(nin):
        w(f"    T x{i} = ((const T*)p.in[{i}])[t];")
    for j in range(nout):
        w(f"    T r{j};")
    w(f"    eval_tree<T>({', '.join(f'x{i}' for i in range(nin))}, {', '.join(f'&r{j}' for j in range(nout))});")
    for j in range(nout):
        w(f"    ((T*)p.out[{j}])[t] = r{j};")
    w("  }")
    w("}")
    w("")
    w("template <typename T>")
    w("static cudaError_t launch_t(Params& p, int ndim, int all_linear, cudaStream_t s) {")
    w("  const int threads = 256;")
    w("  if (p.n == 0) return cudaSuccess;")
    w("  bool aligned = true;")
    w("  for (int i = 0; i < NIN; ++i) aligned = aligned && (((uintptr_t)p.in[i]) % 16 == 0);")
    w("  for (int j = 0; j < NOUT; ++j) aligned = aligned && (((uintptr_t)p.out[j]) % 16 == 0);")
    w("  if (all_linear && aligned) {")
    w("    constexpr int VEC = 16 / sizeof(T);")
    w("    long long nvec = p.n / VEC;")
    w("    long long blocks = (nvec + threads - 1) / threads;")
    w("    if (blocks < 1) blocks = 1;")
    w("    if (blocks > 65535LL * 8) blocks = 65535LL * 8;")
    w("    vec_kernel<T><<<(unsigned)blocks, threads, 0, s>>>(p);")
    w("    return cudaGetLastError();")
    w("  }")
    w("  long long blocks = (p.n + threads - 1) / threads;")
    w("  if (blocks > 65535LL * 8) blocks = 65535LL * 8;")
    w("  switch (ndim) {")
    for d in range(1, MAX_DIMS + 1):
        w(f"    case {d}: strided_kernel<T, {d}><<<(unsigned)blocks, threads, 0, s>>>(p); break;")
    w("    default: return cudaErrorInvalidValue;")
    w("  }")
    w("  return cudaGetLastError();")
    w("}")
    w(f"}}  // namespace {sym}_ns")
    w("")
    w(f'extern "C" int {sym}_launch(int dtype_code, int ndim, int all_linear, long long n,')
    w("    const void* const* ins, void* const* outs, const long long* sizes,")
    w("    const long long* in_strides, const long long* out_strides, void* stream) {")
    w(f"  using namespace {sym}_ns;")
    w("  if (ndim < 1 || ndim > MAXD) return (int)cudaErrorInvalidValue;")
    w("  Params p;")
    w("  p.n = n;")
    w("  for (int d = 0; d < MAXD; ++d) p.sizes[d] = d < ndim ? sizes[d] : 1;")
    w("  for (int i = 0; i < NIN; ++i) { p.in[i] = ins[i]; for (int d = 0; d < MAXD; ++d) p.in_st[i][d] = d < ndim ? in_strides[i * ndim + d] : 0; }")
    w("  for (int j = 0; j < NOUT; ++j) { p.out[j] = outs[j]; for (int d = 0; d < MAXD; ++d) p.out_st[j][d] = d < ndim ? out_strides[j * ndim + d] : 0; }")
    w("  cudaStream_t s = (cudaStream_t)stream;")
    w("  switch (dtype_code) {")
    w("    case 0: return (int)launch_t<float>(p, ndim, all_linear, s);")
    w("    case 1: return (int)launch_t<__half>(p, ndim, all_linear, s);")
    w("    case 2: return (int)launch_t<__nv_bfloat16>(p, ndim, all_linear, s);")
    w("    case 3: return (int)launch_t<double>(p, ndim, all_linear, s);")
    w("  }")
    w("  return (int)cudaErrorInvalidValue;")
    w("}")
    return sym, "\n".join(L) + "\n"


def emit_cuda_binding(tree: Tree) -> str:
    """C++ (torch) side for ``load_inline``: ``run(ins, outs, meta)`` where ``meta`` is
    ``[dtype_code, ndim, all_linear, n, sizes..., in_strides..., out_strides...]``."""
    sym = cuda_symbol(tree)
    nin, nout = tree.n_inputs, tree.n_outputs
    return f"""// generated by fxopt.codegen.elementwise.emit_cuda_binding - do not edit
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <vector>

extern "C" int {sym}_launch(int dtype_code, int ndim, int all_linear, long long n,
    const void* const* ins, void* const* outs, const long long* sizes,
    const long long* in_strides, const long long* out_strides, void* stream);

void run(const std::vector<torch::Tensor>& ins, const std::vector<torch::Tensor>& outs, const std::vector<int64_t>& meta) {{
  TORCH_CHECK(ins.size() == {nin} && outs.size() == {nout}, "fxopt {sym}: wrong operand count");
  const void* ip[{nin}];
  void* op[{nout}];
  for (int i = 0; i < {nin}; ++i) ip[i] = ins[i].data_ptr();
  for (int j = 0; j < {nout}; ++j) op[j] = outs[j].data_ptr();
  int ndim = (int)meta[1];
  const long long* m = (const long long*)meta.data();
  auto stream = c10::cuda::getCurrentCUDAStream(ins[0].get_device()).stream();
  int err = {sym}_launch((int)meta[0], ndim, (int)meta[2], (long long)meta[3], ip, op,
                         m + 4, m + 4 + ndim, m + 4 + ndim + {nin} * ndim, (void*)stream);
  TORCH_CHECK(err == 0, "fxopt {sym}: kernel launch failed with CUDA error ", err);
}}
"""
