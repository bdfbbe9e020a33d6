"""Where the selective-scan kernels' error comes from (GPU diagnostic).

    python benchmarks/scan_numerics.py [--shape b,d,L,n]

For one random problem: the max and mean signed error against an fp64 evaluation of the loop,
for y and for the final state, of the eager fp32 loop (PyTorch on the GPU), emulations of the
kernel's arithmetic in PyTorch (exp as exp2 of a log2(e)-scaled argument, as the FMA-pipe
``exp2_fma``; the update as an FMA), and each CUDA kernel (Gluon default, Gluon with the SFU exp2,
plain Triton). The contract the op ships under is ``fp64_relative(2)`` against the eager loop.

``--exp-profile``: the error in ulps of each exp2 the kernels can use (the SFU's ``ex2.approx``,
:func:`fxopt.codegen.exp2.exp2_fma` on the GPU) and of the eager loop's ``torch.exp`` against fp64,
per range of the argument: the mean (bias) matters as much as the max, since a recurrence adds up
a bias linearly. ``rel-bias``: the mean relative error in units of 2^-24.
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
        elif mode == "exp2_fma":
            from fxopt.codegen.exp2 import exp2_fma_ref

            a = exp2_fma_ref(d_ * (A * 1.4426950408889634))
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
    p.add_argument("--exp-profile", action="store_true")
    args = p.parse_args(argv)
    if args.exp_profile:
        return exp_profile()
    import dataclasses

    from fxopt.codegen import scan_launch as st
    from fxopt.codegen.scan_config import TritonScanConfig

    b, d, L, n = (int(v) for v in args.shape.split(","))
    g = torch.Generator(device="cuda").manual_seed(L + n)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    u, dt = r(b, d, L), torch.nn.functional.softplus(r(b, d, L) - 1)
    A, B, C, h0 = -torch.exp(r(d, n)), r(b, n, L), r(b, n, L), r(b, d, n)
    h64 = walk(u.double(), dt.double(), A.double(), B.double(), h0.double(), "exp")
    rows = {m: walk(u, dt, A, B, h0, m) for m in ("exp", "exp2", "exp2_split", "exp2_fma", "fma")}
    dflt = st.choose_config(b, d, L, n)
    for name, cfg in (("gluon default", None), ("gluon G=1", dataclasses.replace(dflt, G=1)),
                      ("gluon SFU exp2", dataclasses.replace(dflt, exp="sfu", sfu_bias=0.0)),
                      ("gluon SFU exp2, bias-corrected", dataclasses.replace(dflt, exp="sfu")),
                      ("triton G=1", TritonScanConfig(BD=16, K=8, G=1, PF2=True, num_warps=1))):
        rows[name] = st.selective_scan(u, dt, A, B, C, None, None, h0, torch.float32, config=cfg)[1]
    for name, h in rows.items():
        e = h.double() - h64
        print(f"{name:18} h_last max |err| {e.abs().max().item():.3e}  mean err {e.mean().item():+.3e}  "
              f"mean |err| {e.abs().mean().item():.3e}")


def exp_profile():
    import numpy as np
    import triton
    import triton.language as tl

    from fxopt.codegen.exp2 import exp2_fma

    @triton.jit
    def both(t_ptr, sfu_ptr, fma_ptr, n, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = o < n
        t = tl.load(t_ptr + o, mask=m)
        tl.store(sfu_ptr + o, tl.exp2(t), mask=m)
        tl.store(fma_ptr + o, exp2_fma(t), mask=m)

    for lo, hi in ((-2**-10, 0.0), (-2**-6, 0.0), (-0.125, 0.0), (-0.5, 0.0), (-1.0, -0.5), (-2.0, 0.0), (-4.0, -1.0),
                   (-20.0, -4.0), (-120.0, 120.0)):
        t = torch.linspace(lo, hi, 4_000_001, device="cuda")
        sfu, fma = torch.empty_like(t), torch.empty_like(t)
        both[(triton.cdiv(t.numel(), 1024),)](t, sfu, fma, t.numel(), BLOCK=1024)
        eager = torch.exp(t * 0.6931471805599453)  # eager's expf on the (rounded) natural-log argument
        t64 = t.double()
        exact = torch.exp2(t64)
        exact_e = torch.exp((t * 0.6931471805599453).double())
        ulp = torch.from_numpy(np.spacing(exact.float().abs().cpu().numpy())).double().to(t.device)
        ulp_e = torch.from_numpy(np.spacing(exact_e.float().abs().cpu().numpy())).double().to(t.device)
        line = f"t in [{lo:g}, {hi:g}]:"
        for name, v, ex, u in (("SFU ex2", sfu, exact, ulp), ("exp2_fma", fma, exact, ulp), ("torch.exp", eager, exact_e, ulp_e)):
            e = (v.double() - ex) / u
            e = e[torch.isfinite(e) & (ex > 2.0 ** -126)]
            rel = ((v.double() - ex) / ex)[torch.isfinite(ex) & (ex > 2.0 ** -126)] * 2.0 ** 24
            line += f"  {name}: max {e.abs().max().item():.2f} mean {e.mean().item():+.3f} rel-bias {rel.mean().item():+.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
