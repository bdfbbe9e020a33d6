"""Sweep the latent decode-attention kernel's launch parameters on the GPU (issue 13: >= 80 % of the
measured HBM copy bandwidth at the Pythia-2.8B shape).

    python benchmarks/latent_sweep.py --json out/latent_sweep.json          # H200: about 3-4 minutes
    TRITON_INTERPRET=1 python benchmarks/latent_sweep.py --smoke --json x.json   # CPU, tiny, tested

Cases: (b, ctx) in {(1, 16384), (64, 4096), (16, 2048)} x r in {512, 1024, 2560}; H 32 heads, 20
rotary dims, fp16 (``--dtype bf16`` for the other). Per case, two rounds: the tile candidates of its
r (block sizes, rotary chunk, warps, stages, the pipelined chunk loop of r > 512) with the default
split rule, then the split knobs (``split_waves``, ``partial_frac``) on the two fastest tiles where
the context is split. Every variant is checked against the reference on two rows (first and last,
``fp64_relative(3.0)``, the kernel tests' contract) before it is timed; a mismatch is reported and
never picked. Time: the median of a CUDA-graph replay under ``triton.testing.do_bench`` (L2 flushed
before each replay; the combine kernel included). Bandwidth: cache bytes the step must read
(``cache_bytes_read``) per second, against the eager copy probe of :mod:`fxopt.tools.bandwidth`
(read + write counted, as in every benchmark here); MHA SDPA over the same (b, ctx) for comparison.

Prints a table, the best variant per case (TB/s and the fraction of the copy bandwidth) and a
``TUNED`` table for :mod:`fxopt.codegen.latent_decode` (per regime key, the variant with the lowest
summed time relative to each case's best, over the cases of that key); the JSON has all of it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

CASES = [(1, 16384), (64, 4096), (16, 2048)]
RANKS = [512, 1024, 2560]
DIMS = dict(H=32, hd=80, R=20)

# tile candidates per r (keys of fxopt.codegen.latent_decode.CONFIG_KEYS); {} is the heuristic
TILES = {
    "single": [  # r <= 512: one latent block per tile
        {}, {"BLOCK_K": 64}, {"BLOCK_K": 64, "num_stages": 3}, {"BLOCK_K": 64, "num_warps": 4},
        {"BLOCK_K": 64, "BLOCK_T": 16, "num_stages": 3}, {"BLOCK_K": 64, "BLOCK_T": 64},
        {"BLOCK_H": 32, "num_warps": 16, "BLOCK_K": 128}, {"BLOCK_H": 32, "BLOCK_T": 16, "BLOCK_K": 128},
    ],
    "double": [  # 512 < r <= 1024
        {}, {"BLOCK_K": 64}, {"BLOCK_K": 64, "num_warps": 16},
        {"BLOCK_RO": 1024, "BLOCK_RC": 128, "RC_LOOP": True, "BLOCK_K": 64},
        {"BLOCK_RO": 512, "BLOCK_RC": 128, "RC_LOOP": True, "BLOCK_K": 64},
        {"BLOCK_RO": 512, "BLOCK_RC": 256, "RC_LOOP": True, "BLOCK_K": 64, "num_stages": 3},
    ],
    "large": [  # r > 1024: output blocks, scores in chunks
        {}, {"BLOCK_K": 64}, {"BLOCK_K": 64, "num_stages": 3}, {"BLOCK_RO": 256, "BLOCK_K": 64, "num_stages": 3},
        {"BLOCK_RO": 1024, "BLOCK_K": 64}, {"BLOCK_RO": 1024, "BLOCK_K": 64, "num_warps": 16},
        {"BLOCK_RC": 64, "BLOCK_K": 64, "num_stages": 4}, {"BLOCK_RC": 256, "BLOCK_K": 64},
        {"RC_LOOP": False},  # the unrolled chunks of last session (15 ms at b64): the before
    ],
}
SPLITS = [{"split_waves": 1}, {"split_waves": 4}, {"partial_frac": 0.5}, {"split_waves": 4, "partial_frac": 0.5},
          {"split_waves": 8, "partial_frac": 1.0}]
SMOKE_TILES = {"single": [{}, {"BLOCK_K": 16}, {"BLOCK_T": 16}], "double": [{}, {"BLOCK_RO": 16, "BLOCK_RC": 16}],
               "large": [{}, {"RC_LOOP": False}]}
SMOKE_SPLITS = [{"split_waves": 4}, {"n_splits": 3}]


def tile_family(r: int, es: int) -> str:
    single_max = 512 if es <= 2 else 256
    from fxopt.codegen.latent_decode import _pow2

    rp = _pow2(r)
    return "single" if rp <= single_max else ("double" if rp <= 2 * single_max else "large")


def name_of(cfg: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(cfg.items())) or "default"


def time_ms(fn, device, quick=False) -> float:
    """Median ms: a CUDA graph of ``fn`` replayed under do_bench (L2 flushed first); CPU: wall median."""
    if device.type == "cuda":
        from triton.testing import do_bench

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return float(do_bench(g.replay, warmup=5 if quick else 10, rep=20 if quick else 40, return_mode="median"))
    times = []
    for _ in range(2):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def check(args_, scale, cfg, kernel_out, rows) -> tuple[bool, str]:
    from fxopt.ops.latent_attention import latent_decode_attention_ref
    from fxopt.testing.contracts import fp64_relative

    q, qr, c, kr, lengths = args_
    idx = torch.tensor(rows, device=q.device)
    sl = [t.index_select(0, idx) for t in (q, qr, c, kr, lengths)]
    ref = latent_decode_attention_ref(*sl, None, scale)
    ref64 = latent_decode_attention_ref(*(t.double() if t.is_floating_point() else t for t in sl), None, scale)
    try:
        fp64_relative(3.0).check(ref, kernel_out.index_select(0, idx), fp64_ref=ref64)
        return True, ""
    except AssertionError as exc:
        return False, str(exc)[:300]


def run_case(b, T, r, dtype, device, dims, copy_bw, tiles, splits, quick, log) -> list[dict]:
    from fxopt.codegen import latent_decode as ld

    H, hd, R = dims["H"], dims["hd"], dims["R"]
    # drawn on the device: the r 2560 b64 cache is 1.3 G values (slow to draw on the host)
    g = torch.Generator(device=device).manual_seed(b * 131 + T + r)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * s).to(dtype)

    q = rnd(b, H, r, s=r ** -0.5)
    qr = rnd(b, H, R)
    c = rnd(b, T, r)
    kr = rnd(b, T, H, R)
    # per-row lengths differ a little (ragged batch) but every row reads nearly all its cache
    lengths = (T - torch.arange(b) % 4).clamp(min=1).to(torch.int32).to(device)
    scale = hd ** -0.5
    nbytes = int(lengths.sum().item()) * (r + H * R) * c.element_size()
    sms = ld._sm_count(c.device)
    rows_chk = sorted({0, b - 1})
    out_rows = []

    def one(cfg):
        full = ld.decode_config(b, H, r, R, T, dtype, sms, tuned={}, **cfg)
        row = dict(b=b, ctx=T, r=r, variant=name_of(cfg), cfg=cfg, key=list(ld.tuned_key(b, H, r, dtype, sms)),
                   n_splits=full["n_splits"], resolved={k: full[k] for k in ld.CONFIG_KEYS if k in full})
        try:
            out = ld.latent_decode_attention_triton(q, qr, c, kr, lengths, None, scale, **cfg)
            ok, why = check((q, qr, c, kr, lengths), scale, cfg, out, rows_chk)
        except Exception as exc:  # a variant that fails to compile or launch is reported, not fatal
            ok, why = False, f"{type(exc).__name__}: {str(exc)[:300]}"
        row.update(ok=ok)
        if not ok:
            row.update(error=why, ms=None)
            log(f"  !! b{b} ctx{T} r{r} {row['variant']}: {why}")
        else:
            ms = time_ms(lambda: ld.latent_decode_attention_triton(q, qr, c, kr, lengths, None, scale, **cfg), device,
                         quick)
            bw = nbytes / (ms * 1e-3)
            row.update(ms=ms, TBps=bw / 1e12, frac_of_copy=bw / copy_bw)
            log(f"  b{b:<3} ctx{T:<6} r{r:<5} {row['variant']:<60} splits {full['n_splits']:<4} {ms:8.4f} ms "
                f"{bw / 1e12:6.3f} TB/s {bw / copy_bw:6.1%}")
        out_rows.append(row)
        return row

    seen = set()
    for cfg in tiles:
        seen.add(name_of(cfg))
        one(cfg)
    if ld.tuned_key(b, H, r, dtype, sms)[2] == "split":
        good = sorted((x for x in out_rows if x["ok"]), key=lambda x: x["ms"])[:2]
        for base in good:
            for sp in splits:
                cfg = dict(base["cfg"], **sp)
                if name_of(cfg) not in seen:
                    seen.add(name_of(cfg))
                    one(cfg)
    del q, qr, c, kr
    return out_rows


def mha_ms(b, T, dtype, device, dims, quick) -> float:
    H, hd = dims["H"], dims["hd"]
    g = torch.Generator(device=device).manual_seed(b + T)
    q, K, V = (torch.randn(*s, generator=g, device=device).to(dtype) for s in ((b, H, 1, hd), (b, H, T, hd), (b, H, T, hd)))
    return time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, K, V), device, quick)


def pick_tuned(rows: list[dict]) -> dict:
    """Per regime key, the variant with the lowest sum over that key's cases of ms / the case's best ms
    (a variant missing from a case, or wrong there, does not qualify)."""
    by_key: dict = {}
    for x in rows:
        by_key.setdefault(tuple(x["key"]), []).append(x)
    tuned = {}
    for key, xs in by_key.items():
        cases = sorted({(x["b"], x["ctx"], x["r"]) for x in xs})
        best = {cs: min((x["ms"] for x in xs if x["ok"] and (x["b"], x["ctx"], x["r"]) == cs), default=None)
                for cs in cases}
        score: dict = {}
        for x in xs:
            if x["ok"] and best[(x["b"], x["ctx"], x["r"])]:
                score.setdefault(x["variant"], [x["cfg"], 0.0, set()])
                score[x["variant"]][1] += x["ms"] / best[(x["b"], x["ctx"], x["r"])]
                score[x["variant"]][2].add((x["b"], x["ctx"], x["r"]))
        full = [(v[1], name, v[0]) for name, v in score.items() if len(v[2]) == len(cases)]
        if full:
            s, name, cfg = min(full, key=lambda t: t[0])
            tuned[key] = dict(cfg=cfg, score=s / len(cases), cases=[list(cs) for cs in cases])
    return tuned


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--ranks", default=None, help="comma-separated r (default 512,1024,2560)")
    ap.add_argument("--cases", default=None, help="comma-separated bxctx, e.g. 1x16384,64x4096")
    ap.add_argument("--quick", action="store_true", help="shorter do_bench windows")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and candidates (CPU with TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)

    from fxopt.tools.bandwidth import copy_bandwidth

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.smoke:
        cases, ranks, dims, tiles, splits = [(1, 40), (3, 24)], [24, 40, 70], dict(H=3, hd=8, R=4), SMOKE_TILES, SMOKE_SPLITS
    else:
        cases, ranks, dims, tiles, splits = CASES, RANKS, DIMS, TILES, SPLITS
    if args.cases:
        cases = [tuple(int(v) for v in cs.split("x")) for cs in args.cases.split(",")]
    if args.ranks:
        ranks = [int(v) for v in args.ranks.split(",")]
    t0 = time.perf_counter()
    copy_bw = copy_bandwidth(device, 2**20 if args.smoke else 2**30)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}: copy bandwidth {copy_bw / 1e12:.3f} TB/s (read + write, eager copy, median)", flush=True)
    es = torch.empty((), dtype=dtype).element_size()
    # the smoke shapes are tiny: their "families" follow r through the same thresholds scaled down
    rows, mha = [], {}
    for b, T in cases:
        mha[f"{b}x{T}"] = mha_ms(b, T, dtype, device, dims, args.quick)
        for r in ranks:
            fam = tile_family(r, es) if not args.smoke else ("single", "double", "large")[min(ranks.index(r), 2)]
            rows += run_case(b, T, r, dtype, device, dims, copy_bw, tiles[fam], splits, args.quick, print)
    best = {}
    print("\nbest per case:")
    for b, T in cases:
        for r in ranks:
            xs = [x for x in rows if (x["b"], x["ctx"], x["r"]) == (b, T, r) and x["ok"]]
            if not xs:
                print(f"  b{b} ctx{T} r{r}: no correct variant")
                continue
            x = min(xs, key=lambda x: x["ms"])
            dflt = next((y for y in xs if y["variant"] == "default"), None)
            best[f"{b}x{T}x{r}"] = dict(variant=x["variant"], cfg=x["cfg"], ms=x["ms"], TBps=x["TBps"],
                                        frac_of_copy=x["frac_of_copy"], n_splits=x["n_splits"],
                                        default_ms=dflt["ms"] if dflt else None, mha_sdpa_ms=mha[f"{b}x{T}"])
            print(f"  b{b:<3} ctx{T:<6} r{r:<5} {x['ms']:8.4f} ms {x['TBps']:6.3f} TB/s = {x['frac_of_copy']:6.1%} of copy"
                  f" (default {dflt['ms'] if dflt else float('nan'):.4f} ms; MHA SDPA {mha[f'{b}x{T}']:.4f} ms)"
                  f"  {x['variant']}")
    tuned = pick_tuned(rows)
    print("\nTUNED (paste into fxopt/codegen/latent_decode.py):\nTUNED = {")
    for key, v in sorted(tuned.items()):
        print(f"    {tuple(key)!r}: {v['cfg']!r},  # mean time / case best {v['score']:.3f} over {v['cases']}")
    print("}")
    n_bad = sum(not x["ok"] for x in rows)
    wall = time.perf_counter() - t0
    print(f"\n{len(rows)} variants, {n_bad} failed the check; {wall:.0f} s", flush=True)
    result = dict(device=name, dtype=args.dtype, torch=torch.__version__, copy_bw_TBps=copy_bw / 1e12, dims=dims,
                  rows=rows, best=best, mha_sdpa_ms=mha, wall_s=wall,
                  tuned={repr(tuple(k)): v for k, v in tuned.items()})
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
