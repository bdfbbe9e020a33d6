"""Host cost of ``fused_add_tree``'s fast-path gate (the autograd checks added for issue 10).

Times the graph entry point ``fxopt.ops.fused_add.fused_add_tree`` on a warm specialisation,
against the same entry point without the three autograd checks (grad mode + requires_grad,
forward-AD level, functorch), under ``torch.no_grad()`` and with grad mode on but nothing
requiring grad. On CPU (no GPU) the launcher is replaced by a stub that returns its inputs, so
what is timed is exactly the Python around the launch: gate, key, cache lookup, call. On CUDA
the real launcher runs (add ``--stub`` to time the Python part alone there too).

    python benchmarks/fast_path_gate.py [--stub] [--n 200000]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from fxopt.codegen import add_tree_launch as atl
from fxopt.ops import ad_support
from fxopt.ops import fused_add as fa

TREE = "t0=add(x0,x1);t1=add(t0,x2)->t1"


def _without_autograd_checks(xs, tree):
    """The entry point as it was before the autograd checks (for comparison only)."""
    x0 = xs[0]
    if (type(x0) is torch.Tensor and (x0.is_cuda or fa.FAST_PATH_ON_CPU) and not ad_support._is_compiling()
            and not ad_support._dispatch_depth()):
        launcher = atl._LAUNCHERS.get(atl.launcher_key(xs, tree))
        if launcher is None:
            return fa.fused_add_tree_op(xs, tree)
        return launcher(xs)
    return fa.fused_add_tree_op(xs, tree)


class _Stub:
    def __call__(self, xs):
        return xs[:1]


def _per_call_us(fn, xs, n: int) -> float:
    for _ in range(1000):
        fn(xs, TREE)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn(xs, TREE)
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stub", action="store_true", help="stub launcher on CUDA too")
    ap.add_argument("--n", type=int, default=200_000)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    xs = [torch.randn(1, 1, 2560, device=device, dtype=torch.float16) for _ in range(3)]
    if not cuda:  # the first call builds the launcher; the interpreter runs it once
        os.environ.setdefault("TRITON_INTERPRET", "1")
        fa.FAST_PATH_ON_CPU = True
    with torch.no_grad():
        fa.fused_add_tree(xs, TREE)  # build the specialisation (real launcher on CUDA)
    if not cuda or args.stub:
        for k in list(atl._LAUNCHERS):
            atl._LAUNCHERS[k] = _Stub()
    what = "real launcher" if cuda and not args.stub else "stub launcher"
    print(f"fused_add_tree host time per call, {device}, {what}, (1,1,2560) fp16 x3, best of 5 x {args.n}")
    rows = []
    with torch.no_grad():
        rows.append(("no_grad, without the autograd checks", _per_call_us(_without_autograd_checks, xs, args.n)))
        rows.append(("no_grad, with the checks (fxopt)", _per_call_us(fa.fused_add_tree, xs, args.n)))
    rows.append(("grad mode on, nothing requires grad, without", _per_call_us(_without_autograd_checks, xs, args.n)))
    rows.append(("grad mode on, nothing requires grad, with (fxopt)", _per_call_us(fa.fused_add_tree, xs, args.n)))
    for name, us in rows:
        print(f"  {name:52s} {us:7.3f} us")
    print(f"  checks cost: {rows[1][1] - rows[0][1]:+.3f} us (no_grad), {rows[3][1] - rows[2][1]:+.3f} us (grad mode on)")
    if cuda and not args.stub:
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
