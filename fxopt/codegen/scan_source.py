"""Which scan kernel a ``fxopt::selective_scan`` / ``fxopt::linear_scan`` node runs, and its
source (the provider behind :func:`fxopt.codegen.kernel_sources` for the scan ops).

The choice is the launch path's own (:func:`fxopt.codegen.scan_launch.kernel_choice`) applied to
the node's fake values: on a CUDA device the Gluon kernel where it is available and takes the
layout, else the plain-Triton one; on CPU tensors the kernel path runs only under Triton's
interpreter (the op's CPU implementation is the PyTorch reference, which is shown when the
interpreter is off). The source is the kernel's function and the jit helpers it calls
(:mod:`fxopt.codegen.kernel_text`), never whole modules."""
from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch

from ..config import get_config
from .kernel_text import kernel_source
from .scan_ref import LinearScanArgs, SelectiveScanArgs, linear_scan_ref, selective_scan_ref


def _describe(vals: Sequence) -> str:
    def one(v):
        if isinstance(v, torch.Tensor):
            return f"{str(v.dtype).replace('torch.', '')}{list(v.shape)}"
        return "None" if v is None else repr(v)

    return ", ".join(one(v) for v in vals)


def _reference(op: str, fn, vals: Sequence) -> tuple[str, str]:
    header = (f"# {op} for ({_describe(vals)}) on cpu: the op's CPU implementation is this PyTorch reference\n"
              "# (no kernel runs; TRITON_INTERPRET=1 runs the Triton kernel through Triton's interpreter)\n")
    return f"{op.split('::')[-1]}_reference", header + "import torch\n\n" + inspect.getsource(fn)


def selective_scan_source(vals: Sequence) -> Optional[tuple[str, str]]:
    """``(name, source)`` of the kernel a selective scan with these (fake) arguments runs."""
    a = SelectiveScanArgs(*vals)
    if not isinstance(a.u, torch.Tensor) or not isinstance(a.A, torch.Tensor):
        return None
    op = "fxopt::selective_scan"
    if a.u.device.type != "cuda" and not get_config().triton_interpret:
        return _reference(op, selective_scan_ref, vals)
    from . import scan_launch, scan_triton

    where = f"cuda:{a.u.get_device()}" if a.u.device.type == "cuda" else "cpu (Triton's interpreter)"
    try:
        choice = scan_launch.kernel_choice(a)
        kernel, why = choice.kernel, f"{choice.num_warps} warp(s), {choice.block_d} channels per program, " \
                                     f"{choice.chunk} steps per chunk, {choice.groups} group(s)"
    except Exception as exc:  # noqa: BLE001 - a signature only a real launch can judge: the fallback kernel
        kernel, why = scan_triton.selective_scan_kernel, f"launch choice needs real tensors ({type(exc).__name__})"
    family = "gluon" if kernel is not scan_triton.selective_scan_kernel else "triton"
    header = (f"# {op} for ({_describe(vals)}) on {where}\n"
              f"# runs {kernel.fn.__module__}.{kernel.fn.__qualname__} ({family}): {why}\n")
    return f"fxopt_selective_scan_{family}", kernel_source(kernel, header)


def linear_scan_source(vals: Sequence) -> Optional[tuple[str, str]]:
    """``(name, source)`` of the kernel a linear scan with these (fake) arguments runs."""
    a = LinearScanArgs(*vals)
    if not isinstance(a.a, torch.Tensor):
        return None
    op = "fxopt::linear_scan"
    if a.a.device.type != "cuda" and not get_config().triton_interpret:
        return _reference(op, linear_scan_ref, vals)
    from . import scan_triton

    where = f"cuda:{a.a.get_device()}" if a.a.device.type == "cuda" else "cpu (Triton's interpreter)"
    header = (f"# {op} for ({_describe(vals)}) on {where}\n"
              "# runs fxopt.codegen.scan_triton._linear_scan_kernel (torch contracts the readout, if any)\n")
    return "fxopt_linear_scan_triton", kernel_source(scan_triton._linear_scan_kernel, header)
