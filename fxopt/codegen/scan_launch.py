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
directly (bound once, :func:`fxopt.codegen.launch.bind`: the JIT's argument binding costs tens of
microseconds). Under ``TRITON_INTERPRET=1`` plans replay the same way with CPU tensors, launching
through the interpreter.

Host time per call is the point of the plan (issue 12: <= 25 us): a replay reads each input's
shape, strides, dtype, device and address once (:func:`_key_and_ptrs`: the key takes the
address's alignment, the launch the address itself), looks the plan up, allocates, and launches
with every other argument pre-packed at the plan's first compiled launch.

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
from .launch import bind as bind_kernel
from .launch import compiled_kernel, launch_hooks, run_compiled
from .scan_config import (GluonScanConfig, KernelChoice, ScanConfig, capability, choose_config, choose_triton_config,
                          gluon_available, kernel_strides, next_pow2, sm_count)
from .scan_ref import SelectiveScanArgs, compute_dtype, selective_scan_ref

_PLANS: dict = {}
_MAX_PLANS = 256


def _key_and_ptrs(a: SelectiveScanArgs, config: Optional[ScanConfig]) -> tuple[tuple, tuple]:
    """(the plan key, the eight inputs' addresses: None for an absent one). The key is what a
    launch depends on: FXOPT_SCAN_EXP as set; the explicit config; out_dtype; per tensor shape,
    strides, dtype, device and 16-byte alignment (None for an absent one). Spelled out tensor by
    tensor, flat, and reading each address once (the replay launches with it): this runs on every
    call, and the generic spelling (a comprehension of per-tensor tuples, then the addresses read
    again for the launch) cost several microseconds more."""
    u, delta, A, B, C, D, z, h0, out_dtype = a
    pu, pt, pa, pb, pc = u.data_ptr(), delta.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr()
    if D is None:
        pd = kd = None
    else:
        pd = D.data_ptr()
        kd = (D.shape, D.stride(), D.dtype, D.get_device(), pd & 15)
    if z is None:
        pz = kz = None
    else:
        pz = z.data_ptr()
        kz = (z.shape, z.stride(), z.dtype, z.get_device(), pz & 15)
    if h0 is None:
        ph = kh = None
    else:
        ph = h0.data_ptr()
        kh = (h0.shape, h0.stride(), h0.dtype, h0.get_device(), ph & 15)
    key = (scan_exp_raw(), config, out_dtype,
           u.shape, u.stride(), u.dtype, u.get_device(), pu & 15,
           delta.shape, delta.stride(), delta.dtype, delta.get_device(), pt & 15,
           A.shape, A.stride(), A.dtype, A.get_device(), pa & 15,
           B.shape, B.stride(), B.dtype, B.get_device(), pb & 15,
           C.shape, C.stride(), C.dtype, C.get_device(), pc & 15,
           kd, kz, kh)
    return key, (pu, pt, pa, pb, pc, pd, pz, ph)


def plan_key(a: SelectiveScanArgs, config: Optional[ScanConfig] = None) -> tuple:
    """The key of ``a``'s launch plan (see :func:`_key_and_ptrs`)."""
    return _key_and_ptrs(a, config)[0]


def run(a: SelectiveScanArgs, config: Optional[ScanConfig] = None) -> tuple[Tensor, Tensor]:
    """``fxopt::selective_scan`` through the plan of ``a``'s signature (made on its first call)."""
    key, ptrs = _key_and_ptrs(a, config)
    plan = _PLANS.get(key)
    if plan is None:
        return _first_call(key, a, config)
    return plan(a, ptrs)


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
        warnings.warn(f"fxopt: the Gluon selective-scan kernel did not compile for inputs {_describe(a)} ({exc}); "
                      "using the Triton kernel", RuntimeWarning, stacklevel=3)
        plan = build_plan(a, config, gluon=False)
        out = plan(a)
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = plan
    return out


def _describe(a: SelectiveScanArgs) -> str:
    return ", ".join(f"{name}=None" if t is None else
                     f"{name}:{tuple(t.shape)}/{t.stride()}/{str(t.dtype)[6:]}/{t.device}/align {t.data_ptr() & 15}"
                     for name, t in zip(a._fields, a[:8]))


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
        # per launch (fn, head, gx, gy, gz, tail, kernel) once every launch has a compiled kernel
        # (CUDA; see use_compiled)
        self.direct: Optional[tuple] = None

    def use_compiled(self, kernels) -> None:
        """Replay by launching ``kernels`` (one compiled kernel per launch, in order) directly:
        each bound once (:func:`fxopt.codegen.launch.bind`), grid and scalars fixed."""
        kernels = tuple(kernels)
        if len(kernels) != len(self.launches):
            raise CodegenError(f"{len(kernels)} compiled kernels for a plan of {len(self.launches)} launches")
        direct = []
        for k, launch in zip(kernels, self.launches):
            fn, head = bind_kernel(k)
            gx, gy, gz = (tuple(launch.grid) + (1, 1))[:3]
            direct.append((fn, head, gx, gy, gz, launch.tail, k))
        self.direct = tuple(direct)

    def __call__(self, a: SelectiveScanArgs, ptrs: Optional[tuple] = None) -> tuple[Tensor, Tensor]:
        """Run the plan on ``a``; ``ptrs``: the addresses of ``a``'s eight tensors (None for an
        absent one) as :func:`_key_and_ptrs` read them, for the direct launch."""
        direct = self.direct
        if direct is None or ptrs is None:
            return self._through_launches(a)
        u = a[0]
        y = u.new_empty(self.y_shape, dtype=self.out_dtype)
        hl = u.new_empty(self.h_shape, dtype=_F32)
        # compiled kernels take addresses (a tensor would cost a method call and a driver query
        # per pointer); everything here lives on the current stream until the launches are queued
        yp, hp = y.data_ptr(), hl.data_ptr()
        if self.preps:
            # the copies this layout needs (referenced by ``copies`` until the launches are queued)
            copies = [prep(a[i]) for i, prep in self.preps]
            ptrs = list(ptrs)
            for (i, _), t in zip(self.preps, copies):
                ptrs[i] = t.data_ptr()
        pu, pt, pa, pb, pc, pd, pz, ph = ptrs
        if pd is None:  # absent inputs: any valid address (the kernel never reads them)
            pd = yp
        if pz is None:
            pz = yp
        if ph is None:
            ph = yp
        if self.scratch:
            buf = u.new_empty((self.scratch,), dtype=_F32)
            S = buf.data_ptr()
            ds = S + 4 * self.split
        else:
            S = ds = hp
        stream = _raw_stream(self.device_index)
        enter, exit_ = launch_hooks()
        for fn, head, gx, gy, gz, tail, k in direct:
            meta = None if enter is None else k.launch_metadata(
                (gx, gy, gz), stream, pu, pt, pa, pb, pc, pd, pz, ph, yp, hp, S, ds, *tail)
            fn(gx, gy, gz, stream, *head, meta, enter, exit_, pu, pt, pa, pb, pc, pd, pz, ph, yp, hp, S, ds, *tail)
        return y, hl

    def _through_launches(self, a: SelectiveScanArgs) -> tuple[Tensor, Tensor]:
        """Launch through each :class:`Launch` (Triton's JIT until it hands back compiled kernels;
        the interpreter). Once every launch has a compiled kernel (CUDA), later calls go direct."""
        u = a.u
        y = u.new_empty(self.y_shape, dtype=self.out_dtype)
        hl = u.new_empty(self.h_shape, dtype=_F32)
        if self.preps:
            a = list(a)
            for i, prep in self.preps:
                a[i] = prep(a[i])
        u, delta, A, B, C, D, z, h0 = a[:8]
        if self.scratch:
            buf = u.new_empty((self.scratch,), dtype=_F32)
            S, ds = buf[: self.split], buf[self.split:]
        else:
            S = ds = hl
        ptrs = (u, delta, A, B, C, y if D is None else D, y if z is None else z, y if h0 is None else h0,
                y, hl, S, ds)
        stream = _raw_stream(self.device_index) if self.device_index >= 0 else 0
        for launch in self.launches:
            launch(ptrs, stream)
        if self.device_index >= 0 and all(launch.compiled is not None for launch in self.launches):
            self.use_compiled([launch.compiled for launch in self.launches])
        return y, hl


_F32 = torch.float32


def _no_cuda_streams(device_index: int) -> int:
    raise CodegenError("fxopt: a CUDA launch plan was replayed with a torch built without CUDA")


# The current stream's handle: the C function itself where torch has CUDA (a replay calls it
# once; a Python wrapper around it would add a frame). Benchmarks replace it to time plans with
# stub kernels on CPU.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", _no_cuda_streams)


class _EmptyPlan:
    """A dimension of size 0: nothing to launch; h_last is h0 (or zeros)."""

    __slots__ = ("y_shape", "h_shape", "out_dtype")

    def __init__(self, y_shape, h_shape, out_dtype):
        self.y_shape, self.h_shape, self.out_dtype = y_shape, h_shape, out_dtype

    def __call__(self, a: SelectiveScanArgs, ptrs: Optional[tuple] = None) -> tuple[Tensor, Tensor]:
        y = a.u.new_empty(self.y_shape, dtype=self.out_dtype)
        hl = a.u.new_empty(self.h_shape, dtype=torch.float32)
        if a.h0 is not None:
            hl.copy_(a.h0.expand(self.h_shape))
        else:
            hl.zero_()
        return y, hl


def _reference_plan(a: SelectiveScanArgs, ptrs: Optional[tuple] = None) -> tuple[Tensor, Tensor]:
    """fp64 inputs: the kernels compute in fp32, the reference in fp64."""
    return selective_scan_ref(*a)


def _h0_prep(h_shape: tuple):
    def prep(h0: Tensor) -> Tensor:
        return h0.to(torch.float32).expand(h_shape).contiguous()

    return prep


def _d_prep(d: int):
    def prep(D: Tensor) -> Tensor:
        return D.expand(d).contiguous()

    return prep


# what each tensor of SelectiveScanArgs is, in terms of u's (b, d, l) and A's n
_ROLES = (("delta", "bdl"), ("A", "dn"), ("B", "bnl"), ("C", "bnl"), ("D", "d"), ("z", "bdl"), ("h0", "bdn"))


def check_shapes(a: SelectiveScanArgs) -> None:
    """Raise a clear error for shapes the kernels would read out of bounds: u is (b, d, l), A is
    (d, n), and every other tensor has its role's shape, where a dimension of size 1 broadcasts
    (the kernels step it with stride 0, as the reference broadcasts it); h0 also with leading
    dimensions left out (it is expanded)."""
    u, A = a.u, a.A
    if u.dim() != 3 or A.dim() != 2:
        raise CodegenError(f"fxopt::selective_scan: u must be (b, d, l) and A (d, n); got u {tuple(u.shape)}, "
                           f"A {tuple(A.shape)}")
    bsz, d, L = u.shape
    size = dict(b=bsz, d=d, l=L, n=A.shape[1])
    for name, dims in _ROLES:
        t = getattr(a, name)
        if t is None:
            continue
        full = tuple(size[c] for c in dims)
        shape = tuple(t.shape)
        if name == "h0":
            shape = (1,) * (len(full) - len(shape)) + shape
        if len(shape) != len(full) or any(s not in (f, 1) for s, f in zip(shape, full)):
            raise CodegenError(
                f"fxopt::selective_scan: {name} has shape {tuple(t.shape)}; with u {tuple(u.shape)} (b, d, l) and "
                f"A {tuple(A.shape)} (d, n) it must be ({', '.join(dims)}) = {full}, a dimension of size 1 "
                "broadcasting")


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
    if compute_dtype(*a.tensors()) == torch.float64:
        return _reference_plan
    check_shapes(a)
    y_shape = tuple(a.u.shape)
    bsz, d, L = y_shape
    n = a.A.shape[-1]
    h_shape = (bsz, d, n)
    out_dtype = a.out_dtype or a.u.dtype
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
    D = a.D
    if D is not None and not (tuple(D.shape) == (d,) and (D.stride(0) == 1 or d == 1)):
        # the kernels read D at unit stride over d (no stride argument): a strided or broadcast
        # D as a contiguous (d,) copy (a layout no model hands it: the copy is the rare case)
        preps.append((5, _d_prep(d)))
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
