"""Shared pytest setup: Hypothesis profiles.

``ci``  -- derandomized (same examples every run), no deadline, 50 examples, ``too_slow`` suppressed.
``dev`` -- randomized, 500 examples, no deadline (for local bug hunting).

The active profile is ``fxopt.config.get_config().hypothesis_profile`` (env FXOPT_HYPOTHESIS_PROFILE,
default ``ci``). Tests that need a different example count use ``@settings(max_examples=...)``,
which overrides only that field of the loaded profile.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from fxopt import config
from fxopt.config import get_config

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=50,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=500,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)

_profile = get_config().hypothesis_profile
if _profile not in ("ci", "dev"):
    raise RuntimeError(f"FXOPT_HYPOTHESIS_PROFILE={_profile!r}: expected 'ci' or 'dev'")
settings.load_profile(_profile)


@pytest.fixture(autouse=True)
def _fresh_config_snapshot():
    """Launch paths read fxopt.config.current(), a process snapshot of the environment: retake
    it after each test, so a test's monkeypatched FXOPT_* variables do not leak into the next."""
    yield
    config.refresh()
