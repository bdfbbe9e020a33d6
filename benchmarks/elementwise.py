"""GPU benchmark of the fused add tree (issue 3).

    python benchmarks/elementwise.py [--quick] [--json out.json] [--skip-e2e] [--skip-compile]

Sections
1. correctness on the GPU: generated Triton and CUDA C kernels vs eager, bit for bit
   (inf/nan/-0.0/subnormals - flush-to-zero would show here -, broadcast, non-contiguous;
   fp32/fp16/bf16), and CUDA-graph capture of the op;
2. device-to-device copy bandwidth (the HBM floor of an elementwise op is
   bytes / copy bandwidth; the fused tree moves 3 reads + 1 write);
3. (mlp + attn) + hidden at (1,1,2560), (1,2048,2560), (8,2048,2560) in fp16 and bf16:
   eager (two aten adds) vs the fused op (Triton, CUDA C), plain launches (wall clock per
   call, CPU overhead included) and inside a CUDA graph (replay time per call), against
   the HBM floor;
4. end to end: GPTNeoX 2.8B shape (Pythia-2.8B config, random weights) fp16 prefill
   b1 L2048: eager vs fxopt.optimize vs torch.compile.
Prints tables and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

TREE = "t0=add(x0,x1);t1=add(t0,x2)->t1"  # (mlp + attn) + hidden
SHAPES = [(1, 1, 2560), (1, 2048, 2560), (8, 2048, 2560)]
DTYPES = [torch.float16, torch.bfloat16]



def _refresh_config() -> None:
    """After changing an FXOPT_* variable: launch paths read fxopt.config's process snapshot."""
    from fxopt import config

    config.refresh()

def _sync():
    torch.cuda.synchronize()


def time_plain(fn, iters: int, warmup: int = 50, repeats: int = 5) -> float:
    """Seconds per call, calls issued back to back from Python (CPU launch cost
    included); the best of ``repeats`` runs of ``iters`` calls."""
    for _ in range(warmup):
        fn()
    _sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def time_events(fn, iters: int, warmup: int = 5) -> float:
    """Seconds per call by CUDA events (GPU time when the GPU is the bottleneck)."""
    for _ in range(warmup):
        fn()
    _sync()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    _sync()
    return s.elapsed_time(e) / 1e3 / iters


def time_graph(fn, reps: int = 20, replays: int = 50) -> float:
    """Seconds per call inside a CUDA graph holding ``reps`` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    for _ in range(3):
        g.replay()
    _sync()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    st.record()
    for _ in range(replays):
        g.replay()
    en.record()
    _sync()
    return st.elapsed_time(en) / 1e3 / (replays * reps)


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a, b) -> bool:
    nan = a.isnan() & b.isnan()
    return bool(((bits(a) == bits(b)) | nan).all()) and a.shape == b.shape


# ----------------------------------------------------------------------------- 1
def correctness(backends) -> dict:
    from fxopt.codegen import elementwise as ew
    from fxopt.codegen.add_tree_launch import run_generated
    from fxopt.testing.strategies import special_values

    res = {}
    trees = [TREE, "t0=add(x0,x1);t1=sub(t0,x2)->t1,t0"]
    for backend in backends:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            ok = True
            notes = []
            sp = torch.stack(list(special_values(dtype).values())).cuda()
            n = len(sp)
            cases = {
                "specials": [sp.repeat_interleave(n * n), sp.repeat_interleave(n).repeat(n), sp.repeat(n * n)],
                "random": [torch.randn(3, 1000, device="cuda").to(dtype) for _ in range(3)],
                "broadcast+noncontig": [torch.randn(4, 33, 65, device="cuda").to(dtype),
                                        torch.randn(65, device="cuda").to(dtype),
                                        torch.randn(65, 33, 4, device="cuda").to(dtype).permute(2, 1, 0)],
                "misaligned": [torch.randn(4097, device="cuda").to(dtype)[1:] for _ in range(3)],
            }
            fi = torch.finfo(dtype)
            # subnormal + subnormal = subnormal: flushed to zero if the kernel runs with FTZ
            tiny = torch.full((256,), fi.smallest_normal / 4, dtype=dtype, device="cuda")
            cases["subnormal_sum"] = [tiny, tiny, tiny]
            for tree in (trees if backend == "triton" else trees[:1]):
                t = ew.parse_tree(tree)
                for cname, xs in cases.items():
                    ref = t.evaluate(xs)
                    try:
                        out = run_generated(xs, tree, backend)
                    except Exception as exc:  # report, keep going
                        ok = False
                        notes.append(f"{cname}: {type(exc).__name__}: {exc}"[:300])
                        continue
                    for r, o in zip(ref, out):
                        if not same_bits(r, o):
                            ok = False
                            bad = int(((bits(r) != bits(o)) & ~(r.isnan() & o.isnan())).sum())
                            notes.append(f"{tree} {cname}: {bad} elements differ")
            res[f"{backend}/{str(dtype)[6:]}"] = {"bit_equal": ok, "notes": notes}
    # the op inside a CUDA graph
    xs = [torch.randn(1, 1, 2560, device="cuda", dtype=torch.float16) for _ in range(3)]
    op = torch.ops.fxopt.fused_add_tree.default
    out_holder = {}

    def call():
        out_holder["o"] = op(xs, TREE)[0]

    try:
        time_graph(call, reps=1, replays=2)
        res["cuda_graph_capture"] = {"ok": same_bits(out_holder["o"], (xs[0] + xs[1]) + xs[2])}
    except Exception as exc:
        res["cuda_graph_capture"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return res


# ----------------------------------------------------------------------------- 2
def copy_bandwidth() -> float:
    n = 1 << 28  # 512 MiB of fp16
    x = torch.empty(n, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)
    t = time_events(lambda: y.copy_(x), iters=20)
    return 2 * x.numel() * x.element_size() / t  # bytes read + written per second


# ----------------------------------------------------------------------------- 3
def chain_bench(backends, bw: float, quick: bool) -> list[dict]:
    from fxopt.codegen import add_tree_launch
    from fxopt.ops import fused_add

    op = torch.ops.fxopt.fused_add_tree.default
    rows = []
    for shape in SHAPES:
        for dtype in DTYPES:
            numel = 1
            for s in shape:
                numel *= s
            xs = [torch.randn(shape, device="cuda", dtype=dtype) for _ in range(3)]
            mlp, attn, hidden = xs
            floor = 4 * numel * xs[0].element_size() / bw
            small = numel < 100_000
            iters = (200 if quick else 2000) if small else (20 if quick else 100)

            def eager():
                return (mlp + attn) + hidden

            row = {"shape": list(shape), "dtype": str(dtype)[6:], "hbm_floor_us": floor * 1e6}
            timer = time_plain if small else time_events
            row["eager_us"] = timer(eager, iters) * 1e6
            row["eager_graph_us"] = time_graph(eager) * 1e6
            ref = eager()
            for backend in backends:
                os.environ["FXOPT_BACKEND"] = backend
                _refresh_config()

                def fused():  # what a rewritten graph calls
                    return fused_add.fused_add_tree(xs, TREE)

                def via_op():  # through the dispatcher (exported / compiled graphs)
                    return op(xs, TREE)

                try:
                    out = fused()[0]
                    row[f"{backend}_bit_equal"] = same_bits(out, ref) and same_bits(via_op()[0], ref)
                    row[f"{backend}_us"] = timer(fused, iters) * 1e6
                    row[f"{backend}_graph_us"] = time_graph(fused) * 1e6
                    row[f"{backend}_op_us"] = timer(via_op, iters) * 1e6
                    launcher = add_tree_launch.launcher_for(xs, TREE, backend)
                    row[f"{backend}_launcher_us"] = timer(lambda: launcher(xs), iters) * 1e6
                except Exception as exc:
                    row[f"{backend}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            os.environ["FXOPT_BACKEND"] = "triton"
            _refresh_config()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def print_chain_table(rows, backends):
    hdr = f"{'shape':>16} {'dtype':>8} {'floor':>8} {'eager':>8} " + " ".join(
        f"{b + ' ':>8}{'x':>6}{b + '/op':>10}" for b in backends) + f" {'eager/G':>8} " + " ".join(f"{b + '/G':>9}" for b in backends)
    print("\n(mlp + attn) + hidden: microseconds per call (plain launches; /op = through the dispatcher; "
          "/G = inside a CUDA graph); x = speed-up over eager")
    print(hdr)
    for r in rows:
        line = f"{str(tuple(r['shape'])):>16} {r['dtype']:>8} {r['hbm_floor_us']:8.1f} {r['eager_us']:8.1f} "
        for b in backends:
            t = r.get(f"{b}_us")
            line += f"{t:8.1f}{r['eager_us'] / t:6.2f}{r.get(f'{b}_op_us', float('nan')):10.1f} " if t else f"{'err':>8}{'':>16} "
        line += f"{r['eager_graph_us']:8.2f} "
        for b in backends:
            t = r.get(f"{b}_graph_us")
            line += f"{t:9.2f}" if t else f"{'err':>9}"
        print(line)


# ----------------------------------------------------------------------------- 4
def e2e(skip_compile: bool, quick: bool, variants=("residual_add", "compile", "default")) -> dict:
    from transformers import GPTNeoXForCausalLM

    import fxopt
    from fxopt.models.hf import gpt_neox_2_8b_config

    res: dict = {}
    cfg = gpt_neox_2_8b_config()
    if quick:
        cfg.num_hidden_layers = 4
    res["layers"] = cfg.num_hidden_layers
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.float16)
        try:
            model = GPTNeoXForCausalLM(cfg).eval()
        finally:
            torch.set_default_dtype(prev)
    res["build_s"] = time.perf_counter() - t0
    ids = torch.randint(0, cfg.vocab_size, (1, 2048), device="cuda")
    iters = 3 if quick else 10
    with torch.inference_mode():
        ref = model(ids, use_cache=False).logits
        res["eager_ms"] = time_events(lambda: model(ids, use_cache=False), iters, warmup=2) * 1e3

    outs: dict = {}

    def run_opt(label, passes):
        try:
            t0 = time.perf_counter()
            with torch.inference_mode():
                opt = fxopt.optimize(model, (ids,), {"use_cache": False}, passes=passes)
            res[f"{label}_optimize_s"] = time.perf_counter() - t0
            with torch.inference_mode():
                out = opt(ids, use_cache=False).logits
                res[f"{label}_bit_equal_vs_eager"] = same_bits(out, ref)
                res[f"{label}_max_abs_diff_vs_eager"] = float((out.float() - ref.float()).abs().max())
                outs[label] = out
                if "fxopt_nopass" in outs and label != "fxopt_nopass":
                    res[f"{label}_bit_equal_vs_nopass"] = same_bits(out, outs["fxopt_nopass"])
                if passes == ["residual_add"]:
                    # is the kernel faithful? the same graph with the tree evaluated by ATen
                    os.environ["FXOPT_BACKEND"] = "torch"
                    _refresh_config()
                    out_aten = opt(ids, use_cache=False).logits
                    os.environ["FXOPT_BACKEND"] = "triton"
                    _refresh_config()
                    res[f"{label}_triton_bit_equal_vs_aten_tree"] = same_bits(out, out_aten)
                res[f"{label}_ms"] = time_events(lambda: opt(ids, use_cache=False), iters, warmup=2) * 1e3
            try:
                res[f"{label}_matches"] = dict(getattr(opt.report(), "matches", {}) or {})
            except Exception:
                pass
        except Exception as exc:
            res[f"{label}_error"] = f"{type(exc).__name__}: {exc}"[:400]
            traceback.print_exc()
        finally:
            os.environ["FXOPT_BACKEND"] = "triton"
            _refresh_config()
        print(json.dumps({k: v for k, v in res.items() if k.startswith(label)}), flush=True)

    if "nopass" in variants:
        run_opt("fxopt_nopass", [])
    if "residual_add" in variants:
        run_opt("fxopt_residual_add", ["residual_add"])
    if not skip_compile and "compile" in variants:
        try:
            cm = torch.compile(model)
            t0 = time.perf_counter()
            with torch.inference_mode():
                cm(ids, use_cache=False)
                _sync()
                res["compile_s"] = time.perf_counter() - t0
                res["torch_compile_ms"] = time_events(lambda: cm(ids, use_cache=False), iters, warmup=2) * 1e3
        except Exception as exc:
            res["compile_error"] = f"{type(exc).__name__}: {exc}"[:400]
        print(json.dumps({k: v for k, v in res.items() if "compile" in k}), flush=True)
    if "default" in variants:
        run_opt("fxopt_default", None)
    if "fxopt_nopass_ms" in res and "fxopt_residual_add_ms" in res:
        res["residual_add_gain_vs_nopass"] = res["fxopt_nopass_ms"] / res["fxopt_residual_add_ms"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations, 4-layer model")
    ap.add_argument("--json", default="elementwise_bench.json")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--skip-cuda-c", action="store_true", help="Triton only (CUDA C build takes ~1 min)")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--max-numel", type=int, default=None, help="only chain shapes up to this many elements")
    ap.add_argument("--e2e-variants", default="residual_add,compile,default",
                    help="comma list of nopass, residual_add, compile, default")
    args = ap.parse_args(argv)
    if args.max_numel is not None:
        SHAPES[:] = [sh for sh in SHAPES if sh[0] * sh[1] * sh[2] <= args.max_numel]
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import fxopt.ops.fused_add  # noqa: F401  (registers the op)

    backends = ["triton"] + ([] if args.skip_cuda_c else ["cuda"])
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"device: {out['device']}  torch {out['torch']}  triton {out.get('triton')}", flush=True)
    t0 = time.perf_counter()
    if not args.skip_correctness:
        out["correctness"] = correctness(backends)
        print("correctness:", json.dumps(out["correctness"], indent=1), f"({time.perf_counter() - t0:.1f} s)", flush=True)
    bw = copy_bandwidth()
    out["copy_bandwidth_GBps"] = bw / 1e9
    print(f"copy bandwidth (read+write): {bw / 1e9:.0f} GB/s", flush=True)
    out["chain"] = chain_bench(backends, bw, args.quick)
    print_chain_table(out["chain"], backends)
    if not args.skip_e2e:
        t0 = time.perf_counter()
        out["e2e"] = e2e(args.skip_compile, args.quick, tuple(args.e2e_variants.split(",")))
        print("\nend to end GPTNeoX 2.8B shape fp16 prefill b1 L2048:", json.dumps(out["e2e"], indent=1),
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
