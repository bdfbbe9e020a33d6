"""Direct launch of an already-compiled Triton / Gluon kernel.

Calling ``kernel[grid](*args)`` binds and specialises every argument in Python on each call
(tens of microseconds for a kernel with ~50 arguments, more than the GPU time of a decode-size
launch). Once a call site knows its specialisation is fixed (it keys its cache on everything
Triton specialises on), it keeps the ``CompiledKernel`` the first call returned and launches it
with :func:`run_compiled`, which does what the JIT does after binding: the launch hooks and the
driver call. Callers that have checked their tensors' devices pass addresses (``t.data_ptr()``)
for pointer arguments: for a tensor, Triton's launcher calls ``data_ptr()`` and asks the driver
for the device pointer (``cuPointerGetAttribute``), per pointer and per launch.

Call sites whose plan holds a compiled kernel for many calls bind it once (:func:`bind`): that
resolves ``k.run`` (a property) and, where Triton's ``CudaLauncher`` is a pure pass-through to
its C launch function (checked by probing it, :func:`_pass_through`), launches through that
function directly, skipping the wrapper's Python frame and its per-launch scratch logic.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

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


def launch_hooks() -> tuple:
    """(enter, exit) launch hooks as a launch passes them: None where none is installed. Read per
    call: a profiler may install them at any time."""
    global _runtime_knobs
    knobs = _runtime_knobs
    if knobs is None:
        import triton

        knobs = _runtime_knobs = triton.knobs.runtime
    return _hook(knobs.launch_enter_hook), _hook(knobs.launch_exit_hook)


def bind(k: Any) -> tuple[Callable, tuple]:
    """``(fn, head)`` for compiled kernel ``k``: launching it is
    ``fn(gx, gy, gz, stream, *head, meta, enter, exit, *args)`` (``meta`` from
    ``k.launch_metadata`` when ``enter`` is set, hooks from :func:`launch_hooks`), which is what
    :func:`run_compiled` does, minus the per-launch lookups."""
    run = k.run  # a property in Triton 3.x: loads the binary on first use, before k.function is read
    inner = _pass_through(run)
    if inner is not None:
        fn, middle = inner
        return fn, (k.function, *middle, k.packed_metadata)
    return run, (k.function, k.packed_metadata)


def _pass_through(run: Any) -> Optional[tuple[Callable, tuple]]:
    """``(launch, middle)`` when ``run`` is Triton's ``CudaLauncher`` and calling it is exactly
    ``run.launch(gx, gy, gz, stream, function, *middle, *rest)``: no scratch to allocate (both
    scratch sizes 0) and ``middle`` fixed (the same for two different probe calls). Decided by
    calling ``CudaLauncher.__call__`` on a copy of ``run`` whose ``launch`` records its arguments,
    so a Triton whose wrapper does something else is detected rather than assumed; anything
    unexpected gives None (then ``run`` itself is called)."""
    try:
        from triton.backends.nvidia.driver import CudaLauncher
    except Exception:  # noqa: BLE001 - no NVIDIA backend: nothing to bypass
        return None
    if type(run) is not CudaLauncher:
        return None
    state = getattr(run, "__dict__", None)
    if state is None or not callable(state.get("launch")):
        return None
    # with a scratch size the wrapper allocates per launch: not a pass-through (never probed: the
    # probe would allocate)
    if state.get("global_scratch_size", 1) != 0 or state.get("profile_scratch_size", 1) != 0:
        return None
    seen: list = []
    probe = object.__new__(CudaLauncher)
    probe.__dict__.update(state)
    probe.launch = lambda *args: seen.append(args)
    middles = []
    for head in ((1, 2, 3, 11, 12), (4, 5, 6, 13, 14)):
        tail = (object(), object(), object())
        try:
            probe(*head, *tail)
        except Exception:  # noqa: BLE001 - the wrapper wants something we did not give it
            return None
        if len(seen) != 1:
            return None
        got = seen.pop()
        if len(got) < len(head) + len(tail) or got[:len(head)] != head or any(
                a is not b for a, b in zip(got[-len(tail):], tail)):
            return None
        middles.append(got[len(head):len(got) - len(tail)])
    if middles[0] != middles[1]:
        return None
    return state["launch"], middles[0]
