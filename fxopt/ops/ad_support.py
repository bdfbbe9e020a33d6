"""What fxopt's custom ops support of autograd beyond first-order reverse mode, the clear errors
for the rest, and the one test that decides whether a call may skip the dispatcher.

* Forward mode is refused. The ops carry reverse-mode autograd (``torch.library.register_autograd``),
  which has no jvp rule: under ``torch.autograd.forward_ad`` or ``torch.func.jvp`` torch would run
  such an op as if no input had a tangent and hand back zero tangents, silently. Every op
  implementation calls :func:`refuse_forward_ad` first; outside a dual level that is one
  module-attribute read. (``torch.func.jvp`` opens a dual level too, and the kernels see unwrapped
  tensors, so "a level is open" is the test, not "an input has a tangent".)
* :func:`first_order_only` marks a backward that is not itself differentiable (the scans'): when
  it runs under ``create_graph=True`` its gradients get a grad_fn that raises if differentiated,
  whether or not the incoming gradients require grad. (``torch.autograd.function.once_differentiable``
  only does so when they do; otherwise the result looks like a constant, and a gradient penalty
  built on it would silently lose its second-order term.)
* :func:`direct_call_ok`: the ops' graph entry points (``fxopt.ops.fused_add.fused_add_tree``,
  ``fxopt.ops.scan.selective_scan``, ``fxopt.ops.scan.linear_scan``) skip the dispatcher (and the
  Python autograd wrapper torch.library puts in front of a custom op: tens of microseconds per
  call) only when it says so, i.e. when the op's autograd could record nothing and no tracing
  would see the call. Gradients are never dropped: with grad mode on and an input requiring grad
  the op runs and records its backward.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.autograd.forward_ad as _fwad

from ..errors import FxoptError


def refuse_forward_ad(op_name: str) -> None:
    if _fwad._current_level >= 0:
        raise FxoptError(
            f"{op_name} was called under forward-mode AD (torch.autograd.forward_ad.dual_level or "
            "torch.func.jvp). fxopt's ops implement reverse mode only and would return zero tangents. "
            "Use reverse mode (loss.backward() or torch.autograd.grad), or run the model without fxopt "
            "for forward-mode derivatives."
        )


def first_order_only(op_name: str):
    message = (f"{op_name}: double backward (differentiating a gradient taken with create_graph=True) is "
               "not supported by fxopt's scan ops; take second derivatives on the unoptimized model").encode()

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                out = backward(ctx, *grads)
            if not torch.is_grad_enabled():  # the usual case: no create_graph
                return out
            err = torch._C._functions.DelayedError(message, len(out))

            def poisoned(g):
                return None if g is None else g.detach().requires_grad_(True)

            res = err(*[poisoned(g) for g in out])
            res = res if isinstance(res, tuple) else (res,)
            return tuple(res)

        return wrapper

    return decorate


# Bound once: the test below runs on every call of an entry point (a few C calls, ~0.1-0.3 us).
_grad_enabled = torch._C.is_grad_enabled
_any_requires_grad = torch._C._any_requires_grad
_functorch_active = torch._C._are_functorch_transforms_active
_dispatch_depth = torch._C._len_torch_dispatch_stack
_is_compiling = torch.compiler.is_compiling
# Tensors the dispatcher would hand to the op's kernel unchanged: plain tensors and parameters
# (whose __torch_function__ is disabled). Subclasses (FakeTensor, functorch wrappers, DTensor, ...)
# go through the op.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def direct_call_ok(tensors: Sequence[Optional[torch.Tensor]]) -> bool:
    """True when a call of an fxopt op on ``tensors`` (None entries are absent optional inputs)
    may skip the dispatcher and run the op's implementation directly: every tensor is a plain
    tensor or parameter; no gradient can flow (grad mode off, or no input requires grad); no
    forward-AD level is open (the op would refuse it: the op path raises the clear error); no
    functorch transform, torch.compile / export tracing or dispatch mode is active (they must see
    the op)."""
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return False
    return (not (_grad_enabled() and _any_requires_grad(*tensors))
            and _fwad._current_level < 0
            and not _functorch_active()
            and not _is_compiling()
            and not _dispatch_depth())
