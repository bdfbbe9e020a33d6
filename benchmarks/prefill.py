"""GPTNeoX 2.8B-shape prefill (fp16, random weights, b x L): eager vs fxopt by pass set (GPU).

Rows: HF eager; fxopt with the default passes and with ``fxopt.registry.BLOCK_PASSES`` (causal
SDPA restored, fused regions), each replayed as a CUDA graph (``cuda_graphs="auto"``, the default)
and not; the compute floor (2 * parameters * tokens at the H200's dense fp16 rate). Per fxopt row:
optimize() seconds (the soundness checks included), whether the logits are bit-equal to eager's,
the max |logit difference|, and the report's match counts. ``--compile`` adds torch.compile
(default mode) with its compile time (the first call) and the same bit-equality columns.

    python benchmarks/prefill.py --json out/prefill.json          # GPU
    python benchmarks/prefill.py --smoke                          # CPU, tiny model (tested)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fxopt  # noqa: E402
from fxopt.registry import BLOCK_PASSES, DEFAULT_PASSES  # noqa: E402

# default + causal_sdpa: what the causal-mask rule alone is worth (it goes before addcmul/residual_add
# like in BLOCK_PASSES; the order does not matter to it, the rule only touches the mask and SDPA)
PASS_SETS = {"default": DEFAULT_PASSES, "block": BLOCK_PASSES,
             "causal": ("scan", "causal_sdpa") + tuple(p for p in DEFAULT_PASSES if p != "scan")}
PEAK_FP16_FLOPS = 790e12  # H200 dense fp16/bf16 (device notes)


def build(smoke: bool, device: str, dtype):
    import transformers

    from fxopt.models import hf

    cfg = hf.gpt_neox_config(True, vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4) \
        if smoke else hf.gpt_neox_2_8b_config()
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.GPTNeoXForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(device=device, dtype=dtype).eval()


def timed_ms(fn, device: str, iters: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def compile_row(model, ids, ref, device: str, iters: int, b: int, length: int) -> dict:
    """torch.compile (default mode) of the same model: first-call (compile) seconds, then ms/call."""
    try:
        torch._dynamo.reset()
        compiled = torch.compile(model)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = compiled(ids).logits
        if device == "cuda":
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        ms = timed_ms(lambda: compiled(ids), device, iters)
        return dict(b=b, L=length, row="torch_compile", ms=ms, compile_s=compile_s,
                    bit_equal=bool(torch.equal(out, ref)), max_abs_diff=(out.float() - ref.float()).abs().max().item())
    except Exception as exc:  # noqa: BLE001 - one failing row must not hide the table
        return dict(b=b, L=length, row="torch_compile", ms=None, error=f"{type(exc).__name__}: {exc}"[:300])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--shapes", default="1x2048,8x2048", help="comma-separated BxL")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default=None)
    ap.add_argument("--compile", action="store_true", help="also a torch.compile row (its compile time included)")
    ap.add_argument("--sets", default="default,block",
                    help="comma-separated pass sets: default, block (BLOCK_PASSES), causal (default + causal_sdpa)")
    ap.add_argument("--no-plain", action="store_true", help="only the CUDA-graph replay rows of each set")
    args = ap.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.float16
    shapes = [(1, 12), (2, 9)] if args.smoke else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    iters = 2 if args.smoke else args.iters
    model = build(args.smoke, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for b, length in shapes:
        ids = torch.randint(0, model.config.vocab_size, (b, length), device=device)
        with torch.no_grad():
            ref = model(ids).logits
        rows.append(dict(b=b, L=length, row="hf_eager", ms=timed_ms(lambda: model(ids), device, iters)))
        rows.append(dict(b=b, L=length, row="floor_compute", ms=2 * params * b * length / PEAK_FP16_FLOPS * 1e3))
        if args.compile:
            rows.append(compile_row(model, ids, ref, device, iters, b, length))
            print(json.dumps(rows[-1]), flush=True)
        for label in args.sets.split(","):
            passes = PASS_SETS[label]
            for graphs in ((False, "auto") if not args.no_plain else ("auto",)):
                t0 = time.perf_counter()
                try:
                    with torch.no_grad():
                        opt = fxopt.optimize(model, (ids,), passes=list(passes), cuda_graphs=graphs)
                    opt_s = time.perf_counter() - t0
                    with torch.no_grad():
                        out = opt(ids).logits
                    ms = timed_ms(lambda: opt(ids), device, iters)
                    rep = opt.report()
                    row = dict(b=b, L=length, row=f"fxopt_{label}" + ("_graphs" if graphs else ""), ms=ms,
                               optimize_s=opt_s, bit_equal=bool(torch.equal(out, ref)),
                               max_abs_diff=(out.float() - ref.float()).abs().max().item(), matches=rep.matches,
                               notes=[n[:200] for n in rep.notes])
                    del opt
                except Exception as exc:  # noqa: BLE001 - one failing row must not hide the table
                    row = dict(b=b, L=length, row=f"fxopt_{label}" + ("_graphs" if graphs else ""), ms=None,
                               error=f"{type(exc).__name__}: {exc}"[:300])
                rows.append(row)
                print(json.dumps(row), flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
    print(f"\n{'b':>3} {'L':>5}  {'row':<22}{'ms':>9}{'opt|compile s':>14}{'bit-equal':>11}{'max|diff|':>11}")
    for r in rows:
        ms = f"{r['ms']:9.2f}" if r.get("ms") is not None else f"{'-':>9}"
        print(f"{r['b']:>3} {r['L']:>5}  {r['row']:<22}{ms}{r.get('optimize_s', r.get('compile_s', float('nan'))):>14.1f}"
              f"{str(r.get('bit_equal', '')):>11}{r.get('max_abs_diff', float('nan')):>11.3g}"
              + (f"  {r['error']}" if "error" in r else ""))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                    date=time.strftime("%Y-%m-%d"), params=params)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
