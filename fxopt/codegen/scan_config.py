"""Launch choices of the selective-scan kernels: typed configs, the per-shape choice, the exp mode.

Two kernels take the same arguments (:mod:`fxopt.codegen.scan_launch` launches either):

* :class:`GluonScanConfig` - the Gluon kernel (:mod:`fxopt.codegen.scan_gluon`), the default on
  CUDA devices with async copies (sm_80+);
* :class:`TritonScanConfig` - the plain-Triton kernel (:mod:`fxopt.codegen.scan_triton`): the
  interpreter (CPU tests), older GPUs, layouts the Gluon kernel declines.

:func:`choose_config` picks one per (shape, device); the choices were measured on an H100
(benchmarks/scan.py --tune / --compare, 2026-11-22; BENCHMARKS.md). Configs are frozen
dataclasses (they are part of the launch-plan key); :func:`config_from_dict` reads one from JSON
(benchmarks), refusing unknown fields.

Glossary: ``b`` batch, ``d`` channels, ``l`` time steps, ``n`` state size (``NP`` its power of two).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Optional, Union

from .. import config as _env
from ..errors import CodegenError

# FXOPT_SCAN_EXP=sfu: exp(dt A) as one MUFU.EX2 of ``fma(dt, A log2 e, SFU_EXP_BIAS)``. The SFU's
# exp2 is ~2 ulp and biased low (mean relative error -0.1 to -0.85 x 2^-24 depending on the
# argument, benchmarks/scan_numerics.py --exp-profile, H100); a recurrence adds a bias up along
# the sequence. Adding 2e-8 to the argument (a relative +1.4e-8 on the result, folded into the
# FMA that forms the argument: no extra instruction) centres the error where long memories live
# (decays near 1). Calibrated on the H100 over five regimes of exp(dt A) x 7 shapes x 3 dtypes
# (benchmarks/scan.py --contract --contract-dists ...): uses at most 0.75 of the fp64_relative(2)
# bound, where 0 and 3e-8 fail it. A measurement, not a proof: the fma mode is exact to 1 ulp
# by construction.
SFU_EXP_BIAS = 2e-8

# GPUs (compute capability) whose MUFU.EX2 bias the correction above was calibrated on. There
# FXOPT_SCAN_EXP=auto (the default) picks the SFU exp: the speed targets need it (the
# FMA-pipe exp makes the loop issue-bound, ~1.5x slower at b4 l2048 d5120) and the contract holds
# with a margin (<= 0.75 of the bound over 420 GPU checks). Elsewhere auto picks the FMA-pipe exp,
# whose accuracy does not depend on the hardware's exp unit; add an entry after running
# ``benchmarks/scan.py --contract --contract-dists test mamba-init slow still fast --contract-cfg
# '{"exp": "sfu"}'`` on that GPU.
SFU_CALIBRATED = {(9, 0): SFU_EXP_BIAS}

EXP_MODES = ("fma", "sfu")


@dataclass(frozen=True)
class GluonScanConfig:
    """Launch choice of the Gluon kernel (names as in :mod:`fxopt.codegen.scan_gluon`)."""

    TPC: int         # lanes per channel (capped at NP)
    M: int           # channels per lane
    W: int           # warps per program
    K: int           # time steps per chunk
    STAGES: int      # chunks in the shared-memory ring
    G: int           # groups the sequence is cut into (1: no pre-pass)
    exp: str         # "fma" or "sfu" (resolved: see resolve_exp)
    bc_reg: bool = True                # B / C through registers when they are unit-stride along l
    sfu_bias: Optional[float] = None   # with exp="sfu": None is the device's calibrated bias

    def __post_init__(self) -> None:
        if self.exp not in EXP_MODES:
            raise CodegenError(f"GluonScanConfig.exp must be resolved to 'fma' or 'sfu' (resolve_exp), got {self.exp!r}")
        _check_positive(self, "TPC", "M", "W", "K", "STAGES", "G")


@dataclass(frozen=True)
class TritonScanConfig:
    """Launch choice of the plain-Triton kernel (names as in :mod:`fxopt.codegen.scan_triton`)."""

    BD: int          # channels per program
    K: int           # time steps per chunk
    G: int           # groups the sequence is cut into (1: no pre-pass)
    PF2: bool        # two chunks in flight instead of one
    num_warps: int

    def __post_init__(self) -> None:
        _check_positive(self, "BD", "K", "G", "num_warps")


ScanConfig = Union[GluonScanConfig, TritonScanConfig]

_KINDS = {"gluon": GluonScanConfig, "triton": TritonScanConfig}


def _check_positive(cfg, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise CodegenError(f"{type(cfg).__name__}.{name} must be a positive int, got {v!r}")


def config_from_dict(d: dict) -> ScanConfig:
    """``{"kind": "gluon" | "triton", <fields>}`` -> a config (for configs written as JSON)."""
    d = dict(d)
    kind = d.pop("kind", None)
    cls = _KINDS.get(kind)
    if cls is None:
        raise CodegenError(f"scan config {d}: 'kind' must be one of {sorted(_KINDS)}, got {kind!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise CodegenError(f"{cls.__name__} has no field(s) {unknown}; fields: {sorted(fields)}")
    return cls(**d)


def config_to_dict(cfg: ScanConfig) -> dict:
    kind = next(k for k, cls in _KINDS.items() if isinstance(cfg, cls))
    return {"kind": kind, **dataclasses.asdict(cfg)}


@dataclass(frozen=True)
class KernelChoice:
    """What one kernel needs of the launches for one input signature (made by the kernel module's
    ``specialise``, turned into launches by :mod:`fxopt.codegen.scan_launch`)."""

    kernel: Any                # the jit function (selective_scan_kernel of scan_triton / scan_gluon)
    block_d: int               # channels per program
    chunk: int                 # time steps per chunk: group lengths are multiples of it
    groups: int                # groups asked for (the launch rounds to whole chunks)
    constexprs: tuple          # the kernel's constexprs after HAS_D, HAS_Z, HAS_H0, STATE_ONLY
    num_warps: int
    preps: tuple               # per tensor of SelectiveScanArgs: None or the copy (fn(t) -> t) its layout needs
    fallible: bool             # may fail to compile for a layout: then the Triton kernel runs instead


def kernel_strides(t) -> tuple:
    """Strides of a (3-d) tensor as both kernels take them: 0 along size-1 dims (never stepped; 0
    tells the compiler the most about alignment), (0, 0, 0) for an absent tensor."""
    if t is None:
        return (0, 0, 0)
    return tuple(0 if n == 1 else st for n, st in zip(t.shape, t.stride()))


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# ----------------------------------------------------------------------------------------------
# device facts
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    import torch

    if device_index < 0 or not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def capability(device_index: int) -> tuple:
    import torch

    return tuple(torch.cuda.get_device_capability(device_index))


@functools.lru_cache(maxsize=None)
def gluon_available(device_index: int) -> bool:
    """The Gluon kernel runs on CUDA devices with async copies (sm_80+), compiled (not under
    ``TRITON_INTERPRET=1``), with a Triton that has Gluon."""
    import torch
    import triton

    if device_index < 0 or triton.knobs.runtime.interpret or not torch.cuda.is_available():
        return False
    try:
        import triton.experimental.gluon  # noqa: F401
    except Exception:  # pragma: no cover - a Triton without Gluon
        return False
    return capability(device_index)[0] >= 8


def resolve_exp(mode: str, cap: tuple) -> str:
    """The exp mode a launch on a GPU of compute capability ``cap`` uses: ``auto`` is ``sfu``
    where the SFU's bias correction was calibrated (:data:`SFU_CALIBRATED`), else ``fma``;
    explicit ``fma`` / ``sfu`` are kept (``sfu`` then uses the sm_90 correction)."""
    if mode != "auto":
        return mode
    return "sfu" if tuple(cap) in SFU_CALIBRATED else "fma"


def sfu_bias(cfg: GluonScanConfig, cap: tuple) -> float:
    """The bias added to the SFU exp's argument (0 with the FMA-pipe exp)."""
    if cfg.exp != "sfu":
        return 0.0
    return float(cfg.sfu_bias) if cfg.sfu_bias is not None else SFU_CALIBRATED.get(tuple(cap), SFU_EXP_BIAS)


# ----------------------------------------------------------------------------------------------
# the choice per shape
# ----------------------------------------------------------------------------------------------
def choose_config(bsz: int, d: int, L: int, n: int, device_index: int = 0) -> ScanConfig:
    """The launch choice for a selective scan of this size on this device (-1: CPU, which runs
    the plain-Triton kernel under the interpreter). Reads FXOPT_SCAN_EXP."""
    if gluon_available(device_index):
        exp = resolve_exp(_env.current().scan_exp, capability(device_index))  # as the plan key reads it
        return choose_gluon_config(bsz, d, L, n, sm_count(device_index), exp)
    return choose_triton_config(bsz, d, L, n, sm_count(device_index))


def lanes_per_channel(n: int) -> int:
    """Lanes sharing a channel's n states: 8 states per lane (n=16: 2 lanes)."""
    return max(1, min(next_pow2(n) // 8, 32))


@functools.lru_cache(maxsize=256)
def choose_gluon_config(bsz: int, d: int, L: int, n: int, sms: int, exp: str) -> GluonScanConfig:
    """Gluon launch choice on a GPU with ``sms`` SMs, ``exp`` resolved (fma / sfu). Measured on an
    H100: 16 steps per chunk, 3 stages, one channel per lane slot. With enough (batch x channel)
    warps the sequence is not split and two warps share a program (one copy of each B / C chunk
    for both); otherwise it is cut into groups of >= 128 steps until there are ~8 warps per SM,
    the pre-pass as its own launch (measured faster than one launch whose main programs wait on
    the pre-pass's). States per lane: 8 with the SFU exp; 4 with the FMA-pipe exp (12
    instructions per exp, so more lanes share the work: b4 l2048 d5120 0.65 -> 0.52 ms, b1 d1536
    0.094 -> 0.087 ms). Short and narrow: 8 lanes per channel in both modes (b1 l512 d1536 sfu:
    0.0286 against 0.0309 ms with 4)."""
    if exp not in EXP_MODES:
        raise CodegenError(f"exp must be resolved to 'fma' or 'sfu' (resolve_exp), got {exp!r}")
    NP = next_pow2(n)
    tpc = lanes_per_channel(n)
    if exp == "fma":
        tpc = min(2 * tpc, NP, 8)
    warps = bsz * -(-d // (32 // tpc))
    K = 16 if L >= 64 else 8
    if warps < 8 * sms and L < 1024:
        # short and narrow: one launch (host time dominates), 8 lanes per channel for more warps
        return GluonScanConfig(TPC=min(NP, 8), M=1, W=1, K=K, STAGES=3, G=1, exp=exp)
    G = 1
    while warps * G < 8 * sms and G * 2 <= min(32, L // 128):
        G *= 2
    W = 2 if G == 1 and warps >= 4 * sms else 1
    return GluonScanConfig(TPC=tpc, M=1, W=W, K=K, STAGES=3, G=G, exp=exp)


@functools.lru_cache(maxsize=256)
def choose_triton_config(bsz: int, d: int, L: int, n: int, sms: int) -> TritonScanConfig:
    """Plain-Triton launch choice, measured on an H100 (before the Gluon kernel): (BD, 8) input
    tiles, one warp per 16 or 32 channels. With enough (batch x channel block) programs (b4 d5120)
    the sequence is not split (a split measured slower); otherwise it is split into groups of ~64
    steps (G=32 at b1 d1536 L2048, 8 at L512)."""
    NP = next_pow2(n)
    cap = max(4, next_pow2(d))
    BD = min(max(4, 256 // NP), cap) if NP > 16 else min(16, cap)
    if bsz * -(-d // BD) >= 4 * sms or L < 128:
        # enough programs without splitting the sequence: long walks, 2 chunks in flight
        return TritonScanConfig(BD=BD, K=8, G=1, PF2=True, num_warps=1)
    G = 1
    while G * 2 <= min(32, L // 64):
        G *= 2
    if NP <= 16 and d >= 32 and bsz * -(-d // 32) * G >= 6 * sms:
        BD = 32
    return TritonScanConfig(BD=BD, K=8, G=G, PF2=BD == 32, num_warps=1)
