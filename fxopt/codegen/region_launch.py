"""Planning and launching region kernels, cached per specialisation.

A *launcher* is everything one specialisation of a region needs (key: region text, backend,
and per input dtype, shape, strides, 16-byte alignment and device): eager's output layouts,
and either a launch function (the generated Triton kernel, compiled once, then called through
:func:`fxopt.codegen.launch.run_compiled` with its arguments pre-packed, so a repeated call
only allocates the outputs and launches) or ``None`` with the reason the kernel cannot take
the call (then the reference is evaluated: bit-equal to eager). Kernels launch on the current
stream and are CUDA-graph capturable.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import CodegenError
from . import region as rg
from . import region_triton as rt
from .cache import load_triton_module
from .launch import compiled_kernel, run_compiled

_MAX_LAUNCHERS = 4096
# compile options of every region kernel: no fp contraction (a*b+c stays two roundings, as in
# eager's separate kernels; the emitter writes fma where ATen's kernel has one) and libdevice
# without flush-to-zero (as nvcc compiles ATen's kernels)
LAUNCH_OPTIONS = {"enable_fp_fusion": False, "enable_reflect_ftz": False}


class RegionLauncher:
    """One specialisation: ``out_specs`` ``[(shape, stride, dtype)]``, ``launch(xs, outs)`` or
    None (then ``reason`` says why and calls evaluate the reference)."""

    __slots__ = ("region", "out_specs", "launch", "reason", "spec", "config", "kernel_name")

    def __init__(self, region, out_specs, launch, reason="", spec=None, config=None, kernel_name=None):
        self.region = region
        self.out_specs = out_specs
        self.launch = launch
        self.reason = reason
        self.spec = spec
        self.config = config
        self.kernel_name = kernel_name

    def __call__(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.launch is None:
            return self.region.evaluate(list(xs))
        x0 = xs[0]
        outs = [x0.new_empty_strided(shape, stride, dtype=dt) for shape, stride, dt in self.out_specs]
        self.launch(xs, outs)
        return outs


def _triton_launch(spec: rg.Spec, xs: Sequence[torch.Tensor],
                   emission: str | None = None) -> tuple[Callable, rt.KernelConfig, str]:
    import triton

    interpret = bool(triton.knobs.runtime.interpret) or xs[0].device.type != "cuda"
    cfg = rt.kernel_config(spec, interpret)
    name, src = rt.emit_triton(spec, interpret, emission)
    mod = load_triton_module(name, src, signature=f"interpret={interpret}")
    fn = getattr(mod, name)
    scalars = rt.scalar_args(spec)
    grid = (triton.cdiv(spec.rows, cfg.block_m), cfg.col_blocks, 1)
    opts = dict(num_warps=cfg.num_warps, **LAUNCH_OPTIONS)
    if interpret:
        opts = {}  # the interpreter takes no compile options

    def slow(xs, outs):
        return fn[grid](*xs, *outs, *scalars, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, I64=cfg.i64, **opts)

    if interpret:
        return slow, cfg, name

    dev = xs[0].device
    dev_index = dev.index if dev.index is not None else torch.cuda.current_device()
    get_stream = torch._C._cuda_getCurrentRawStream
    tail = (*scalars, cfg.block_m, cfg.block_n, cfg.i64)
    state: dict[str, object] = {}

    def fast(xs, outs):
        k = state.get("kernel")
        if k is None:
            state["kernel"] = compiled_kernel(slow(xs, outs)) or False
            return
        if k is False:
            slow(xs, outs)
            return
        run_compiled(k, grid, get_stream(dev_index), (*xs, *outs, *tail))

    return fast, cfg, name


def make_launcher(xs: Sequence[torch.Tensor], text: str, backend: str, emission: str | None = None) -> RegionLauncher:
    """Plan one call (no caching): the kernel where it can take the call, else the reference.
    ``emission``: see :func:`fxopt.codegen.region_triton.emit_triton` (None: FXOPT_REGION_EMIT)."""
    region = rg.parse_region(text)
    out_specs, spec, reason = rg.plan(region, xs)
    if backend == "torch":
        return RegionLauncher(region, out_specs, None, "FXOPT_BACKEND=torch")
    if backend not in ("triton", "cuda"):
        raise CodegenError(f"unknown FXOPT_BACKEND {backend!r}; use triton, cuda or torch")
    if spec is None:
        return RegionLauncher(region, out_specs, None, reason)
    device = xs[0].device
    if any(x.device != device for x in xs):
        return RegionLauncher(region, out_specs, None, "inputs on several devices")
    try:
        launch, cfg, name = _triton_launch(spec, xs, emission)
    except CodegenError as exc:  # a construct the emitter does not generate: the reference runs
        return RegionLauncher(region, out_specs, None, str(exc), spec)
    return RegionLauncher(region, out_specs, launch, "", spec, cfg, name)


def spec_key(xs: Sequence[torch.Tensor], text: str, backend: str) -> tuple:
    return (text, backend, rt.resolve_emission(None)) + tuple(
        (x.dtype, tuple(x.shape), x.stride(), x.data_ptr() % 16 == 0, x.device) for x in xs)


_LAUNCHERS: dict[tuple, RegionLauncher] = {}


def get_launcher(xs: Sequence[torch.Tensor], text: str, backend: str) -> RegionLauncher:
    key = spec_key(xs, text, backend)
    launcher = _LAUNCHERS.get(key)
    if launcher is None:
        if len(_LAUNCHERS) >= _MAX_LAUNCHERS:
            _LAUNCHERS.clear()
        launcher = _LAUNCHERS[key] = make_launcher(xs, text, backend)
    return launcher


def kernel_source(xs: Sequence[torch.Tensor], text: str, interpret: bool = False,
                  emission: str | None = None) -> tuple[str, str] | None:
    """``(name, source)`` of the kernel generated for this call (meta / fake tensors are
    fine), or None when the kernel cannot take it."""
    region = rg.parse_region(text)
    _, spec, _ = rg.plan(region, xs)
    if spec is None:
        return None
    try:
        return rt.emit_triton(spec, interpret, emission)
    except CodegenError:
        return None


def compile_for_target(xs: Sequence[torch.Tensor], text: str, arch: int = 90, emission: str | None = None,
                       config: rt.KernelConfig | None = None):
    """``(compiled kernel, KernelConfig)``: the kernel of this call compiled for ``sm_<arch>`` without
    a GPU (ptxas ships with Triton), specialised as a launch on ``xs`` would be (meta tensors
    are fine: a pointer is 16-byte aligned where its storage offset is; ints equal to 1 become
    constants and those divisible by 16 are marked so, as the JIT does). For reading the PTX /
    SASS (vector widths, instruction counts, registers) of an emission offline."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    region = rg.parse_region(text)
    _, spec, reason = rg.plan(region, xs)
    if spec is None:
        raise CodegenError(f"the generated kernel cannot take this call: {reason}")
    cfg = config or rt.kernel_config(spec)
    name, src = rt.emit_triton(spec, False, emission)
    fn = getattr(load_triton_module(name, src, signature="interpret=False"), name)
    names = fn.arg_names
    tdt = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64"}
    outs = [torch.empty_strided(s, st, dtype=dt, device="meta") for s, st, dt in
            zip(spec.out_shapes, spec.out_strides, (o.dtype for o in spec.outputs))]
    ptrs = [(tdt[t.dtype], (t.storage_offset() * t.element_size()) % 16 == 0) for t in (*xs, *outs)]
    ints = rt.scalar_args(spec)
    consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "I64": cfg.i64}
    sig, div16 = {}, []
    for i, nm in enumerate(names):
        if nm in consts:
            sig[nm] = "constexpr"
        elif i < len(ptrs):
            sig[nm] = ptrs[i][0]
            if ptrs[i][1]:
                div16.append(i)
        else:
            v = ints[i - len(ptrs)]
            if v == 1:
                sig[nm] = "constexpr"
                consts[nm] = 1
            else:
                sig[nm] = "i64" if abs(v) >= 2**31 else "i32"
                if v % 16 == 0:
                    div16.append(i)
    src_ = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                     attrs={(i,): [["tt.divisibility", 16]] for i in div16})
    opts = dict(num_warps=cfg.num_warps, num_stages=1, **LAUNCH_OPTIONS)
    return triton.compile(src_, target=GPUTarget("cuda", arch, 32), options=opts), cfg
