"""Where ``fxopt.optimize()`` spends its time (issue 10: <= 10 s at L = 2048), phase by phase.

Rows: HF Mamba at mamba-130m's shape (24 layers, d_model 768, vocab 50280) in fp32 and bf16 with the
default passes, and GPTNeoX at Pythia-2.8B's shape in fp16 with ``fxopt.registry.DEFAULT_PASSES`` and
``BLOCK_PASSES``; batch 1, L = 2048, random weights. GPTNeoX is built directly on the device in fp16
(as ``benchmarks/prefill.py`` builds it: 5.6 GB of weights, never an fp32 copy).

Each ``optimize()`` call is split into phases by wrapping fxopt's own functions for the duration of
the call (nothing in fxopt changes; the wrappers only read the clock). Every second of the call is
charged to exactly one (context, phase) pair, the innermost of each that is running, so the rows of
one model add up to its optimize() time:

* contexts: ``length probes`` (capture + passes at L = 5, 7, 11), ``layer probes`` (the 1-3 layer
  proxies inside each probe length), ``layer check`` (every layer's op stream, once),
  ``length fit`` (the verification proxy's op streams at the probes), ``length verify`` (its op
  stream at the real L), ``layer/length instantiate``, and ``optimize`` (the rest);
* phases: ``capture`` (torch.export), ``copy graph``, ``pass <name>``, ``record meta|fake`` (op-stream
  recordings), ``fit streams``, ``stream check``, ``layer fit`` (cutting and comparing the proxies'
  graphs), ``skeleton``, ``repropagate`` (fake-tensor metadata of an instantiated graph),
  ``recompile`` (GraphModule code generation), ``model state``, ``layer stack``, ``(other)``.

    python benchmarks/optimize_time.py --device cuda --json out/optimize_time.json   # GPU host
    python benchmarks/optimize_time.py --device cpu --models mamba_fp32,mamba_bf16
    python benchmarks/optimize_time.py --smoke                                       # tiny models, CPU

The first optimize() of a process also pays one-time costs (imports, the first export, the
passes' pattern graphs): ``--repeat 2`` shows them (run 0 vs run 1 of the first model). ``--profile
DIR`` also writes a cProfile dump per row (slower: cProfile roughly doubles Python time).
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import json
import os
import sys
import time
from collections import OrderedDict
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fxopt  # noqa: E402
from fxopt.registry import BLOCK_PASSES, DEFAULT_PASSES  # noqa: E402

MODELS = ("mamba_fp32", "mamba_bf16", "mamba_fp32_block", "mamba_bf16_block", "neox_default", "neox_block")


# ----------------------------------------------------------------- the phase clock

class PhaseClock:
    """Charges wall time to (innermost context, innermost phase) while fxopt's functions run."""

    def __init__(self):
        self.ctx: list[str] = ["optimize"]
        self.leaf: list[str] = ["(other)"]
        self.seconds: "OrderedDict[tuple[str, str], float]" = OrderedDict()
        self.calls: dict[tuple[str, str], int] = {}
        self.t = time.perf_counter()

    def _charge(self) -> None:
        now = time.perf_counter()
        key = (self.ctx[-1], self.leaf[-1])
        self.seconds[key] = self.seconds.get(key, 0.0) + now - self.t
        self.t = now

    @contextmanager
    def enter(self, kind: str, label: str):
        self._charge()
        stack = self.ctx if kind == "ctx" else self.leaf
        stack.append(label)
        key = (self.ctx[-1], self.leaf[-1])
        self.calls[key] = self.calls.get(key, 0) + 1
        try:
            yield
        finally:
            self._charge()
            stack.pop()

    def rows(self) -> list[dict]:
        return [dict(context=c, phase=p, seconds=s, calls=self.calls.get((c, p), 0))
                for (c, p), s in self.seconds.items()]


def _targets():
    """(owner, attribute, kind, label) of every function the clock wraps. ``label`` is a string or
    a function of the call's (args, kwargs)."""
    import importlib

    from fxopt import layer_check
    from fxopt import layer_generic as lyr
    from fxopt import length_check as lc
    from fxopt import length_generic as lg
    from fxopt.rewrite import manager

    opt_mod = importlib.import_module("fxopt.optimize")  # the module (fxopt.optimize is also the function)

    how = lambda a, k: f"record {k.get('how', 'meta')}"
    return [
        (lg, "build_template", "ctx", "length probes"),
        (lyr, "build_layer_template", "ctx", "layer probes"),
        (layer_check, "check_all_layers", "ctx", "layer check"),
        (lc, "fit_module", "ctx", "length fit"),
        (opt_mod.OptimizedModule, "_check_stream", "ctx", "length verify"),
        (lyr.LayerTemplate, "instantiate", "ctx", "layer instantiate"),
        (lg.LengthTemplate, "instantiate", "ctx", "length instantiate"),
        (opt_mod, "capture", "leaf", "capture"),
        (opt_mod, "copy_graph_module", "leaf", "copy graph"),
        (lg, "copy_graph_module", "leaf", "copy graph"),
        (manager, "run_pass", "leaf", lambda a, k: f"pass {a[0].name}"),
        (lc, "record_stream", "leaf", how),
        (lc, "source_line", "leaf", "source line"),
        (lc, "fit_streams", "leaf", "fit streams"),
        (lc.StreamModel, "check", "leaf", "stream check"),
        (lg, "skeleton", "leaf", "skeleton"),
        (lyr, "fit_layer_template", "leaf", "layer fit"),
        (lyr, "_layers_differ", "leaf", "layer fit"),
        (lyr, "_peel_evidence", "leaf", "layer fit"),
        (lyr, "check_layer_attributes", "leaf", "layer fit"),
        (lg, "repropagate", "leaf", "repropagate"),
        (lyr, "repropagate", "leaf", "repropagate"),
        (torch.fx.GraphModule, "recompile", "leaf", "recompile"),
        (opt_mod, "ModelState", "leaf", "model state"),
        (lyr, "find_layer_stack", "leaf", "layer stack"),
    ]


@contextmanager
def phase_clock():
    clock = PhaseClock()
    saved = []
    for owner, attr, kind, label in _targets():
        if attr not in vars(owner):
            raise RuntimeError(f"benchmarks/optimize_time.py: {owner.__name__}.{attr} is gone; update _targets()")
        fn = vars(owner)[attr]
        saved.append((owner, attr, fn))

        def wrapper(*a, _fn=fn, _kind=kind, _label=label, **k):
            with clock.enter(_kind, _label(a, k) if callable(_label) else _label):
                return _fn(*a, **k)

        # a class (ModelState) is replaced by a function that constructs it, timed
        setattr(owner, attr, wrapper if isinstance(fn, type) else functools.wraps(fn)(wrapper))
    try:
        clock.t = time.perf_counter()
        yield clock
    finally:
        clock._charge()
        for owner, attr, fn in reversed(saved):
            setattr(owner, attr, fn)


# ----------------------------------------------------------------- models

def build(name: str, smoke: bool, device: str, layers: int | None = None):
    """The model of row ``name``, its dtype and passes. Weights are random (seed 0); GPTNeoX is
    created on ``device`` in fp16 directly. ``layers``: the stack's depth instead of the shape's."""
    import transformers

    from fxopt.models import hf

    if name.startswith("mamba"):
        dtype = torch.float32 if name.startswith("mamba_fp32") else torch.bfloat16
        cfg = hf.hf_mamba_config(vocab_size=512, hidden_size=64, num_hidden_layers=5) if smoke \
            else hf.mamba_130m_config()
        make, passes = transformers.MambaForCausalLM, (BLOCK_PASSES if name.endswith("_block") else DEFAULT_PASSES)
    else:
        dtype = torch.float32 if smoke and device == "cpu" else torch.float16
        cfg = hf.gpt_neox_config(True, vocab_size=512, hidden_size=64, num_hidden_layers=5, num_attention_heads=4) \
            if smoke else hf.gpt_neox_2_8b_config()
        make, passes = transformers.GPTNeoXForCausalLM, (DEFAULT_PASSES if name == "neox_default" else BLOCK_PASSES)
    if layers is not None:
        cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = make(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(device=device, dtype=dtype).eval(), dtype, list(passes)


def measure(model, ids, passes, profile_path: str | None = None) -> dict:
    prof = cProfile.Profile() if profile_path else None
    with phase_clock() as clock, torch.no_grad():
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        opt = fxopt.optimize(model, (ids,), passes=passes)
        if prof is not None:
            prof.disable()
        total = time.perf_counter() - t0
    if prof is not None:
        prof.dump_stats(profile_path)
    rep = opt.report()
    return dict(optimize_s=total, phases=clock.rows(), matches=rep.matches, nodes_final=rep.nodes_final,
                length_template=any(n.startswith("length-generic: graph instantiated") for n in rep.notes),
                layer_template=any(n.startswith("layer-generic:") for n in rep.notes),
                notes=[n[:400] for n in rep.notes])


# ----------------------------------------------------------------- output

def _by(rows: list[dict], key: str) -> "OrderedDict[str, float]":
    out: "OrderedDict[str, float]" = OrderedDict()
    for r in rows:
        out[r[key]] = out.get(r[key], 0.0) + r["seconds"]
    return out


def print_table(results: list[dict], min_seconds: float = 0.005) -> None:
    for res in results:
        print(f"\n== {res['model']} run {res['run']} ({res['dtype']}, b{res['b']} L{res['L']}, {res['device']}): "
              f"optimize() {res['optimize_s']:.2f} s; length template {res['length_template']}, "
              f"layer template {res['layer_template']}")
        print(f"  {'context':<20}{'phase':<24}{'s':>8}{'calls':>7}")
        for r in res["phases"]:
            if r["seconds"] >= min_seconds:
                print(f"  {r['context']:<20}{r['phase']:<24}{r['seconds']:8.3f}{r['calls']:7d}")
        print("  by context: " + ", ".join(f"{k} {v:.2f}" for k, v in _by(res["phases"], "context").items()))
        print("  by phase:   " + ", ".join(f"{k} {v:.2f}" for k, v in
                                           sorted(_by(res["phases"], "phase").items(), key=lambda kv: -kv[1])))
    print(f"\n{'model':<14}{'run':>4} {'dtype':<10}{'optimize s':>11}  notes")
    for res in results:
        print(f"{res['model']:<14}{res['run']:>4} {res['dtype']:<10}{res['optimize_s']:11.2f}  "
              + ("; ".join(n[:90] for n in res["notes"][:2]) or "-"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="where the models live (default: cuda when available; --smoke: cpu)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--length", type=int, default=None, help="sequence length (default 2048; --smoke: 40)")
    ap.add_argument("--repeat", type=int, default=1, help="optimize() calls per model (the first pays one-time costs)")
    ap.add_argument("--smoke", action="store_true", help="tiny models (5 layers) on the CPU: checks the script runs")
    ap.add_argument("--profile", default=None, metavar="DIR", help="also write a cProfile dump per row here")
    ap.add_argument("--layers", type=int, default=None, help="the stack's depth (default: the shape's; --smoke: 5)")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    names = [m for m in args.models.split(",") if m]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    length = args.length or (40 if args.smoke else 2048)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    results = []
    for name in names:
        model, dtype, passes = build(name, args.smoke, device, args.layers)
        ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
        for rep in range(args.repeat):
            prof = os.path.join(args.profile, f"{name}_{rep}.prof") if args.profile else None
            res = dict(model=name, dtype=str(dtype).replace("torch.", ""), device=device, b=1, L=length,
                       passes=passes, run=rep, **measure(model, ids, passes, prof))
            res["by_context"] = dict(_by(res["phases"], "context"))
            res["by_phase"] = dict(_by(res["phases"], "phase"))
            results.append(res)
            print(f"{name} run {rep}: optimize() {res['optimize_s']:.2f} s", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    print_table(results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                    cpu_count=os.cpu_count(), date=time.strftime("%Y-%m-%d"), smoke=args.smoke)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
