"""What captured generation graphs assume about the user's model, checked before they run.

The graphs read the model's parameters and buffers through ``get_attr`` (so in-place updates
of their values are seen, also by CUDA-graph replay, which reads the same addresses), but they
were captured for particular tensors, dtypes, devices and train/eval flags, and they do not run
module hooks. :class:`ModelGuard` records those at capture and :meth:`ModelGuard.check` returns
the first difference (a reason string) or None; the runtime then rebuilds its graphs.
This is the runtime's own guard; a guard object of the optimizer with the same ``check()``
protocol can stand in for it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def _tensor_key(t: torch.Tensor) -> tuple:
    return (id(t), t.dtype, t.device, tuple(t.shape), t.data_ptr() if t.device.type != "meta" else 0)


def snapshot(model: nn.Module) -> dict[str, tuple]:
    state: dict[str, tuple] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        state[f"module {name or '<root>'}"] = (id(mod), mod.training)
    for name, p in model.named_parameters(remove_duplicate=False):
        state[f"parameter {name}"] = _tensor_key(p)
    for name, b in model.named_buffers(remove_duplicate=False):
        state[f"buffer {name}"] = _tensor_key(b)
    return state


def hooks_of(model: nn.Module) -> list[str]:
    """Modules of ``model`` with forward (pre-)hooks, plus global module hooks: captured graphs
    would skip them (they run once, on fake tensors, at capture)."""
    found = []
    for name, mod in model.named_modules():
        if mod._forward_hooks or mod._forward_pre_hooks:
            found.append(name or "<root>")
    from torch.nn.modules import module as _m

    if getattr(_m, "_global_forward_hooks", None) or getattr(_m, "_global_forward_pre_hooks", None):
        found.append("<global module hooks>")
    return found


class ModelGuard:
    """``check() -> reason | None``: has the model changed in a way the graphs depend on?"""

    def __init__(self, model: nn.Module):
        self.model = model
        self.state = snapshot(model)

    def check(self) -> Optional[str]:
        now = snapshot(self.model)
        if now.keys() != self.state.keys():
            changed = sorted(set(now) ^ set(self.state))
            return f"the model's modules/parameters/buffers changed ({', '.join(changed[:3])} ...)"
        for key, value in now.items():
            old = self.state[key]
            if value != old:
                if key.startswith("module"):
                    what = "was replaced" if value[0] != old[0] else f"switched to {'train' if value[1] else 'eval'} mode"
                else:
                    what = ("was replaced" if value[0] != old[0] else
                            f"changed dtype/device/shape/storage ({old[1]}, {old[2]} -> {value[1]}, {value[2]})")
                return f"{key} {what}"
        return None
