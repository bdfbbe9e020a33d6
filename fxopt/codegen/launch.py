"""Direct launch of an already-compiled Triton / Gluon kernel.

Calling ``kernel[grid](*args)`` binds and specialises every argument in Python on each call
(tens of microseconds for a kernel with ~50 arguments, more than the GPU time of a decode-size
launch). Once a call site knows its specialisation is fixed (it keys its cache on everything
Triton specialises on), it keeps the ``CompiledKernel`` the first call returned and launches it
with :func:`run_compiled`, which does what the JIT does after binding: the launch hooks and the
driver call. Callers that have checked their tensors' devices pass addresses (``t.data_ptr()``)
for pointer arguments: for a tensor, Triton's launcher calls ``data_ptr()`` and asks the driver
for the device pointer (``cuPointerGetAttribute``), per pointer and per launch.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

_runtime_knobs = None


def compiled_kernel(launch_result: Any) -> Optional[Any]:
    """The ``CompiledKernel`` a ``kernel[grid](...)`` call returned, or None where this Triton
    returns something else (then keep launching through the JIT)."""
    k = launch_result.result() if hasattr(launch_result, "result") else launch_result
    if k is not None and all(hasattr(k, a) for a in ("run", "function", "packed_metadata", "launch_metadata")):
        return k
    return None


def _hook(h):
    # an empty HookChain is truthy but does nothing: pass None so the C launcher skips it
    return None if h is None or (hasattr(h, "calls") and not h.calls) else h


def run_compiled(k: Any, grid: Sequence[int], stream: int, args: Sequence[Any]) -> None:
    """Launch compiled kernel ``k`` on ``grid`` with all its arguments in order (constexprs included)."""
    global _runtime_knobs
    knobs = _runtime_knobs
    if knobs is None:
        import triton

        knobs = _runtime_knobs = triton.knobs.runtime
    # the hooks are read per launch: a profiler may install them at any time
    enter, exit_ = _hook(knobs.launch_enter_hook), _hook(knobs.launch_exit_hook)
    meta = k.launch_metadata(tuple(grid), stream, *args) if enter is not None else None
    gx, gy, gz = grid if len(grid) == 3 else (tuple(grid) + (1, 1))[:3]
    k.run(gx, gy, gz, stream, k.function, k.packed_metadata, meta, enter, exit_, *args)
