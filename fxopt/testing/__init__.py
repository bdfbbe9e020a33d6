"""The equivalence harness: numerical contracts, ``assert_equivalent`` and Hypothesis strategies.

Contracts (:mod:`fxopt.testing.contracts`)::

    from fxopt.testing import assert_equivalent, bitwise, ulp, fp64_relative
    assert_equivalent(original_gm, rewritten_gm, (x, y), ulp(1))

Strategies (:mod:`fxopt.testing.strategies`, needs ``hypothesis``) are imported lazily so that
importing the contracts never requires hypothesis.
"""
from __future__ import annotations

from .contracts import (
    AllOf,
    Bitwise,
    Contract,
    EquivalenceReport,
    ExactValue,
    Fp64Elementwise,
    Fp64Relative,
    Rounded,
    Ulp,
    all_of,
    assert_equivalent,
    bitwise,
    exact_fma,
    fma_rounding,
    fp64_elementwise,
    fp64_relative,
    round_exact,
    rounded,
    ulp,
    ulp_distance,
)

__all__ = [
    "Contract",
    "Bitwise",
    "Ulp",
    "Fp64Relative",
    "Fp64Elementwise",
    "AllOf",
    "Rounded",
    "ExactValue",
    "EquivalenceReport",
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
]


def __getattr__(name: str):
    if name == "strategies":
        import importlib

        return importlib.import_module(".strategies", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
