"""Scan custom ops (namespace ``fxopt``) that the ``scan`` pass emits.

``fxopt::selective_scan`` (the Mamba selective scan with its prologue and epilogue folded in) and
``fxopt::linear_scan`` (a general first-order linear recurrence): their arguments, layouts and
plain-PyTorch references are in :mod:`fxopt.codegen.scan_ref` (:class:`SelectiveScanArgs`,
:class:`LinearScanArgs`; the op schemas are read from those), re-exported here.

* fake impl: output shapes and dtypes, so rewritten graphs export / compile;
* default (CPU) impl: the reference (``selective_scan_ref``, ``linear_scan_ref``);
* CUDA impl: the kernels (:mod:`fxopt.codegen.scan_launch` for the selective scan: the Gluon kernel
  on sm_80+, the plain-Triton one elsewhere, through a launch plan per input signature;
  :func:`fxopt.codegen.scan_triton.linear_scan_triton`), the reference where Triton is missing;
* autograd (:mod:`fxopt.ops.scan_grad`): the backward of the reference, recomputed chunk by chunk
  from states checkpointed at chunk boundaries;
* graph entry points :func:`selective_scan` / :func:`linear_scan`: what a rewritten graph should
  call. Semantically the ops; when no gradient can flow and nothing traces the call
  (:func:`fxopt.ops.ad_support.direct_call_ok`) they skip the dispatcher and its Python autograd
  wrapper and run the implementation directly (CUDA: straight to the launch plan; CPU: the
  reference); otherwise they call the op, so autograd records it and exported graphs contain it.
"""
from __future__ import annotations

import torch
import torch.fx

from ..codegen import register_source_provider
from ..codegen.scan_ref import (LinearScanArgs, SelectiveScanArgs, compute_dtype, linear_scan_ref,  # noqa: F401
                                linear_scan_shapes, op_signature, selective_scan_ref, selective_scan_shapes)
from . import scan_grad
from .ad_support import direct_call_ok, refuse_forward_ad


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------
def _selective_scan_default(*args, **kwargs):
    refuse_forward_ad("fxopt::selective_scan")
    return selective_scan_ref(*args, **kwargs)


def _linear_scan_default(*args, **kwargs):
    refuse_forward_ad("fxopt::linear_scan")
    return linear_scan_ref(*args, **kwargs)


_selective_scan_default.__signature__ = op_signature(SelectiveScanArgs)
_linear_scan_default.__signature__ = op_signature(LinearScanArgs)
selective_scan_op = torch.library.custom_op("fxopt::selective_scan", mutates_args=())(_selective_scan_default)
linear_scan_op = torch.library.custom_op("fxopt::linear_scan", mutates_args=())(_linear_scan_default)


@selective_scan_op.register_fake
def _selective_scan_fake(*args, **kwargs):
    a = SelectiveScanArgs(*args, **kwargs)
    y_shape, h_shape = selective_scan_shapes(a)
    return (a.u.new_empty(y_shape, dtype=a.out_dtype or a.u.dtype),
            a.u.new_empty(h_shape, dtype=compute_dtype(*a.tensors())))


@linear_scan_op.register_fake
def _linear_scan_fake(*args, **kwargs):
    a = LinearScanArgs(*args, **kwargs)
    S = linear_scan_shapes(a.a, a.b, a.h0)
    sd = a.state_dtype or torch.promote_types(a.a.dtype, a.b.dtype)
    yshape = [a.a.shape[0]] + (S[:-1] if a.C is not None else S)
    return a.a.new_empty(yshape, dtype=a.out_dtype or sd), a.a.new_empty(S, dtype=sd)


@selective_scan_op.register_kernel("cuda")
def _selective_scan_cuda(*args, **kwargs):
    refuse_forward_ad("fxopt::selective_scan")
    return _selective_scan_kernel()(SelectiveScanArgs(*args, **kwargs))


@linear_scan_op.register_kernel("cuda")
def _linear_scan_cuda(*args, **kwargs):
    refuse_forward_ad("fxopt::linear_scan")
    return _linear_scan_kernel()(*args, **kwargs)


SELECTIVE_SCAN = torch.ops.fxopt.selective_scan.default
LINEAR_SCAN = torch.ops.fxopt.linear_scan.default

torch.library.register_autograd(
    "fxopt::selective_scan", scan_grad.selective_scan_backward, setup_context=scan_grad.selective_scan_setup_context)
torch.library.register_autograd(
    "fxopt::linear_scan", scan_grad.linear_scan_backward, setup_context=scan_grad.linear_scan_setup_context)


# ----------------------------------------------------------------------------------------------
# the kernels (imported on first use: Triton is optional, and slow to import)
# ----------------------------------------------------------------------------------------------
_kernels: dict = {}


def _selective_scan_kernel():
    run = _kernels.get("selective_scan")
    if run is None:
        try:
            from ..codegen import scan_launch
        except ImportError:  # pragma: no cover - no triton on this machine
            run = lambda a: selective_scan_ref(*a)  # noqa: E731
        else:
            run = scan_launch.run
        run = _kernels["selective_scan"] = run
    return run


def _linear_scan_kernel():
    run = _kernels.get("linear_scan")
    if run is None:
        try:
            from ..codegen import scan_triton
        except ImportError:  # pragma: no cover - no triton on this machine
            run = linear_scan_ref
        else:
            run = scan_triton.linear_scan_triton
        run = _kernels["linear_scan"] = run
    return run


# ----------------------------------------------------------------------------------------------
# graph entry points
# ----------------------------------------------------------------------------------------------
# Tests set this to drive the kernel path with CPU tensors under TRITON_INTERPRET=1 (no GPU in
# CI). On CUDA tensors ``is_cuda`` short-circuits and it is never read.
FAST_PATH_ON_CPU = False


def selective_scan(*args, **kwargs):
    """What rewritten graphs call (arguments as :class:`SelectiveScanArgs`). Semantically
    ``fxopt::selective_scan``; see the module docstring for when the dispatcher is skipped."""
    a = SelectiveScanArgs(*args, **kwargs)
    if direct_call_ok(a[:8]):
        if a.u.is_cuda or FAST_PATH_ON_CPU:
            return _selective_scan_kernel()(a)
        return selective_scan_ref(*a)
    return SELECTIVE_SCAN(*a)


def linear_scan(*args, **kwargs):
    """What rewritten graphs call (arguments as :class:`LinearScanArgs`). Semantically
    ``fxopt::linear_scan``; see the module docstring for when the dispatcher is skipped."""
    a = LinearScanArgs(*args, **kwargs)
    if direct_call_ok(a[:4]):
        if a.a.is_cuda or FAST_PATH_ON_CPU:
            return _linear_scan_kernel()(*a)
        return linear_scan_ref(*a)
    return LINEAR_SCAN(*a)


# Graph targets that mean "a selective / linear scan": the op overloads and the entry points.
SELECTIVE_SCAN_TARGETS = (SELECTIVE_SCAN, selective_scan)
LINEAR_SCAN_TARGETS = (LINEAR_SCAN, linear_scan)


def _fake_args(node) -> list:
    vals = [x.meta.get("val") if isinstance(x, torch.fx.Node) else x for x in node.args]
    vals += [x.meta.get("val") if isinstance(x, torch.fx.Node) else x for x in node.kwargs.values()]
    return vals


def _selective_scan_source(node):
    from ..codegen import scan_source  # imported on demand: triton is optional

    return scan_source.selective_scan_source(_fake_args(node))


def _linear_scan_source(node):
    from ..codegen import scan_source

    return scan_source.linear_scan_source(_fake_args(node))


for _target in SELECTIVE_SCAN_TARGETS:
    register_source_provider(_target, _selective_scan_source)
for _target in LINEAR_SCAN_TARGETS:
    register_source_provider(_target, _linear_scan_source)
