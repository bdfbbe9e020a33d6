"""Planning and launching of fused add trees (``fxopt::fused_add_tree``; the op is in
:mod:`fxopt.ops.fused_add`, the tree IR and the emitters in :mod:`fxopt.codegen.elementwise`).

One cache of :class:`Launcher` objects, one key (:func:`launcher_key`): the tree, the backend as
requested, and per input its shape, strides, dtype, device and 16-byte alignment. A launcher holds
everything a call with that key needs: the outputs' layouts (eager's, from a meta evaluation) and
a launch function with its grid and scalar arguments fixed. A call allocates the outputs and
launches; the first Triton launch goes through the JIT and keeps the compiled kernel, later ones
call it directly (:func:`fxopt.codegen.launch.run_compiled`). Layouts the generated kernels do not
take (mixed dtypes, more than :data:`fxopt.codegen.elementwise.MAX_DIMS` collapsed dims, several
devices, ``FXOPT_BACKEND=torch``, empty outputs) get a launcher that evaluates with ATen, which is
bit-equal anyway. Kernels launch on the current stream and are CUDA-graph capturable.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.fx

from .. import config
from ..errors import CodegenError
from . import elementwise as ew
from .cache import build_cuda_extension, load_triton_module
from .launch import compiled_kernel, run_compiled

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def evaluate(xs: Sequence[torch.Tensor], tree: str) -> list[torch.Tensor]:
    """The tree evaluated with eager ATen ops in statement order (the unfused computation itself);
    outputs are fresh tensors, never inputs."""
    outs = ew.parse_tree(tree).evaluate(list(xs))
    return [o.clone() if any(o is x for x in xs) else o for o in outs]


class Launcher:
    """One specialisation's work: output layouts and a launch function (None: ATen evaluation)."""

    __slots__ = ("tree", "out_specs", "launch")

    def __init__(self, tree: str, out_specs, launch: Optional[Callable]):
        self.tree = tree
        self.out_specs = out_specs  # [(shape, stride, dtype)]
        self.launch = launch        # fn(xs, outs)

    def __call__(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.launch is None:
            return evaluate(xs, self.tree)
        x0 = xs[0]  # kernel path: every output has x0's dtype and device
        outs = [x0.new_empty_strided(s, st) for s, st, _ in self.out_specs]
        self.launch(xs, outs)
        return outs


_LAUNCHERS: dict[tuple, Launcher] = {}
_MAX_LAUNCHERS = 4096


def launcher_key(xs: Sequence[torch.Tensor], tree: str, backend: Optional[str] = None) -> tuple:
    """What a launcher depends on. ``backend`` None: FXOPT_BACKEND as set (read cheaply)."""
    return (tree, config.backend_raw() if backend is None else backend,
            *[(x.shape, x.stride(), x.dtype, x.get_device(), x.data_ptr() & 15) for x in xs])


def launcher_for(xs: Sequence[torch.Tensor], tree: str, backend: Optional[str] = None) -> Launcher:
    """The cached launcher of this call's specialisation (made on a miss)."""
    key = launcher_key(xs, tree, backend)
    launcher = _LAUNCHERS.get(key)
    if launcher is None:
        if len(_LAUNCHERS) >= _MAX_LAUNCHERS:
            _LAUNCHERS.clear()
        launcher = _LAUNCHERS[key] = make_launcher(xs, tree, backend or config.backend_raw())
    return launcher


def clear_launchers() -> None:
    _LAUNCHERS.clear()


# ----------------------------------------------------------------------------------
# planning
# ----------------------------------------------------------------------------------
def out_specs(xs: Sequence[torch.Tensor], tree: ew.Tree) -> list[tuple]:
    """(shape, strides, dtype) of every output, as eager computes them (TensorIterator's rules)."""
    metas = [torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta") for x in xs]
    return [(tuple(o.shape), tuple(o.stride()), o.dtype) for o in tree.evaluate(metas)]


def plan(xs: Sequence[torch.Tensor], tree: ew.Tree):
    """(out_specs, Layout | None): None when the generated kernel cannot take this call."""
    specs = out_specs(xs, tree)
    dtypes = {x.dtype for x in xs}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _SUPPORTED:
        return specs, None
    if any(o[2] != xs[0].dtype for o in specs):
        return specs, None
    root_shape = specs[0][0]
    if any(o[0] != root_shape for o in specs):
        return specs, None
    layout = ew.plan_layout(root_shape, [x.shape for x in xs], [x.stride() for x in xs], [o[1] for o in specs])
    return specs, layout


def triton_block_config(numel: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a launch over ``numel`` elements."""
    if numel <= 4096:
        return 1024, 4
    return 2048, 8


def _triton_launch(tree: ew.Tree, dtype: torch.dtype, layout: ew.Layout, device: torch.device) -> Callable:
    import triton

    name, src = ew.emit_triton(tree, dtype, layout.in_linear, layout.out_linear, layout.ndim)
    interpret = bool(triton.knobs.runtime.interpret)
    fn = getattr(load_triton_module(name, src, signature=f"interpret={interpret}"), name)
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

    def through_jit(xs, outs):
        return fn[grid](*xs, *outs, *scalars, BLOCK=block, I64=i64, num_warps=warps)

    if interpret or device.type != "cuda":
        return through_jit

    dev_index = device.index if device.index is not None else torch.cuda.current_device()
    get_stream = torch._C._cuda_getCurrentRawStream
    tail = (*scalars, block, i64)
    state: dict[str, object] = {}

    def direct(xs, outs):
        k = state.get("kernel")
        if k is None:  # compile (or fetch from Triton's cache) and launch once
            state["kernel"] = compiled_kernel(through_jit(xs, outs)) or False
        elif k is False:  # this Triton hands back no compiled kernel: keep the JIT
            through_jit(xs, outs)
        else:  # addresses, not tensors: the launcher would query the driver for each pointer
            run_compiled(k, grid, get_stream(dev_index),
                         (*[x.data_ptr() for x in xs], *[o.data_ptr() for o in outs], *tail))

    return direct


def _cuda_launch(tree: ew.Tree, dtype: torch.dtype, layout: ew.Layout) -> Callable:
    sym, cu = ew.emit_cuda(tree)
    ext = build_cuda_extension(sym, cu, ew.emit_cuda_binding(tree))
    meta = [ew.CUDA_DTYPE_CODE[dtype], layout.ndim, int(layout.all_linear), layout.numel, *layout.sizes]
    for st in layout.in_strides:
        meta += list(st)
    for st in layout.out_strides:
        meta += list(st)
    run = ext.run
    return lambda xs, outs: run(list(xs), outs, meta)


def make_launcher(xs: Sequence[torch.Tensor], tree_text: str, backend: str) -> Launcher:
    """A launcher for calls like this one (uncached: see :func:`launcher_for`)."""
    tree = ew.parse_tree(tree_text)
    specs, layout = plan(xs, tree)
    device = xs[0].device
    if backend == "torch" or layout is None or layout.numel == 0 or any(x.device != device for x in xs):
        return Launcher(tree_text, specs, None)
    dtype = xs[0].dtype
    if backend == "triton":
        launch = _triton_launch(tree, dtype, layout, device)
    elif backend == "cuda":
        launch = _cuda_launch(tree, dtype, layout)
    else:
        raise CodegenError(f"unknown FXOPT_BACKEND {backend!r}; use triton, cuda or torch")
    return Launcher(tree_text, specs, launch)


def run_generated(xs: Sequence[torch.Tensor], tree: str, backend: str = "triton") -> list[torch.Tensor]:
    """Run the generated kernel for ``tree`` on ``xs`` whatever the device (CPU tensors work
    under ``TRITON_INTERPRET=1``), bypassing the op and the cache. For tests and benchmarks."""
    launcher = make_launcher(list(xs), tree, backend)
    if launcher.launch is None:
        raise CodegenError(f"the generated {backend} kernel cannot take this call (layout/dtype); ATen would be used")
    return launcher(list(xs))


# ----------------------------------------------------------------------------------
# source (inspection)
# ----------------------------------------------------------------------------------
def kernel_source(tree: str, dtype: torch.dtype = torch.float16, backend: Optional[str] = None,
                  in_linear=None, out_linear=None, ndim: int = 1) -> tuple[str, str]:
    """(name, source) of the kernel the backend generates for ``tree``."""
    backend = backend or config.backend()
    t = ew.parse_tree(tree)
    if backend == "cuda":
        return ew.emit_cuda(t)
    return ew.emit_triton(t, dtype, in_linear, out_linear, ndim)


def kernel_source_for_node(node: torch.fx.Node) -> Optional[tuple[str, str]]:
    """The source the configured backend generates for a fused-add node's call, specialised with
    the layout recorded in the graph's fake values (a source provider for
    :func:`fxopt.codegen.kernel_sources`)."""
    xs_nodes, tree_text = node.args[0], node.args[1]
    tree = ew.parse_tree(tree_text)
    backend = config.backend()
    if backend == "cuda":
        return ew.emit_cuda(tree)
    vals = [n.meta.get("val") if isinstance(n, torch.fx.Node) else None for n in xs_nodes]
    dtype = torch.float32
    in_linear = out_linear = None
    ndim = 1
    if all(isinstance(v, torch.Tensor) for v in vals) and vals:
        dtype = vals[0].dtype
        try:
            _, layout = plan(vals, tree)
        except Exception:  # symbolic shapes etc.: show the all-contiguous kernel
            layout = None
        if layout is not None:
            in_linear, out_linear, ndim = layout.in_linear, layout.out_linear, layout.ndim
    if backend == "torch":
        return f"{tree_text} (aten)", "# FXOPT_BACKEND=torch: evaluated with ATen ops\n# " + tree.expression() + "\n"
    return ew.emit_triton(tree, dtype, in_linear, out_linear, ndim)
