"""What fxopt's custom ops support of autograd beyond first-order reverse mode, and the clear
errors for the rest.

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
"""
from __future__ import annotations

import functools

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
