"""``fxopt::fused_add_tree(Tensor[] xs, str tree) -> Tensor[]``: a tree of rounded adds.

``tree`` is the only description of the computation (grammar in
:mod:`fxopt.codegen.elementwise`); outputs are the tree's ``->`` list in order (the
root first, then intermediates that also had users outside the tree).

* fake/meta impl: evaluates the tree on the fake inputs, so output shapes, dtypes and
  strides are exactly eager's (TensorIterator's layout rules) and rewritten graphs still
  export / compile;
* CPU impl: evaluates the tree with ``torch.add``/``torch.sub`` in statement order - the
  unfused computation itself, bit-equal by construction;
* :func:`fused_add_tree` (what rewritten graphs call): on plain tensors outside
  tracing, when no gradient is being recorded (grad mode off, or no input requires grad),
  it skips the dispatcher (CUDA: straight to the cached launcher; CPU: ATen); otherwise
  it calls the op (so exported / compiled graphs contain ``fxopt::fused_add_tree`` and
  autograd records it);
* autograd: the backward of the tree, statement by statement in reverse (``add`` passes
  its gradient to both operands, ``sub`` negates it for the second), each contribution
  summed to its operand's shape and cast to its dtype as eager's autograd engine does
  for broadcast and mixed-dtype adds. The backward is made of ATen ops, so it is itself
  differentiable;
* CUDA impl: the generated kernel (Triton by default, CUDA C with
  ``FXOPT_BACKEND=cuda``; ``FXOPT_BACKEND=torch`` evaluates with ATen). Per
  (tree, backend, dtype, shapes, strides, alignment) the compiled kernel and its launch
  arguments are cached in memory, so a repeated call does no re-specialisation: it
  allocates outputs and launches (Triton's compiled launcher is called directly,
  bypassing the JIT's argument binding). Kernels launch on the current stream and are
  CUDA-graph capturable.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as _forward_ad

from ..codegen import elementwise as ew
from ..codegen.cache import build_cuda_extension, load_triton_module
from ..codegen.launch import compiled_kernel, run_compiled
from .. import config
from ..errors import CodegenError
from .ad_support import refuse_forward_ad

OP_NAME = "fxopt::fused_add_tree"

# Below this many output elements a CUDA call outside CUDA-graph capture evaluates with
# ATen (bit-equal anyway). 0 disables. Not needed as measured on an H100 (2026-11-22,
# benchmarks/elementwise.py): at (1,1,2560) fp16 the graph entry point costs 11.9 us per
# call against 13.5 us for the two eager adds, 1.24 us vs 2.95 us inside a CUDA graph.
SMALL_NUMEL_THRESHOLD = 0

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_lib = torch.library.Library("fxopt", "FRAGMENT")
_lib.define("fused_add_tree(Tensor[] xs, str tree) -> Tensor[]")


def _evaluate(xs: Sequence[torch.Tensor], tree: str) -> list[torch.Tensor]:
    outs = ew.parse_tree(tree).evaluate(list(xs))
    # outputs are fresh tensors (results of add/sub), never inputs
    return [o.clone() if any(o is x for x in xs) else o for o in outs]


def _cpu_impl(xs, tree):
    refuse_forward_ad(OP_NAME)
    return _evaluate(xs, tree)


@torch.library.register_fake(OP_NAME)
def _fake_impl(xs, tree):
    return _evaluate(xs, tree)


# ----------------------------------------------------------------------------------
# CUDA: launchers cached per specialisation
# ----------------------------------------------------------------------------------
class _Launcher:
    """Everything needed to run one specialisation: output layouts and a launch fn."""

    __slots__ = ("out_specs", "launch", "numel", "device")

    def __init__(self, out_specs, launch, numel, device):
        self.out_specs = out_specs  # [(shape, stride, dtype)]
        self.launch = launch  # fn(xs, outs) or None (=> ATen evaluation)
        self.numel = numel
        self.device = device

    def __call__(self, xs, tree):
        if self.launch is None:
            return _evaluate(xs, tree)
        x0 = xs[0]  # kernel path: every output has x0's dtype and device
        outs = [x0.new_empty_strided(s, st) for s, st, _ in self.out_specs]
        self.launch(xs, outs)
        return outs


_LAUNCHERS: dict[tuple, _Launcher] = {}
_MAX_LAUNCHERS = 4096


_backend = config.backend
_backend_raw = config.backend_raw


def _spec_key(xs, tree: str, backend: str) -> tuple:
    return (tree, backend) + tuple((x.dtype, x.shape, x.stride(), x.data_ptr() % 16 == 0, x.device) for x in xs)


def _out_specs(xs: Sequence[torch.Tensor], tree: ew.Tree):
    metas = [torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta") for x in xs]
    outs = tree.evaluate(metas)
    return [(tuple(o.shape), tuple(o.stride()), o.dtype) for o in outs]


def triton_block_config(numel: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a launch over ``numel`` elements."""
    if numel <= 4096:
        return 1024, 4
    return 2048, 8


def plan(xs: Sequence[torch.Tensor], tree: ew.Tree):
    """(out_specs, Layout | None): None when the generated kernel cannot take this call."""
    out_specs = _out_specs(xs, tree)
    dtypes = {x.dtype for x in xs}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _SUPPORTED:
        return out_specs, None
    if any(o[2] != xs[0].dtype for o in out_specs):
        return out_specs, None
    root_shape = out_specs[0][0]
    if any(o[0] != root_shape for o in out_specs):
        return out_specs, None
    layout = ew.plan_layout(root_shape, [x.shape for x in xs], [x.stride() for x in xs], [o[1] for o in out_specs])
    return out_specs, layout


def _make_triton_launch(tree: ew.Tree, dtype: torch.dtype, layout: ew.Layout, xs, outs_example) -> Callable:
    import triton

    name, src = ew.emit_triton(tree, dtype, layout.in_linear, layout.out_linear, layout.ndim)
    interpret = bool(triton.knobs.runtime.interpret)
    mod = load_triton_module(name, src, signature=f"interpret={interpret}")
    fn = getattr(mod, name)
    block, warps = triton_block_config(layout.numel)
    max_off = 0
    for st in (*layout.in_strides, *layout.out_strides):
        max_off = max(max_off, sum(abs(s) * (n - 1) for s, n in zip(st, layout.sizes)))
    i64 = max(layout.numel, max_off + 1) + block >= 2**31
    scalars: list[int] = [layout.numel, *layout.sizes]
    for i, lin in enumerate(layout.in_linear):
        if not lin:
            scalars += list(layout.in_strides[i])
    for j, lin in enumerate(layout.out_linear):
        if not lin:
            scalars += list(layout.out_strides[j])
    grid = (triton.cdiv(layout.numel, block), 1, 1)
    state: dict[str, object] = {}

    def slow(xs, outs):
        return fn[grid](*xs, *outs, *scalars, BLOCK=block, I64=i64, num_warps=warps)

    if interpret or xs[0].device.type != "cuda":
        return lambda xs, outs: slow(xs, outs)

    dev_index = xs[0].device.index if xs[0].device.index is not None else torch.cuda.current_device()
    get_stream = torch._C._cuda_getCurrentRawStream
    tail = (*scalars, block, i64)

    def fast(xs, outs):
        k = state.get("kernel")
        if k is None:
            # compile (or fetch from Triton's cache) and launch once
            state["kernel"] = compiled_kernel(slow(xs, outs)) or False
            return
        if k is False:
            slow(xs, outs)
            return
        run_compiled(k, grid, get_stream(dev_index), (*xs, *outs, *tail))

    return fast


def _make_cuda_launch(tree: ew.Tree, dtype: torch.dtype, layout: ew.Layout) -> Callable:
    sym, cu = ew.emit_cuda(tree)
    cpp = ew.emit_cuda_binding(tree)
    ext = build_cuda_extension(sym, cu, cpp)
    meta = [ew.CUDA_DTYPE_CODE[dtype], layout.ndim, int(layout.all_linear), layout.numel, *layout.sizes]
    for st in layout.in_strides:
        meta += list(st)
    for st in layout.out_strides:
        meta += list(st)
    run = ext.run
    return lambda xs, outs: run(list(xs), outs, meta)


def _make_launcher(xs, tree_text: str, backend: str) -> _Launcher:
    tree = ew.parse_tree(tree_text)
    out_specs, layout = plan(xs, tree)
    device = xs[0].device
    if backend == "torch" or layout is None or layout.numel == 0 or any(x.device != device for x in xs):
        return _Launcher(out_specs, None, 0 if layout is None else layout.numel, device)
    dtype = xs[0].dtype
    if backend == "triton":
        launch = _make_triton_launch(tree, dtype, layout, xs, None)
    elif backend == "cuda":
        launch = _make_cuda_launch(tree, dtype, layout)
    else:
        raise CodegenError(f"unknown FXOPT_BACKEND {backend!r}; use triton, cuda or torch")
    return _Launcher(out_specs, launch, layout.numel, device)


def get_launcher(xs, tree: str, backend: str | None = None) -> _Launcher:
    backend = backend or _backend()
    key = _spec_key(xs, tree, backend)
    launcher = _LAUNCHERS.get(key)
    if launcher is None:
        if len(_LAUNCHERS) >= _MAX_LAUNCHERS:
            _LAUNCHERS.clear()
        launcher = _make_launcher(xs, tree, backend)
        _LAUNCHERS[key] = launcher
    return launcher


def _cuda_impl(xs, tree):
    refuse_forward_ad(OP_NAME)
    launcher = get_launcher(xs, tree)
    if (
        SMALL_NUMEL_THRESHOLD
        and launcher.numel < SMALL_NUMEL_THRESHOLD
        and not torch.cuda.is_current_stream_capturing()
    ):
        return _evaluate(xs, tree)
    return launcher(xs, tree)


_lib.impl("fused_add_tree", _cpu_impl, "CPU")
_lib.impl("fused_add_tree", _cuda_impl, "CUDA")


# ----------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    xs, tree = inputs
    ctx.tree = tree
    ctx.leaves = tuple((tuple(x.shape), x.dtype) for x in xs)  # no tensor is kept alive
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None


@lru_cache(maxsize=1024)
def _temp_metas(tree_text: str, leaves: tuple) -> tuple:
    """(shape, dtype) of every temp of the tree, by ATen's own broadcast and promotion rules
    (0-dim operands promote differently: evaluate on meta tensors, not by hand)."""
    tree = ew.parse_tree(tree_text)
    env = {f"x{i}": torch.empty(shape, dtype=dtype, device="meta") for i, (shape, dtype) in enumerate(leaves)}
    metas = []
    for k, st in enumerate(tree.stmts):
        t = env[f"t{k}"] = (torch.add if st.op == "add" else torch.sub)(env[st.a], env[st.b])
        metas.append((tuple(t.shape), t.dtype))
    return tuple(metas)


def tree_vjp(tree_text: str, leaves: Sequence[tuple], grads: Sequence[torch.Tensor | None],
             needed: Sequence[bool] | None = None) -> list:
    """Gradients of the tree's inputs (None where none flows or ``needed`` says no) from
    those of its outputs; ``leaves``: each input's (shape, dtype).

    Like eager autograd on the unfused adds: statements in reverse order, each operand's
    contribution reduced to the operand's shape (``sum_to_size``) and then cast to its
    dtype, contributions to one value added in the order the engine would deliver them
    (later statements first), so for the same operations the result is the same bits."""
    tree = ew.parse_tree(tree_text)
    leaves = tuple(leaves)
    metas = dict(zip((f"t{k}" for k in range(len(tree.stmts))), _temp_metas(tree_text, leaves)))
    metas.update((f"x{i}", m) for i, m in enumerate(leaves))
    acc: dict[str, torch.Tensor] = {}
    for name, g in zip(tree.outputs, grads):
        if g is not None:
            acc[name] = g

    def give(name: str, g: torch.Tensor) -> None:
        if needed is not None and name[0] == "x" and not needed[int(name[1:])]:
            return
        shape, dtype = metas[name]
        if tuple(g.shape) != shape:
            g = g.sum_to_size(shape)
        if g.dtype != dtype:
            g = g.to(dtype)
        acc[name] = g if name not in acc else acc[name] + g

    for k in range(len(tree.stmts) - 1, -1, -1):
        g = acc.pop(f"t{k}", None)
        if g is None:
            continue
        st = tree.stmts[k]
        give(st.a, g)
        give(st.b, g if st.op == "add" else torch.neg(g))
    return [acc.get(f"x{i}") for i in range(len(leaves))]


def _backward(ctx, grads):
    needed = ctx.needs_input_grad[0]  # one bool per tensor of xs
    return tree_vjp(ctx.tree, ctx.leaves, grads, needed), None


torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)

fused_add_tree_op = torch.ops.fxopt.fused_add_tree.default

_is_compiling = torch.compiler.is_compiling
_dispatch_depth = torch._C._len_torch_dispatch_stack
_grad_enabled = torch._C.is_grad_enabled
_any_requires_grad = torch._C._any_requires_grad
_functorch_active = torch._C._are_functorch_transforms_active
_Tensor = torch.Tensor

# Tests set this to drive the launcher path with CPU tensors under TRITON_INTERPRET=1 (no GPU
# in CI). On CUDA tensors ``x0.is_cuda`` short-circuits and it is never read.
FAST_PATH_ON_CPU = False


def fused_add_tree(xs, tree):
    """What rewritten graphs call. Semantically ``fxopt::fused_add_tree(xs, tree)``.

    On plain tensors outside any tracing, and when no gradient can flow through the call,
    it skips the dispatcher: CUDA tensors go straight to the cached launcher (at decode
    sizes the launch cost *is* the cost), others are evaluated with ATen as the op's CPU
    impl would. Otherwise it calls the custom op: under tracing (FakeTensors,
    torch.export, torch.compile, dispatch modes), so a rewritten graph exports/compiles
    to the op; and whenever autograd would record the call (grad mode on and an input
    requiring grad, a torch.func transform, or a forward-AD dual level), so the outputs
    carry history (or forward mode gets its clear error). The checks are a few C calls
    (~0.1 us under ``torch.no_grad()``, ~0.3 us with grad mode on, as measured on CPU;
    benchmarks/fast_path_gate.py)."""
    x0 = xs[0]
    if (
        type(x0) is _Tensor
        and not (_grad_enabled() and _any_requires_grad(*xs))
        and _forward_ad._current_level < 0
        and not _functorch_active()
        and not _is_compiling()
        and not _dispatch_depth()
    ):
        if not (x0.is_cuda or FAST_PATH_ON_CPU):
            # CPU (or another device): what the op's CPU impl would do, minus the dispatcher
            # and its Python autograd kernel
            return _evaluate(xs, tree)
        key = (tree, _backend_raw(), x0.get_device(), *[(x.shape, x.stride(), x.dtype, x.data_ptr() & 15) for x in xs])
        launcher = _FAST.get(key)
        if launcher is None:
            backend = _backend()
            if not all(type(x) is _Tensor and x.device == x0.device for x in xs):
                return fused_add_tree_op(xs, tree)
            if len(_FAST) >= _MAX_LAUNCHERS:
                _FAST.clear()
            launcher = _FAST[key] = get_launcher(xs, tree, backend)
        if SMALL_NUMEL_THRESHOLD and launcher.numel < SMALL_NUMEL_THRESHOLD and not torch.cuda.is_current_stream_capturing():
            return _evaluate(xs, tree)
        return launcher(xs, tree)
    return fused_add_tree_op(xs, tree)


_FAST: dict[tuple, _Launcher] = {}


def run_generated(xs: Sequence[torch.Tensor], tree: str, backend: str = "triton") -> list[torch.Tensor]:
    """Run the generated kernel for ``tree`` on ``xs`` whatever the device (CPU tensors
    work under ``TRITON_INTERPRET=1``), bypassing the size threshold and the op. For
    tests and benchmarks."""
    launcher = _make_launcher(list(xs), tree, backend)
    if launcher.launch is None:
        raise CodegenError(f"the generated {backend} kernel cannot take this call (layout/dtype); ATen would be used")
    return launcher(list(xs), tree)


def kernel_source(tree: str, dtype: torch.dtype = torch.float16, backend: str | None = None,
                  in_linear=None, out_linear=None, ndim: int = 1) -> tuple[str, str]:
    """(name, source) of the kernel the backend generates for ``tree``."""
    backend = backend or _backend()
    t = ew.parse_tree(tree)
    if backend == "cuda":
        sym, cu = ew.emit_cuda(t)
        return sym, cu
    return ew.emit_triton(t, dtype, in_linear, out_linear, ndim)
