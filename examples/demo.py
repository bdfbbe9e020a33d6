"""fxopt demo: optimize a small HF GPTNeoX, a small HF Mamba and the seed-style Mamba,
check the outputs against eager, print each report and write inspection pictures.

    python examples/demo.py --out out/demo
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
import fxopt  # noqa: E402
from fxopt.models.hf import tiny_gpt_neox, tiny_hf_mamba  # noqa: E402
from fxopt.models.seed_mamba import seed_mamba  # noqa: E402


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def run_one(name: str, model: torch.nn.Module, ids: torch.Tensor, out_dir: str) -> dict:
    print(f"\n=== {name}: {type(model).__name__}, input {tuple(ids.shape)} ===", flush=True)
    opt = fxopt.optimize(model, (ids,))
    with torch.no_grad():
        ref, got = _logits(model(ids)), _logits(opt(ids))
    bitwise = torch.equal(ref, got)
    err = (ref.double() - got.double()).abs().max().item()
    print(opt.report())
    print(f"logits: bitwise equal to eager: {bitwise}; max |diff| = {err:.3g}")
    target = os.path.join(out_dir, name)
    from fxopt import inspection

    written = inspection.write_inspection(opt, target)
    print("wrote: " + ", ".join(str(p) for p in written.values()))
    return {"matches": opt.report().matches, "bitwise": bitwise, "max_abs_diff": err}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--seq-len", type=int, default=16)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    L = a.seq_len
    results = {
        "gpt_neox": run_one("gpt_neox", tiny_gpt_neox(parallel_residual=True), torch.randint(0, 128, (1, L)), a.out),
        "hf_mamba": run_one("hf_mamba", tiny_hf_mamba(), torch.randint(0, 128, (1, L)), a.out),
        "seed_mamba": run_one("seed_mamba", seed_mamba(), torch.randint(0, 256, (1, L)), a.out),
    }
    print(f"\nOpen {os.path.join(a.out, 'gpt_neox', 'graph.html')} (and the others) in a browser to see the rewrites.")
    return results


if __name__ == "__main__":
    main()
