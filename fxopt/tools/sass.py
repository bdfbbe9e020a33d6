"""Compile the Gluon selective-scan kernel offline and read its machine code (SASS).

No GPU needed: Triton ships ptxas and cuobjdump. Used by tests/test_scan_kernel.py (every
constexpr branch lowers to sm_90 without spills in the time loop) and for reading what limits the
kernel (BENCHMARKS.md).

    k = compile_for_target(90, dtype="*bf16", TPC=2, W=2, BC_REG=True)
    sass = disassemble(k); resource_usage(k); local_accesses_in_longest_loop(sass)
"""
from __future__ import annotations

import os
import re
import struct
import subprocess
import tempfile

from ..codegen import scan_gluon

# the kernel's pointers to (b, d, l) / (b, n, l) tiles: these take the data dtype
_TILE_PTRS = ("u_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr")


def compile_for_target(arch: int = 90, *, dtype: str = "*fp32", HAS_D=True, HAS_Z=True, HAS_H0=False,
                       STATE_ONLY=False, NP=16, TPC=4, M=1, W=1, K=16, BC_LMAJOR=True, STAGES=3,
                       N_EVEN=True, BC_REG=False, EXP_SFU=False, SFU_BIAS=0.0):
    """Compile :func:`fxopt.codegen.scan_gluon.selective_scan_kernel` for ``sm_<arch>`` as a launch
    with contiguous, 16-byte aligned (b, d, l) tensors would specialise it (unit strides along l,
    sizes divisible by 16)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    kernel = scan_gluon.selective_scan_kernel
    names = kernel.arg_names
    consts = dict(HAS_D=HAS_D, HAS_Z=HAS_Z, HAS_H0=HAS_H0, STATE_ONLY=STATE_ONLY, NP=NP, TPC=TPC, M=M, W=W, K=K,
                  BC_LMAJOR=BC_LMAJOR, STAGES=STAGES, N_EVEN=N_EVEN, BC_REG=BC_REG, EXP_SFU=EXP_SFU, SFU_BIAS=SFU_BIAS)
    unit = ("s_ul", "s_tl", "s_zl", "s_yl", "s_an") + (("s_bl", "s_cl") if BC_LMAJOR else ("s_bn", "s_cn"))
    sig, div16 = {}, []
    for i, nm in enumerate(names):
        if nm in consts or nm in unit:
            sig[nm] = "constexpr"
            consts.setdefault(nm, 1)
            continue
        sig[nm] = (dtype if nm in _TILE_PTRS else "*fp32") if nm.endswith("_ptr") else "i32"
        if nm.endswith("_ptr") or nm in ("D_", "L_") or (nm.startswith("s_") and nm not in ("s_ad",)):
            div16.append(i)
    src = GluonASTSource(fn=kernel, signature=sig,
                         constexprs={(names.index(k),): v for k, v in consts.items()},
                         attrs={(i,): [["tt.divisibility", 16]] for i in div16})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=W, num_stages=1))


def _cuobjdump(kernel, flag: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def disassemble(kernel) -> str:
    """SASS of a compiled kernel (``cuobjdump -sass``)."""
    return _cuobjdump(kernel, "-sass")


def longest_loop(sass: str) -> list:
    """The instructions between the target and the source of the longest backward branch in
    ``sass``: for the scan kernel, the time loop (one chunk of K steps per iteration)."""
    addr = {}
    lines = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if m:
            addr[int(m.group(1), 16)] = len(lines)
            lines.append(m.group(2))
    best = None
    for i, ins in enumerate(lines):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) in addr and addr[int(m.group(1), 16)] < i:
            span = (addr[int(m.group(1), 16)], i)
            if best is None or span[1] - span[0] > best[1] - best[0]:
                best = span
    return [] if best is None else lines[best[0]:best[1] + 1]


def local_accesses_in_longest_loop(sass: str) -> int:
    """Local-memory (spill) instructions in the time loop (:func:`longest_loop`). (ptxas may park a
    value that is only needed after the loop on the stack; that costs nothing per step.)"""
    return sum(bool(re.match(r"(@!?U?P\d+\s+)?(LDL|STL)\b", ins)) for ins in longest_loop(sass))


def polynomial_exps_in_longest_loop(sass: str) -> int:
    """How many FMA-pipe exps (:func:`fxopt.codegen.exp2.exp2_mul_gluon`) the time loop evaluates:
    the FFMAs whose immediate is the polynomial's second-highest coefficient (one per exp)."""
    q4 = repr(struct.unpack("f", struct.pack("f", 0.0013398875016719103))[0])[:10]  # '0.00133988'
    return sum(ins.startswith("FFMA") and q4 in ins for ins in longest_loop(sass))


def resource_usage(kernel) -> dict:
    """Registers, stack, local and shared bytes ptxas assigned (``cuobjdump -res-usage``)."""
    out = _cuobjdump(kernel, "-res-usage")
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}
