"""What captured generation graphs assume about the user's model, checked before they run.

The runtime uses the optimizer's own model-state check (:class:`fxopt.guards.ModelState`:
modules, parameter/buffer objects, dtypes, devices, storages, hooks). Its graphs are not keyed
by train/eval mode, so :class:`ModelGuard` also reports a mode switch as a change; the runtime
then rebuilds its graphs.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..guards import ModelState, hooked_modules as hooks_of  # noqa: F401  (re-exported for the engine)


class ModelGuard:
    """``check() -> reason | None``: has the model changed in a way the graphs depend on?"""

    def __init__(self, model: nn.Module):
        self.model = model
        self._state = ModelState(model)
        self._mode = self._state.mode()

    def check(self) -> Optional[str]:
        why = self._state.check()
        if why is None:
            for (name, m), was in zip(self._state.modules, self._mode):
                if m.training != was:
                    return f"module {name or '<root>'} switched to {'train' if m.training else 'eval'} mode"
        return why
