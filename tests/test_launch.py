"""fxopt.codegen.launch: binding a compiled kernel once (``bind``) launches it exactly as
``run_compiled`` / Triton's JIT would, and skips Triton's ``CudaLauncher`` wrapper only where
probing shows it is a pure pass-through. No GPU needed: the C launch function is replaced by a
recorder, the wrapper itself is the installed Triton's."""
from __future__ import annotations

import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fxopt.codegen import launch as ln

driver = pytest.importorskip("triton.backends.nvidia.driver")
CudaLauncher = driver.CudaLauncher


def _cuda_launcher(calls: list, **over) -> CudaLauncher:
    """A CudaLauncher as its __init__ leaves it (minus the compiled C module): ``launch`` records."""
    run = object.__new__(CudaLauncher)
    state = dict(num_ctas=1, global_scratch_size=0, global_scratch_align=1, profile_scratch_size=0,
                 profile_scratch_align=1, launch_cooperative_grid=False, launch_pdl=False)
    state.update(over)
    run.__dict__.update(state)
    run.launch = lambda *args: calls.append(args)
    return run


def _kernel(run) -> types.SimpleNamespace:
    return types.SimpleNamespace(run=run, function=0xF00D, packed_metadata=(4, 1, 0),
                                 launch_metadata=lambda grid, stream, *args: ("meta", grid, stream, args))


def test_bind_passes_through_the_cuda_launcher():
    calls: list = []
    run = _cuda_launcher(calls)
    fn, head = ln.bind(_kernel(run))
    assert fn is run.launch  # the C launch function itself: no wrapper frame per launch
    assert head == (0xF00D, False, False, None, None, (4, 1, 0))
    assert calls == []  # probing records on a copy, never on the real launcher


@given(grid=st.tuples(*[st.integers(1, 2**16)] * 3), stream=st.integers(0, 2**48),
       args=st.lists(st.one_of(st.integers(-2**40, 2**40), st.booleans(), st.none(), st.floats(allow_nan=False)),
                     max_size=60),
       hooked=st.booleans(), coop=st.booleans(), pdl=st.booleans())
def test_bound_launch_equals_the_wrapper(grid, stream, args, hooked, coop, pdl):
    """Whatever the arguments: the bound launch hands the C function exactly what the installed
    Triton's CudaLauncher.__call__ (what run_compiled and the JIT call) hands it."""
    calls: list = []
    run = _cuda_launcher(calls, launch_cooperative_grid=coop, launch_pdl=pdl)
    k = _kernel(run)
    fn, head = ln.bind(k)
    enter = exit_ = (lambda meta: None) if hooked else None
    meta = k.launch_metadata(grid, stream, *args) if hooked else None
    fn(*grid, stream, *head, meta, enter, exit_, *args)
    run(*grid, stream, k.function, k.packed_metadata, meta, enter, exit_, *args)
    assert len(calls) == 2 and calls[0] == calls[1]


@pytest.mark.parametrize("field", ["global_scratch_size", "profile_scratch_size"])
def test_bind_keeps_the_wrapper_when_it_allocates_scratch(field):
    """A kernel with scratch memory: the wrapper allocates it per launch, so it stays (and is
    never probed: the probe would allocate)."""
    calls: list = []
    run = _cuda_launcher(calls, **{field: 256})
    k = _kernel(run)
    fn, head = ln.bind(k)
    assert fn is run and head == (k.function, k.packed_metadata)
    assert calls == []


def test_bind_keeps_anything_that_is_not_a_cuda_launcher():
    seen = []

    class Sub(CudaLauncher):  # a look-alike: same attributes, its own __call__
        def __call__(self, *args):
            seen.append(args)

    for run in (lambda *a: seen.append(a), _subclass_instance(Sub)):
        k = _kernel(run)
        fn, head = ln.bind(k)
        assert fn is run and head == (k.function, k.packed_metadata)


def _subclass_instance(cls):
    run = object.__new__(cls)
    run.__dict__.update(dict(num_ctas=1, global_scratch_size=0, profile_scratch_size=0,
                             launch_cooperative_grid=False, launch_pdl=False, launch=lambda *a: None))
    return run


@pytest.mark.parametrize("change", ["extra_arg", "grid_dependent", "reordered", "two_launches", "raises"])
def test_bind_detects_a_wrapper_that_is_not_a_pass_through(monkeypatch, change):
    """A Triton whose CudaLauncher.__call__ does something else than forward its arguments after
    a fixed middle: the probe sees it, and the wrapper is called as is."""
    def call(self, gx, gy, gz, stream, function, *args):
        if change == "raises":
            raise RuntimeError("needs a device")
        middle = (self.launch_cooperative_grid, self.launch_pdl, None, None)
        if change == "extra_arg":
            return self.launch(gx, gy, gz, stream, function, *middle, *args, 0)
        if change == "grid_dependent":
            return self.launch(gx, gy, gz, stream, function, gx * gy * gz, *middle, *args)
        if change == "reordered":
            return self.launch(gy, gx, gz, stream, function, *middle, *args)
        self.launch(gx, gy, gz, stream, function, *middle, *args)
        self.launch(gx, gy, gz, stream, function, *middle, *args)

    monkeypatch.setattr(CudaLauncher, "__call__", call)
    calls: list = []
    run = _cuda_launcher(calls)
    k = _kernel(run)
    fn, head = ln.bind(k)
    assert fn is run and head == (k.function, k.packed_metadata)


def test_launch_hooks_read_per_call(monkeypatch):
    """Hooks as run_compiled passes them: an empty HookChain is None (the C launcher then skips
    it); an installed hook is passed; a change between calls is seen."""
    knobs = types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)
    monkeypatch.setattr(ln, "_runtime_knobs", knobs)
    assert ln.launch_hooks() == (None, None)
    knobs.launch_enter_hook = types.SimpleNamespace(calls=[])  # an empty chain
    assert ln.launch_hooks() == (None, None)
    hook = types.SimpleNamespace(calls=[print])
    knobs.launch_enter_hook, knobs.launch_exit_hook = hook, print
    assert ln.launch_hooks() == (hook, print)
