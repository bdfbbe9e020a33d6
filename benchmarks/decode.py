"""Generation benchmark (issue 12): time per output token and decode throughput.

    python benchmarks/decode.py                       # GPU: 2.8B shapes, fp16, every row, b1 / b16 / b64
    python benchmarks/decode.py --smoke               # tiny models (CPU is fine): a < 1 min check of the script
    python benchmarks/decode.py --families neox --batches 1 --rows fxopt,hf_eager
    python benchmarks/decode.py --budget-s 420 --json out.json

Models: HF GPTNeoX with Pythia-2.8B's shape and HF Mamba with mamba-2.8b's (64 layers, d_model
2560), fp16, random weights (eos disabled, so every row generates every token). Per family and
batch size:

* b1: TPOT (ms per output token) for a 32-token prompt and 128 new tokens;
* b16 / b64: decode tokens/s at context 2048 (prompt 2048 - 128, 128 new tokens);
* warm-up: the first call's extra time (fxopt: ``optimize`` + graph building + capture; HF
  static cache: torch.compile).

Decode time is measured as ``t(generate(n + 1)) - t(generate(1))`` (the prefill and the first
token cancel), so every row is timed the same way through its own public ``generate``; the
host-bound HF rows (``hf_eager``, ``hf_kernels``: tens of ms per token) with ``--slow-new-tokens``
(32) tokens, timed once, the others with 128, best of ``--repeats`` (2). Tokens are compared with
``hf_eager``'s (greedy; the first divergence is reported: fp16 kernels may round differently).

Rows: ``hf_eager`` (HF ``generate``, dynamic cache), ``hf_compile`` (GPTNeoX: HF's static cache,
which HF compiles with torch.compile on CUDA), ``hf_kernels`` (Mamba: HF with the official
mamba_ssm / causal-conv1d kernels, built from ``.peers`` (see ../shared/peers/README.md) in a
child process, since HF binds those kernels at import; "absent" when they are missing),
``fxopt`` (``fxopt.runtime.generate``: static cache, CUDA-graph replay of the decode step),
``fxopt_nographs`` (the same without graph replay, with ``--with-nographs``), and ``floor``: the
weight-streaming floor, parameter bytes (plus, batched, the cache bytes a step reads) / measured
copy bandwidth.

HF's torch-only Mamba path prefills with a Python loop over the sequence (minutes at L=1920
with 64 layers), so ``hf_eager`` for Mamba runs at b1 only unless ``--hf-eager-mamba-batched``.
One process (the peer rows aside), one model per family shared by the rows, modest repeats, and
``--budget-s``: sections that would start after the budget is spent are skipped (and listed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

ROWS = ("hf_eager", "hf_compile", "hf_kernels", "fxopt", "fxopt_nographs", "floor")


# ---------------------------------------------------------------------------------------------- models

def _config(family: str, smoke: bool):
    from fxopt.models import hf

    if family == "neox":
        if smoke:
            return hf.gpt_neox_config(True, vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
        return hf.gpt_neox_2_8b_config()
    if smoke:
        return hf.hf_mamba_config(vocab_size=512, num_hidden_layers=2)
    return hf.hf_mamba_config(vocab_size=50280, hidden_size=2560, num_hidden_layers=64, state_size=16, expand=2)


def build_model(family: str, smoke: bool, dtype, device, seed: int = 0):
    import transformers

    cfg = _config(family, smoke)
    cls = transformers.GPTNeoXForCausalLM if family == "neox" else transformers.MambaForCausalLM
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialise on the device: 2.8B random parameters on the host take minutes
            model = cls(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(device=device, dtype=dtype).eval()


def param_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def copy_bandwidth(device) -> float:
    """bytes/s of a device-to-device copy (read + write counted)."""
    if device.type != "cuda":
        x = torch.empty(32 * 2**20 // 4)
        y = torch.empty_like(x)
        t0 = time.perf_counter()
        for _ in range(5):
            y.copy_(x)
        return 2 * x.numel() * 4 * 5 / (time.perf_counter() - t0)
    x = torch.empty(512 * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 4 * 10 / (start.elapsed_time(end) * 1e-3)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def decode_time(gen, new_tokens: int, device, repeats: int):
    """(seconds per decode step, output of the long call, the long call's seconds): min over
    ``repeats`` of t(gen(new_tokens + 1)) - t(gen(1))."""
    best, out, long_s = float("inf"), None, float("inf")
    for _ in range(repeats):
        t_short, _ = timed(lambda: gen(1), device)
        t_long, out = timed(lambda: gen(new_tokens + 1), device)
        best = min(best, (t_long - t_short) / new_tokens)
        long_s = min(long_s, t_long)
    return best, out, long_s


# ---------------------------------------------------------------------------------------------- rows

def _hf_gen(model, ids, **extra):
    def gen(n):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                                  **extra)
    return gen


def run_row(row: str, family: str, model, ids, args, device, opt_holder: dict) -> dict:
    b, prompt = ids.shape
    n = args.new_tokens
    res = dict(family=family, row=row, batch=b, prompt=prompt, new_tokens=n,
               passes=args.passes if row.startswith("fxopt") else None)
    if row in ("hf_eager", "hf_kernels"):  # hf_kernels: the same call, in the child with the kernels installed
        gen = _hf_gen(model, ids)
    elif row == "hf_compile":
        if device.type != "cuda" and not args.smoke:
            return {**res, "skipped": "HF compiles its static cache on CUDA only"}
        gen = _hf_gen(model, ids, cache_implementation="static")
    elif row in ("fxopt", "fxopt_nographs"):
        import fxopt
        from fxopt import runtime
        from fxopt.runtime.engine import runtime_for

        if "opt" not in opt_holder:
            passes = list(fxopt.registry.BLOCK_PASSES) if args.passes == "block" else None
            t_opt, opt_holder["opt"] = timed(lambda: fxopt.optimize(model, (ids[:1, :8],), passes=passes), device)
            opt_holder["optimize_s"] = t_opt
            res["optimize_s"] = t_opt
        opt = opt_holder["opt"]
        runtime_for(opt).cuda_graphs = row == "fxopt"

        def gen(k):
            return runtime.generate(opt, ids, max_new_tokens=k, eos_token_id=None)
    else:
        raise ValueError(row)
    slow = row in ("hf_eager", "hf_kernels")  # host-bound rows (~75 ms per token at 2.8B): fewer tokens, once
    if slow and not args.smoke:
        n = min(n, args.slow_new_tokens)
        res["new_tokens"] = n
    first_s, _ = timed(lambda: gen(n + 1), device)        # builds / compiles / captures
    timed(lambda: gen(1), device)                         # the short call's own buckets (a shorter cache)
    per_step, out, steady_s = decode_time(gen, n, device, 1 if slow else args.repeats)
    res.update(first_call_s=first_s, steady_call_s=steady_s, warmup_s=first_s - steady_s + res.get("optimize_s", 0.0),
               tpot_ms=per_step * 1e3, tokens_per_s=b / per_step)
    if row.startswith("fxopt"):
        from fxopt.runtime.engine import runtime_for

        rt = runtime_for(opt_holder["opt"])
        res["graph_replays"] = rt._replay.stats["replays"]
        res["notes"] = (rt.stats.notes + rt._replay.notes)[-6:]
        if args.profile and device.type == "cuda" and row == "fxopt":
            res["profile"] = kernel_profile(gen, device)
    res["tokens"] = out[:, prompt:].cpu()
    return res


def _kernel_totals(fn) -> dict:
    """{kernel name: [calls, total device µs]} of the CUDA kernels ``fn()`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out: dict = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            entry = out.setdefault(e.name, [0, 0.0])
            entry[0] += 1
            entry[1] += e.device_time if hasattr(e, "device_time") else e.cuda_time
    return out


def kernel_profile(gen, device, steps: int = 16) -> dict:
    """Where a decode step's device time goes: kernels of gen(steps + 1) minus those of gen(1),
    per step (count, µs), grouped by kernel name; the top 12 and the sum."""
    short, long = _kernel_totals(lambda: gen(1)), _kernel_totals(lambda: gen(steps + 1))
    per = {}
    for name, (calls, us) in long.items():
        c0, u0 = short.get(name, (0, 0.0))
        if calls - c0 > 0:
            per[name] = ((calls - c0) / steps, (us - u0) / steps)
    top = sorted(per.items(), key=lambda kv: -kv[1][1])[:12]
    total_us = sum(v[1] for v in per.values())
    kernels = sum(v[0] for v in per.values())
    print(f"  decode step: {kernels:.0f} kernels, {total_us:.0f} µs device time per token", flush=True)
    for name, (calls, us) in top:
        print(f"    {us:8.1f} µs {calls:6.1f}x  {name[:110]}", flush=True)
    return dict(kernels_per_token=kernels, device_us_per_token=total_us,
                top=[dict(name=n[:160], calls=c, us=u) for n, (c, u) in top])


def floor_row(family, model, ids, args, bw, opt_holder) -> dict:
    b, prompt = ids.shape
    weights = param_bytes(model)
    cache = 0
    if "opt" in opt_holder:
        from fxopt import runtime

        # what a decode step reads besides the weights: on average half the K/V cache (GPTNeoX), all
        # of the state (Mamba, read and written)
        full = runtime.cache_bytes(opt_holder["opt"], b, prompt + args.new_tokens)
        cache = full * (2 if family == "mamba" else (prompt + args.new_tokens / 2) / runtime.cache_length(
            prompt + args.new_tokens))
    step = (weights + cache) / bw
    return dict(family=family, row="floor", batch=b, prompt=prompt, new_tokens=args.new_tokens,
                tpot_ms=step * 1e3, tokens_per_s=b / step, weight_bytes=weights, cache_bytes_per_step=cache)


def peer_rows(args, family_batches) -> list:
    """hf_kernels rows in a child process with the official kernels installed (HF binds them at import)."""
    peers = os.path.join(ROOT, ".peers")
    if not os.path.isdir(peers):
        return [dict(family="mamba", row="hf_kernels", batch=b, skipped="absent (.peers not found)")
                for b in family_batches]
    cmd = [sys.executable, os.path.abspath(__file__), "--child-peers", "--families", "mamba", "--rows", "hf_kernels",
           "--batches", ",".join(map(str, family_batches)), "--new-tokens", str(args.new_tokens),
           "--prompt", str(args.prompt), "--context", str(args.context), "--repeats", str(args.repeats),
           "--slow-new-tokens", str(args.slow_new_tokens)]
    if args.smoke:
        cmd.append("--smoke")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60, args.budget_s), cwd=ROOT)
        line = [x for x in r.stdout.splitlines() if x.startswith("PEER_JSON ")]
        if not line:
            return [dict(family="mamba", row="hf_kernels", batch=b, skipped=f"child failed: {r.stderr[-400:]}")
                    for b in family_batches]
        return json.loads(line[-1][len("PEER_JSON "):])
    except subprocess.TimeoutExpired:
        return [dict(family="mamba", row="hf_kernels", batch=b, skipped="child timed out") for b in family_batches]


# ---------------------------------------------------------------------------------------------- driver

def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    same = (a == b).all(0)
    first = int((~same).nonzero()[0]) if bool((~same).any()) else a.shape[1]
    return dict(equal=bool(same.all()), first_divergence=first)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny models, few tokens (CPU is fine)")
    p.add_argument("--families", default="neox,mamba")
    p.add_argument("--rows", default="hf_eager,hf_compile,hf_kernels,fxopt,floor")
    p.add_argument("--with-nographs", action="store_true", help="also the fxopt row without CUDA-graph replay")
    p.add_argument("--batches", default=None, help="comma-separated (default 1,16,64; smoke 1,2)")
    p.add_argument("--prompt", type=int, default=None, help="b1 prompt length (default 32; smoke 8)")
    p.add_argument("--context", type=int, default=None, help="batched: prompt + new tokens (default 2048; smoke 24)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 128; smoke 8")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (min is kept; default 2, smoke 1)")
    p.add_argument("--slow-new-tokens", type=int, default=32,
                   help="new tokens for the host-bound HF rows (hf_eager, hf_kernels), timed once")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--budget-s", type=float, default=900.0, help="skip sections that would start after this")
    p.add_argument("--hf-eager-mamba-batched", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--passes", choices=("default", "block"), default="default",
                   help="fxopt rows: the default passes or fxopt.registry.BLOCK_PASSES")
    p.add_argument("--profile", action="store_true", help="fxopt rows: device time per decode step by kernel")
    p.add_argument("--child-peers", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    smoke = args.smoke
    args.batches = [int(x) for x in (args.batches or ("1,2" if smoke else "1,16,64")).split(",")]
    args.prompt = args.prompt or (8 if smoke else 32)
    args.context = args.context or (24 if smoke else 2048)
    args.new_tokens = args.new_tokens or (8 if smoke else 128)
    args.repeats = args.repeats or (1 if smoke else 2)
    rows = [r for r in args.rows.split(",") if r]
    if args.with_nographs and "fxopt_nographs" not in rows:
        rows.insert(rows.index("fxopt") + 1 if "fxopt" in rows else len(rows), "fxopt_nographs")
    unknown = set(rows) - set(ROWS)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; choose from {ROWS}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not smoke:
        print("benchmarks/decode.py needs a CUDA device (or --smoke)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # random tiny Mamba states underflow: subnormal arithmetic is ~100x slower
    if args.child_peers:
        sys.path.insert(0, os.path.join(ROOT, ".peers"))
        import peers  # noqa: F401

        peers.install()
    t_start = time.perf_counter()
    skipped: list[str] = []
    import transformers

    import triton

    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                  triton=triton.__version__, transformers=transformers.__version__, dtype=str(dtype), smoke=smoke,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), rows=[])
    bw = copy_bandwidth(device)
    result["copy_bw_TBps"] = bw / 1e12
    if not args.child_peers:
        print(f"device {result['device']}  torch {torch.__version__}  transformers {transformers.__version__}  "
              f"copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    for family in [f for f in args.families.split(",") if f]:
        if time.perf_counter() - t_start > args.budget_s:
            skipped.append(f"{family}: all")
            continue
        model = build_model(family, smoke, dtype, device)
        opt_holder: dict = {}
        reference_tokens: dict = {}
        family_rows = [r for r in rows if not (r == "hf_compile" and family == "mamba")
                       and not (r == "hf_kernels" and family == "neox")]
        for b in args.batches:
            prompt = args.prompt if b == 1 else args.context - args.new_tokens
            ids = torch.randint(3, model.config.vocab_size, (b, prompt), device=device,
                                generator=torch.Generator(device).manual_seed(b))
            for row in family_rows:
                if row in ("floor", "hf_kernels") and not args.child_peers:
                    continue
                if row == "hf_eager" and family == "mamba" and b > 1 and not (args.hf_eager_mamba_batched or smoke):
                    result["rows"].append(dict(family=family, row=row, batch=b, skipped="HF's torch-only Mamba prefill "
                                               "loops over the sequence (minutes); --hf-eager-mamba-batched"))
                    continue
                if time.perf_counter() - t_start > args.budget_s:
                    skipped.append(f"{family} b{b} {row}")
                    continue
                try:
                    res = run_row(row, family, model, ids, args, device, opt_holder)
                except Exception as exc:  # noqa: BLE001 - one failing row must not hide the others
                    res = dict(family=family, row=row, batch=b, error=f"{type(exc).__name__}: {exc}"[:500])
                    traceback.print_exc()
                tokens = res.pop("tokens", None)
                if tokens is not None:
                    if row == "hf_eager":
                        reference_tokens[b] = tokens
                    elif b in reference_tokens:
                        k = min(tokens.shape[1], reference_tokens[b].shape[1])
                        res["vs_hf_eager"] = _agreement(tokens[:, :k], reference_tokens[b][:, :k])
                result["rows"].append(res)
                if not args.child_peers:
                    print(json.dumps(res), flush=True)
                release_row_memory(model, device)
            if "floor" in family_rows and not args.child_peers:
                result["rows"].append(floor_row(family, model, ids, args, bw, opt_holder))
        del opt_holder
        release_row_memory(model, device)
        del model
        release_row_memory(None, device)
    if args.child_peers:
        print("PEER_JSON " + json.dumps(result["rows"]), flush=True)
        return 0
    if "hf_kernels" in rows and "mamba" in args.families.split(","):
        if time.perf_counter() - t_start > args.budget_s:
            skipped.append("mamba hf_kernels")
        else:
            result["rows"] += peer_rows(args, args.batches)
    result["skipped_for_budget"] = skipped
    result["total_s"] = time.perf_counter() - t_start
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


def release_row_memory(model, device) -> None:
    """Give back what a row left on the device before the next one. HF's generate keeps its static
    cache on the model (``_cache``) and torch.compile keeps its graphs (and their pools): at b64
    context 2048 the compiled row's leftovers made the next row run out of memory on the H200."""
    if model is not None and getattr(model, "_cache", None) is not None:
        model._cache = None
    if device.type == "cuda":
        import gc

        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()


def print_table(result) -> None:
    print(f"\n{'family':<7}{'row':<16}{'batch':>6}{'prompt':>7}{'TPOT ms':>10}{'tok/s':>11}{'warm-up s':>11}  notes")
    for r in result["rows"]:
        if "skipped" in r or "error" in r:
            print(f"{r['family']:<7}{r['row']:<16}{r['batch']:>6}{'':>7}{'-':>10}{'-':>11}{'-':>11}  "
                  f"{r.get('skipped') or r.get('error')}")
            continue
        warm = f"{r['warmup_s']:>11.1f}" if "warmup_s" in r else f"{'':>11}"
        agree = ""
        if "vs_hf_eager" in r:
            a = r["vs_hf_eager"]
            agree = "tokens = HF eager" if a["equal"] else f"tokens diverge from HF eager at {a['first_divergence']}"
        print(f"{r['family']:<7}{r['row']:<16}{r['batch']:>6}{r['prompt']:>7}{r['tpot_ms']:>10.3f}"
              f"{r['tokens_per_s']:>11.1f}{warm}  {agree}")
    if result.get("skipped_for_budget"):
        print(f"skipped (budget): {', '.join(result['skipped_for_budget'])}")
    print(f"total {result['total_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
