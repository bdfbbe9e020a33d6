"""Command line: ``python -m fxopt inspect MODEL`` and ``python -m fxopt passes``.

``inspect`` builds a demo model (or imports ``package.module:factory``), optimizes it
and writes listings, diff, picture and report to a folder::

    python -m fxopt inspect gpt_neox --seq-len 32 --layers 24 --out out/neox24
    python -m fxopt inspect seed_mamba --passes scan,addcmul
    python -m fxopt inspect mypkg.models:build --set hidden=128

A factory returns a model, or ``(model, example_args)`` / ``(model, example_args,
example_kwargs)``; without example arguments, a model with ``config.vocab_size`` gets
``input_ids`` of shape (batch, seq_len).

Every bad input (an option, a ``--set``, a model spec, a factory that raises, a model fxopt
cannot capture) ends with one ``fxopt: error: ...`` line on stderr that names what is wrong
and what to do, and exit code 2, as argparse does for usage errors. A failure fxopt did not
anticipate is reported the same way with exit code 1. ``FXOPT_DEBUG=1`` prints the
traceback before the line.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import difflib
import importlib
import inspect
import operator
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from .errors import FxoptError

# name -> (builder(seed, **overrides), config key that sets the layer count, description,
#          config(**overrides): the demo's config object, so --set keys and values are checked
#          before a model is built)
DEMO_MODELS: dict[str, tuple[Callable[..., Any], str, str, Callable[..., Any]]] = {}


def _demo(name: str, layers_key: str, description: str, config: Callable[..., Any]):
    def deco(fn):
        DEMO_MODELS[name] = (fn, layers_key, description, config)
        return fn

    return deco


def _neox_config(parallel_residual: bool):
    def make(**cfg):
        from .models.hf import gpt_neox_config

        return gpt_neox_config(parallel_residual, **cfg)

    return make


def _mamba_config(**cfg):
    from .models.hf import hf_mamba_config

    return hf_mamba_config(**cfg)


def _seed_mamba_config(**cfg):
    from .models.seed_mamba import SeedMambaConfig

    return SeedMambaConfig(**cfg)


@_demo("gpt_neox", "num_hidden_layers", "tiny HF GPTNeoXForCausalLM, parallel residual (Pythia style)",
       _neox_config(True))
def _gpt_neox(seed: int = 0, **cfg):
    from .models.hf import tiny_gpt_neox

    return tiny_gpt_neox(parallel_residual=True, seed=seed, **cfg)


@_demo("gpt_neox_serial", "num_hidden_layers", "tiny HF GPTNeoXForCausalLM, serial residual", _neox_config(False))
def _gpt_neox_serial(seed: int = 0, **cfg):
    from .models.hf import tiny_gpt_neox

    return tiny_gpt_neox(parallel_residual=False, seed=seed, **cfg)


@_demo("hf_mamba", "num_hidden_layers", "tiny HF MambaForCausalLM (slow path: the scan is a Python loop)",
       _mamba_config)
def _hf_mamba(seed: int = 0, **cfg):
    from .models.hf import tiny_hf_mamba

    return tiny_hf_mamba(seed=seed, **cfg)


@_demo("seed_mamba", "n_layer", "fxopt's seed-style Mamba (selective scan as a Python loop)", _seed_mamba_config)
def _seed_mamba(seed: int = 0, **cfg):
    from .models.seed_mamba import seed_mamba

    return seed_mamba(seed=seed, **cfg)


# --------------------------------------------------------------------------- progress


class _Progress:
    """Phase lines on stderr with elapsed seconds; a heartbeat while a phase runs long."""

    def __init__(self, enabled: bool = True, heartbeat_s: float = 10.0):
        self.enabled = enabled
        self.heartbeat_s = heartbeat_s
        self.t0 = time.perf_counter()

    def say(self, msg: str) -> None:
        if self.enabled:
            print(f"[fxopt {time.perf_counter() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def phase(self, label: str):
        self.say(f"{label} ...")
        start = time.perf_counter()
        stop = threading.Event()

        def beat():
            while not stop.wait(self.heartbeat_s):
                self.say(f"  still {label} ({time.perf_counter() - start:.0f} s)")

        th = None
        if self.enabled and self.heartbeat_s > 0:
            th = threading.Thread(target=beat, daemon=True)
            th.start()
        try:
            yield
        finally:
            stop.set()
            if th is not None:
                th.join()
        self.say(f"{label}: done in {time.perf_counter() - start:.2f} s")


# --------------------------------------------------------------------------- messages


def _one_line(text: object) -> str:
    """A message on one line (torch and transformers errors often span several)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _exc_text(exc: BaseException) -> str:
    msg = _one_line(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


# --------------------------------------------------------------------------- option values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**63:  # what torch.manual_seed and torch.Generator take
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to 2**63 - 1, got {text!r}")
    return value


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _parse_sets(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise FxoptError(f"--set takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k.isidentifier():
            raise FxoptError(f"--set {item!r}: {k!r} is not a configuration key (a Python name, like hidden_size)")
        if k in out:
            raise FxoptError(f"--set {k} is given twice; give each key once")
        out[k] = _parse_value(v.strip())
    return out


def _format_sets(overrides: dict) -> str:
    return " ".join(f"--set {k}={v!r}" for k, v in overrides.items())


def resolve_device(text: str):
    """``--device`` as a torch.device that can hold tensors here, or an FxoptError saying why not."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise FxoptError(
            f"--device {text!r} is not a torch device ({_one_line(exc)}); use cpu, cuda or cuda:N"
        ) from None
    if device.type == "meta":
        raise FxoptError("--device meta holds no data; inspect runs the model, so use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise FxoptError(
                f"--device {text}: no CUDA device is available (torch {torch.__version__}, {built}); "
                "use --device cpu, or run where a GPU and a CUDA build of torch are"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise FxoptError(f"--device {text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    try:
        torch.empty(1, device=device)
    except Exception as exc:  # any backend torch names but this build or machine cannot use
        raise FxoptError(
            f"--device {text}: torch cannot make a tensor there ({_exc_text(exc)}); use --device cpu"
        ) from None
    return device


def check_out_dir(out: Path) -> None:
    """Fail before the long build if ``out`` cannot become a folder we can write."""
    if out.exists() and not out.is_dir():
        raise FxoptError(f"--out {out} is a file, not a folder; give a folder path (it is created if missing)")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != out and not probe.is_dir():
        raise FxoptError(f"--out {out}: {probe} is a file, so no folder can be made below it; give another --out")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        what = "folder" if probe == out else f"folder {probe} it would be made in"
        raise FxoptError(f"--out {out}: the {what} is not writable; give a folder you can write")


# --------------------------------------------------------------------------- models


def _config_dict(cfg) -> dict:
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    if dataclasses.is_dataclass(cfg):
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return dict(vars(cfg))


def _own_fields(cfg, known: set[str]) -> list[str]:
    """The fields a config class adds to its base (what a user means to set), else all."""
    cls = type(cfg)
    try:
        own = set(inspect.signature(cls.__init__).parameters)
        base = next((b for b in cls.__mro__[1:] if b is not object), None)
        if base is not None:
            own -= set(inspect.signature(base.__init__).parameters)
    except (TypeError, ValueError):
        own = set()
    return sorted((own & known) or known)


def _unknown_key(spec: str, key: str, cfg, known: set[str]) -> FxoptError:
    return FxoptError(
        f"model {spec!r}: --set {key}: {type(cfg).__name__} has no field {key!r}{_did_you_mean(key, known)}; "
        f"its fields: {', '.join(_own_fields(cfg, known))}"
    )


def check_demo_overrides(spec: str, overrides: dict) -> None:
    """Refuse ``--set`` keys the demo's config does not know and values it rejects, naming them.

    A transformers config keeps any keyword it does not know as a plain attribute, so an
    unknown key (a typo) would otherwise be accepted and change nothing. A key counts as known
    when the default config has it, or when the config consumes it (legacy names such as
    ``rotary_pct`` are folded into other fields and do not show up themselves)."""
    if not overrides:
        return
    _, _, _, make_config = DEMO_MODELS[spec]
    default = make_config()
    cls = type(default).__name__
    known = {k for k in _config_dict(default) if not k.startswith("_")}
    if not hasattr(default, "to_dict"):  # a plain dataclass takes its fields and nothing else
        for k in overrides:
            if k not in known:
                raise _unknown_key(spec, k, default, known)
    try:
        cfg = make_config(**overrides)
    except Exception as exc:
        raise FxoptError(
            f"model {spec!r}: {cls} rejects {_format_sets(overrides)}: {_exc_text(exc)}; fix the value(s)"
        ) from exc
    stored = _config_dict(cfg)
    for k in overrides:
        if k not in known and k in stored:
            raise _unknown_key(spec, k, default, known)


def _module_hint(mod_name: str) -> str:
    if "/" in mod_name or "\\" in mod_name:
        return "; give a module name, not a file path (put its folder on PYTHONPATH: PYTHONPATH=dir ... mod:factory)"
    if mod_name.endswith(".py"):
        return f"; drop the .py ({mod_name[:-3]}:factory)"
    return "; check the spelling, and that its folder is on PYTHONPATH"


def _import_factory(spec: str) -> Callable[..., Any]:
    mod_name, sep, attr = spec.partition(":")
    if not sep:
        raise FxoptError(
            f"model {spec!r} is not a demo model{_did_you_mean(spec, DEMO_MODELS)}: give one of "
            f"{', '.join(DEMO_MODELS)}, or package.module:factory"
        )
    if not mod_name or not attr or ":" in attr or not all(p.isidentifier() for p in attr.split(".")):
        raise FxoptError(
            f"model {spec!r}: expected a demo name ({', '.join(DEMO_MODELS)}) or package.module:factory, "
            "with one ':' between the module and a function name"
        )
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise FxoptError(
            f"model {spec!r}: cannot import module {mod_name!r}: {_one_line(exc)}{_module_hint(mod_name)}"
        ) from exc
    except Exception as exc:  # the module itself raised (a bug in it, a relative name, ...)
        raise FxoptError(f"model {spec!r}: importing module {mod_name!r} raised {_exc_text(exc)}") from exc
    obj = mod
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise FxoptError(f"model {spec!r}: module {mod_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise FxoptError(
            f"model {spec!r}: {attr!r} is not a callable that returns a model (its type is {type(obj).__name__})"
        )
    return obj


def _check_factory_arguments(spec: str, factory: Callable[..., Any], overrides: dict) -> None:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to check (a builtin, ...): let the call say
        return
    try:
        sig.bind(**overrides)
    except TypeError as exc:
        takes = [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        bad = [k for k in overrides if k not in takes]
        what = f"does not take {', '.join(repr(k) for k in bad)}" if bad else f"cannot be called so ({exc})"
        if bad:
            what += _did_you_mean(bad[0], takes)
        raise FxoptError(
            f"factory {spec!r} {what}; it takes: {', '.join(takes) or 'no keyword arguments'} (--set KEY=VALUE)"
        ) from None


def _with_layers(spec: str, layers: int | None, overrides: dict) -> dict:
    """``overrides`` plus ``--layers`` as the demo's layer-count key."""
    if layers is None:
        return dict(overrides)
    if spec not in DEMO_MODELS:
        raise FxoptError(f"--layers works with the demo models only; for {spec!r} pass --set KEY={layers}")
    layers_key = DEMO_MODELS[spec][1]
    if layers_key in overrides:
        raise FxoptError(f"model {spec!r}: --layers and --set {layers_key} both set the layer count; give one")
    return {**overrides, layers_key: layers}


def build_model(spec: str, *, seed: int = 0, layers: int | None = None, overrides: dict | None = None):
    """(model, args or None, kwargs or None) for a demo name or ``module:factory``."""
    import torch

    overrides = _with_layers(spec, layers, overrides or {})
    if spec in DEMO_MODELS:
        fn = DEMO_MODELS[spec][0]
        check_demo_overrides(spec, overrides)
        try:
            return fn(seed=seed, **overrides), None, None
        except Exception as exc:
            sets = f" with {_format_sets(overrides)}" if overrides else ""
            raise FxoptError(f"model {spec!r}: building it{sets} failed: {_exc_text(exc)}; fix the value(s)") from exc
    factory = _import_factory(spec)
    _check_factory_arguments(spec, factory, overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            made = factory(**overrides)
        except Exception as exc:
            raise FxoptError(
                f"factory {spec!r} raised {_exc_text(exc)}; fix the factory or its --set arguments "
                "(FXOPT_DEBUG=1 shows the traceback)"
            ) from exc
    args = kwargs = None
    shape = "a torch.nn.Module or (model, example_args[, example_kwargs])"
    if isinstance(made, (tuple, list)):
        if not made or not isinstance(made[0], torch.nn.Module) or len(made) > 3:
            first = f", first item a {type(made[0]).__name__}" if made else ""
            raise FxoptError(
                f"factory {spec!r} must return {shape}, got a {type(made).__name__} of length {len(made)}{first}"
            )
        model = made[0]
        args = made[1] if len(made) > 1 else None
        kwargs = made[2] if len(made) > 2 else None
        if isinstance(args, torch.Tensor):
            args = (args,)
        if args is not None and not isinstance(args, (tuple, list)):
            raise FxoptError(
                f"factory {spec!r}: example_args must be a tuple of the model's positional inputs (or one "
                f"tensor), got a {type(args).__name__}"
            )
        if kwargs is not None and not isinstance(kwargs, dict):
            raise FxoptError(
                f"factory {spec!r}: example_kwargs must be a dict of keyword inputs, got a {type(kwargs).__name__}"
            )
    else:
        model = made
    if not isinstance(model, torch.nn.Module):
        raise FxoptError(
            f"factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module; it must return {shape}"
        )
    return model, (tuple(args) if args is not None else None), kwargs


def example_inputs(model, batch: int, seq_len: int, device) -> tuple:
    import torch

    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is None:
        raise FxoptError(
            f"{type(model).__name__} has no config.vocab_size, so fxopt cannot make example input_ids; "
            "have the factory return (model, example_args)"
        )
    try:
        n_tokens = operator.index(vocab)
    except TypeError:
        n_tokens = 0
    if n_tokens < 1:
        raise FxoptError(
            f"{type(model).__name__}.config.vocab_size is {vocab!r}, not a positive integer, so fxopt cannot make "
            "example input_ids; fix the config or have the factory return (model, example_args)"
        )
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(0, n_tokens, (batch, seq_len), generator=gen).to(device),)


_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64", "fp64": "float64"}


def _max_abs_diff(a, b) -> float:
    import torch
    from torch.utils import _pytree as pytree

    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    worst = 0.0
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.is_floating_point():
            d = (x.double() - y.double()).abs()
            d = d[torch.isfinite(d)]
            if d.numel():
                worst = max(worst, float(d.max()))
    return worst


# --------------------------------------------------------------------------- commands


def cmd_inspect(ns: argparse.Namespace) -> int:
    import torch

    import fxopt
    from .inspection import graph_diff, write_inspection

    prog = _Progress(enabled=not ns.quiet, heartbeat_s=ns.heartbeat)
    # Every check that needs no model comes first, so a typo fails in a second, not after a
    # long build.
    passes = None
    if ns.passes is not None:
        passes = [p.strip() for p in ns.passes.split(",") if p.strip()]
    dtype = getattr(torch, _DTYPES[ns.dtype])
    device = resolve_device(ns.device)
    overrides = _parse_sets(ns.set or [])
    out = Path(ns.out) if ns.out else Path("out") / f"inspect-{ns.model.replace(':', '-').replace('/', '-')}"
    check_out_dir(out)
    if ns.model in DEMO_MODELS:
        check_demo_overrides(ns.model, _with_layers(ns.model, ns.layers, overrides))
    else:
        # A factory module may register its own passes when imported, so import it first.
        _check_factory_arguments(ns.model, _import_factory(ns.model), _with_layers(ns.model, ns.layers, overrides))
    from .registry import resolve_passes

    resolve_passes(passes)

    with prog.phase(f"building model {ns.model}"):
        model, args, kwargs = build_model(ns.model, seed=ns.seed, layers=ns.layers, overrides=overrides)
        try:
            model = model.to(device=device, dtype=dtype).eval()
        except Exception as exc:
            raise FxoptError(f"moving {type(model).__name__} to {device} / {dtype} failed: {_exc_text(exc)}") from exc
        if args is None:
            args = example_inputs(model, ns.batch, ns.seq_len, device)
        n_params = sum(p.numel() for p in model.parameters())
    prog.say(f"model {type(model).__name__}: {n_params / 1e6:.2f} M parameters, {dtype}, {device}")

    with prog.phase("capturing and running passes"), torch.no_grad():
        opt = fxopt.optimize(model, args, kwargs, passes=passes)
    report = opt.report()
    prog.say(
        f"captured {report.nodes_captured} nodes in {report.capture_seconds:.2f} s; passes took "
        f"{report.pass_seconds:.2f} s -> {report.nodes_final} nodes"
    )

    if ns.check:
        with prog.phase("checking optimized output against the model"), torch.no_grad():
            ref = model(*args, **(kwargs or {}))
            got = opt(*args, **(kwargs or {}))
            worst = _max_abs_diff(ref, got)
        prog.say(f"max |optimized - eager| = {worst:.3g}")

    with prog.phase(f"writing inspection to {out}"):
        try:
            paths = write_inspection(opt, out, title=f"fxopt inspect {ns.model}", progress=lambda m: prog.say("  " + m))
        except OSError as exc:
            raise FxoptError(
                f"--out {out}: writing the inspection failed: {_exc_text(exc)}; give a folder you can write"
            ) from exc

    print(report)
    print()
    print(graph_diff(opt.original_graph_module, opt.graph_module).summary())
    print()
    for key in ("html", "diff", "before", "after", "report", "kernels"):
        if key in paths:
            print(f"{key:>8}: {paths[key]}")
    return 0


def cmd_passes(ns: argparse.Namespace) -> int:
    from .registry import DEFAULT_PASSES, _REGISTRY, available_passes

    names = available_passes()
    if not names:
        print("no passes registered")
        return 0
    width = max(len(n) for n in names)
    for name in names:
        factory = _REGISTRY.get(name)
        doc = (getattr(factory, "__doc__", None) or "").strip().splitlines()
        first = doc[0] if doc else ""
        mark = "*" if name in DEFAULT_PASSES else " "
        print(f"{mark} {name.ljust(width)}  {first}")
    print("\n* = run by default (fxopt.optimize(passes=None))")
    return 0


def cmd_models(ns: argparse.Namespace) -> int:
    width = max(len(n) for n in DEMO_MODELS)
    for name, (_, layers_key, desc, _) in DEMO_MODELS.items():
        print(f"{name.ljust(width)}  {desc} (--layers sets {layers_key})")
    print(f"{'pkg.mod:factory'.ljust(width)}  your own: factory(**--set) returns a model or (model, example_args)")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with fxopt's one-line error format (``fxopt: error: ...``, exit code 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"fxopt: error: {_one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m fxopt", description="fxopt: graph-rewriting passes for PyTorch")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "inspect",
        help="optimize a model and write listings, diff, picture and report to a folder",
        description="Build MODEL, optimize it, and write before.txt, after.txt, diff.txt, graph.html, report.txt "
        "and kernels/ to --out.",
    )
    p.add_argument("model", metavar="MODEL",
                   help=f"a demo model ({', '.join(DEMO_MODELS)}) or package.module:factory")
    p.add_argument("--seq-len", type=_positive_int, default=16, help="example input length (default 16)")
    p.add_argument("--batch", type=_positive_int, default=1, help="example batch size (default 1)")
    p.add_argument("--passes", default=None,
                   help="comma-separated pass names (default: the library defaults); '' runs none")
    p.add_argument("--out", default=None, help="output folder (default out/inspect-MODEL)")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="model dtype (default float32)")
    p.add_argument("--device", default="cpu", help="device for the model and inputs (default cpu)")
    p.add_argument("--layers", type=_positive_int, default=None, help="number of layers of a demo model")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override for a demo model, or keyword argument for a factory (repeatable)")
    p.add_argument("--seed", type=_seed, default=0, help="weight seed (default 0)")
    p.add_argument("--check", action="store_true", help="also run model and optimized model and compare outputs")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--heartbeat", type=_non_negative_float, default=10.0,
                   help="seconds between 'still working' lines (0: none)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("passes", help="list registered passes")
    p.set_defaults(func=cmd_passes)
    p = sub.add_parser("models", help="list the demo models inspect can build")
    p.set_defaults(func=cmd_models)
    return parser


def _debug() -> bool:
    from .config import get_config

    try:
        return get_config().debug >= 1
    except FxoptError:  # a malformed FXOPT_* variable: that error is reported on its own
        return False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed by _Parser.error
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if not getattr(ns, "func", None):
        parser.print_help()
        return 2
    try:
        return int(ns.func(ns) or 0)
    except KeyboardInterrupt:
        print("fxopt: interrupted", file=sys.stderr)
        return 130
    except FxoptError as exc:
        if _debug():
            traceback.print_exception(exc, file=sys.stderr)
        print(f"fxopt: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # not anticipated: still one line; the traceback on request
        if _debug():
            traceback.print_exception(exc, file=sys.stderr)
        print(
            f"fxopt: error: {ns.command} failed with {_exc_text(exc)}; this is likely a bug in fxopt "
            "(FXOPT_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
