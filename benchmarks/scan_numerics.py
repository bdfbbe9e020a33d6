"""Where the selective-scan kernels' error comes from (GPU diagnostic).

    python benchmarks/scan_numerics.py [--shape b,d,L,n]

For one random problem: the max and mean signed error against an fp64 evaluation of the loop,
for y and for the final state, of the eager fp32 loop (PyTorch on the GPU), emulations of the
kernel's arithmetic in PyTorch (exp as exp2 of a log2(e)-scaled argument; the update as an FMA),
and each CUDA kernel (Gluon default, plain-Triton ``seqk``). The contract the op ships under is
``fp64_relative(2)`` against the eager loop.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def walk(u, dt, A, B, h0, mode):
    h = h0.clone()
    for t in range(u.shape[2]):
        d_, u_, B_ = dt[:, :, t, None], u[:, :, t, None], B[:, None, :, t]
        if mode == "exp2":
            a = torch.exp2(d_ * (A * 1.4426950408889634))
        elif mode == "exp2_split":  # the exp2 argument rounded once (A log2 e carried as hi + lo)
            a_hi = A * 1.4426950408889634
            a_lo = (A.double() * 1.4426950408889634 - a_hi.double()).float()
            a = torch.exp2((d_.double() * a_hi.double() + (d_ * a_lo).double()).float())
        else:
            a = torch.exp(d_ * A)
        if mode == "fma":
            h = torch.addcmul(a * h, d_ * u_, B_)
        else:
            h = a * h + (d_ * B_) * u_
    return h


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="2,70,96,16")
    args = p.parse_args(argv)
    from fxopt.codegen import scan_triton as st

    b, d, L, n = (int(v) for v in args.shape.split(","))
    g = torch.Generator(device="cuda").manual_seed(L + n)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    u, dt = r(b, d, L), torch.nn.functional.softplus(r(b, d, L) - 1)
    A, B, C, h0 = -torch.exp(r(d, n)), r(b, n, L), r(b, n, L), r(b, d, n)
    h64 = walk(u.double(), dt.double(), A.double(), B.double(), h0.double(), "exp")
    rows = {m: walk(u, dt, A, B, h0, m) for m in ("exp", "exp2", "exp2_split", "fma")}
    dflt = st.choose_config(b, d, L, n)
    for name, cfg in (("gluon default", None), ("gluon G=1", dict(dflt, G=1, fused=False)),
                      ("triton seqk G=1", dict(kind="seqk", BD=16, K=8, G=1, PF2=True, num_warps=1))):
        rows[name] = st.selective_scan_triton(u, dt, A, B, C, None, None, h0, torch.float32, config=cfg)[1]
    for name, h in rows.items():
        e = h.double() - h64
        print(f"{name:18} h_last max |err| {e.abs().max().item():.3e}  mean err {e.mean().item():+.3e}  "
              f"mean |err| {e.abs().mean().item():.3e}")


if __name__ == "__main__":
    main()
