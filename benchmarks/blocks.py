"""Block-fusion benchmarks (issue 14): the fused region kernels against eager's kernels.

    python benchmarks/blocks.py [--json out.json] [--shapes decode,prefill,batch] [--dtype fp16]
    python benchmarks/blocks.py --smoke        # CPU: interpreter run of every kernel at tiny sizes
    python benchmarks/blocks.py --emit rows,parts [--sweep]   # both region emissions, one run

Kernel section. Per fused kernel, at the GPTNeoX-2.8B / Mamba-2.8B widths (d = 2560, 32 heads
of 80, rotary 20, MLP 4d) and (b, l) = (1, 1) decode, (1, 2048), (8, 2048):

* ``neox_add_2ln``: parallel residual ``(mlp + attn) + hidden`` and the next layer's two
  LayerNorms (one kernel, three outputs);
* ``mamba_add_rmsnorm``: fp32 residual + mixer output, RMSNorm as HF spells it, weight;
* ``bias_gelu``: bias add + GELU(tanh) over the MLP's 4d columns (tiled over columns);
* ``rotary_qk``: rotate-half rotary on q and k read in place from the qkv projection.

Columns: eager (the unfused ATen ops, i.e. what the graph runs today) and fused, each timed
three ways - ``plain`` (Python-issued back-to-back calls, wall per call: what a decode step
pays, host included), ``gpu`` (CUDA events over back-to-back calls) and ``graph`` (replay time
per call inside a CUDA graph) -, the fused kernel's HBM floor (bytes it must move / measured
device copy bandwidth) and its fraction of that floor. Targets (issue 14, H200): >= 80 % of
the floor at (8, 2048, 2560); never slower than eager at (1, 1, 2560).

``--emit``: the region emissions to time (FXOPT_REGION_EMIT: ``parts`` - the default, each
contiguous column part of an output its own dense tile - and ``rows``, the earlier
whole-row emission with cats as selects); each gives its own fused row (``emit`` column) against
the same eager timing, so old and new are compared in one run. Kernels without slices / cats
emit the same source either way.

Also printed: max ulp / fp64_relative measurements of fused vs eager (the contracts hold on
the GPU at these sizes too). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

SHAPES = {"decode": (1, 1), "prefill": (1, 2048), "batch": (8, 2048)}
D, HEADS, HEAD_DIM, ROT = 2560, 32, 80, 20


# ----------------------------------------------------------------------------- cases
def make_cases(b: int, l: int, dtype: torch.dtype, device: str, d: int = D, heads: int = HEADS,
               head_dim: int = HEAD_DIM, rot: int = ROT):
    """``[(name, region, inputs)]`` at batch ``b``, length ``l``."""
    from fxopt.codegen import region_blocks as rb

    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(device)

    cases = [
        ("neox_add_2ln", rb.neox_residual_two_layernorms(dtype),
         [r(b, l, d), r(b, l, d), r(b, l, d)] + [r(d) for _ in range(4)]),
        ("mamba_add_rmsnorm", rb.mamba_residual_rmsnorm(dtype, torch.float32),
         [r(b, l, d, dt=torch.float32), r(b, l, d), r(d)]),
        ("bias_gelu", rb.bias_gelu(dtype, "tanh"), [r(b, l, 4 * d, scale=2.0), r(4 * d)]),
    ]
    qkv = r(b, l, heads, 3 * head_dim).transpose(1, 2)  # (b h l 3e): q, k, v views, read in place
    cos, sin = r(1, 1, l, rot), r(1, 1, l, rot)
    cases.append(("rotary_qk", rb.rotary_qk(dtype, head_dim, rot),
                  [qkv[..., :head_dim], qkv[..., head_dim:2 * head_dim], cos, sin]))
    return cases


def hbm_bytes(region, xs) -> int:
    """Bytes the fused kernel must move: every distinct input storage region read once
    (broadcast inputs count their real size) plus every output written once."""
    total = 0
    for x in xs:
        extent = 1 + sum((s - 1) * abs(st) for s, st in zip(x.shape, x.stride())) if x.numel() else 0
        # a broadcast input is read once (its extent); q and k, views into the qkv buffer, only
        # the elements they hold (their numel)
        total += min(extent, x.numel()) * x.element_size()
    outs = region.evaluate([torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta") for x in xs])
    total += sum(o.numel() * o.element_size() for o in outs)
    return total


# ----------------------------------------------------------------------------- timing
def _sync():
    torch.cuda.synchronize()


def time_plain(fn, iters: int, repeats: int = 3) -> float:
    for _ in range(10):
        fn()
    _sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def time_gpu(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    _sync()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    _sync()
    return s.elapsed_time(e) / 1e3 / iters


def time_graph(fn, reps: int, replays: int = 20) -> float:
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(st)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    _sync()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(replays):
        g.replay()
    e.record()
    _sync()
    return s.elapsed_time(e) / 1e3 / (reps * replays)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes/s, read + write counted)."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = time_gpu(lambda: b.copy_(a), 20)
    return 2 * a.numel() / t


# ----------------------------------------------------------------------------- checks
def numerics(region, xs) -> dict:
    from fxopt.ops.fused_region import contract, fused_region
    from fxopt.testing import ulp_distance

    ref = region.evaluate(list(xs))
    out = fused_region(list(xs), region.text)
    f64 = region.in_fp64().evaluate([x.double() for x in xs])
    res = {"contract": contract(region).name, "max_ulp": [], "err_ratio": []}
    for r, o, f in zip(ref, out, f64):
        res["max_ulp"].append(float(ulp_distance(r, o).max()))
        er, ec = (r.double() - f).abs().max().item(), (o.double() - f).abs().max().item()
        res["err_ratio"].append(ec / er if er > 0 else (0.0 if ec == 0 else math.inf))
    try:
        for r, o, f in zip(ref, out, f64):
            contract(region).check(r, o, fp64_ref=f)
        res["holds"] = True
    except AssertionError as exc:
        res["holds"] = False
        res["violation"] = str(exc)[:300]
    return res


# ----------------------------------------------------------------------------- sections
def use_emission(emit: str) -> None:
    """Make the fused-region op use region emission ``emit`` from its next call: set
    FXOPT_REGION_EMIT, re-take the config snapshot and drop the cached launchers (their keys
    are per specialisation, not per emission, on the op's fast path)."""
    from fxopt import config
    from fxopt.codegen import region_launch as rl
    from fxopt.ops import fused_region as fr

    os.environ["FXOPT_REGION_EMIT"] = emit
    config.refresh()
    fr._FAST.clear()
    rl._LAUNCHERS.clear()


def _emits_of(region, emits):
    """The emissions worth timing for ``region``: without slices / cats both emit the same
    source (region_triton.uses_parts), so the first one only."""
    from fxopt.codegen.region import OPS

    return emits if any(OPS[s.op].kind == "view" for s in region.stmts) else emits[:1]


def kernel_section(shapes, dtype, bandwidth, emits=("parts",)) -> list[dict]:
    from fxopt.ops.fused_region import fused_region

    rows = []
    for shape_name in shapes:
        b, l = SHAPES[shape_name]
        for name, region, xs in make_cases(b, l, dtype, "cuda"):
            text = region.text
            eager = lambda: region.evaluate(xs)  # noqa: E731 - the unfused ATen ops
            fused = lambda: fused_region(xs, text)  # noqa: E731
            nbytes = hbm_bytes(region, xs)
            floor = nbytes / bandwidth
            small = b * l == 1
            iters = 2000 if small else (200 if b == 1 else 50)
            base = {"kernel": name, "shape": f"({b},{l},{D})", "dtype": str(dtype)[6:], "bytes": nbytes,
                    "floor_us": floor * 1e6}
            base["eager_plain_us"] = time_plain(eager, iters) * 1e6
            base["eager_gpu_us"] = time_gpu(eager, iters) * 1e6
            base["eager_graph_us"] = time_graph(eager, 20 if small else 5) * 1e6
            own = _emits_of(region, emits)
            for emit in own:
                use_emission(emit)
                row = dict(base, emit=emit if len(own) == len(emits) else "same")  # "same": one source for all
                row["fused_plain_us"] = time_plain(fused, iters) * 1e6
                row["fused_gpu_us"] = time_gpu(fused, iters) * 1e6
                row["fused_graph_us"] = time_graph(fused, 20 if small else 5) * 1e6
                row["fused_pct_floor"] = 100 * floor * 1e6 / row["fused_gpu_us"]
                row["speedup_plain"] = row["eager_plain_us"] / row["fused_plain_us"]
                row["speedup_graph"] = row["eager_graph_us"] / row["fused_graph_us"]
                row["numerics"] = numerics(region, xs)
                rows.append(row)
                print(_fmt_row(row), flush=True)
    return rows


_COLS = ("kernel", "shape", "emit", "eager_plain_us", "fused_plain_us", "eager_gpu_us", "fused_gpu_us",
         "eager_graph_us", "fused_graph_us", "floor_us", "fused_pct_floor")


def _fmt_row(row) -> str:
    cells = []
    for c in _COLS:
        v = row[c]
        cells.append(f"{v:9.1f}" if isinstance(v, float) else (f"{v:>18}" if c in ("kernel", "shape") else f"{v:>9}"))
    ok = "ok" if row["numerics"]["holds"] else "CONTRACT VIOLATED"
    return " ".join(cells) + f"  {row['numerics']['contract']} {ok}"


def _header() -> str:
    return " ".join(f"{c:>18}" if c in ("kernel", "shape") else f"{c[:9]:>9}" for c in _COLS)


def sweep_section(dtype, bandwidth, kernels=("rotary_qk", "bias_gelu"), emits=("parts",)) -> list[dict]:
    """Launch shapes of the generated kernels at (8, 2048, 2560): the heuristic's choice
    (``region_triton.kernel_config``) against other rows-per-program / warps / column tiles,
    same kernel source, CUDA-event time per call and fraction of the HBM floor. The data the
    launch heuristic is chosen from."""
    import dataclasses

    from fxopt.codegen import region as rg
    from fxopt.codegen import region_launch as rl
    from fxopt.codegen import region_triton as rt

    rows = []
    b, l = SHAPES["batch"]
    original = rt.kernel_config
    for name, region, xs in make_cases(b, l, dtype, "cuda"):
        if name not in kernels:
            continue
        floor = hbm_bytes(region, xs) / bandwidth
        _, spec, _ = rg.plan(region, xs)
        base = original(spec)
        variants = [("heuristic", base)]
        for bm in (4, 8, 16, 32, 64, 128):
            for nw in (2, 4, 8):
                if bm * base.block_n <= 16384 and (bm, nw) != (base.block_m, base.num_warps):
                    variants.append((f"bm{bm} w{nw}", dataclasses.replace(base, block_m=bm, num_warps=nw)))
        for (label, cfg), emit in [(v, e) for e in _emits_of(region, emits) for v in variants]:
            rt.kernel_config = lambda spec, interpret=False, _c=cfg: _c  # noqa: E731
            try:
                launcher = rl.make_launcher(xs, region.text, "triton", emit)
                ref = region.evaluate(xs)
                out = launcher(xs)
                same = all(torch.equal(r, o) or not rg.parse_region(region.text).numerics() == "exact"
                           for r, o in zip(ref, out))
                us = time_gpu(lambda: launcher(xs), 50) * 1e6
                row = dict(kernel=name, emit=emit, config=label, block_m=cfg.block_m, block_n=cfg.block_n,
                           num_warps=cfg.num_warps, us=us, pct_floor=100 * floor * 1e6 / us, bitwise_ok=same)
            except Exception as exc:  # noqa: BLE001 - one config failing must not hide the others
                row = dict(kernel=name, emit=emit, config=label, error=f"{type(exc).__name__}: {exc}"[:200])
            finally:
                rt.kernel_config = original
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# ----------------------------------------------------------------------------- smoke (CPU)
def smoke(emits=("parts",)) -> dict:
    """Every kernel of the section through the Triton interpreter at tiny sizes (CPU): the
    script's code paths, the kernels' numerics vs CPU eager, and the host-side cost of the
    launcher's Python work (key, lookup, allocation; the GPU's driver launch excluded)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from fxopt.codegen import region_launch as rl
    from fxopt.ops.fused_region import contract

    res = {}
    for name, region, xs in make_cases(2, 3, torch.float16, "cpu", d=48, heads=2, head_dim=16, rot=4):
        ref = region.evaluate(xs)
        f64 = region.in_fp64().evaluate([x.double() for x in xs])
        c = contract(region)
        for emit in emits:
            out = rl.make_launcher(xs, region.text, "triton", emit)(xs)
            for r, o, f in zip(ref, out, f64):
                c.check(r, o, fp64_ref=f)
        launcher = rl.get_launcher(xs, region.text, "triton")
        key_args = [(x.shape, x.stride(), x.dtype, x.data_ptr() & 15) for x in xs]
        cache = {("k", *key_args): launcher}
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            key = ("k", *[(x.shape, x.stride(), x.dtype, x.data_ptr() & 15) for x in xs])
            lch = cache[key]
            [xs[0].new_empty_strided(s, st, dtype=dt) for s, st, dt in lch.out_specs]
        host = (time.perf_counter() - t0) / n
        res[name] = {"contract": c.name, "holds": True, "bytes": hbm_bytes(region, xs),
                     "host_python_us": host * 1e6, "kernel": launcher.kernel_name}
        print(f"{name:20s} {c.name:18s} ok   launcher python work {host * 1e6:6.1f} us/call (CPU, no launch)")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="benchmarks/results/blocks.json")
    ap.add_argument("--shapes", default="decode,prefill,batch")
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter run at tiny sizes")
    ap.add_argument("--sweep", action="store_true", help="launch-shape sweep of rotary_qk and bias_gelu at (8,2048)")
    ap.add_argument("--emit", default="parts",
                    help="comma-separated region emissions to time: parts (default), rows (the earlier one)")
    args = ap.parse_args(argv)
    from fxopt.codegen.region_triton import EMISSIONS

    emits = tuple(e for e in args.emit.split(",") if e)
    if not emits or any(e not in EMISSIONS for e in emits):
        ap.error(f"--emit takes a comma-separated list of {', '.join(EMISSIONS)}")
    meta = {"torch": torch.__version__, "python": platform.python_version()}
    if args.smoke:
        out = {"meta": meta, "smoke": smoke(emits)}
    else:
        if not torch.cuda.is_available():
            print("needs a CUDA device (use --smoke on CPU)", file=sys.stderr)
            return 2
        import triton

        meta.update(device=torch.cuda.get_device_name(), triton=triton.__version__)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        bw = copy_bandwidth()
        meta["copy_bandwidth_GBps"] = bw / 1e9
        print(f"{meta['device']}: device copy bandwidth {bw / 1e9:.0f} GB/s")
        if args.sweep:
            out = {"meta": meta, "sweep": sweep_section(dtype, bw, emits=emits)}
        else:
            print(_header())
            rows = kernel_section([s for s in args.shapes.split(",") if s], dtype, bw, emits)
            out = {"meta": meta, "kernels": rows}
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
