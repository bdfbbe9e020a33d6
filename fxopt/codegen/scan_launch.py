"""Host side of the selective scan's kernels: one launch plan per input signature.

Both kernels (Gluon, :mod:`fxopt.codegen.scan_gluon`; plain Triton, :mod:`fxopt.codegen.scan_triton`)
take the same arguments::

    pointers   u, delta, A, B, C, D, z, h0, y, h_last, S, ds     (S, ds: the group pre-pass's scratch)
    scalars    d, n, l, LG / K, G, G - 1, then the strides of u, delta, A, B, C, z, y
    constexprs HAS_D, HAS_Z, HAS_H0, STATE_ONLY, then the kernel's own

with grid ``(d / BD, G, b)``, and for ``G > 1`` a pre-pass launch (``STATE_ONLY``, grid
``(d / BD, G - 1, b)``) first.

Everything a launch derives from its inputs depends only on their shapes, strides, dtypes,
devices and 16-byte alignment, on ``out_dtype``, on FXOPT_SCAN_EXP and on an explicit config:
that tuple is the plan key (:func:`plan_key`). The first call with a key chooses the kernel and
its config (:func:`fxopt.codegen.scan_config.choose_config`), decides which inputs its layout needs
copied, computes grids and every scalar, and launches through Triton's JIT, keeping the compiled
kernels. Every later call with the key replays the plan (:class:`LaunchPlan`): allocates the
outputs and scratch, makes the copies decided for the signature, and launches the compiled kernels
directly (:func:`fxopt.codegen.launch.run_compiled`: the JIT's argument binding costs tens of
microseconds). Under ``TRITON_INTERPRET=1`` plans replay the same way with CPU tensors, launching
through the interpreter.

The Gluon kernel may fail to compile for a layout: the first call then warns and the signature's
plan uses the Triton kernel.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from ..config import scan_exp_raw
from ..errors import CodegenError
from .launch import compiled_kernel, run_compiled
from .scan_config import (GluonScanConfig, KernelChoice, ScanConfig, capability, choose_config, choose_triton_config,
                          gluon_available, kernel_strides, next_pow2, sm_count)
from .scan_ref import SelectiveScanArgs, compute_dtype, selective_scan_ref

_PLANS: dict = {}
_MAX_PLANS = 256


def plan_key(a: SelectiveScanArgs, config: Optional[ScanConfig] = None) -> tuple:
    """What a launch depends on: per tensor shape, strides, dtype, device and alignment; out_dtype;
    FXOPT_SCAN_EXP as set; the explicit config."""
    return (scan_exp_raw(), config, a.out_dtype,
            *[None if t is None else (t.shape, t.stride(), t.dtype, t.get_device(), t.data_ptr() & 15) for t in a[:8]])


def run(a: SelectiveScanArgs, config: Optional[ScanConfig] = None) -> tuple[Tensor, Tensor]:
    """``fxopt::selective_scan`` through the plan of ``a``'s signature (made on its first call)."""
    key = plan_key(a, config)
    plan = _PLANS.get(key)
    if plan is None:
        return _first_call(key, a, config)
    return plan(a)


def selective_scan(*args, config: Optional[ScanConfig] = None, **kwargs) -> tuple[Tensor, Tensor]:
    """:func:`run` with the op's arguments (as :class:`SelectiveScanArgs`; for tests and benchmarks)."""
    return run(SelectiveScanArgs(*args, **kwargs), config)


def clear_plans() -> None:
    _PLANS.clear()


def _first_call(key: tuple, a: SelectiveScanArgs, config: Optional[ScanConfig]) -> tuple[Tensor, Tensor]:
    plan = build_plan(a, config)
    try:
        out = plan(a)
    except KernelDeclined as exc:
        warnings.warn(f"fxopt: the Gluon selective-scan kernel did not compile for inputs {key[3:]} ({exc}); "
                      "using the Triton kernel", RuntimeWarning, stacklevel=3)
        plan = build_plan(a, config, gluon=False)
        out = plan(a)
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = plan
    return out


# ----------------------------------------------------------------------------------------------
# plans
# ----------------------------------------------------------------------------------------------
class KernelDeclined(Exception):
    """The first launch of a kernel that may decline a layout (the Gluon one) failed."""


class Launch:
    """One kernel launch of a plan: grid and every argument after the pointers. Launches through
    Triton's JIT until the JIT hands back a compiled kernel (not under the interpreter), then
    directly."""

    __slots__ = ("kernel", "grid", "tail", "num_warps", "compiled", "fallible")

    def __init__(self, kernel, grid: tuple, tail: tuple, num_warps: int, fallible: bool):
        self.kernel, self.grid, self.tail, self.num_warps, self.fallible = kernel, grid, tail, num_warps, fallible
        self.compiled = None

    def __call__(self, ptrs: tuple, stream: int) -> None:
        k = self.compiled
        if k is not None:
            run_compiled(k, self.grid, stream, (*ptrs, *self.tail))
            return
        try:
            res = self.kernel[self.grid](*ptrs, *self.tail, num_warps=self.num_warps, num_stages=1)
        except Exception as exc:  # a compiler limit this layout hits: the caller falls back
            if self.fallible:
                raise KernelDeclined(f"{type(exc).__name__}: {str(exc)[:200]}") from exc
            raise
        self.fallible = False  # it compiled: a later failure is an error, not a declined layout
        self.compiled = compiled_kernel(res)


class LaunchPlan:
    """One signature's work, derived once: output shapes, the copies its layout needs, scratch
    size, and the launches. A call allocates, copies, and launches; nothing else."""

    __slots__ = ("y_shape", "h_shape", "out_dtype", "preps", "scratch", "split", "launches", "device_index",
                 "direct")

    def __init__(self, y_shape, h_shape, out_dtype, preps, scratch, split, launches, device_index):
        self.y_shape, self.h_shape, self.out_dtype = y_shape, h_shape, out_dtype
        self.preps = preps              # ((index in SelectiveScanArgs, fn(t) -> t), ...)
        self.scratch, self.split = scratch, split  # fp32 elements of S and ds, where ds starts
        self.launches = launches
        self.device_index = device_index  # CUDA device index; -1: CPU (interpreter)
        # ((compiled kernel, grid, tail), ...) once every launch has a compiled kernel (CUDA)
        self.direct: Optional[tuple] = None

    def __call__(self, a: SelectiveScanArgs) -> tuple[Tensor, Tensor]:
        u = a.u
        y = u.new_empty(self.y_shape, dtype=self.out_dtype)
        hl = u.new_empty(self.h_shape, dtype=torch.float32)
        if self.preps:
            a = list(a)
            for i, prep in self.preps:
                a[i] = prep(a[i])
        u, delta, A, B, C, D, z, h0 = a[:8]
        direct = self.direct
        if direct is not None:
            # compiled kernels take addresses (a tensor would cost a method call and a driver
            # query per pointer); everything here lives on the current stream until the launches
            # are queued
            yp, hp = y.data_ptr(), hl.data_ptr()
            if self.scratch:
                buf = u.new_empty((self.scratch,), dtype=torch.float32)
                S = buf.data_ptr()
                ds = S + 4 * self.split
            else:
                S = ds = hp
            ptrs = (u.data_ptr(), delta.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(),
                    yp if D is None else D.data_ptr(), yp if z is None else z.data_ptr(),
                    yp if h0 is None else h0.data_ptr(), yp, hp, S, ds)
            stream = _raw_stream(self.device_index)
            for k, grid, tail in direct:
                run_compiled(k, grid, stream, (*ptrs, *tail))
            return y, hl
        if self.scratch:
            buf = u.new_empty((self.scratch,), dtype=torch.float32)
            S, ds = buf[: self.split], buf[self.split:]
        else:
            S = ds = hl
        ptrs = (u, delta, A, B, C, y if D is None else D, y if z is None else z, y if h0 is None else h0,
                y, hl, S, ds)
        stream = _raw_stream(self.device_index) if self.device_index >= 0 else 0
        for launch in self.launches:
            launch(ptrs, stream)
        if self.device_index >= 0 and all(launch.compiled is not None for launch in self.launches):
            self.direct = tuple((launch.compiled, launch.grid, launch.tail) for launch in self.launches)
        return y, hl


def _raw_stream(device_index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device_index)


class _EmptyPlan:
    """A dimension of size 0: nothing to launch; h_last is h0 (or zeros)."""

    __slots__ = ("y_shape", "h_shape", "out_dtype")

    def __init__(self, y_shape, h_shape, out_dtype):
        self.y_shape, self.h_shape, self.out_dtype = y_shape, h_shape, out_dtype

    def __call__(self, a: SelectiveScanArgs) -> tuple[Tensor, Tensor]:
        y = a.u.new_empty(self.y_shape, dtype=self.out_dtype)
        hl = a.u.new_empty(self.h_shape, dtype=torch.float32)
        if a.h0 is not None:
            hl.copy_(a.h0.expand(self.h_shape))
        else:
            hl.zero_()
        return y, hl


def _reference_plan(a: SelectiveScanArgs) -> tuple[Tensor, Tensor]:
    """fp64 inputs: the kernels compute in fp32, the reference in fp64."""
    return selective_scan_ref(*a)


def _h0_prep(h_shape: tuple):
    def prep(h0: Tensor) -> Tensor:
        return h0.to(torch.float32).expand(h_shape).contiguous()

    return prep


def kernel_choice(a: SelectiveScanArgs, config: Optional[ScanConfig] = None, gluon: bool = True) -> KernelChoice:
    """The kernel and its needs for inputs like ``a``: ``config`` or the default choice; the
    Triton kernel where the Gluon kernel is unavailable, declines the layout, or ``gluon`` is off."""
    from . import scan_triton

    bsz, d, L = a.u.shape
    n = a.A.shape[-1]
    dev = a.u.get_device()
    cfg = config or choose_config(bsz, d, L, n, dev)
    if isinstance(cfg, GluonScanConfig):
        if not gluon_available(dev):
            raise CodegenError("a GluonScanConfig needs a CUDA device with async copies (sm_80+) and compiled "
                               "Triton (not TRITON_INTERPRET=1); use a TritonScanConfig")
        if gluon:
            from . import scan_gluon

            choice = scan_gluon.specialise(a, cfg, capability(dev))
            if choice is not None:
                return choice
        cfg = choose_triton_config(bsz, d, L, n, sm_count(dev))
    return scan_triton.specialise(a, cfg)


def build_plan(a: SelectiveScanArgs, config: Optional[ScanConfig] = None, gluon: bool = True):
    """The plan (a callable of :class:`SelectiveScanArgs`) for inputs with ``a``'s signature."""
    y_shape = tuple(a.u.shape)
    bsz, d, L = y_shape
    n = a.A.shape[-1]
    h_shape = (bsz, d, n)
    out_dtype = a.out_dtype or a.u.dtype
    if compute_dtype(*a.tensors()) == torch.float64:
        return _reference_plan
    if L == 0 or bsz == 0 or d == 0:
        return _EmptyPlan(y_shape, h_shape, out_dtype)
    devices = {t.device for t in a.tensors() if t is not None}
    if len(devices) > 1:
        raise CodegenError(f"fxopt::selective_scan: every tensor must be on one device, got {sorted(map(str, devices))}")
    choice = kernel_choice(a, config, gluon)
    preps = [(i, p) for i, p in enumerate(choice.preps) if p is not None]
    h0 = a.h0
    if h0 is not None and not (h0.dtype == torch.float32 and tuple(h0.shape) == h_shape and h0.is_contiguous()):
        preps.append((7, _h0_prep(h_shape)))
    ts = list(a[:8])
    for i, prep in preps:
        ts[i] = prep(ts[i])
    u, delta, A, B, C, D, z, h0 = ts
    K = choice.chunk
    LG = -(-(-(-L // choice.groups)) // K) * K   # group length: whole chunks
    G = -(-L // LG)
    nblk = -(-d // choice.block_d)
    y_strides = tuple(0 if s == 1 else st for s, st in zip(y_shape, (d * L, L, 1)))
    strides = (*kernel_strides(u), *kernel_strides(delta), *kernel_strides(A), *kernel_strides(B),
               *kernel_strides(C), *kernel_strides(z), *y_strides)
    scalars = (d, n, L, LG // K, G, G - 1, *strides)
    launches = []
    if G > 1:
        launches.append(Launch(choice.kernel, (nblk, G - 1, bsz), (*scalars, False, False, False, True, *choice.constexprs),
                               choice.num_warps, choice.fallible))
    launches.append(Launch(choice.kernel, (nblk, G, bsz),
                           (*scalars, D is not None, z is not None, h0 is not None, False, *choice.constexprs),
                           choice.num_warps, choice.fallible))
    NP = next_pow2(n)
    scratch = bsz * G * d * (NP + 1) if G > 1 else 0
    return LaunchPlan(y_shape, h_shape, out_dtype, tuple(preps), scratch, bsz * G * d * NP, tuple(launches),
                      a.u.get_device())
