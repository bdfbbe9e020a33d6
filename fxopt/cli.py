"""Command line: ``python -m fxopt inspect MODEL`` and ``python -m fxopt passes``.

``inspect`` builds a demo model (or imports ``package.module:factory``), optimizes it
and writes listings, diff, picture and report to a folder::

    python -m fxopt inspect gpt_neox --seq-len 32 --layers 24 --out out/neox24
    python -m fxopt inspect seed_mamba --passes scan,addcmul
    python -m fxopt inspect mypkg.models:build --set hidden=128

A factory returns a model, or ``(model, example_args)`` / ``(model, example_args,
example_kwargs)``; without example arguments, a model with ``config.vocab_size`` gets
``input_ids`` of shape (batch, seq_len).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .errors import FxoptError

# name -> (builder(seed, **overrides), config key that sets the layer count, description)
DEMO_MODELS: dict[str, tuple[Callable[..., Any], str, str]] = {}


def _demo(name: str, layers_key: str, description: str):
    def deco(fn):
        DEMO_MODELS[name] = (fn, layers_key, description)
        return fn

    return deco


@_demo("gpt_neox", "num_hidden_layers", "tiny HF GPTNeoXForCausalLM, parallel residual (Pythia style)")
def _gpt_neox(seed: int = 0, **cfg):
    from .models.hf import tiny_gpt_neox

    return tiny_gpt_neox(parallel_residual=True, seed=seed, **cfg)


@_demo("gpt_neox_serial", "num_hidden_layers", "tiny HF GPTNeoXForCausalLM, serial residual")
def _gpt_neox_serial(seed: int = 0, **cfg):
    from .models.hf import tiny_gpt_neox

    return tiny_gpt_neox(parallel_residual=False, seed=seed, **cfg)


@_demo("hf_mamba", "num_hidden_layers", "tiny HF MambaForCausalLM (slow path: the scan is a Python loop)")
def _hf_mamba(seed: int = 0, **cfg):
    from .models.hf import tiny_hf_mamba

    return tiny_hf_mamba(seed=seed, **cfg)


@_demo("seed_mamba", "n_layer", "fxopt's seed-style Mamba (selective scan as a Python loop)")
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


# --------------------------------------------------------------------------- models


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_sets(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise FxoptError(f"--set takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v.strip())
    return out


def _import_factory(spec: str) -> Callable[..., Any]:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise FxoptError(f"model {spec!r}: expected a demo name ({', '.join(DEMO_MODELS)}) or package.module:factory")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise FxoptError(f"model {spec!r}: cannot import module {mod_name!r}: {exc}") from exc
    obj = mod
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise FxoptError(f"model {spec!r}: module {mod_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise FxoptError(f"model {spec!r}: {attr!r} is not callable")
    return obj


def build_model(spec: str, *, seed: int = 0, layers: int | None = None, overrides: dict | None = None):
    """(model, args or None, kwargs or None) for a demo name or ``module:factory``."""
    import torch

    overrides = dict(overrides or {})
    if spec in DEMO_MODELS:
        fn, layers_key, _ = DEMO_MODELS[spec]
        if layers is not None:
            overrides[layers_key] = layers
        try:
            return fn(seed=seed, **overrides), None, None
        except TypeError as exc:
            raise FxoptError(f"model {spec!r}: bad configuration override(s) {sorted(overrides)}: {exc}") from exc
    factory = _import_factory(spec)
    if layers is not None:
        raise FxoptError(f"--layers works with the demo models only; for {spec!r} pass --set KEY={layers}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        made = factory(**overrides)
    args = kwargs = None
    if isinstance(made, (tuple, list)):
        if not made or not isinstance(made[0], torch.nn.Module) or len(made) > 3:
            raise FxoptError(
                f"factory {spec!r} must return a torch.nn.Module or (model, example_args[, example_kwargs]), "
                f"got a {type(made).__name__} of length {len(made)}"
            )
        model = made[0]
        args = made[1] if len(made) > 1 else None
        kwargs = made[2] if len(made) > 2 else None
        if isinstance(args, torch.Tensor):
            args = (args,)
    else:
        model = made
    if not isinstance(model, torch.nn.Module):
        raise FxoptError(f"factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
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
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(0, int(vocab), (batch, seq_len), generator=gen).to(device),)


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
    passes = None
    if ns.passes is not None:
        passes = [p.strip() for p in ns.passes.split(",") if p.strip()]
    dtype = getattr(torch, _DTYPES[ns.dtype])
    device = torch.device(ns.device)
    overrides = _parse_sets(ns.set or [])
    # Fail fast on a bad pass name, before a long model build. A factory module may
    # register its own passes when imported, so import it first.
    if ns.model not in DEMO_MODELS:
        _import_factory(ns.model)
    from .registry import resolve_passes

    resolve_passes(passes)

    with prog.phase(f"building model {ns.model}"):
        model, args, kwargs = build_model(ns.model, seed=ns.seed, layers=ns.layers, overrides=overrides)
        model = model.to(device=device, dtype=dtype).eval()
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

    out = Path(ns.out) if ns.out else Path("out") / f"inspect-{ns.model.replace(':', '-').replace('/', '-')}"
    with prog.phase(f"writing inspection to {out}"):
        paths = write_inspection(opt, out, title=f"fxopt inspect {ns.model}", progress=lambda m: prog.say("  " + m))

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
    for name, (_, layers_key, desc) in DEMO_MODELS.items():
        print(f"{name.ljust(width)}  {desc} (--layers sets {layers_key})")
    print(f"{'pkg.mod:factory'.ljust(width)}  your own: factory(**--set) returns a model or (model, example_args)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fxopt", description="fxopt: graph-rewriting passes for PyTorch")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "inspect",
        help="optimize a model and write listings, diff, picture and report to a folder",
        description="Build MODEL, optimize it, and write before.txt, after.txt, diff.txt, graph.html, report.txt "
        "and kernels/ to --out.",
    )
    p.add_argument("model", metavar="MODEL",
                   help=f"a demo model ({', '.join(DEMO_MODELS)}) or package.module:factory")
    p.add_argument("--seq-len", type=int, default=16, help="example input length (default 16)")
    p.add_argument("--batch", type=int, default=1, help="example batch size (default 1)")
    p.add_argument("--passes", default=None,
                   help="comma-separated pass names (default: the library defaults); '' runs none")
    p.add_argument("--out", default=None, help="output folder (default out/inspect-MODEL)")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="model dtype (default float32)")
    p.add_argument("--device", default="cpu", help="device for the model and inputs (default cpu)")
    p.add_argument("--layers", type=int, default=None, help="number of layers of a demo model")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override for a demo model, or keyword argument for a factory (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.add_argument("--check", action="store_true", help="also run model and optimized model and compare outputs")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--heartbeat", type=float, default=10.0, help="seconds between 'still working' lines (0: none)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("passes", help="list registered passes")
    p.set_defaults(func=cmd_passes)
    p = sub.add_parser("models", help="list the demo models inspect can build")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "func", None):
        parser.print_help()
        return 2
    try:
        return int(ns.func(ns) or 0)
    except FxoptError as exc:
        print(f"fxopt: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fxopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
