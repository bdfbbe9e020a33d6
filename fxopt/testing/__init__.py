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
    Fp64Elementwise,
    Fp64Relative,
    Ulp,
    all_of,
    assert_equivalent,
    bitwise,
    fp64_elementwise,
    fp64_relative,
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
    "EquivalenceReport",
    "bitwise",
    "ulp",
    "fp64_relative",
    "fp64_elementwise",
    "all_of",
    "ulp_distance",
    "assert_equivalent",
]


def __getattr__(name: str):
    if name == "strategies":
        import importlib

        return importlib.import_module(".strategies", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
