"""What a captured graph assumes about the model it was captured from, checked on every call.

A graph captured from a model reads the model's parameters and buffers through ``get_attr``
(the same tensor objects, so in-place updates of their *values* are always seen), but it was
traced for

* the module tree as it was (``m.lm_head = nn.Linear(...)`` later swaps a module the graph
  does not know),
* particular tensor objects with particular dtypes, devices, shapes and storages
  (``m.w = nn.Parameter(...)`` or ``m.to(torch.bfloat16)``, which swaps ``param.data``),
* every module's train/eval flag (dropout, batch norm and user code branch on it): not a
  reason to rebuild but part of the specialisation key (:meth:`ModelState.mode`),
* no forward hooks (a captured graph runs none; hooks ran once, at capture, and there on fake
  tensors only when fxopt let them, which it does not).

:class:`ModelState` records all of that once and :meth:`ModelState.check` compares it with the
model as it is now. The check is the per-call price of soundness, so it is a flat loop over
precomputed slots (a few hundred nanoseconds each) rather than a walk of ``named_modules``.
A difference is a reason string; the optimizer then re-specialises (a new capture for the new
state) instead of running a graph built for another model.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as _module_impl


def _global_hooks() -> bool:
    return bool(getattr(_module_impl, "_global_forward_hooks", None)
                or getattr(_module_impl, "_global_forward_pre_hooks", None))


def hooked_modules(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` with forward (pre-)hooks, plus global module hooks."""
    found = [name or "<root>" for name, m in model.named_modules(remove_duplicate=False)
             if m._forward_hooks or m._forward_pre_hooks]
    if _global_hooks():
        found.append("<global module hooks>")
    return found


def _tensor_state(t: torch.Tensor) -> tuple:
    ptr = t.data_ptr() if t.device.type != "meta" else 0
    return (t.dtype, t.device, t.shape, ptr)


class ModelState:
    """The state of ``model`` a captured graph depends on. ``check() -> reason | None``."""

    def __init__(self, model: nn.Module):
        self.model = model
        modules = list(model.named_modules(remove_duplicate=False))
        self.modules = [(name, m) for name, m in modules]
        # (owner's dict, key, the object there at capture, its name for messages)
        self._children = [(m._modules, k, c, f"{name + '.' if name else ''}{k}")
                          for name, m in modules for k, c in m._modules.items()]
        self._tensors = []
        for name, m in modules:
            for store, kind in ((m._parameters, "parameter"), (m._buffers, "buffer")):
                for k, t in store.items():
                    if t is not None:
                        self._tensors.append((store, k, t, _tensor_state(t), f"{kind} {name + '.' if name else ''}{k}"))
        self._sizes = [(m, len(m._modules), len(m._parameters), len(m._buffers)) for _, m in modules]
        self.hooks = hooked_modules(model)

    def mode(self) -> tuple:
        """Every module's train/eval flag: part of a specialisation's key (a mode switch selects
        another specialisation; switching back finds the first one again)."""
        return tuple(m.training for _, m in self.modules)

    def check(self) -> Optional[str]:
        for store, k, child, where in self._children:
            if store.get(k) is not child:
                return f"module {where} was replaced"
        hooked = _global_hooks()
        for m, nm, np_, nb in self._sizes:  # one pass over the modules: sizes and hooks
            if len(m._modules) != nm or len(m._parameters) != np_ or len(m._buffers) != nb:
                return f"{type(m).__name__} gained or lost a submodule, parameter or buffer"
            hooked = hooked or bool(m._forward_hooks or m._forward_pre_hooks)
        for store, k, t, state, where in self._tensors:
            cur = store.get(k)
            if cur is not t:
                return f"{where} was reassigned (replaced by another tensor)"
            # A new device or ``param.data = ...`` means new storage: data_ptr covers both.
            if cur.dtype != state[0] or cur.data_ptr() != state[3] or cur.shape != state[2]:
                now = _tensor_state(cur)
                return f"{where} changed dtype/device/shape/storage ({state[0]}, {state[1]}, {list(state[2])} -> " \
                       f"{now[0]}, {now[1]}, {list(now[2])})"
        if hooked != bool(self.hooks):
            return "forward hooks were registered" if hooked else "forward hooks were removed"
        return None
