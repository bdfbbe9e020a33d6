"""optimize() host time (issue 10): what it does to go faster keeps every result and check as it was.

* meta recordings compute a fresh-result op's metadata once per argument metadata
  (``length_check._Recorder._meta``): the cached result is the kernel's, op for op;
* graphs built on the way are lazy (code generated on first use); what optimize() hands out is a
  plain GraphModule with its code (``graph_utils.make_graph_module`` / ``finalize``);
* capture generates the code of its edits once;
* the cyclic collector is off while templates are built (``optimize._gc_paused``), never around
  a direct capture, and is left as the caller had it;
* ``benchmarks/optimize_time.py --smoke`` runs and its phases add up to optimize()'s time.
"""
from __future__ import annotations

import gc
import importlib
import os
import sys

import pytest
import torch
import torch.fx
from hypothesis import given, settings
from hypothesis import strategies as st

import fxopt
from fxopt import graph_utils
from fxopt import length_check as lc
from fxopt.models.hf import tiny_hf_mamba
from fxopt.rewrite.pass_base import Pass, PassResult

opt_mod = importlib.import_module("fxopt.optimize")  # the module (fxopt.optimize is also the function)
aten = torch.ops.aten
_LAZY = graph_utils._lazy_class()


# ----------------------------------------------------------------- meta results computed once

def _meta(shape, stride, offset: int, dtype) -> torch.Tensor:
    """A meta tensor with exactly this shape, strides and storage offset."""
    span = 1 + offset + sum((s - 1) * st for s, st in zip(shape, stride) if s > 0)
    return torch.empty(span, dtype=dtype, device="meta").as_strided(shape, stride, offset)


def _like(t: torch.Tensor, shift: int = 0) -> torch.Tensor:
    return _meta(tuple(t.shape), t.stride(), t.storage_offset() + shift, t.dtype)


def _picture(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.stride(), t.dtype, t.storage_offset(), t.untyped_storage().nbytes(), t.requires_grad,
            t._is_view(), t.is_meta)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool)


@st.composite
def _operand(draw, shape, dtype=None):
    """A meta tensor of ``shape``: contiguous, permuted or strided, maybe at an offset."""
    dtype = dtype or draw(st.sampled_from(_DTYPES))
    dims = len(shape)
    perm = draw(st.permutations(range(dims))) if dims else []
    step = draw(st.sampled_from((1, 1, 2)))
    stride, acc = [0] * dims, step
    for d in reversed(perm):
        stride[d] = acc
        acc *= max(shape[d], 1)
    offset = draw(st.sampled_from((0, 0, 1, 3, 16)))
    return _meta(tuple(shape), tuple(stride), offset, dtype)


@st.composite
def _op_call(draw):
    """(op, args, kwargs) of an op whose result is fresh, on meta operands."""
    shape = draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))
    a = draw(_operand(shape))
    kind = draw(st.sampled_from(("binary", "where", "to_copy", "clone", "sum", "exp", "bmm", "cat")))
    if kind in ("binary", "where"):
        bshape = [1 if draw(st.booleans()) else s for s in shape][draw(st.integers(0, len(shape))):]
        b = draw(_operand(bshape))
        if kind == "where":
            cond = draw(_operand(shape, torch.bool))
            return aten.where.self, (cond, a, b), {}
        op = draw(st.sampled_from((aten.add.Tensor, aten.mul.Tensor, aten.maximum.default)))
        if a.dtype == torch.bool and b.dtype == torch.bool and op is aten.add.Tensor:
            op = aten.mul.Tensor
        return op, (a, b), {}
    if kind == "to_copy":
        fmt = draw(st.sampled_from((None, torch.preserve_format, torch.contiguous_format)))
        kw = {"dtype": draw(st.sampled_from(_DTYPES))}
        if fmt is not None:
            kw["memory_format"] = fmt
        return aten._to_copy.default, (a,), kw
    if kind == "clone":
        return aten.clone.default, (a,), {"memory_format": draw(st.sampled_from((torch.preserve_format,
                                                                                 torch.contiguous_format)))}
    if kind == "sum":
        if not shape:
            return aten.sum.default, (a,), {}
        return aten.sum.dim_IntList, (a, [draw(st.integers(0, len(shape) - 1))], draw(st.booleans())), {}
    if kind == "exp":
        return aten.exp.default, (draw(_operand(shape, draw(st.sampled_from(_DTYPES[:3])))),), {}
    if kind == "bmm":
        b_, m, k, n = (draw(st.integers(1, 3)) for _ in range(4))
        dt = draw(st.sampled_from(_DTYPES[:3]))
        return aten.bmm.default, (draw(_operand((b_, m, k), dt)), draw(_operand((b_, k, n), dt))), {}
    return aten.cat.default, ([a, draw(_operand(shape, a.dtype))], 0), {}  # 0-d operands: an error


@settings(max_examples=150, deadline=None)
@given(_op_call(), st.sampled_from((0, 64)))
def test_a_cached_meta_result_is_the_kernels(call, shift_bytes):
    """Property: after one run of an op, a second run on fresh operands of the same metadata
    (also shifted by 64 bytes in their storages, as a loop's slice moves on) returns what the
    kernel returns for them: shape, strides, dtype, offset, storage size, flags."""
    op, args, kwargs = call
    rec = lc._Recorder({}, home=torch.device("cpu"))
    try:
        first = op(*args, **kwargs)
    except Exception:  # noqa: BLE001 - RuntimeError, IndexError (0-d cat): whatever the op raises
        return  # operands an op refuses (0-d cat, maximum of bools): no result to compare
    assert _picture(rec._meta(op, args, kwargs)) == _picture(first)
    assert len(rec.meta_results) == 1

    def again(x):  # same metadata; a tensor at an offset moves on by 64 bytes (its alignment class stays)
        if isinstance(x, torch.Tensor):
            return _like(x, shift_bytes // x.element_size() if x.storage_offset() else 0)
        return [again(y) for y in x] if isinstance(x, list) else x

    args2 = tuple(again(x) for x in args)
    expected = op(*args2, **kwargs)
    got = rec._meta(op, args2, kwargs)
    assert got is not expected and _picture(got) == _picture(expected)
    assert len(rec.meta_results) == 1  # the second call was answered from the first


def test_ops_that_alias_mutate_or_depend_on_data_are_never_cached():
    for op in (aten.select.int, aten.expand.default, aten.view.default, aten.transpose.int, aten.add_.Tensor,
               aten.nonzero.default, aten.bernoulli.default, aten.convolution.default, aten.split.Tensor):
        assert not lc._cacheable(op), op
    # _unsafe_view declares no alias but returns its input's storage: its schema passes, its result does not
    rec = lc._Recorder({}, home=torch.device("cpu"))
    x = _meta((4, 6), (6, 1), 0, torch.float32)
    out = rec._meta(aten._unsafe_view.default, (x, [24]), {})
    assert out.untyped_storage()._cdata == x.untyped_storage()._cdata and not rec.meta_results
    assert aten._unsafe_view.default in rec.not_fresh  # and is not keyed again in this recording
    again = rec._meta(aten._unsafe_view.default, (x, [24]), {})
    assert again.untyped_storage()._cdata == x.untyped_storage()._cdata and not rec.meta_results
    for op in (aten.mul.Tensor, aten.add.Tensor, aten._to_copy.default, aten.bmm.default, aten.stack.default):
        assert lc._cacheable(op), op


def test_look_alike_arguments_get_their_own_results():
    """Same shapes but other strides, another alignment, True for 1, -0.0 for 0.0: other keys,
    and each gets the kernel's own result."""
    rec = lc._Recorder({}, home=torch.device("cpu"))
    a = _meta((4, 3), (3, 1), 0, torch.float32)
    b_rows, b_cols = _meta((4, 3), (3, 1), 0, torch.float32), _meta((4, 3), (1, 4), 0, torch.float32)
    a_t = _meta((4, 3), (1, 4), 0, torch.float32)
    for x, y in ((a, b_rows), (a_t, b_cols), (a, b_cols), (a_t, b_rows)):
        assert _picture(rec._meta(aten.add.Tensor, (x, y), {})) == _picture(aten.add.Tensor(x, y))
    assert len(rec.meta_results) == 4

    keys = []
    for args in (((a,), 1), ((a,), True), ((a,), 0.0), ((a,), -0.0)):
        out: list = []
        assert lc._meta_key(args, out)
        keys.append(tuple(out))
    assert len(set(keys)) == 4
    off0, off1, off16 = (_meta((4,), (1,), o, torch.float32) for o in (0, 1, 16))
    k = [lc._meta_key((t,), out := []) and tuple(out) for t in (off0, off1, off16)]
    assert len(set(k)) == 3  # offset 0, misaligned, aligned but not 0: three classes
    assert not lc._meta_key((object(),), [])  # an object it cannot hold exactly: the op just runs
    # a factory without dtype= reads the default dtype: another default, another result
    full = (aten.full.default, ([3], 1.5), {"device": torch.device("meta")})
    got32 = rec._meta(*full)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got64 = rec._meta(*full)
    finally:
        torch.set_default_dtype(old)
    assert (got32.dtype, got64.dtype) == (torch.float32, torch.float64)
    # a long list (stack of one tensor per step, issued once) is not keyed: the op just runs
    assert lc._meta_key(([off0] * lc._MAX_KEYED_LIST,), []) and not lc._meta_key(([off0] * (lc._MAX_KEYED_LIST + 1),), [])


def test_meta_recording_with_cached_results_is_the_uncached_one(monkeypatch):
    """HF Mamba's stream at L = 48 (a loop of pointwise ops per step): op for op the same with and
    without the cache, and most pointwise ops are answered from it."""
    model = tiny_hf_mamba(num_hidden_layers=2)
    ids = torch.randint(0, model.config.vocab_size, (1, 48))
    args, kwargs = lc.normalize_call(model, (ids,), {})
    rec = lc._run(model, tuple(args), dict(kwargs), None, "meta")
    cached = lc.record_stream(model, (ids,), how="meta")
    monkeypatch.setattr(lc, "_cacheable", lambda func: False)
    plain = lc.record_stream(model, (ids,), how="meta")
    assert (cached.keys, cached.ints, cached.vocab) == (plain.keys, plain.ints, plain.vocab)
    loop_ops = ("aten.mul.Tensor", "aten.add.Tensor", "aten.bmm.default")
    issued = sum(1 for k in cached.keys if cached.vocab[k][0] in loop_ops)
    computed = sum(1 for key in rec.meta_results if str(key[0]) in loop_ops)
    assert issued > 300 and computed < issued / 10


# ----------------------------------------------------------------- lazy graphs on the way, plain ones out

def test_lazy_graph_module_generates_code_when_used_and_finalize_makes_it_plain():
    assert _LAZY is not None  # torch >= 2.3
    gm = torch.fx.symbolic_trace(lambda x: torch.relu(x) + 1)
    lazy = graph_utils.copy_graph_module(gm, lazy=True)
    assert isinstance(lazy, _LAZY) and type(lazy).forward is _LAZY._lazy_forward  # no code yet
    x = torch.randn(5)
    out = graph_utils.finalize(lazy)
    assert not isinstance(out, _LAZY) and out.graph is lazy.graph and "relu" in out.code
    assert torch.equal(out(x), gm(x)) and torch.equal(lazy(x), gm(x))
    eager = graph_utils.copy_graph_module(gm)
    assert not isinstance(eager, _LAZY) and graph_utils.finalize(eager) is eager  # look-alike: left as it is


_UNARY = (torch.relu, torch.neg, torch.exp, torch.sigmoid, lambda x: x * 2, lambda x: x + 1, lambda x: x.t().t())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(range(len(_UNARY))), min_size=1, max_size=6), st.integers(1, 4))
def test_a_finalized_lazy_copy_is_the_eager_copy(chain, rows):
    """Property: for any chain of ops, a lazy copy finalized has the eager copy's code and values."""
    def fn(x):
        for i in chain:
            x = _UNARY[i](x)
        return x

    gm = torch.fx.symbolic_trace(fn)
    eager, lazy = graph_utils.copy_graph_module(gm), graph_utils.copy_graph_module(gm, lazy=True)
    out = graph_utils.finalize(lazy)
    x = torch.randn(rows, 3)
    assert out.code == eager.code and torch.equal(out(x), eager(x)) and not isinstance(out, _LAZY)


@pytest.mark.parametrize("templates", [True, False])
def test_what_optimize_hands_out_is_a_plain_graph_module(templates):
    model = tiny_hf_mamba(num_hidden_layers=5)
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    opt = fxopt.optimize(model, (ids,), passes=["scan"], seq_dim="auto" if templates else None,
                         layer_templates=templates)
    gm = opt.graph_module
    assert type(gm).__mro__[1] is torch.fx.GraphModule and "def forward" in gm.code
    # the template's graph computes what a direct capture's does, bit for bit
    direct = fxopt.optimize(model, (ids,), passes=["scan"], seq_dim=None, layer_templates=False)
    with torch.no_grad():
        assert torch.equal(opt(ids).logits, direct(ids).logits)
    if templates:
        assert any(n.startswith("length-generic: graph instantiated") for n in opt.report().notes)
        (template, _), = opt._templates.values()  # the probes' graphs were never given code
        assert isinstance(template.probe_spec.optimized, _LAZY)


def test_capture_generates_code_once_for_its_edits(monkeypatch):
    """export's input-shape guard dropped and use_cache removed from the inputs: one recompile."""
    seen = []
    real = torch.fx.GraphModule.recompile

    def counting(self):
        caller = sys._getframe(1).f_code
        seen.append((os.path.basename(caller.co_filename), caller.co_name))
        return real(self)

    monkeypatch.setattr(torch.fx.GraphModule, "recompile", counting)
    model = tiny_hf_mamba()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    gm = fxopt.capture(model, (ids,))
    assert [s for s in seen if s[0] == "capture.py"] == [("capture.py", "capture")]
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    with torch.no_grad():
        assert torch.equal(gm(ids).logits, model(ids, use_cache=False).logits)
    # look-alike: a plain module (no use_cache to remove): at most the guard's one recompile
    seen.clear()
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    gm = fxopt.capture(lin, (x,))
    assert len([s for s in seen if s[0] == "capture.py"]) <= 1 and torch.equal(gm(x), lin(x))


# ----------------------------------------------------------------- the collector

class _GcProbe(Pass):
    name = "gc_probe"
    fixpoint = False

    def __init__(self):
        self.seen: list[bool] = []

    def call(self, graph_module):
        self.seen.append(gc.isenabled())
        return PassResult(graph_module, False)


@pytest.mark.parametrize("templates", [True, False])
def test_the_collector_is_off_while_templates_are_built_only(templates):
    model = tiny_hf_mamba(num_hidden_layers=5)
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    probe = _GcProbe()
    assert gc.isenabled()
    fxopt.optimize(model, (ids,), passes=["scan", probe], seq_dim="auto" if templates else None,
                   layer_templates=templates)
    assert gc.isenabled()
    # templates: every pass run is a probe's (collector off); direct capture (look-alike): on
    assert probe.seen and set(probe.seen) == ({False} if templates else {True})


@settings(max_examples=50, deadline=None)
@given(st.booleans(), st.integers(1, 4), st.booleans())
def test_gc_paused_property(enabled_before, depth, raises):
    """Property: any nesting, with or without an exception: off inside, the caller's setting after."""
    (gc.enable if enabled_before else gc.disable)()
    try:
        def nest(k):
            with opt_mod._gc_paused():
                assert not gc.isenabled()
                if k > 1:
                    nest(k - 1)
                elif raises:
                    raise KeyError
        if raises:
            with pytest.raises(KeyError):
                nest(depth)
        else:
            nest(depth)
        assert gc.isenabled() == enabled_before
    finally:
        gc.enable()


def test_gc_paused_restores_the_callers_setting():
    assert gc.isenabled()
    with pytest.raises(ValueError):
        with opt_mod._gc_paused():
            with opt_mod._gc_paused():
                assert not gc.isenabled()
            assert not gc.isenabled()  # the inner one leaves it to the outer
            raise ValueError
    assert gc.isenabled()
    gc.disable()
    try:
        with opt_mod._gc_paused():
            pass
        assert not gc.isenabled()  # a caller's own gc.disable() stays
    finally:
        gc.enable()


# ----------------------------------------------------------------- the benchmark

def test_optimize_time_benchmark_smoke(tmp_path, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        bench = importlib.import_module("optimize_time")
    finally:
        sys.path.pop(0)
    out = tmp_path / "t.json"
    own = (opt_mod.capture, lc.record_stream, torch.fx.GraphModule.recompile, opt_mod.ModelState)
    assert bench.main(["--smoke", "--models", "mamba_bf16,neox_block", "--json", str(out)]) == 0
    import json

    res = json.loads(out.read_text())["results"]
    assert [r["model"] for r in res] == ["mamba_bf16", "neox_block"]
    for r in res:
        assert r["length_template"] and r["layer_template"], r["notes"]
        total = sum(p["seconds"] for p in r["phases"])
        assert abs(total - r["optimize_s"]) < 0.02 * r["optimize_s"] + 0.01
        phases = {p["phase"] for p in r["phases"]}
        assert {"capture", "record meta", "repropagate"} <= phases or {"capture", "record fake", "repropagate"} <= phases
        contexts = {p["context"] for p in r["phases"]}
        assert {"layer probes", "layer check", "length fit", "length verify", "length instantiate"} <= contexts
    assert "optimize()" in capsys.readouterr().out
    # the clock's wrappers are gone afterwards: fxopt's functions are its own again
    assert (opt_mod.capture, lc.record_stream, torch.fx.GraphModule.recompile, opt_mod.ModelState) == own
