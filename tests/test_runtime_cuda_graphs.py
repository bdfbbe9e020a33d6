"""GraphReplay: CUDA-graph replay of a callable's specialisations.

On CPU the bookkeeping runs with ``backend="emulate"`` (the graph stands in as a call of the
function on the static buffers); the CUDA tests need a GPU."""
from __future__ import annotations

import threading
import time
import traceback

import pytest
import torch

import fxopt
from fxopt import runtime
from fxopt.runtime import GraphReplay

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _affine(x, w):
    return (x @ w + 1.0, x.sum())


def test_cpu_tensors_run_eagerly_with_a_note():
    calls = []
    step = GraphReplay(lambda x: calls.append(1) or x * 2)  # backend "cuda"
    x = torch.arange(4.0)
    for _ in range(3):
        assert torch.equal(step(x), x * 2)
    assert len(calls) == 3 and step.stats["captures"] == 0
    assert any("CPU tensors" in n for n in step.notes)


def test_warm_up_capture_replay_and_copy_out():
    w = torch.randn(3, 3)
    step = GraphReplay(_affine, backend="emulate")
    xs = [torch.randn(2, 3) for _ in range(4)]
    outs = [step(x, w) for x in xs]
    assert step.stats == {"eager": 1, "captures": 1, "replays": 3}
    for x, (y, s) in zip(xs, outs):  # every output still holds its own call's values
        ry, rs = _affine(x, w)
        assert torch.equal(y, ry) and torch.equal(s, rs)
    assert outs[1][0].data_ptr() != outs[2][0].data_ptr()


def test_alias_outputs_contract():
    w = torch.randn(3, 3)
    step = GraphReplay(_affine, backend="emulate", alias_outputs=True)
    step(torch.randn(2, 3), w)                      # warm-up (eager)
    a = step(torch.ones(2, 3), w)[0]                # first replay
    snapshot = a.clone()
    b = step(torch.zeros(2, 3), w)[0]               # the next call reuses the same buffer
    assert a.data_ptr() == b.data_ptr()
    assert torch.equal(b, _affine(torch.zeros(2, 3), w)[0]) and not torch.equal(a, snapshot)


def test_static_arguments_are_used_in_place():
    def step_fn(x, cache):
        cache.mul_(0.5).add_(x)
        return cache.sum()

    step = GraphReplay(step_fn, static_args=(1,), backend="emulate")
    cache, ref = torch.zeros(4), torch.zeros(4)
    for i in range(5):
        x = torch.full((4,), float(i))
        out = step(x, cache)
        expect = step_fn(x, ref)
        assert torch.equal(cache, ref) and torch.equal(out, expect)
    assert step.stats == {"eager": 1, "captures": 1, "replays": 4}  # the capture itself ran nothing
    # another cache tensor is another specialisation (its address is part of the key)
    other = torch.zeros(4)
    step(torch.ones(4), other)
    assert torch.equal(other, torch.ones(4))


def test_in_place_write_to_a_copied_input_is_not_captured():
    def bad(x):
        x.add_(1)
        return x * 2

    step = GraphReplay(bad, backend="emulate")
    for i in range(3):
        x = torch.zeros(3)
        assert torch.equal(step(x), torch.full((3,), 2.0)) and torch.equal(x, torch.ones(3))
    assert step.stats["captures"] == 0 and any("written in place" in n for n in step.notes)


def test_uncapturable_outputs_fall_back():
    step = GraphReplay(lambda x: [x + 1, object()], backend="emulate")
    for _ in range(3):
        out = step(torch.zeros(2))
        assert torch.equal(out[0], torch.ones(2))
    assert step.stats["captures"] == 0 and any("capture failed" in n for n in step.notes)


def test_gradients_are_not_replayed():
    step = GraphReplay(lambda x: x * 3, backend="emulate")
    x = torch.ones(2, requires_grad=True)
    for _ in range(3):
        step(x).sum().backward()
    assert torch.equal(x.grad, torch.full((2,), 9.0)) and step.stats["captures"] == 0
    assert any("gradients" in n for n in step.notes)


def test_check_hook_drops_graphs_and_recaptures():
    state = {"reason": None}
    w = torch.randn(3, 3)
    step = GraphReplay(_affine, backend="emulate", check=lambda: state["reason"])
    x = torch.randn(2, 3)
    step(x, w), step(x, w)
    assert step.graphs == 1
    state["reason"] = "the model's parameters were replaced"
    assert torch.equal(step(x, w)[0], _affine(x, w)[0])
    assert step.graphs == 0 and any("parameters were replaced" in n for n in step.notes)
    state["reason"] = None
    step(x, w), step(x, w)
    assert step.graphs == 1 and step.stats["captures"] == 2


def test_keys_and_eviction():
    step = GraphReplay(lambda x: x + 1, backend="emulate", max_graphs=2)
    for n in (1, 2, 3, 1):
        for _ in range(2):
            assert torch.equal(step(torch.zeros(n)), torch.ones(n))
    assert len(step._entries) == 2 and step.stats["captures"] == 4  # n=1 was evicted and captured again
    # a non-tensor argument is part of the key
    step2 = GraphReplay(lambda x, k: x * k, backend="emulate")
    assert torch.equal(step2(torch.ones(2), 2), torch.full((2,), 2.0))
    assert torch.equal(step2(torch.ones(2), 3), torch.full((2,), 3.0))


def _threads(step, shapes, fn, device="cpu", rounds=6):
    """4 threads call ``step`` (one GraphReplay, or a list of them: thread t uses step[t % n]);
    inputs and references are made before and checked after, so the only CUDA work on the
    threads is fxopt's own (other CUDA work during a capture follows CUDA's rules, see the module)."""
    errors = []
    steps = step if isinstance(step, list) else [step]
    inputs = {}
    for tid in range(4):
        g = torch.Generator(device=device).manual_seed(tid)
        inputs[tid] = [torch.randn(shapes[(tid + r) % len(shapes)], generator=g, device=device) for r in range(rounds)]
    outs: dict = {}

    def work(tid):
        try:
            outs[tid] = [steps[tid % len(steps)](x) for x in inputs[tid]]
        except Exception:  # noqa: BLE001
            errors.append((tid, traceback.format_exc()[-1500:]))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for tid, got in outs.items():
        for r, (x, out) in enumerate(zip(inputs[tid], got)):
            if not torch.equal(out, fn(x)):
                errors.append((tid, r, tuple(x.shape)))
    return errors


def test_threads_emulated():
    fn = lambda x: torch.tanh(x) * 2 + x.mean()  # noqa: E731
    step = GraphReplay(fn, backend="emulate")
    assert _threads(step, [(3,), (2, 5), (7, 1)], fn) == []
    assert step.stats["captures"] == 3


# ---------------------------------------------------------------------------------------------- CUDA


@needs_cuda
def test_cuda_replay_bit_equal_and_outputs_stay_valid():
    from fxopt.models.hf import tiny_hf_mamba

    model = tiny_hf_mamba().cuda().eval()
    ids = torch.randint(0, 128, (2, 40), device="cuda")
    # outputs that require grad are never replayed (autograd is not recorded in a graph): inference
    with torch.no_grad():
        opt = fxopt.optimize(model, (ids,), cuda_graphs=False)
        direct = opt(ids).logits
        step = GraphReplay(lambda i: opt(i).logits)
        outs = [step(ids) for _ in range(3)]
        assert step.stats["captures"] == 1 and step.stats["replays"] == 2, step.notes
        other = torch.randint(0, 128, (2, 40), device="cuda")
        after = step(other)
        torch.cuda.synchronize()
        for o in outs:
            assert torch.equal(o, direct)  # bit-equal, and still valid after the next call
        assert torch.equal(after, opt(other).logits)


@needs_cuda
def test_cuda_self_replaying_module_bit_equal_and_nested():
    """The user's default path (cuda_graphs="auto": the module replays its own specialisation),
    and a GraphReplay around it (the inner replay runs directly inside the outer capture)."""
    from fxopt.models.hf import tiny_hf_mamba

    model = tiny_hf_mamba().cuda().eval()
    ids = torch.randint(0, 128, (2, 40), device="cuda")
    with torch.no_grad():
        plain = fxopt.optimize(model, (ids,), cuda_graphs=False)(ids).logits
        opt = fxopt.optimize(model, (ids,))
        outs = [opt(ids).logits for _ in range(4)]
        inner = opt._last.replay
        assert inner is not None and inner.stats["replays"] >= 2, inner.notes if inner else None
        for o in outs:
            assert torch.equal(o, plain)
        step = GraphReplay(lambda i: opt(i).logits)
        nested = [step(ids) for _ in range(3)]
        assert step.stats["captures"] == 1, step.notes
        assert all(torch.equal(o, plain) for o in nested)
        torch.randn(3, device="cuda")  # the RNG still works after everything above


@needs_cuda
def test_cuda_failed_capture_leaves_rng_usable():
    """A capture that CUDA invalidates (a host sync) must not leave the default generator in
    capture mode (every later random op of the process would fail)."""
    step = GraphReplay(lambda x: x * float(torch.rand((), device="cuda").add(x.sum()).item()))
    x = torch.ones(3, device="cuda")
    for _ in range(3):
        step(x)
    assert step.stats["captures"] == 0
    y = torch.randn(4, device="cuda")
    torch.cuda.synchronize()
    assert y.shape == (4,)


@needs_cuda
def test_cuda_threads():
    fn = lambda x: torch.nn.functional.gelu(x @ x.transpose(-1, -2)) + 1  # noqa: E731
    step = GraphReplay(fn)
    shapes = [(4, 8), (16, 8), (3, 5, 8)]
    # every result right while 4 threads call it (a capture that another thread's sync
    # invalidates runs eagerly and is retried: correct either way)
    assert _threads(step, shapes, fn, device="cuda") == [], step.notes
    print(step.stats, step.notes)
    # two GraphReplays on four threads: one's capture is exclusive against the other's calls
    pair = [GraphReplay(fn), GraphReplay(fn)]
    assert _threads(pair, shapes, fn, device="cuda") == [], pair[0].notes + pair[1].notes
    assert all(p.stats["captures"] == 3 for p in pair), [(p.stats, p.notes) for p in pair]
    # and nothing was left broken (RNG, memory pools): afterwards every shape captures and replays
    fresh = GraphReplay(fn)
    for shape in shapes:
        x = torch.randn(shape, device="cuda")
        for _ in range(3):
            assert torch.equal(fresh(x), fn(x))
    assert fresh.graphs == 3 and fresh.stats["replays"] == 6, (fresh.stats, fresh.notes)


@needs_cuda
def test_cuda_uncapturable_host_sync_falls_back():
    step = GraphReplay(lambda x: x * float(x.sum().item()))
    x = torch.ones(3, device="cuda")
    for _ in range(3):
        assert torch.equal(step(x), x * 3.0)
    assert step.stats["captures"] == 0 and any("capture failed" in n for n in step.notes)


@needs_cuda
@pytest.mark.parametrize("family", ["neox", "mamba"])
def test_cuda_generate_replay_equals_no_replay(family):
    from fxopt.models.hf import tiny_gpt_neox, tiny_hf_mamba
    from fxopt.runtime.engine import runtime_for

    model = (tiny_gpt_neox() if family == "neox" else tiny_hf_mamba()).cuda()
    ids = torch.randint(3, 128, (2, 40), device="cuda")
    opt = fxopt.optimize(model, (ids,))
    replayed = runtime.generate(opt, ids, max_new_tokens=16, eos_token_id=None)
    rt = runtime_for(opt)
    assert rt._replay.stats["replays"] > 0, rt._replay.notes + rt.stats.notes
    rt.cuda_graphs = False
    direct = runtime.generate(opt, ids, max_new_tokens=16, eos_token_id=None)
    assert torch.equal(replayed, direct)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(replayed, ref)


def test_keyword_arguments_and_static_keywords():
    def fn(x, *, scale, cache):
        cache.add_(x)
        return x * scale + cache.sum()

    step = GraphReplay(fn, static_args=("cache",), backend="emulate")
    cache, ref = torch.zeros(3), torch.zeros(3)
    for i in range(4):
        x = torch.full((3,), float(i))
        assert torch.equal(step(x, scale=2.0, cache=cache), fn(x, scale=2.0, cache=ref))
        assert torch.equal(cache, ref)
    assert step.stats["replays"] == 3


# ---------------------------------------------------------------------------------------------- the capture gate
def _hold(gate, exclusive, log, name, hold_s, ready=None, inner_exclusive=False):
    with (gate.exclusive() if exclusive else gate.shared()):
        log.append((name, "in"))
        if ready is not None:
            ready.wait(2)
        if inner_exclusive:
            with gate.exclusive():
                log.append((name, "x-in"))
                time.sleep(hold_s)
                log.append((name, "x-out"))
        else:
            time.sleep(hold_s)
        log.append((name, "out"))


def test_capture_gate_excludes_other_threads_and_nests():
    from fxopt.runtime.cuda_graphs import _CaptureGate

    gate, log = _CaptureGate(), []
    with gate.exclusive():
        with gate.exclusive(), gate.shared():  # nests in one thread
            pass
        t = threading.Thread(target=_hold, args=(gate, False, log, "reader", 0.0))
        t.start()
        time.sleep(0.1)
        assert log == []  # another thread's shared hold waits for the capture
    t.join(2)
    assert log == [("reader", "in"), ("reader", "out")]
    # a capture waits for every other thread's shared hold
    log.clear()
    t = threading.Thread(target=_hold, args=(gate, False, log, "reader", 0.2))
    t.start()
    time.sleep(0.05)
    with gate.exclusive():
        log.append(("writer", "in"))
    t.join(2)
    assert log == [("reader", "in"), ("reader", "out"), ("writer", "in")]


def test_capture_gate_two_upgrades_do_not_deadlock():
    """Two threads each inside a shared hold both start a capture: each gives its shared hold back
    while it waits, so both captures run (one after the other) and neither overlaps a shared hold."""
    from fxopt.runtime.cuda_graphs import _CaptureGate

    gate, log = _CaptureGate(), []
    ready = threading.Barrier(2)

    class _B:  # both threads inside their shared hold before either asks for the capture
        def wait(self, timeout):
            ready.wait(timeout)

    ts = [threading.Thread(target=_hold, args=(gate, False, log, n, 0.05, _B(), True)) for n in ("a", "b")]
    for t in ts:
        t.start()
    for t in ts:
        t.join(5)
    assert not any(t.is_alive() for t in ts), "deadlock"
    xs = [e for e in log if e[1].startswith("x-")]
    assert len(xs) == 4 and xs[0][0] == xs[1][0] and xs[2][0] == xs[3][0]  # captures never overlap
    # and the gate is free afterwards
    with gate.exclusive():
        pass
