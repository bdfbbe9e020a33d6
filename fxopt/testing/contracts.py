"""Numerical contracts: what "the rewritten graph computes the same thing" means.

A *contract* is an object with a ``name``, a ``needs_fp64`` flag and
``check(ref, cand, *, fp64_ref=None)`` which raises :class:`AssertionError` with a precise
message (worst element index, both values, their bit patterns, ulp distance or errors) when
``cand`` does not honour it, and otherwise returns a small dict of measurements (so a test or
an example can *report* what it measured, e.g. ``{"max_ulp": 1}``).

Contracts shipped here:

* :data:`bitwise` -- identical bits (see :class:`Bitwise` for the NaN / signed-zero decision);
* :func:`ulp` ``(k)`` -- every element within ``k`` units in the last place of the reference dtype;
* :func:`fp64_relative` ``(factor, atol=0.0, rtol=None)`` -- error against a float64 evaluation
  of the reference is no worse than ``factor`` x the original's own error (max-abs and RMS norms);
* :func:`fp64_elementwise` ``(factor=1.0, atol=0.0, rtol=0.0)`` -- the same, per element;
* :func:`rounded` ``(via=None, steps=1, or_reference=False)`` -- every element is the *exact*
  value rounded to the dtype (to nearest, ties to even), optionally through a wider dtype
  first; :func:`fma_rounding` ``(dtype)`` is the one a fused multiply-add kernel meets
  (``addcmul``, ``add`` with ``alpha``), and :func:`exact_fma` computes the exact value it needs;
* :func:`all_of` ``(*contracts)`` (also ``c1 & c2``) -- every contract must hold.

:func:`assert_equivalent` runs a reference and a candidate callable on private copies of the
same inputs and checks a contract on every leaf of their (pytree) outputs.

Rules common to every contract:

* ``ref`` and ``cand`` must have the same shape and dtype (a rewrite must not change either).
  They may live on different devices (then both are compared on the CPU; on one device the
  comparison runs there).
* Non-floating tensors (integer, bool) must be exactly equal under every contract.
* Complex tensors are compared as their real view (``torch.view_as_real``), so the reported
  index has one trailing dimension (0 = real, 1 = imaginary).
* NaN: any NaN matches any NaN (payload and sign bit may legitimately differ between CPU and GPU
  code), a NaN never matches a number.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Contract",
    "Bitwise",
    "Ulp",
    "Fp64Relative",
    "Fp64Elementwise",
    "AllOf",
    "Rounded",
    "ExactValue",
    "bitwise",
    "ulp",
    "fp64_relative",
    "fp64_elementwise",
    "all_of",
    "rounded",
    "fma_rounding",
    "exact_fma",
    "round_exact",
    "ulp_distance",
    "assert_equivalent",
    "EquivalenceReport",
]

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SIGN_MASK = {1: 0x7F, 2: 0x7FFF, 4: 0x7FFFFFFF, 8: 0x7FFFFFFFFFFFFFFF}


# --------------------------------------------------------------------------- helpers


def _prepare(ref: Any, cand: Any, contract_name: str) -> tuple[Tensor, Tensor]:
    """Shared shape/dtype checks; returns both tensors detached on the CPU (complex -> real view)."""
    if not isinstance(ref, Tensor) or not isinstance(cand, Tensor):
        raise AssertionError(
            f"{contract_name}: expected two tensors, got reference {type(ref).__name__} and "
            f"candidate {type(cand).__name__}"
        )
    if ref.dtype != cand.dtype:
        raise AssertionError(f"{contract_name}: dtype differs: reference {ref.dtype}, candidate {cand.dtype}")
    if tuple(ref.shape) != tuple(cand.shape):
        raise AssertionError(
            f"{contract_name}: shape differs: reference {tuple(ref.shape)}, candidate {tuple(cand.shape)}"
        )
    ref, cand = ref.detach(), cand.detach()
    if ref.device != cand.device:
        ref, cand = ref.cpu(), cand.cpu()
    if ref.is_complex():
        ref, cand = torch.view_as_real(ref.resolve_conj()), torch.view_as_real(cand.resolve_conj())
    return ref, cand


def _index(flat_idx: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    idx = []
    for side in reversed(shape):
        idx.append(flat_idx % side if side else 0)
        flat_idx = flat_idx // side if side else 0
    return tuple(reversed(idx))


def _bits_hex(t: Tensor, flat_idx: int) -> str:
    if not t.is_floating_point():
        return ""
    size = t.element_size()
    raw = int(t.reshape(-1)[flat_idx : flat_idx + 1].view(_INT_VIEW[size]).item())
    raw &= (1 << (8 * size)) - 1
    return f" (0x{raw:0{2 * size}x})"


def _fmt(t: Tensor, flat_idx: int) -> str:
    v = t.reshape(-1)[flat_idx].item()
    return f"{v!r}{_bits_hex(t, flat_idx)}"


def _isnan(t: Tensor) -> Tensor:
    return t.isnan() if t.element_size() >= 2 else t.float().isnan()


def _isinf(t: Tensor) -> Tensor:
    return t.isinf() if t.element_size() >= 2 else t.float().isinf()


def _ordered(t: Tensor) -> Tensor:
    """Map floats to integers whose order (and differences) follow the float order.

    Sign-magnitude bits -> two's complement: negative floats map to ``-(bits & ~sign)``, so
    ``-0.0`` and ``+0.0`` both map to 0 and the distance across zero is the number of
    representable values between the two numbers. Result is int64."""
    size = t.element_size()
    bits = t.contiguous().view(_INT_VIEW[size]).to(torch.int64)
    mag = bits & _SIGN_MASK[size]
    return torch.where(bits < 0, -mag, mag)


def ulp_distance(ref: Tensor, cand: Tensor) -> Tensor:
    """Per-element distance in units in the last place of ``ref.dtype`` (float64 tensor).

    Equal values (including ``-0.0`` vs ``+0.0``) are at distance 0; NaN vs NaN is 0; NaN vs
    anything else is ``inf``; an infinity vs anything but the same infinity is ``inf``.
    Both tensors must be floating point of the same dtype and shape."""
    if ref.dtype != cand.dtype or tuple(ref.shape) != tuple(cand.shape) or not ref.is_floating_point():
        raise ValueError(
            f"ulp_distance needs two floating tensors of one dtype and shape, got {ref.dtype}{tuple(ref.shape)} "
            f"and {cand.dtype}{tuple(cand.shape)}"
        )
    ref, cand = ref.detach(), cand.detach()
    if ref.device != cand.device:
        ref, cand = ref.cpu(), cand.cpu()
    oa, ob = _ordered(ref), _ordered(cand)
    if ref.element_size() < 8:
        dist = (oa - ob).abs().to(torch.float64)
    else:  # int64 subtraction could overflow when the signs differ
        same_sign = (oa >= 0) == (ob >= 0)
        dist = torch.where(
            same_sign,
            (oa - ob).abs().to(torch.float64),
            oa.abs().to(torch.float64) + ob.abs().to(torch.float64),
        )
    rn, cn = _isnan(ref), _isnan(cand)
    ri, ci = _isinf(ref), _isinf(cand)
    inf = torch.full_like(dist, math.inf)
    dist = torch.where(rn ^ cn, inf, dist)
    dist = torch.where(rn & cn, torch.zeros_like(dist), dist)
    inf_mismatch = (ri | ci) & ~(rn | cn) & (oa != ob)
    dist = torch.where(inf_mismatch, inf, dist)
    return dist


def _check_exact_nonfloat(ref: Tensor, cand: Tensor, name: str) -> dict:
    diff = ref != cand
    n = int(diff.sum())
    if n:
        flat = int(diff.reshape(-1).nonzero()[0, 0])
        raise AssertionError(
            f"{name}: {n} of {ref.numel()} elements differ (dtype {ref.dtype}, exact equality required "
            f"for non-floating tensors); first at index {_index(flat, tuple(ref.shape))}: "
            f"reference={_fmt(ref, flat)} candidate={_fmt(cand, flat)}"
        )
    return {"mismatches": 0}


class Contract:
    """Base class. Subclasses set ``name`` and implement :meth:`check`."""

    name: str = "contract"
    needs_fp64: bool = False

    def check(self, ref: Tensor, cand: Tensor, *, fp64_ref: Tensor | None = None) -> dict:  # pragma: no cover
        raise NotImplementedError

    def __and__(self, other: "Contract") -> "AllOf":
        return AllOf(self, other)

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__


# --------------------------------------------------------------------------- bitwise


class Bitwise(Contract):
    """Same dtype, same shape, identical bits.

    Decisions:

    * ``-0.0`` vs ``+0.0`` is a **mismatch** (different bits; it is observable, e.g. ``1/x``).
    * NaN vs NaN is a **match whatever the payload or sign bit**: CPU and GPU code (and different
      instruction sequences computing the same IEEE operation) produce different NaN payloads, and
      no PyTorch operation lets a program observe a payload. NaN vs a number is a mismatch.
    * Everything else (subnormals, infinities) must have identical bits.

    ``bitwise`` is an instance; calling it (``bitwise()``) returns the same instance.
    """

    name = "bitwise"

    def __call__(self) -> "Bitwise":
        return self

    def check(self, ref: Tensor, cand: Tensor, *, fp64_ref: Tensor | None = None) -> dict:
        ref, cand = _prepare(ref, cand, self.name)
        if not ref.is_floating_point():
            return _check_exact_nonfloat(ref, cand, self.name)
        iv = _INT_VIEW[ref.element_size()]
        same = (ref.contiguous().view(iv) == cand.contiguous().view(iv)) | (_isnan(ref) & _isnan(cand))
        n_bad = int((~same).sum())
        if n_bad:
            dist = ulp_distance(ref, cand).reshape(-1)
            bad = (~same).reshape(-1)
            dist_bad = torch.where(bad, dist, torch.full_like(dist, -1.0))
            flat = int(dist_bad.argmax())  # worst by ulp distance; ties -> first
            first = int(bad.nonzero()[0, 0])
            shape = tuple(ref.shape)
            msg = (
                f"bitwise: {n_bad} of {ref.numel()} elements differ (shape {shape}, dtype {ref.dtype}); "
                f"worst at index {_index(flat, shape)}: reference={_fmt(ref, flat)} "
                f"candidate={_fmt(cand, flat)}, ulp distance {_fmt_dist(float(dist[flat]))}"
            )
            if first != flat:
                msg += (
                    f"; first at index {_index(first, shape)}: reference={_fmt(ref, first)} "
                    f"candidate={_fmt(cand, first)}"
                )
            raise AssertionError(msg)
        return {"mismatches": 0}


def _fmt_dist(d: float) -> str:
    if math.isinf(d):
        return "inf (NaN/inf mismatch)"
    return str(int(d))


bitwise = Bitwise()


# --------------------------------------------------------------------------- ulp


class Ulp(Contract):
    """Every element within ``k`` units in the last place of the reference's dtype.

    The distance is the number of representable values of that dtype between the two numbers
    (floats mapped to ordered integers, so it is right across zero and across the
    subnormal/normal boundary; ``-0.0`` and ``+0.0`` are at distance 0). An infinity must be
    matched by the same infinity exactly; NaN must be matched by NaN (any payload).
    ``ulp(0)`` is ``bitwise`` except that it accepts ``-0.0`` vs ``+0.0``."""

    def __init__(self, k: int):
        if k < 0:
            raise ValueError(f"ulp(k) needs k >= 0, got {k}")
        self.k = k
        self.name = f"ulp({k})"

    def check(self, ref: Tensor, cand: Tensor, *, fp64_ref: Tensor | None = None) -> dict:
        ref, cand = _prepare(ref, cand, self.name)
        if not ref.is_floating_point():
            return _check_exact_nonfloat(ref, cand, self.name)
        if ref.numel() == 0:
            return {"max_ulp": 0}
        dist = ulp_distance(ref, cand).reshape(-1)
        worst = int(dist.argmax())
        max_d = float(dist[worst])
        if max_d > self.k:
            n_bad = int((dist > self.k).sum())
            shape = tuple(ref.shape)
            raise AssertionError(
                f"{self.name}: {n_bad} of {ref.numel()} elements more than {self.k} ulp apart (shape {shape}, "
                f"dtype {ref.dtype}); worst at index {_index(worst, shape)}: reference={_fmt(ref, worst)} "
                f"candidate={_fmt(cand, worst)}, ulp distance {_fmt_dist(max_d)}"
            )
        return {"max_ulp": int(max_d)}


def ulp(k: int = 1) -> Ulp:
    """Contract: per element within ``k`` ulp of the reference (see :class:`Ulp`)."""
    return Ulp(k)


# --------------------------------------------------------------------------- fp64 contracts


def _nonfinite_must_match(ref: Tensor, cand: Tensor, name: str) -> None:
    """Positions where the reference is non-finite must hold the same non-finite value in the
    candidate (NaN <-> any NaN, +inf <-> +inf, -inf <-> -inf) and vice versa."""
    rn, cn = _isnan(ref), _isnan(cand)
    rf = ref.isfinite() if ref.element_size() >= 2 else ref.float().isfinite()
    cf = cand.isfinite() if cand.element_size() >= 2 else cand.float().isfinite()
    r64, c64 = ref.to(torch.float64), cand.to(torch.float64)
    bad = (rf != cf) | (rn != cn) | (~rf & ~rn & (r64 != c64))
    n_bad = int(bad.sum())
    if n_bad:
        flat = int(bad.reshape(-1).nonzero()[0, 0])
        raise AssertionError(
            f"{name}: non-finite values differ at {n_bad} of {ref.numel()} positions (non-finite positions "
            f"must match exactly); first at index {_index(flat, tuple(ref.shape))}: "
            f"reference={_fmt(ref, flat)} candidate={_fmt(cand, flat)}"
        )


def _fp64_views(ref: Tensor, cand: Tensor, f64: Tensor, name: str):
    """Non-finite positions must match exactly; returns both outputs in float64 and the
    mask of positions where all three are finite (the ones whose errors are measured)."""
    _nonfinite_must_match(ref, cand, name)
    r64, c64 = ref.to(torch.float64), cand.to(torch.float64)
    return r64, c64, r64.isfinite() & c64.isfinite() & f64.isfinite()


def _prepare_fp64(ref: Tensor, cand: Tensor, fp64_ref: Tensor | None, name: str):
    if fp64_ref is None:
        raise ValueError(
            f"{name} needs an fp64 reference: call check(..., fp64_ref=...) or use assert_equivalent, "
            f"which computes it"
        )
    ref, cand = _prepare(ref, cand, name)
    if not isinstance(fp64_ref, Tensor):
        raise AssertionError(f"{name}: fp64 reference is a {type(fp64_ref).__name__}, not a tensor")
    f64 = fp64_ref.detach().to(ref.device)
    if f64.is_complex():
        f64 = torch.view_as_real(f64.resolve_conj())
    if tuple(f64.shape) != tuple(ref.shape):
        raise AssertionError(
            f"{name}: fp64 reference shape {tuple(f64.shape)} differs from reference shape {tuple(ref.shape)}"
        )
    return ref, cand, f64.to(torch.float64)


class Fp64Relative(Contract):
    """Error against a float64 evaluation no worse than ``factor`` x the original's error.

    ``fp64_ref`` is the reference function evaluated on inputs upcast to float64 (done by
    :func:`fxopt.testing.assert_equivalent`). With ``e_ref = |ref - fp64_ref|`` and
    ``e_cand = |cand - fp64_ref|`` over the positions where reference, candidate and fp64
    reference are all finite, the contract requires BOTH

    * ``max(e_cand) <= factor * max(e_ref) + floor`` (worst element), and
    * ``rms(e_cand) <= factor * rms(e_ref) + floor`` (RMS error; the same comparison as the
      relative Frobenius norm ``||cand - fp64|| / ||fp64||`` since the denominators are equal),

    where the floor is ``atol + rtol * max|fp64_ref|`` for the max comparison and
    ``atol + rtol * rms(fp64_ref)`` for the RMS comparison; ``rtol`` defaults to the machine
    epsilon of the reference dtype (about one rounding at the output's scale, so a reference that
    happens to be exact does not make every reordering fail). Pass ``rtol=0.0`` for no relative
    floor.

    Non-finite values are not measured but must match exactly: wherever the reference is
    NaN/inf the candidate must hold NaN/the same inf, and the candidate must not be non-finite
    anywhere else. Positions where only the fp64 reference is non-finite are ignored."""

    needs_fp64 = True

    def __init__(self, factor: float = 2.0, atol: float = 0.0, rtol: float | None = None):
        if factor < 0 or atol < 0 or (rtol is not None and rtol < 0):
            raise ValueError("fp64_relative: factor, atol and rtol must be >= 0")
        self.factor = float(factor)
        self.atol = float(atol)
        self.rtol = rtol
        parts = [f"{factor:g}"]
        if atol:
            parts.append(f"atol={atol:g}")
        if rtol is not None:
            parts.append(f"rtol={rtol:g}")
        self.name = f"fp64_relative({', '.join(parts)})"

    def check(self, ref: Tensor, cand: Tensor, *, fp64_ref: Tensor | None = None) -> dict:
        ref, cand, f64 = _prepare_fp64(ref, cand, fp64_ref, self.name)
        if not ref.is_floating_point():
            return _check_exact_nonfloat(ref, cand, self.name)
        r64, c64, mask = _fp64_views(ref, cand, f64, self.name)
        if not bool(mask.any()):
            return {"max_err": 0.0, "max_err_ref": 0.0, "rms_err": 0.0, "rms_err_ref": 0.0,
                    "floor_max": self.atol, "floor_rms": self.atol}
        zero = torch.zeros((), dtype=torch.float64, device=ref.device)
        e_ref = torch.where(mask, (r64 - f64).abs(), zero)
        e_cand = torch.where(mask, (c64 - f64).abs(), zero)
        n = int(mask.sum())
        rtol = torch.finfo(ref.dtype).eps if self.rtol is None else self.rtol
        f_abs = torch.where(mask, f64.abs(), zero)
        floor_max = self.atol + rtol * float(f_abs.max())
        floor_rms = self.atol + rtol * math.sqrt(float((f_abs * f_abs).sum()) / n)
        max_ref, max_cand = float(e_ref.max()), float(e_cand.max())
        rms_ref = math.sqrt(float((e_ref * e_ref).sum()) / n)
        rms_cand = math.sqrt(float((e_cand * e_cand).sum()) / n)
        stats = {
            "max_err": max_cand,
            "max_err_ref": max_ref,
            "rms_err": rms_cand,
            "rms_err_ref": rms_ref,
            "floor_max": floor_max,
            "floor_rms": floor_rms,
        }
        bound_max = self.factor * max_ref + floor_max
        bound_rms = self.factor * rms_ref + floor_rms
        if max_cand > bound_max or rms_cand > bound_rms:
            flat = int(e_cand.reshape(-1).argmax())
            shape = tuple(ref.shape)
            which = []
            if max_cand > bound_max:
                which.append(f"max abs error {max_cand:.6g} > {self.factor:g} x {max_ref:.6g} + {floor_max:.3g}")
            if rms_cand > bound_rms:
                which.append(f"RMS error {rms_cand:.6g} > {self.factor:g} x {rms_ref:.6g} + {floor_rms:.3g}")
            raise AssertionError(
                f"{self.name}: candidate is further from the fp64 reference than allowed ({'; '.join(which)}) "
                f"over {n} finite elements (shape {shape}, dtype {ref.dtype}); worst candidate element at index "
                f"{_index(flat, shape)}: reference={_fmt(ref, flat)} candidate={_fmt(cand, flat)} "
                f"fp64={f64.reshape(-1)[flat].item()!r} (error reference {e_ref.reshape(-1)[flat].item():.6g}, "
                f"candidate {e_cand.reshape(-1)[flat].item():.6g})"
            )
        return stats


def fp64_relative(factor: float = 2.0, atol: float = 0.0, rtol: float | None = None) -> Fp64Relative:
    """Contract: norm-wise error vs fp64 no worse than ``factor`` x the original's (see :class:`Fp64Relative`)."""
    return Fp64Relative(factor, atol, rtol)


class Fp64Elementwise(Contract):
    """Per element: ``|cand - fp64| <= factor * |ref - fp64| + atol + rtol * |fp64|``.

    The strict form of "never further from the fp64 reference than the original" (defaults:
    factor 1, no slack). Non-finite values must match exactly, as in :class:`Fp64Relative`;
    positions where the fp64 reference is non-finite are not measured."""

    needs_fp64 = True

    def __init__(self, factor: float = 1.0, atol: float = 0.0, rtol: float = 0.0):
        if factor < 0 or atol < 0 or rtol < 0:
            raise ValueError("fp64_elementwise: factor, atol and rtol must be >= 0")
        self.factor, self.atol, self.rtol = float(factor), float(atol), float(rtol)
        parts = [f"{factor:g}"]
        if atol:
            parts.append(f"atol={atol:g}")
        if rtol:
            parts.append(f"rtol={rtol:g}")
        self.name = f"fp64_elementwise({', '.join(parts)})"

    def check(self, ref: Tensor, cand: Tensor, *, fp64_ref: Tensor | None = None) -> dict:
        ref, cand, f64 = _prepare_fp64(ref, cand, fp64_ref, self.name)
        if not ref.is_floating_point():
            return _check_exact_nonfloat(ref, cand, self.name)
        r64, c64, mask = _fp64_views(ref, cand, f64, self.name)
        zero = torch.zeros((), dtype=torch.float64, device=ref.device)
        e_ref = torch.where(mask, (r64 - f64).abs(), zero)
        e_cand = torch.where(mask, (c64 - f64).abs(), zero)
        bound = self.factor * e_ref + self.atol + self.rtol * torch.where(mask, f64.abs(), zero)
        excess = e_cand - bound
        bad = excess > 0
        n_bad = int(bad.sum())
        stats = {"max_err": float(e_cand.max()) if e_cand.numel() else 0.0,
                 "max_err_ref": float(e_ref.max()) if e_ref.numel() else 0.0,
                 "violations": 0}
        if n_bad:
            flat = int(excess.reshape(-1).argmax())
            shape = tuple(ref.shape)
            raise AssertionError(
                f"{self.name}: {n_bad} of {ref.numel()} elements are further from the fp64 reference than "
                f"{self.factor:g} x the original's error (+ slack) (shape {shape}, dtype {ref.dtype}); worst at "
                f"index {_index(flat, shape)}: reference={_fmt(ref, flat)} candidate={_fmt(cand, flat)} "
                f"fp64={f64.reshape(-1)[flat].item()!r} (error reference {e_ref.reshape(-1)[flat].item():.6g}, "
                f"candidate {e_cand.reshape(-1)[flat].item():.6g})"
            )
        return stats


def fp64_elementwise(factor: float = 1.0, atol: float = 0.0, rtol: float = 0.0) -> Fp64Elementwise:
    """Contract: per element, error vs fp64 no worse than ``factor`` x the original's."""
    return Fp64Elementwise(factor, atol, rtol)


# --------------------------------------------------------------------------- exact values and rounding


class ExactValue(NamedTuple):
    """A real number per element, held as ``hi + lo`` (two float64 tensors of one shape).

    ``hi`` is the number rounded to float64 (to nearest); ``lo`` is the rest rounded to
    float64: zero exactly when ``hi`` is the number, otherwise its sign says on which side
    of ``hi`` the number lies, which is all that rounding to a narrower dtype needs. Where
    an operand was inf or NaN, ``hi`` holds the IEEE result and ``lo`` is zero."""

    hi: Tensor
    lo: Tensor


_NARROW = (torch.float16, torch.bfloat16, torch.float32)
_RANK = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24, torch.float64: 53}  # significand bits


def _exact_scale(v: float) -> bool:
    """``v * t`` is exact for the products :func:`exact_fma` forms: a moderate power of two."""
    m, e = math.frexp(abs(v))
    return m == 0.5 and -600 < e < 600


def _two_sum(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``s + e == a + b`` exactly with ``s = fl(a + b)`` (Knuth's two-sum; finite float64)."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, torch.where(s.isfinite(), e, torch.zeros_like(e))


def exact_fma(c, t1, t2, value: float = 1.0) -> ExactValue:
    """The exact value of ``c + value * t1 * t2`` per element (operands broadcast; tensors or numbers).

    float16 / bfloat16 / float32 operands with ``value`` a power of two (±1 included) take a
    fast path: the product has at most 48 significant bits, so it is exact in float64, and a
    two-sum keeps the addition's rounding error. Anything else (float64 operands, another
    ``value``) is computed per element with :class:`fractions.Fraction`: exact, slow, meant
    for test-sized tensors. A scalar factor ``s`` of a kernel computing in float32 is passed
    as ``torch.tensor(s, dtype=torch.float32)`` (the factor the kernel sees)."""
    ts = [x if isinstance(x, Tensor) else torch.tensor(float(x), dtype=torch.float64) for x in (c, t1, t2)]
    if not all(t.is_floating_point() for t in ts):
        raise TypeError(f"exact_fma needs floating operands, got {[str(t.dtype) for t in ts]}")
    shape = torch.broadcast_shapes(*(t.shape for t in ts))
    c64, a64, b64 = (t.detach().cpu().to(torch.float64).expand(shape) for t in ts)
    value = float(value)
    prod = value * (a64 * b64)
    hi, lo = _two_sum(c64, prod)
    if all(t.dtype in _NARROW for t in ts) and _exact_scale(value):
        return ExactValue(hi.contiguous(), lo.contiguous())
    hi, lo = hi.reshape(-1).clone(), torch.zeros(hi.numel(), dtype=torch.float64)
    fv = Fraction(value)
    for i, (ci, ai, bi) in enumerate(zip(*(t.reshape(-1).tolist() for t in (c64, a64, b64)))):
        if not all(map(math.isfinite, (ci, ai, bi, value))):
            continue  # the float64 IEEE result is the answer (inf, NaN)
        p = fv * Fraction(ai) * Fraction(bi)
        x = Fraction(ci) + p
        if x == 0:  # IEEE: an exact zero sum is +0 unless both addends are zeros of sign -
            both_negative_zeros = p == 0 and math.copysign(1, ci) < 0 and math.copysign(1, value * ai * bi) < 0
            hi[i] = -0.0 if both_negative_zeros else 0.0
            continue
        try:
            h = float(x)  # correctly rounded (CPython divides the integers exactly)
        except OverflowError:
            hi[i] = math.inf if x > 0 else -math.inf
            continue
        hi[i] = h if h != 0 else (0.0 if x > 0 else -0.0)  # an underflow keeps the sign
        lo[i] = float(x - Fraction(h))
    return ExactValue(hi.reshape(shape), lo.reshape(shape))


def _pick_odd(x: Tensor, y: Tensor) -> Tensor:
    iv = _INT_VIEW[x.element_size()]
    return torch.where((x.contiguous().view(iv) & 1) == 1, x, y)


def _to_odd_f64(hi: Tensor, lo: Tensor) -> Tensor:
    """``hi + lo`` rounded to odd in float64: exact values stay, others take the one of their
    two float64 neighbours whose last significand bit is 1."""
    towards = torch.where(lo > 0, torch.full_like(hi, math.inf), torch.full_like(hi, -math.inf))
    inexact = (lo != 0) & hi.isfinite()
    return torch.where(inexact, _pick_odd(hi, torch.nextafter(hi, towards)), hi)


def _to_odd_f32(x: Tensor) -> Tensor:
    """float64 ``x`` rounded to odd in float32 (see :func:`_to_odd_f64`)."""
    t = x.to(torch.float32)
    inexact = (t.to(torch.float64) != x) & ~x.isnan()
    towards = torch.where(x > t.to(torch.float64), torch.tensor(math.inf), torch.tensor(-math.inf)).to(torch.float32)
    return torch.where(inexact, _pick_odd(t, torch.nextafter(t, towards)), t)


def _exact_parts(x, shape=None) -> tuple[Tensor, Tensor]:
    if isinstance(x, ExactValue):
        hi, lo = x.hi, x.lo
    elif isinstance(x, Tensor):
        hi = x
        lo = torch.zeros_like(x, dtype=torch.float64)
    else:
        raise TypeError(f"expected an ExactValue or a float64 tensor, got {type(x).__name__}")
    hi, lo = hi.detach().cpu().to(torch.float64), lo.detach().cpu().to(torch.float64)
    if shape is not None:
        hi, lo = hi.expand(shape), lo.expand(shape)
    return hi, lo


def round_exact(x: "ExactValue | Tensor", dtype: torch.dtype) -> Tensor:
    """The exact value ``x`` (an :class:`ExactValue`, or a float64 tensor taken as exact) rounded
    to ``dtype`` once: to nearest, ties to even, +-inf from the overflow threshold
    ``max + ulp(max)/2`` up, as IEEE 754 rounds (a CPU tensor).

    Why it is exact: rounding to odd at two or more extra bits, then to nearest, is the
    correct rounding to nearest (a classic result, Boldo & Melquiond); float64 -> float32
    and float32 -> float16/bfloat16 conversions round to nearest."""
    hi, lo = _exact_parts(x)
    if dtype not in _RANK:
        raise ValueError(f"round_exact: {dtype} is not a floating dtype it knows ({list(_RANK)})")
    if dtype == torch.float64:
        return hi.clone()  # hi is the float64 rounding by definition
    odd = _to_odd_f64(hi, lo)
    if dtype == torch.float32:
        return odd.to(torch.float32)
    return _to_odd_f32(odd).to(dtype)


def _signed_key(t: Tensor) -> Tensor:
    """Integers in the order of the floats, -0.0 just below +0.0 (so a range can pin a zero's sign)."""
    return 2 * _ordered(t) - t.signbit().to(torch.int64)


class Rounded(Contract):
    """Every element is the exact value ``x`` rounded to the dtype (:func:`round_exact`: to
    nearest, ties to even, +-inf from the overflow threshold up).

    * ``via=torch.float32`` (float16 / bfloat16 results): the value may pass through float32
      first, as ATen's 16-bit kernels compute: the element must be the dtype rounding of a
      float32 number at most ``steps`` float32 steps from the float32 rounding of ``x``. Two
      roundings in a row: the element is the correctly rounded value or -- only where ``x``
      lies within ``steps + 1/2`` float32 ulps of the point halfway between two dtype values
      (or of the overflow threshold) -- the other dtype value next to ``x``.
    * ``or_reference=True``: an element bit-equal to the reference (NaN matching NaN) is
      accepted as well (a kernel that rounds the product first computes what the original did).

    ``fp64_ref`` is an :class:`ExactValue` (see :func:`exact_fma`) or a float64 tensor taken as
    exact -- right where a float64 evaluation of the reference is itself exact, which a
    multiply-add of 16/32-bit operands is not always (use :func:`exact_fma` there). Zeros:
    the sign must be the correctly rounded one (``via`` ranges may admit both); NaN expected
    means any NaN; infinities are values like any other (+inf only where the rounding is +inf)."""

    needs_fp64 = True

    def __init__(self, via: torch.dtype | None = None, steps: int = 1, or_reference: bool = False):
        if via is not None and via not in _RANK:
            raise ValueError(f"rounded(via=...) needs a floating dtype, got {via}")
        if steps < 0:
            raise ValueError(f"rounded(steps=...) needs steps >= 0, got {steps}")
        self.via, self.steps, self.or_reference = via, int(steps), bool(or_reference)
        parts = [] if via is None else [f"via={str(via).replace('torch.', '')}"]
        if via is not None and steps != 1:
            parts.append(f"steps={steps}")
        self.name = f"rounded({', '.join(parts)})" + (" | reference" if or_reference else "")

    def _bounds(self, hi: Tensor, lo: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        expect = round_exact(ExactValue(hi, lo), dtype)
        if self.via is None or _RANK[self.via] <= _RANK[dtype]:
            return expect, expect, expect
        t = round_exact(ExactValue(hi, lo), self.via)
        down, up = t, t
        for _ in range(self.steps):
            down = torch.nextafter(down, torch.full_like(down, -math.inf))
            up = torch.nextafter(up, torch.full_like(up, math.inf))
        return expect, round_exact(down.to(torch.float64), dtype), round_exact(up.to(torch.float64), dtype)

    def check(self, ref: Tensor, cand: Tensor, *, fp64_ref: "ExactValue | Tensor | None" = None) -> dict:
        if fp64_ref is None:
            raise ValueError(
                f"{self.name} needs the exact value: call check(..., fp64_ref=exact_fma(...)) (or a float64 "
                f"tensor that is exact)"
            )
        ref, cand = _prepare(ref, cand, self.name)
        if not ref.is_floating_point():
            return _check_exact_nonfloat(ref, cand, self.name)
        ref, cand = ref.cpu(), cand.cpu()
        hi, lo = _exact_parts(fp64_ref)
        if tuple(torch.broadcast_shapes(hi.shape, ref.shape)) != tuple(ref.shape):
            raise AssertionError(
                f"{self.name}: exact value shape {tuple(hi.shape)} does not broadcast to {tuple(ref.shape)}"
            )
        hi, lo = hi.expand(ref.shape), lo.expand(ref.shape)
        expect, low, high = self._bounds(hi, lo, ref.dtype)
        c_nan, e_nan = _isnan(cand), _isnan(expect)
        kc = _signed_key(cand)
        in_range = torch.where(e_nan, c_nan, ~c_nan & (_signed_key(low) <= kc) & (kc <= _signed_key(high)))
        rounded = torch.where(e_nan, c_nan, ~c_nan & (kc == _signed_key(expect)))
        ok = in_range
        if self.or_reference:
            iv = _INT_VIEW[ref.element_size()]
            same = (ref.contiguous().view(iv) == cand.contiguous().view(iv)) | (_isnan(ref) & c_nan)
            ok = ok | same
        n_bad = int((~ok).sum())
        if n_bad:
            flat = int((~ok).reshape(-1).nonzero()[0, 0])
            shape = tuple(ref.shape)
            h, l = hi.reshape(-1)[flat].item(), lo.reshape(-1)[flat].item()
            allowed = (f"correctly rounded {_fmt(expect, flat)}" if self.via is None else
                       f"allowed [{_fmt(low, flat)}, {_fmt(high, flat)}], correctly rounded {_fmt(expect, flat)}")
            raise AssertionError(
                f"{self.name}: {n_bad} of {ref.numel()} elements are not the rounding the contract allows "
                f"(shape {shape}, dtype {ref.dtype}); first at index {_index(flat, shape)}: reference="
                f"{_fmt(ref, flat)} candidate={_fmt(cand, flat)} exact={h!r}{'' if l == 0 else f' + {l!r}'}; {allowed}"
            )
        return {
            "rounded": int(rounded.sum()),
            "other_neighbour": int((in_range & ~rounded).sum()),
            "as_reference": int((ok & ~in_range).sum()),
            "violations": 0,
        }


def rounded(via: torch.dtype | None = None, steps: int = 1, or_reference: bool = False) -> Rounded:
    """Contract: every element is the exact value rounded to the dtype (see :class:`Rounded`)."""
    return Rounded(via, steps, or_reference)


def fma_rounding(dtype: torch.dtype) -> Rounded:
    """The contract of one ATen multiply-add kernel (``addcmul``, ``add`` with ``alpha``) against
    the exact ``c + v*a*b`` it stands for, for results of ``dtype``:

    * float32 / float64: correctly rounded (a fused multiply-add, as ATen's CPU kernels and
      recent CUDA ``addcmul`` with ``value=1`` compute), or bit-equal to the original
      two-rounding computation (a kernel that rounds the product first: recent CUDA
      ``addcmul`` with ``value != 1``, older CUDA builds for every value);
    * float16 / bfloat16: computed in float32 and rounded once more: ``rounded(via=float32)``
      (the correctly rounded value, or the other neighbour of ``x`` within 1.5 float32 ulps of a
      halfway point), or bit-equal to the original.

    The exact value comes from :func:`exact_fma`. ``fxopt.passes.addcmul`` claims this contract."""
    if dtype not in _RANK:
        raise ValueError(f"fma_rounding: {dtype} is not a floating dtype")
    via = torch.float32 if _RANK[dtype] < _RANK[torch.float32] else None
    contract = Rounded(via=via, or_reference=True)
    contract.name = f"fma_rounding({str(dtype).replace('torch.', '')})"
    return contract


# --------------------------------------------------------------------------- combinator


class AllOf(Contract):
    """Every contract must hold; the first failure is raised (its message names it)."""

    def __init__(self, *contracts: Contract):
        flat: list[Contract] = []
        for c in contracts:
            flat.extend(c.contracts if isinstance(c, AllOf) else [c])
        if not flat:
            raise ValueError("all_of() needs at least one contract")
        self.contracts = tuple(flat)
        self.needs_fp64 = any(c.needs_fp64 for c in flat)
        self.name = " & ".join(c.name for c in flat)

    def check(self, ref: Tensor, cand: Tensor, *, fp64_ref: Tensor | None = None) -> dict:
        stats: dict = {}
        for c in self.contracts:
            for key, val in c.check(ref, cand, fp64_ref=fp64_ref).items():
                stats[f"{c.name}.{key}" if key in stats else key] = val
        return stats


def all_of(*contracts: Contract) -> AllOf:
    """Contract: all of ``contracts`` hold (e.g. ``all_of(ulp(1), fp64_elementwise())``)."""
    return AllOf(*contracts)


# --------------------------------------------------------------------------- assert_equivalent


def _region(t: Tensor) -> tuple[int, int]:
    """(storage offset, number of storage elements spanned) of a strided tensor."""
    extent = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
    return t.storage_offset(), extent


def _clone_preserving_layout(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A fresh copy of ``t`` with the same sizes, strides and storage offset (so expanded,
    transposed and sliced inputs stay expanded/transposed/sliced), optionally converted."""
    dtype = t.dtype if dtype is None else dtype
    src = t.detach()
    if src.layout != torch.strided or src.numel() == 0 or any(st < 0 for st in src.stride()):
        out = src.clone().to(dtype)
    else:
        offset, extent = _region(src)
        region = src.as_strided((extent,), (1,), offset)
        flat = torch.empty(offset + extent, dtype=dtype, device=src.device)
        flat[offset:].copy_(region)
        out = flat.as_strided(tuple(src.shape), tuple(src.stride()), offset)
    if t.requires_grad and out.is_floating_point() or (t.requires_grad and out.is_complex()):
        out.requires_grad_(True)
    return out


def _upcast(t: Tensor) -> Tensor:
    if t.is_floating_point():
        return _clone_preserving_layout(t, torch.float64)
    if t.is_complex():
        return _clone_preserving_layout(t, torch.complex128)
    return _clone_preserving_layout(t)


def _tree_map_tensors(fn, tree):
    from torch.utils import _pytree as pytree

    return pytree.tree_map(lambda x: fn(x) if isinstance(x, Tensor) else x, tree)


class _Fp64Audit:
    """Records ATen ops that produced a floating tensor narrower than float64 during the fp64 run."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        audit = self
        self.narrow: dict[str, set] = {}

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                from torch.utils import _pytree as pytree

                for leaf in pytree.tree_leaves(out):
                    if isinstance(leaf, Tensor) and (
                        (leaf.is_floating_point() and leaf.dtype != torch.float64)
                        or (leaf.is_complex() and leaf.dtype != torch.complex128)
                    ):
                        audit.narrow.setdefault(str(func), set()).add(str(leaf.dtype).replace("torch.", ""))
                return out

        self.mode = _Mode()

    def summary(self, limit: int = 6) -> str:
        items = sorted(self.narrow.items())
        text = ", ".join(f"{op} -> {'/'.join(sorted(d))}" for op, d in items[:limit])
        return text + (f", ... ({len(items) - limit} more ops)" if len(items) > limit else "")


def _fp64_reference_fn(reference_fn):
    if isinstance(reference_fn, torch.nn.Module):
        import copy
        import warnings

        with warnings.catch_warnings():  # torch's own deprecation noise when copying exported GraphModules
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            return copy.deepcopy(reference_fn).to(torch.float64)
    return reference_fn


class EquivalenceReport:
    """What :func:`assert_equivalent` measured: ``entries`` is a list of ``(path, stats)``."""

    def __init__(self, contract: Contract, entries: list[tuple[str, dict]]):
        self.contract = contract
        self.entries = entries

    def __getitem__(self, path: str) -> dict:
        for p, s in self.entries:
            if p == path:
                return s
        raise KeyError(path)

    def __str__(self) -> str:
        lines = [f"contract {self.contract.name}: {len(self.entries)} leaves hold"]
        for p, s in self.entries:
            kv = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items())
            lines.append(f"  {p}: {kv}")
        return "\n".join(lines)

    __repr__ = __str__


def _check_leaf(contract: Contract, ref: Any, cand: Any, f64: Any) -> dict:
    if isinstance(ref, Tensor) or isinstance(cand, Tensor):
        if f64 is not None and not isinstance(f64, Tensor):
            f64 = torch.as_tensor(f64, dtype=torch.float64)
        return contract.check(ref, cand, fp64_ref=f64)
    if isinstance(ref, float) and isinstance(cand, float):
        t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        return contract.check(t(ref), t(cand), fp64_ref=None if f64 is None else t(float(f64)))
    if type(ref) is not type(cand) or ref != cand:
        raise AssertionError(f"{contract.name}: non-tensor values differ: reference {ref!r}, candidate {cand!r}")
    return {}


def assert_equivalent(
    reference_fn,
    candidate_fn,
    inputs,
    contract: Contract,
    *,
    kwargs: dict | None = None,
    reference_fp64_fn=None,
    check_inputs: bool = True,
    fp64_audit: str = "warn",
) -> EquivalenceReport:
    """Run ``reference_fn`` and ``candidate_fn`` on the same inputs and check ``contract`` on every output.

    * ``inputs`` is the tuple of positional arguments (a single tensor is accepted); ``kwargs``
      optional keyword arguments. Both functions get their **own copy** of every tensor, with the
      same sizes, strides and storage offset (expanded / transposed / sliced inputs stay so), so an
      in-place candidate cannot corrupt the reference run.
    * Outputs may be any pytree (tensors, tuples, lists, dicts, HF ``ModelOutput``): the structures
      must be equal and the contract is checked leaf by leaf. Non-tensor leaves must be ``==``.
    * ``check_inputs`` (default True): the arguments after the call are compared too (a rewrite
      must keep in-place mutations of its inputs).
    * When ``contract.needs_fp64``, the fp64 reference is computed by calling
      ``reference_fp64_fn`` (default: ``reference_fn`` itself, or for an ``nn.Module`` a deep copy
      converted with ``.to(torch.float64)`` -- the given module is never mutated) on copies of the
      inputs whose floating tensors are upcast to float64. Functions that hard-code a dtype
      inside (captured graphs contain explicit casts) need an explicit ``reference_fp64_fn``; a
      floating fp64-reference output that is not float64 is reported as an error (TypeError).
    * ``fp64_audit`` (``"warn"`` default, ``"error"``, ``"off"``): the fp64 run is watched with a
      dispatch mode; an ATen op producing a floating tensor narrower than float64 inside it (an
      explicit cast, a float32 constant, HF's float32 rotary block) means the "fp64 reference" is
      partly computed in lower precision -- warn (``UserWarning`` naming the ops) or raise TypeError.

    Raises AssertionError naming every failing output path (e.g. ``output.logits``, ``output[1]``,
    ``args[0]``); returns an :class:`EquivalenceReport` of the measurements otherwise."""
    from torch.utils import _pytree as pytree

    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    inputs = tuple(inputs)
    kwargs = dict(kwargs or {})

    ref_args, ref_kwargs = _tree_map_tensors(_clone_preserving_layout, (inputs, kwargs))
    cand_args, cand_kwargs = _tree_map_tensors(_clone_preserving_layout, (inputs, kwargs))
    ref_out = reference_fn(*ref_args, **ref_kwargs)
    cand_out = candidate_fn(*cand_args, **cand_kwargs)

    ref_tree: dict = {"output": ref_out}
    cand_tree: dict = {"output": cand_out}
    if check_inputs:
        ref_tree.update(args=ref_args, kwargs=ref_kwargs)
        cand_tree.update(args=cand_args, kwargs=cand_kwargs)

    f64_leaves = None
    if contract.needs_fp64:
        f64_args, f64_kwargs = _tree_map_tensors(_upcast, (inputs, kwargs))
        fn64 = reference_fp64_fn if reference_fp64_fn is not None else _fp64_reference_fn(reference_fn)
        if fp64_audit not in ("warn", "error", "off"):
            raise ValueError(f"fp64_audit must be 'warn', 'error' or 'off', got {fp64_audit!r}")
        if fp64_audit == "off":
            f64_out = fn64(*f64_args, **f64_kwargs)
        else:
            audit = _Fp64Audit()
            with audit.mode:
                f64_out = fn64(*f64_args, **f64_kwargs)
            if audit.narrow:
                text = (
                    f"the fp64 reference computed some values in lower precision ({audit.summary()}); "
                    f"pass reference_fp64_fn= that computes in float64 throughout"
                )
                if fp64_audit == "error":
                    raise TypeError(text)
                import warnings

                warnings.warn(text, stacklevel=2)
        f64_tree: dict = {"output": f64_out}
        if check_inputs:
            f64_tree.update(args=f64_args, kwargs=f64_kwargs)
        f64_flat, f64_spec = pytree.tree_flatten_with_path(f64_tree)
        f64_leaves = [leaf for _, leaf in f64_flat]

    ref_flat, ref_spec = pytree.tree_flatten_with_path(ref_tree)
    cand_flat, cand_spec = pytree.tree_flatten_with_path(cand_tree)
    if ref_spec != cand_spec:
        raise AssertionError(
            f"{contract.name}: output structure differs:\n  reference: {ref_spec}\n  candidate: {cand_spec}"
        )
    if f64_leaves is not None and f64_spec != ref_spec:
        raise AssertionError(
            f"{contract.name}: the fp64 reference's output structure differs from the reference's:\n"
            f"  reference: {ref_spec}\n  fp64:      {f64_spec}"
        )

    entries: list[tuple[str, dict]] = []
    failures: list[str] = []
    for i, ((path, r), (_, c)) in enumerate(zip(ref_flat, cand_flat)):
        where = _path_str(path)
        f = f64_leaves[i] if f64_leaves is not None else None
        if (
            isinstance(f, Tensor)
            and isinstance(r, Tensor)
            and (r.is_floating_point() or r.is_complex())
            and f.dtype not in (torch.float64, torch.complex128)
        ):
            raise TypeError(
                f"{where}: the fp64 reference produced {f.dtype}, not float64 (the reference function "
                f"hard-codes a dtype); pass reference_fp64_fn= that computes in float64"
            )
        try:
            entries.append((where, _check_leaf(contract, r, c, f)))
        except AssertionError as exc:
            failures.append(f"{where}: {exc}")
    if failures:
        shown = failures[:5]
        more = f"\n  ... and {len(failures) - 5} more failing leaves" if len(failures) > 5 else ""
        raise AssertionError(
            f"{len(failures)} of {len(ref_flat)} leaves violate {contract.name}:\n  " + "\n  ".join(shown) + more
        )
    return EquivalenceReport(contract, entries)


def _path_str(path) -> str:
    from torch.utils import _pytree as pytree

    if not path:
        return "output"
    head, rest = path[0], path[1:]
    name = getattr(head, "key", str(head))
    return f"{name}{pytree.keystr(rest)}" if rest else str(name)
