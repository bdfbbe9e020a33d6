"""Selective-scan benchmark (GPU).

    python benchmarks/scan.py                 # kernel table + end-to-end HF Mamba 130m shape
    python benchmarks/scan.py --skip-compile  # without torch.compile (L=512 compile takes minutes)
    python benchmarks/scan.py --skip-e2e      # kernel table only
    python benchmarks/scan.py --tune          # sweep block shapes of the Triton kernel
    python benchmarks/scan.py --tune --blocks 'gluon,2,1,16,2,3;triton,32,8,1,pf2' --gs 1 16 32
    python benchmarks/scan.py --compare cfgs.json --rounds 3   # {"b,L,d,n": [config, ...]}
    python benchmarks/scan.py --check [--profile-host]          # GPU correctness, host time per call
    python benchmarks/scan.py --json out.json
    python benchmarks/scan.py --skip-kernels --e2e-lengths 2048   # end-to-end rows only (HF Mamba 130m shape)

Kernel table, per shape (b, L, d, n): the eager loop (the seed-style Python loop of
``fxopt.models.seed_mamba.selective_scan`` without the D term folded differently), torch.compile of
that loop (L=512 only, with its compile time), the fxopt kernel (``fxopt::selective_scan`` CUDA
impl), the HBM floor (bytes of u, delta, B, C read and y written / measured copy bandwidth) and the
fraction of the floor reached. Times are ``triton.testing.do_bench`` medians. Every fxopt timing is
preceded by a correctness check against the reference on the same random data.

End-to-end rows (HF Mamba 130m shape, b1, fp32 and bf16): HF's torch-only slow path, HF with the
official kernels (mamba_ssm + causal-conv1d from ``.peers``, timed in a child process because HF
binds them at import; "absent" without them), fxopt called from Python, and fxopt replayed from a
CUDA graph (``fxopt.runtime.GraphReplay``: bit-equality with the non-replayed logits checked).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = [(1, 2048, 1536, 16), (4, 2048, 5120, 16), (1, 512, 1536, 16)]
# mamba_ssm selective_scan_cuda.fwd, H100, from the issue (same shapes)
PEER_MS = {(1, 2048, 1536, 16): 0.127, (4, 2048, 5120, 16): 1.38, (1, 512, 1536, 16): 0.047}



def _refresh_config() -> None:
    """After changing an FXOPT_* variable: launch paths read fxopt.config's process snapshot."""
    from fxopt import config

    config.refresh()

def make_inputs(b, L, d, n, dtype=torch.float32, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    u = torch.randn(b, d, L, device=device, generator=g).to(dtype)
    delta = torch.nn.functional.softplus(torch.randn(b, d, L, device=device, generator=g) - 2.0).to(dtype)
    A = -torch.exp(torch.randn(d, n, device=device, generator=g) * 0.5)
    B = torch.randn(b, n, L, device=device, generator=g).to(dtype)
    C = torch.randn(b, n, L, device=device, generator=g).to(dtype)
    D = torch.randn(d, device=device, generator=g)
    return u, delta, A, B, C, D


def eager_loop(u, delta, A, B, C, D):
    """The seed-style loop in the (b, d, l) layout of the op."""
    from fxopt.models.seed_mamba import selective_scan

    return selective_scan(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D).transpose(1, 2)


def copy_bandwidth(device="cuda"):
    from triton.testing import do_bench

    x = torch.empty(256 * 2**20 // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (ms * 1e-3)  # bytes/s


def floor_bytes(b, L, d, n, esize):
    return (3 * b * d * L + 2 * b * n * L) * esize + d * n * 4 + d * 4


def check(y, ref, what):
    err = (y.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item() + 1e-6
    # a sanity check (the contract is --contract): 1e-3 of the output's scale, or two roundings
    # to a 16-bit output dtype
    ok = err <= max(1e-3, 2 * torch.finfo(y.dtype).eps) * scale
    if not ok:
        print(f"  !! {what}: max err {err:.3e} (scale {scale:.3e})", flush=True)
    return ok, err / scale


def kernel_rows(args, bw):
    from triton.testing import do_bench, do_bench_cudagraph

    from fxopt.codegen import scan_launch as st
    from fxopt.ops.scan import selective_scan_ref

    rows = []
    for (b, L, d, n) in SHAPES:
        for dtype in ([torch.float32] + ([torch.bfloat16] if args.dtypes_all else [])):
            x = make_inputs(b, L, d, n, dtype)
            ref, _ = selective_scan_ref(*x)
            y, _ = st.selective_scan(*x)
            ok, rel = check(y, ref, f"fxopt {b,L,d,n}")
            cfg = _cfg_dict(st.choose_config(b, d, L, n))
            t_fx = do_bench(lambda: st.selective_scan(*x))
            # GPU time without the host launch (a CUDA-graph replay): at b1 the Python call's host
            # time (~60 us, and noisy) can exceed the kernel's
            g_fx = do_bench_cudagraph(lambda: st.selective_scan(*x))
            row = dict(shape=[b, L, d, n], dtype=str(dtype).split(".")[-1], fxopt_ms=t_fx, fxopt_gpu_ms=g_fx, correct=ok,
                       rel_err=rel, config=cfg)
            # where a Python call's time goes: the GPU's with cold L2 (a CUDA-graph replay under
            # do_bench, which flushes L2 before each call) and the host's per call
            row["fxopt_cold_gpu_ms"] = _graph_cold_ms(lambda: st.selective_scan(*x))
            row["host_us"] = _host_us(lambda: st.selective_scan(*x))
            fb = floor_bytes(b, L, d, n, x[0].element_size())
            row["floor_ms"] = fb / bw * 1e3
            row["frac_floor"] = row["floor_ms"] / t_fx
            row["peer_mamba_ssm_ms"] = PEER_MS.get((b, L, d, n))
            row["exp"] = cfg.get("exp")
            # the other exp mode (FXOPT_SCAN_EXP): on the H100 the default (auto) is sfu and the other fma
            alt = "fma" if cfg.get("exp") == "sfu" else "sfu"
            prev = os.environ.get("FXOPT_SCAN_EXP")
            os.environ["FXOPT_SCAN_EXP"] = alt
            _refresh_config()
            try:
                y, _ = st.selective_scan(*x)
                row["alt_exp"] = alt
                row["alt_correct"] = check(y, ref, f"fxopt {alt}-exp {b,L,d,n}")[0]
                row["alt_ms"] = do_bench(lambda: st.selective_scan(*x))
                row["alt_gpu_ms"] = do_bench_cudagraph(lambda: st.selective_scan(*x))
                row["alt_frac_floor"] = row["floor_ms"] / row["alt_ms"]
            finally:
                if prev is None:
                    os.environ.pop("FXOPT_SCAN_EXP")
                    _refresh_config()
                else:
                    os.environ["FXOPT_SCAN_EXP"] = prev
                    _refresh_config()
            if not args.skip_eager and dtype == torch.float32:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                eager_loop(*x)
                torch.cuda.synchronize()
                reps = 3 if L <= 512 else 1
                t0 = time.perf_counter()
                for _ in range(reps):
                    eager_loop(*x)
                torch.cuda.synchronize()
                row["eager_ms"] = (time.perf_counter() - t0) / reps * 1e3
            if not args.skip_compile and L == 512 and dtype == torch.float32:
                torch._dynamo.reset()
                fn = torch.compile(eager_loop)
                t0 = time.perf_counter()
                fn(*x)
                torch.cuda.synchronize()
                row["compile_s"] = time.perf_counter() - t0
                row["compiled_ms"] = do_bench(lambda: fn(*x))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _graph_cold_ms(fn):
    """GPU time of ``fn`` with a cold L2: its CUDA graph replayed by do_bench (which flushes L2
    before every call; a replay's host cost is a few microseconds)."""
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
    return do_bench(g.replay)


def _host_us(fn, calls=200):
    """Host time of one call of ``fn`` (calls issued back to back, not waited for)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def _parse_specs(blocks):
    """'triton,BD,K,warps[,pf2]' or 'gluon,TPC,M,K,W,STAGES', ';'-separated (without G: tune adds it)."""
    specs = []
    for spec in blocks.split(";"):
        f = spec.split(",")
        if f[0] == "gluon":
            specs.append(dict(kind="gluon", TPC=int(f[1]), M=int(f[2]), K=int(f[3]), W=int(f[4]), STAGES=int(f[5])))
        elif f[0] == "triton":
            specs.append(dict(kind="triton", BD=int(f[1]), K=int(f[2]), num_warps=int(f[3]), PF2=len(f) > 4 and f[4] == "pf2"))
        else:
            raise SystemExit(f"--blocks: unknown kernel {f[0]!r} (gluon or triton)")
    return specs


def _cfg(d):
    """A typed launch config from its JSON form ({'kind': 'gluon' | 'triton', fields...})."""
    from fxopt.codegen.scan_config import config_from_dict

    return config_from_dict(d)


def _cfg_dict(cfg):
    from fxopt.codegen.scan_config import config_to_dict

    return config_to_dict(cfg)


def _with(cfg, overrides):
    """``cfg`` with some fields replaced (``--contract-cfg '{"exp": "fma"}'``)."""
    import dataclasses

    return dataclasses.replace(cfg, **overrides)


def tune(args, bw):
    """Sweep launch choices per shape; every choice is checked against the reference first
    (random inputs). Prints one line per choice and a compact table of the best per shape."""
    from triton.testing import do_bench, do_bench_cudagraph

    from fxopt.codegen import scan_launch as st
    from fxopt.ops.scan import selective_scan_ref

    out, table = [], []
    specs = _parse_specs(args.blocks)
    for (b, L, d, n) in SHAPES:
        x = make_inputs(b, L, d, n)
        ref, href = selective_scan_ref(*x)
        fb = floor_bytes(b, L, d, n, 4)
        floor_ms = fb / bw * 1e3
        best = None
        gs = [1, 2, 4, 8, 16, 32] if b * d <= 2048 else [1, 2]
        if args.gs:
            gs = [G for G in args.gs if G in gs]
        cfgs = [dict(kind="default")]
        for spec in specs:
            for G in gs:
                if G * spec["K"] > L:
                    continue
                if spec["kind"] == "gluon":
                    from fxopt.codegen.scan_config import resolve_exp
                    from fxopt.config import scan_exp

                    exp = resolve_exp(scan_exp(), tuple(torch.cuda.get_device_capability()))
                    cfgs.append(dict(spec, G=G, exp=exp))
                    continue
                cfgs.append(dict(spec, G=G))
        for cfg in cfgs:
            c = None if cfg.get("kind") == "default" else _cfg(cfg)
            try:
                y, hl = st.selective_scan(*x, config=c)
                ok, rel = check(y, ref, f"{cfg}")
                okh, relh = check(hl, href, f"{cfg} h_last")
                ok = ok and okh
                t = do_bench(lambda: st.selective_scan(*x, config=c), return_mode="median")
            except Exception as exc:  # noqa: BLE001
                print(f"  {cfg}: failed {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            rec = dict(shape=[b, L, d, n], cfg=cfg, ms=t, ok=ok, frac=floor_ms / t, rel_err=rel)
            out.append(rec)
            if ok and c is not None and (best is None or t < best["ms"]):
                best = rec
            print(f"{b,L,d,n} {cfg} {t:.4f} ms  floor {floor_ms:.4f}  ok={ok} rel={rel:.1e}", flush=True)
        dflt = [r for r in out if r["shape"] == [b, L, d, n] and r["cfg"].get("kind") == "default"]
        if best is not None:
            bc = _cfg(best["cfg"])
            try:
                best["graph_ms"] = do_bench_cudagraph(lambda: st.selective_scan(*x, config=bc))
            except Exception as exc:  # noqa: BLE001
                print("graph bench failed", exc)
        print("BEST", json.dumps(best), flush=True)
        table.append(((b, L, d, n), dflt[0]["ms"] if dflt else None, best, floor_ms))
    print(f"{'shape':22} {'default ms':>10} {'best ms':>9} {'graph ms':>9} {'floor':>7} {'peer':>6}  best cfg")
    for shp, dms, best, fl in table:
        bms = best["ms"] if best else float("nan")
        gms = best.get("graph_ms", float("nan")) if best else float("nan")
        print(f"{str(shp):22} {dms if dms else float('nan'):10.4f} {bms:9.4f} {gms:9.4f} {fl:7.4f} {PEER_MS.get(shp, 0):6.3f}  "
              f"{json.dumps(best['cfg']) if best else '-'}")
    return out


def compare(args, bw):
    """Time given configs per shape in interleaved rounds (median of each round, min over rounds)
    plus a CUDA-graph replay; each config checked against the reference first. ``--compare``
    names a JSON file: {"b,L,d,n": [config, ...], ...}; the default config is always included."""
    from triton.testing import do_bench, do_bench_cudagraph

    from fxopt.codegen import scan_launch as st
    from fxopt.ops.scan import selective_scan_ref

    spec = json.load(open(args.compare))
    table = []
    for key, cfgs in spec.items():
        b, L, d, n = (int(v) for v in key.split(","))
        x = make_inputs(b, L, d, n, seed=1)
        ref, href = selective_scan_ref(*x)
        floor_ms = floor_bytes(b, L, d, n, 4) / bw * 1e3
        cands = [None] + [_cfg(c) for c in cfgs]
        ok = {}
        for i, c in enumerate(cands):
            y, hl = st.selective_scan(*x, config=c)
            ok[i] = check(y, ref, f"{c}")[0] and check(hl, href, f"{c} h_last")[0]
        times = {i: [] for i in range(len(cands))}
        for _ in range(args.rounds):
            for i, c in enumerate(cands):
                times[i].append(do_bench(lambda: st.selective_scan(*x, config=c), return_mode="median"))
        for i, c in enumerate(cands):
            g = do_bench_cudagraph(lambda: st.selective_scan(*x, config=c), return_mode="median")
            cold = _graph_cold_ms(lambda: st.selective_scan(*x, config=c))
            cfg = _cfg_dict(c) if c is not None else dict(_cfg_dict(st.choose_config(b, d, L, n)), default=True)
            row = dict(shape=[b, L, d, n], cfg=cfg, ms=min(times[i]), ms_rounds=times[i], graph_ms=g, cold_graph_ms=cold,
                       ok=ok[i], floor_ms=floor_ms)
            table.append(row)
            print(json.dumps(row), flush=True)
    print(f"{'shape':22} {'ms(min med)':>11} {'rounds':>26} {'graph':>7} {'cold':>7} {'peer':>6} ok  cfg")
    for r in table:
        shp = tuple(r["shape"])
        c = {k: v for k, v in r["cfg"].items() if k not in ("kind", "num_stages")}
        print(f"{str(shp):22} {r['ms']:11.4f} {' '.join('%.4f' % t for t in r['ms_rounds']):>26} {r['graph_ms']:7.4f} {r['cold_graph_ms']:7.4f} "
              f"{PEER_MS.get(shp, 0):6.3f} {'y' if r['ok'] else 'N'}  {json.dumps(c)}")
    return table


def check_mode(args):
    """GPU correctness of the default config and the plain-Triton kernel on fresh random inputs (fp32 and
    bf16, with D, z and h0), each run 10 times (a race shows as a changing or wrong result), and the
    host time of one call on a tiny problem."""
    from fxopt.codegen import scan_launch as st
    from fxopt.ops.scan import selective_scan_ref

    bad = 0
    for (b, L, d, n) in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            u, delta, A, B, C, D = make_inputs(b, L, d, n, dtype, seed=7)
            z = torch.randn_like(u)
            h0 = torch.randn(b, d, n, device=u.device)
            ref, href = selective_scan_ref(u, delta, A, B, C, D, z, h0, torch.float32)
            from fxopt.codegen.scan_config import choose_triton_config, sm_count

            cfgs = [None, choose_triton_config(b, d, L, n, sm_count(0))]  # the fallback kernel too
            for c in cfgs:
                first = None
                for _ in range(10):
                    y, hl = st.selective_scan(u, delta, A, B, C, D, z, h0, torch.float32, config=c)
                    ok = check(y, ref, f"{c}")[0] and check(hl, href, f"{c} h")[0]
                    same = first is None or bool(torch.equal(first, y))
                    first = y if first is None else first
                    if not (ok and same):
                        bad += 1
                        print("  !! mismatch", (b, L, d, n), dtype, c, ok, same, flush=True)
                        break
                print(f"check {(b, L, d, n)} {str(dtype):15} {c if c else 'default'}: {'ok' if ok and same else 'FAIL'}", flush=True)
    x = make_inputs(1, 64, 16, 16)
    from fxopt.codegen.scan_config import GluonScanConfig, TritonScanConfig

    for c in (None, GluonScanConfig(TPC=4, M=2, K=8, W=1, STAGES=3, G=2, exp="fma"),
              TritonScanConfig(BD=16, K=8, G=1, PF2=True, num_warps=1), TritonScanConfig(BD=16, K=8, G=2, PF2=True, num_warps=1)):
        for _ in range(20):
            st.selective_scan(*x, config=c)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            st.selective_scan(*x, config=c)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        print(f"host time per call {c}: {(t1 - t0) / 200 * 1e6:.1f} us", flush=True)
    if args.profile_host:
        import cProfile
        import pstats

        x = make_inputs(1, 2048, 1536, 16)
        st.selective_scan(*x)  # compile outside the profile
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            st.selective_scan(*x)
        pr.disable()
        torch.cuda.synchronize()
        pstats.Stats(pr).sort_stats("tottime").print_stats(12)
    print("CHECK", "FAIL" if bad else "OK", flush=True)
    return bad


def contract_mode(args):
    """The op's contract on the GPU (fp64_relative(2): error vs an fp64 evaluation no worse than
    2x the eager fp32 loop's, plus a tiny absolute floor) over shapes x dtypes x input layouts, for
    the default config and each ``--contract-cfg`` override; prints the worst error ratio."""
    from fxopt.codegen import scan_launch as st
    from fxopt.ops.scan import selective_scan_ref
    from fxopt.testing.contracts import fp64_relative

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from test_scan_kernel import _CUDA_SHAPES, _gpu_inputs

    contract = fp64_relative(args.contract_factor, atol=1e-6)
    cfgs = [None] + [json.loads(c) for c in args.contract_cfg]
    fails = 0
    for c in cfgs:
        worst, nfail = 0.0, 0
        shapes = [tuple(int(v) for v in sh.split(",")) for sh in args.contract_shapes] or _CUDA_SHAPES + [(1, 1536, 2048, 16)]
        wy, wh = 0.0, 0.0
        used = 0.0  # the largest fraction of the contract's max-error bound a case uses
        cases = [(sh, dtype, layout, seed, dist) for sh in shapes for dtype in (torch.float32, torch.bfloat16, torch.float16)
                 for layout in ("contiguous", "hf") for seed in range(args.contract_seeds) for dist in args.contract_dists]
        for (b, d, L, n), dtype, layout, seed, dist in cases:
            u, delta, A, B, C, D, z, h0 = _gpu_inputs(b, d, L, n, dtype, layout, seed=L + n + 1000 * seed)
            A, delta = _decay_distribution(dist, A, delta, seed)
            f64 = [t.double() for t in (u, delta, A, B, C, D, z, h0)]
            ref64, last64 = selective_scan_ref(*f64, out_dtype=torch.float64)
            eager, last = selective_scan_ref(u.float(), delta.float(), A, B.float(), C.float(), D, z.float(), h0,
                                             torch.float32)
            cfg = None if c is None else (_cfg(c) if "kind" in c else _with(st.choose_config(b, d, L, n), c))
            y, hl = st.selective_scan(u, delta, A, B, C, D, z, h0, torch.float32, config=cfg)
            for ref, cand, r64, what in ((eager, y, ref64, "y"), (last, hl, last64, "h_last")):
                e_ref = (ref.double() - r64).abs().max().item()
                e_cand = (cand.double() - r64).abs().max().item()
                worst = max(worst, e_cand / max(e_ref, 1e-30))
                bound = args.contract_factor * e_ref + 1e-6 + torch.finfo(torch.float32).eps * r64.abs().max().item()
                used = max(used, e_cand / bound)
                if what == "y":
                    wy = max(wy, e_cand / max(e_ref, 1e-30))
                else:
                    wh = max(wh, e_cand / max(e_ref, 1e-30))
                try:
                    contract.check(ref, cand, fp64_ref=r64)
                except AssertionError as exc:
                    nfail += 1
                    print(f"  FAIL {c} {(b, d, L, n)} {dtype} {layout} seed {seed} {dist} {what}: {str(exc)[:160]}", flush=True)
        fails += nfail
        print(f"contract {c if c else 'default'}: worst max-error ratio vs eager {worst:.2f} (y {wy:.2f}, h_last {wh:.2f}), "
              f"largest fraction of the max-error bound used {used:.2f}, {nfail} of {2 * len(cases)} failing", flush=True)
    return fails


def _decay_distribution(dist, A, delta, seed):
    """Replace A (d, n) and delta (b, d, l) to put exp(delta A) in a given regime:
    ``test`` (unchanged: A = -exp(N(0,1)), delta = softplus(N(-1,1))), ``mamba-init`` (A = -1..-n as
    Mamba initialises it, delta log-uniform in [1e-3, 0.1] like its dt init), ``slow`` (decays
    within 1e-4 of 1: the longest memories, where a per-step bias accumulates most), ``still``
    (decays within a few ulps of 1), ``fast``
    (decays of 0.5 and below)."""
    if dist == "test":
        return A, delta
    g = torch.Generator(device=A.device).manual_seed(12345 + seed)
    d, n = A.shape
    uni = lambda shape: torch.rand(shape, device=A.device, generator=g)  # noqa: E731
    if dist == "mamba-init":
        A = -torch.arange(1, n + 1, device=A.device, dtype=A.dtype).expand(d, n).contiguous()
        lo, hi = 1e-3, 0.1
    elif dist == "slow":
        A = -torch.exp(-3.0 * uni((d, n)))
        lo, hi = 1e-6, 1e-4
    elif dist == "still":  # decays that round to 1 or to the float below it
        A = -torch.exp(-3.0 * uni((d, n)))
        lo, hi = 1e-9, 1e-7
    elif dist == "fast":
        A = -torch.exp(3.0 * uni((d, n)))
        lo, hi = 0.3, 2.0
    else:
        raise SystemExit(f"unknown --contract-dists entry {dist!r}")
    dt = torch.exp(torch.log(torch.tensor(lo)) + (torch.log(torch.tensor(hi / lo))) * uni(delta.shape))
    return A, _like(dt.to(delta.dtype), delta)


def _like(new, old):
    """``new`` with the strides of ``old`` (the layout under test)."""
    out = torch.empty_strided(old.shape, old.stride(), dtype=new.dtype, device=new.device)
    out.copy_(new)
    return out


def _cuda_graph_ms(fn, ids):
    """Time ``fn(ids)`` replayed from a CUDA graph (no Python launch cost); returns
    (ms, output of the captured call)."""
    from triton.testing import do_bench

    static = ids.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static)
    graph.replay()
    torch.cuda.synchronize()
    return do_bench(graph.replay, warmup=5, rep=50), out


def e2e_rows(args):
    """HF Mamba 130m-shape forward: eager slow path vs fxopt.optimize(passes=--e2e-passes).

    Per row: eager (one timed call after a warm-up), fxopt (do_bench median of the
    optimized module called from Python; and steady state: 20 back-to-back calls) and fxopt
    replayed from a CUDA graph, optimize()
    time, and the logits' max error against an fp32 eager run of the same weights (for
    bf16 rows: eager bf16 and fxopt bf16 both measured against it)."""
    import fxopt
    from fxopt.models.hf import mamba_130m_config

    import transformers
    from triton.testing import do_bench

    def _logits(out):
        return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)

    rows = []
    for L in args.e2e_lengths:
        ref32 = None
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            model = transformers.MambaForCausalLM(mamba_130m_config()).eval().to("cuda", dtype)
            ids = torch.randint(0, 50280, (1, L), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
            with torch.no_grad():
                model(ids[:, :8], use_cache=False)  # warm-up: CUDA/cuBLAS set-up stays out of the timing
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                ref = model(ids, use_cache=False).logits
                torch.cuda.synchronize()
                eager_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                # The rows without replay: cuda_graphs=False; the replay row is the user's default path.
                opt = fxopt.optimize(model, (ids,), passes=args.e2e_passes.split(","), cuda_graphs=False)
                optimize_s = time.perf_counter() - t0
                logits = _logits(opt(ids))
                torch.cuda.synchronize()
                fx_ms = do_bench(lambda: opt(ids), warmup=5, rep=100)
                # steady state: back-to-back forwards, as a caller sees them (the forward is host-bound:
                # ~1300 ATen calls through the GraphModule; do_bench's per-call cache flush and events
                # make that number noisy)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(20):
                    opt(ids)
                torch.cuda.synchronize()
                steady_ms = (time.perf_counter() - t0) / 20 * 1e3
                try:
                    graph_ms, gout = _cuda_graph_ms(opt, ids)
                    graph_equal = bool(torch.equal(_logits(gout), logits))
                except Exception as exc:  # noqa: BLE001 - report, do not hide the rest of the table
                    graph_ms, graph_equal = None, f"{type(exc).__name__}: {exc}"[:200]
                t0 = time.perf_counter()
                opt_auto = fxopt.optimize(model, (ids,), passes=args.e2e_passes.split(","))  # cuda_graphs="auto"
                optimize_auto_s = time.perf_counter() - t0
                replay_ms, replay_equal, replay_notes = _replay_ms(opt_auto, ids, logits, _logits)
                del opt_auto
            if dtype == torch.float32:
                ref32 = ref.float()
            row = dict(L=L, dtype=str(dtype).split(".")[-1], eager_ms=eager_s * 1e3, fxopt_ms=fx_ms,
                       speedup=eager_s * 1e3 / fx_ms, fxopt_steady_ms=steady_ms, speedup_steady=eager_s * 1e3 / steady_ms,
                       fxopt_graph_ms=graph_ms,
                       speedup_graph=(eager_s * 1e3 / graph_ms) if graph_ms else None, graph_bit_equal=graph_equal,
                       fxopt_replay_ms=replay_ms, replay_bit_equal=replay_equal, replay_notes=replay_notes,
                       optimize_s=optimize_s, optimize_auto_s=optimize_auto_s, max_abs_logit=ref32.abs().max().item(),
                       eager_err_vs_fp32=(ref.float() - ref32).abs().max().item(),
                       fxopt_err_vs_fp32=(logits.float() - ref32).abs().max().item(),
                       passes=args.e2e_passes, matches=opt.report().matches, notes=opt.report().notes)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model, opt
            torch.cuda.empty_cache()
    if rows and not args.skip_peers:
        peer = _peer_e2e(args)
        for r in rows:
            r["hf_kernels_ms"] = peer.get(f"{r['L']},{r['dtype']}", peer.get("absent"))
    if rows:
        print(f"\n{'L':>6} {'dtype':<9}{'eager ms':>10}{'kernels':>9}{'fxopt ms':>10}{'x':>7}{'steady ms':>10}{'x':>7}"
              f"{'graph ms':>10}{'x':>7}{'replay ms':>10}{'optimize s':>11}{'eager err':>11}{'fxopt err':>11}"
              f"  (kernels: HF with mamba_ssm + causal-conv1d; replay: fxopt.runtime.GraphReplay; errors: max |logit - fp32 eager|)")
        for r in rows:
            g = f"{r['fxopt_graph_ms']:>10.2f}{r['speedup_graph']:>7.0f}" if r["fxopt_graph_ms"] else f"{'-':>10}{'-':>7}"
            k = r.get("hf_kernels_ms")
            k = f"{k:>9.2f}" if isinstance(k, float) else f"{str(k or '-')[:8]:>9}"
            rp = f"{r['fxopt_replay_ms']:>10.2f}" if r.get("fxopt_replay_ms") else f"{'-':>10}"
            print(f"{r['L']:>6} {r['dtype']:<9}{r['eager_ms']:>10.1f}{k}{r['fxopt_ms']:>10.2f}{r['speedup']:>7.0f}"
                  f"{r['fxopt_steady_ms']:>10.2f}{r['speedup_steady']:>7.0f}{g}{rp}"
                  f"{r['optimize_s']:>11.1f}{r['eager_err_vs_fp32']:>11.3g}{r['fxopt_err_vs_fp32']:>11.3g}")
    return rows


def _replay_ms(opt, ids, logits, logits_of):
    """``opt(ids)`` of a module optimized with the default ``cuda_graphs="auto"`` (its
    specialisation replayed as a CUDA graph, outputs copied out, the model-state check before
    each call): ms per call over 20 back-to-back calls, whether its logits are bit-equal to the
    non-replayed module's, and the replay's notes."""
    try:
        for _ in range(3):  # warm-up, capture, first replay
            out = logits_of(opt(ids))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            opt(ids)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / 20 * 1e3
        spec = opt._last
        replay = getattr(spec, "replay", None)
        replays = replay.stats["replays"] if replay is not None else 0
        return (ms if replays else None), bool(torch.equal(out, logits)), (replay.notes if replay else ["no replay"])
    except Exception as exc:  # noqa: BLE001 - report, do not hide the rest of the table
        return None, f"{type(exc).__name__}: {exc}"[:200], []


def _peer_e2e(args) -> dict:
    """HF Mamba 130m with the official kernels (mamba_ssm + causal-conv1d, built from .peers), in a
    child process: HF binds those kernels at import. {"L,dtype": ms} or {"absent": reason}."""
    import subprocess

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    if not os.path.isdir(os.path.join(root, ".peers")):
        return {"absent": "absent"}
    cmd = [sys.executable, os.path.abspath(__file__), "--e2e-peer-child", "--e2e-lengths", *map(str, args.e2e_lengths)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=root)
    line = [x for x in r.stdout.splitlines() if x.startswith("PEER_JSON ")]
    if not line:
        print(f"peer child failed: {r.stderr[-800:]}", flush=True)
        return {"absent": "failed"}
    return json.loads(line[-1][len("PEER_JSON "):])


def _peer_child(args) -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".peers"))
    import peers

    peers.install()
    import transformers

    from fxopt.models.hf import mamba_130m_config

    out = {}
    for L in args.e2e_lengths:
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            model = transformers.MambaForCausalLM(mamba_130m_config()).eval().to("cuda", dtype)
            ids = torch.randint(0, 50280, (1, L), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
            with torch.no_grad():
                for _ in range(3):
                    model(ids, use_cache=False)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(20):
                    model(ids, use_cache=False)
                torch.cuda.synchronize()
            out[f"{L},{str(dtype).split('.')[-1]}"] = (time.perf_counter() - t0) / 20 * 1e3
            del model
            torch.cuda.empty_cache()
    print("PEER_JSON " + json.dumps(out), flush=True)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-eager", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--dtypes-all", action="store_true", help="also time bf16 inputs")
    p.add_argument("--tune", action="store_true")
    p.add_argument("--blocks", default="gluon,2,1,16,1,3;gluon,4,1,16,1,3;gluon,2,1,16,2,3;triton,16,8,1,pf2;triton,32,8,1,pf2",
                   help="tune: 'gluon,TPC,M,K,W,STAGES' or 'triton,BD,K,warps[,pf2]', ';'-separated")
    p.add_argument("--compare", default=None, help="JSON file {'b,L,d,n': [config, ...]}: time these (interleaved rounds)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile-host", action="store_true", help="with --check: cProfile 200 default calls")
    p.add_argument("--check", action="store_true", help="GPU correctness (fp32/bf16, D, z, h0, repeated) + host time")
    p.add_argument("--profile-e2e", type=int, default=0, help="L: profile the optimized HF Mamba forward's host time at this length")
    p.add_argument("--profile-dtype", default="float32", help="with --profile-e2e: the model's dtype")
    p.add_argument("--once", default=None, help="'b,L,d,n': run that shape three times (for ncu); --cfg JSON config")
    p.add_argument("--cfg", default=None)
    p.add_argument("--contract", action="store_true", help="the op's fp64_relative contract over shapes/dtypes/layouts")
    p.add_argument("--contract-factor", type=float, default=2.0, help="with --contract: the fp64_relative factor")
    p.add_argument("--contract-shapes", nargs="*", default=[], help="with --contract: 'b,d,L,n' shapes (default: the test's)")
    p.add_argument("--contract-cfg", nargs="*", default=[], help="with --contract: JSON config overrides to compare")
    p.add_argument("--contract-seeds", type=int, default=1, help="with --contract: random inputs per case")
    p.add_argument("--contract-dists", nargs="*", default=["test"],
                   help="with --contract: regimes of exp(delta A): test mamba-init slow still fast")
    p.add_argument("--gs", type=int, nargs="*", default=None, help="tune: group counts to try")
    p.add_argument("--e2e-lengths", type=int, nargs="*", default=[512, 2048])
    p.add_argument("--e2e-passes", default="scan,cleanup", help="comma-separated passes for the end-to-end rows")
    p.add_argument("--skip-peers", action="store_true", help="no HF-with-official-kernels column (needs .peers)")
    p.add_argument("--e2e-peer-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/scan.py needs a CUDA device", file=sys.stderr)
        return 2
    if args.e2e_peer_child:
        return _peer_child(args)
    import triton

    dev = torch.cuda.get_device_name()
    print(f"device {dev}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    result = dict(device=dev, torch=torch.__version__, triton=triton.__version__, copy_bw_TBps=bw / 1e12,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if args.once:  # a few calls of one shape / config, for a profiler wrapped around this script
        from fxopt.codegen import scan_launch as st

        b, L, d, n = (int(v) for v in args.once.split(","))
        x = make_inputs(b, L, d, n)
        cfg = _cfg(json.loads(args.cfg)) if args.cfg else None
        for _ in range(3):
            st.selective_scan(*x, config=cfg)
        torch.cuda.synchronize()
        return 0
    if args.profile_e2e:  # host-time profile of the optimized HF Mamba forward
        import transformers

        import fxopt
        from fxopt.models.hf import mamba_130m_config

        dtype = getattr(torch, args.profile_dtype)
        model = transformers.MambaForCausalLM(mamba_130m_config()).eval().to("cuda", dtype)
        ids = torch.randint(0, 50280, (1, args.profile_e2e), device="cuda")
        with torch.no_grad():
            opt = fxopt.optimize(model, (ids,), passes=args.e2e_passes.split(","))
            for _ in range(3):
                opt(ids)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                opt(ids)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            print(f"{args.profile_dtype} L={args.profile_e2e}: host {(t1 - t0) * 100:.2f} ms, wall {(t2 - t0) * 100:.2f} ms "
                  f"per forward; {len(opt.graph_module.graph.nodes)} nodes", flush=True)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    opt(ids)
                torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return 0
    if args.check:
        result["check_failures"] = check_mode(args)
    if args.contract:
        result["contract_failures"] = contract_mode(args)
    if args.compare:
        result["compare"] = compare(args, bw)
    elif args.tune:
        result["tune"] = tune(args, bw)
    else:
        if not args.skip_kernels:
            result["kernels"] = kernel_rows(args, bw)
            print_table(result["kernels"])
        if not args.skip_e2e:
            result["e2e"] = e2e_rows(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def print_table(rows):
    """fxopt: the default exp mode (FXOPT_SCAN_EXP=auto: sfu on the H100, the calibrated SFU exp);
    other: the other mode (fma: the FMA-pipe exp, contract by construction).
    ms: called from Python (do_bench, L2 flushed before each call); gpu: replayed from a CUDA graph
    (L2 warm); cold: a CUDA-graph replay under do_bench (L2 flushed); host us: host time per call."""
    hdr = (f"{'shape (b,L,d,n)':22} {'dtype':8} {'eager ms':>10} {'compile ms':>10} {'compile s':>9} {'exp':>4} {'fxopt ms':>9} "
           f"{'gpu':>7} {'cold':>7} {'host us':>7} {'% floor':>8} {'other':>5} {'ms':>8} {'gpu':>7} {'% floor':>8} {'floor ms':>9} "
           f"{'mamba_ssm':>9}")
    print(hdr)
    for r in rows:
        f = lambda k, fmt: (fmt % r[k]) if r.get(k) is not None else "-"  # noqa: E731
        print(f"{str(tuple(r['shape'])):22} {r['dtype']:8} {f('eager_ms', '%10.2f'):>10} {f('compiled_ms', '%10.3f'):>10} "
              f"{f('compile_s', '%9.1f'):>9} {r.get('exp', '-'):>4} {r['fxopt_ms']:9.4f} {f('fxopt_gpu_ms', '%7.4f'):>7} "
              f"{f('fxopt_cold_gpu_ms', '%7.4f'):>7} {f('host_us', '%7.1f'):>7} {100 * r['frac_floor']:7.1f}% {r.get('alt_exp', '-'):>5} "
              f"{f('alt_ms', '%8.4f'):>8} {f('alt_gpu_ms', '%7.4f'):>7} {100 * r.get('alt_frac_floor', float('nan')):7.1f}% "
              f"{r['floor_ms']:9.4f} {f('peer_mamba_ssm_ms', '%9.3f'):>9}")

if __name__ == "__main__":
    sys.exit(main())
