"""Capture: model -> ATen-level ``torch.fx.GraphModule``.

Mechanism: ``torch.export.export(strict=False)`` followed by ``ExportedProgram.module()``.
``torch.fx.symbolic_trace`` cannot trace transformers 5.x models, and export gives a
functional ATen graph with a fake-tensor ``meta["val"]`` on every node plus
``nn_module_stack`` / ``stack_trace`` provenance that inspection uses. We keep export's
default IR (no ``run_decompositions``): it is what the patterns are traced with too
(:func:`capture_function`), so patterns and models are always at the same level, and
skipping the extra decomposition re-trace halves capture time on unrolled loops.

Inputs and outputs may be any pytree of tensors (tuples, dicts, HF ``ModelOutput``),
so a decode step that takes and returns explicit cache tensors captures like any
other call. HF cache *objects* are not pytrees; we turn them off for HF models (see
:func:`normalize_call`) and explain what to do when a user asks for one explicitly.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
import time
import traceback
from typing import Any

import torch
import torch.fx

from .config import get_config
from .logs import configure as configure_logging, progress_logger
from .errors import CaptureError

log = logging.getLogger("fxopt.capture")

_TORCH_DIR = os.path.dirname(torch.__file__)
# One capture at a time in this process: torch.export installs process-wide tracing state
# (dispatch-mode slots, patched module calls), and two exports interleaved by threads corrupt it.
CAPTURE_LOCK = threading.RLock()
_FXOPT_DIR = os.path.dirname(__file__)


# --------------------------------------------------------------------------- inputs

def _accepts_kwarg(model: torch.nn.Module, name: str) -> bool:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return False
    return name in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def is_hf_model(model: torch.nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return cfg is not None and hasattr(cfg, "use_cache") and type(model).__module__.startswith("transformers")


# normalize_call runs on every call of an OptimizedModule: remember per model class (and
# instance-level forward override) whether it takes use_cache, instead of re-inspecting.
_TAKES_USE_CACHE: dict[tuple, bool] = {}


def _takes_use_cache(model: torch.nn.Module) -> bool:
    key = (type(model), id(model.__dict__.get("forward")))
    known = _TAKES_USE_CACHE.get(key)
    if known is None:
        known = _TAKES_USE_CACHE[key] = is_hf_model(model) and _accepts_kwarg(model, "use_cache")
    return known


def prepare_call(model: torch.nn.Module, args: Any = (), kwargs: dict | None = None, *,
                 _inject: bool = False) -> tuple[tuple, dict]:
    """The user's (args, kwargs) as a tuple and a dict, checked, with nothing added: what the
    captured graph takes (capture adds and then removes ``use_cache``, see :func:`capture`).
    Runs on every call of an OptimizedModule, so it does one pass and one dict copy."""
    if isinstance(args, torch.Tensor):
        args = (args,)
    elif isinstance(args, list):
        args = tuple(args)
    elif not isinstance(args, tuple):
        raise CaptureError(
            f"args must be a tuple of positional arguments (got {type(args).__name__}); "
            "write fxopt.capture(model, (input_ids,)) for a single input"
        )
    kwargs = dict(kwargs or {})
    if _takes_use_cache(model):
        if kwargs.get("use_cache") is True:
            raise CaptureError(
                f"{type(model).__name__} was called with use_cache=True: it would return a transformers cache "
                "object, which is not a tensor pytree and cannot be captured. Call it with use_cache=False "
                "(the default fxopt uses), or write a decode-step wrapper that takes and returns the cache as "
                "explicit tensors and capture that."
            )
        if _inject:
            kwargs.setdefault("use_cache", False)
    return args, kwargs


def normalize_call(model: torch.nn.Module, args: Any = (), kwargs: dict | None = None) -> tuple[tuple, dict]:
    """The (args, kwargs) the model is run with under capture.

    HF models return a cache object unless ``use_cache=False``; export rejects it
    (it is not a pytree). Users will call ``fxopt.optimize(model, (ids,))``, so we add
    ``use_cache=False`` when the caller did not choose. An explicit ``use_cache=True``
    is refused with advice instead of silently changing what the model returns.
    """
    return prepare_call(model, args, kwargs, _inject=True)


# --------------------------------------------------------------------------- errors

def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The deepest traceback frame in model code (not torch, not fxopt)."""
    best = None
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:  # follow the cause chain too
        seen.add(id(e))
        for fr in traceback.extract_tb(e.__traceback__):
            fn = os.path.abspath(fr.filename)
            if fn.startswith(_TORCH_DIR) or fn.startswith(_FXOPT_DIR) or "<frozen" in fn:
                continue
            best = fr
        e = e.__cause__ or e.__context__
    return best


def _where(exc: BaseException) -> str:
    fr = _user_frame(exc)
    if fr is None:
        return ""
    code = f": `{fr.line.strip()}`" if fr.line else ""
    return f" at {fr.filename}:{fr.lineno} (in {fr.name}){code}"


def _translate(exc: BaseException, model: torch.nn.Module) -> CaptureError:
    name = type(model).__name__
    msg = str(exc)
    first = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
    kind = type(exc).__name__
    if kind == "GuardOnDataDependentSymNode" or "data-dependent" in msg or "data dependent" in msg:
        return CaptureError(
            f"data-dependent control flow in {name}{_where(exc)}: a Python branch or shape depends on tensor "
            "values, so no single graph describes the model. fxopt captures one straight-line graph per input "
            "shape: make the branch depend on shapes or Python values, move it outside the captured call, or "
            "express it with torch.cond."
        )
    if "in output, which is not a known type" in msg or ("pytree" in msg and "output" in msg):
        typ = msg.split("Found ")[-1].split(" in output")[0] if "Found " in msg else "an object"
        return CaptureError(
            f"{name} returned {typ}, which is not a tensor pytree (typically a transformers cache object). "
            "Call the model with use_cache=False, or wrap it so the cache goes in and out as explicit tensors."
        )
    return CaptureError(
        f"torch.export could not capture {name}{_where(exc)}: {kind}: {first}. "
        "Check that the model runs eagerly on these inputs; set FXOPT_DEBUG=1 for the full torch error."
    )


# --------------------------------------------------------------------------- progress

@contextlib.contextmanager
def _heartbeat(label: str):
    """Print elapsed time every few seconds while a long capture runs (captures of
    unrolled loops can take a while; silence looks like a hang)."""
    cfg = get_config()
    if not cfg.progress:
        yield
        return
    plog = progress_logger(cfg)
    stop = threading.Event()
    t0 = time.perf_counter()

    def beat():
        while not stop.wait(5.0):
            plog.info("%s: %.0f s", label, time.perf_counter() - t0)

    th = threading.Thread(target=beat, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()


# --------------------------------------------------------------------------- capture

def capture(model: torch.nn.Module, args: Any = (), kwargs: dict | None = None) -> torch.fx.GraphModule:
    """Capture ``model(*args, **kwargs)`` as an ATen-level GraphModule.

    The result is called with the same arguments and returns the same output
    structure. Shapes are specialised: another input shape needs another capture
    (``fxopt.optimize`` does that for you). Parameters are shared with ``model``,
    not copied, and ``model`` itself is never modified.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(
            f"capture needs a torch.nn.Module, got {type(model).__name__}; "
            "wrap a plain function with fxopt.capture_function(fn, example_args)"
        )
    user_kwargs = dict(kwargs or {})
    args, kwargs = normalize_call(model, args, kwargs)
    configure_logging(get_config())
    t0 = time.perf_counter()
    with CAPTURE_LOCK, _heartbeat(f"capturing {type(model).__name__}"):
        try:
            ep = torch.export.export(model, args, kwargs, strict=False)
            gm = ep.module()
        except CaptureError:
            raise
        except Exception as exc:  # noqa: BLE001 - every export failure becomes one clear error
            log.info("torch.export failed on %s", type(model).__name__, exc_info=True)  # FXOPT_DEBUG=1 shows it
            raise _translate(exc, model) from exc
    changed = _drop_shape_guards(gm)
    extra = {k: v for k, v in kwargs.items() if k not in user_kwargs}
    if extra:
        changed = _drop_inputs(gm, args, kwargs, user_kwargs, extra) or changed
    if changed:
        gm.recompile()  # once for both edits (a code generation costs ~15 ms per 300 nodes)
    gm.meta["fxopt_capture_seconds"] = time.perf_counter() - t0
    gm.meta["fxopt_model"] = type(model).__name__
    log.info("captured %s: %d nodes in %.2f s", type(model).__name__, len(gm.graph.nodes), gm.meta["fxopt_capture_seconds"])
    return gm


def _drop_shape_guards(gm: torch.fx.GraphModule) -> bool:
    """Export (torch >= 2.12) adds a ``_guards_fn`` call checking the input shapes it traced
    with. fxopt keys every graph on its exact input signature before calling it, so the check
    is implied; dropping it keeps node counts equal to the computation's and saves a call.
    Whether the graph changed (the caller recompiles)."""
    guards = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("_guards_fn")]
    for n in guards:
        gm.graph.erase_node(n)
    return bool(guards)


def _drop_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict, user_kwargs: dict, extra: dict) -> bool:
    """Make ``gm`` take the call the user wrote: the inputs capture added (``extra``, constants
    the graph was specialised on) become constants, and the pytree input spec loses them, so
    ``gm(input_ids)`` works (also for ``torch.export`` of it). Whether the graph changed (the
    caller recompiles)."""
    from torch.utils import _pytree as pytree

    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None or info.in_spec is None or len(phs) != info.in_spec.num_leaves:
        return False  # not the layout export produces; leave the graph as it is
    _, kw_nodes = pytree.tree_unflatten(phs, info.in_spec)
    changed = False
    for key, value in extra.items():
        node = kw_nodes.get(key)
        if not isinstance(node, torch.fx.Node):
            return changed
        if node.users:
            node.replace_all_uses_with(value)  # type: ignore[arg-type]
        gm.graph.erase_node(node)
        changed = True
    new_spec = pytree.tree_flatten((tuple(args), {k: v for k, v in kwargs.items() if k not in extra}))[1]
    codegen.pytree_info = info._replace(in_spec=new_spec, orig_args=[a for a in info.orig_args if a not in extra])
    return True


class _FunctionModule(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def capture_function(fn, example_args: tuple) -> torch.fx.GraphModule:
    """Capture a plain function (a pattern, a replacement, a test program) exactly the
    way :func:`capture` captures models, so both sit at the same IR."""
    return capture(_FunctionModule(fn), tuple(example_args))
