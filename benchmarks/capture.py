"""Capture and optimize() time for full-size model shapes.

HF Mamba at mamba-130m's shape (24 layers, d_model 768) at L = 128, 512, 2048 and
GPTNeoX at Pythia-2.8B's shape (built on the meta device: capture needs shapes,
not weights). Prints a table and writes JSON. CPU is fine; nothing is executed.

    python benchmarks/capture.py [--lengths 128 512 2048] [--skip-neox] [--json out/capture.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
import fxopt  # noqa: E402
from fxopt.models.hf import gpt_neox_2_8b_config, mamba_130m_config  # noqa: E402


def _phase_times(model, ids, passes, seq_dim="auto"):
    t0 = time.perf_counter()
    opt = fxopt.optimize(model, (ids,), passes=passes, seq_dim=seq_dim)
    total = time.perf_counter() - t0
    rep = opt.report()
    return {
        "optimize_s": total,
        "capture_s": rep.capture_seconds,
        "copy_s": getattr(rep, "copy_seconds", 0.0),
        "passes_s": rep.pass_seconds,
        "nodes_captured": rep.nodes_captured,
        "nodes_final": rep.nodes_final,
        "matches": rep.matches,
        "per_pass_s": {r.name: r.seconds for r in rep.records},
        "template": any(n.startswith("length-generic: graph instantiated") for n in rep.notes),
        "notes": rep.notes,
    }


def _progress(r):
    print(f"{r['model']} L={r['L']}: optimize {r['optimize_s']:.1f} s (capture {r['capture_s']:.1f}, "
          f"passes {r['passes_s']:.1f}, template {r['template']}), nodes {r['nodes_captured']} -> {r['nodes_final']}",
          flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--passes", default=None, help="comma-separated pass names, or none (default: library defaults)")
    ap.add_argument("--direct-lengths", type=int, nargs="*", default=[],
                    help="also optimize HF Mamba at these lengths with length templates off (direct capture)")
    ap.add_argument("--skip-neox", action="store_true")
    ap.add_argument("--skip-mamba", action="store_true")
    ap.add_argument("--neox-length", type=int, default=2048)
    ap.add_argument("--json", default="out/capture.json")
    a = ap.parse_args(argv)
    passes = None if a.passes is None else [p for p in a.passes.split(",") if p and p != "none"]
    import transformers

    rows = []
    if not a.skip_mamba:
        torch.manual_seed(0)
        mamba = transformers.MambaForCausalLM(mamba_130m_config()).eval()
        for L in a.lengths:
            ids = torch.randint(0, 50280, (1, L))
            r = {"model": "hf_mamba_130m", "L": L, **_phase_times(mamba, ids, passes)}
            rows.append(r)
            _progress(r)
        for L in a.direct_lengths:
            ids = torch.randint(0, 50280, (1, L))
            r = {"model": "hf_mamba_130m direct", "L": L, **_phase_times(mamba, ids, passes, seq_dim=None)}
            rows.append(r)
            _progress(r)
    if not a.skip_neox:
        with torch.device("meta"):
            neox = transformers.GPTNeoXForCausalLM(gpt_neox_2_8b_config()).eval()
        ids = torch.zeros((1, a.neox_length), dtype=torch.long, device="meta")
        r = {"model": "gpt_neox_2.8b(meta)", "L": a.neox_length, **_phase_times(neox, ids, passes)}
        rows.append(r)
        _progress(r)

    print("\ncapture s / passes s / nodes: of the one capture (the first probe when a length template is used)")
    head = f"{'model':<22}{'L':>6}{'template':>9}{'capture s':>11}{'passes s':>10}{'optimize s':>12}{'nodes':>9}{'-> nodes':>10}  matches"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['model']:<22}{r['L']:>6}{str(r['template']):>9}{r['capture_s']:>11.2f}{r['passes_s']:>10.2f}{r['optimize_s']:>12.2f}"
              f"{r['nodes_captured']:>9}{r['nodes_final']:>10}  {r['matches']}")
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "host": platform.node(),
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    with open(a.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
