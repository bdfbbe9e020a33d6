"""The one place where fxopt reads its environment.

Every knob is read when asked for (not at import), so tests can set variables with
``monkeypatch.setenv`` and see the effect immediately.

| variable                    | meaning                                              | default              |
|-----------------------------|------------------------------------------------------|----------------------|
| FXOPT_DEBUG                 | 0 quiet, 1 pass summaries, 2 per-rule detail, 3 dumps | 0                    |
| FXOPT_DUMP_DIR              | where debug dumps (graphs, kernel source) go         | unset (no dumps)     |
| FXOPT_CACHE_DIR             | on-disk kernel cache                                 | ~/.cache/fxopt       |
| FXOPT_BACKEND               | codegen backend: triton, cuda, torch                 | triton               |
| FXOPT_SHAPE_CACHE_SIZE      | specialisations kept per OptimizedModule             | 8                    |
| FXOPT_FUZZ_EXAMPLES         | examples for the fuzz tests                          | 200                  |
| FXOPT_HYPOTHESIS_PROFILE    | hypothesis profile for the tests (ci, dev)           | ci                   |
| FXOPT_PROGRESS              | print capture progress for long captures (0/1)       | 1 when stderr is tty |
| FXOPT_SCAN_EXP              | exp(delta A) in the GPU selective scan: auto (sfu    | auto                 |
|                             | on GPUs where its bias correction was calibrated:    |                      |
|                             | sm_90; fma elsewhere), fma (FMA-pipe polynomial,     |                      |
|                             | <= 1 ulp, unbiased: the contract by construction) or |                      |
|                             | sfu (the special-function unit, bias-corrected:      |                      |
|                             | within the contract as measured, ~1.5x faster at     |                      |
|                             | large sizes); see fxopt/codegen/exp2.py              |                      |
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:  # a clear message beats a ValueError from deep inside
        from .errors import FxoptError

        raise FxoptError(f"environment variable {name}={raw!r} must be an integer") from exc


@dataclass(frozen=True)
class Config:
    debug: int
    dump_dir: Path | None
    cache_dir: Path
    backend: str
    shape_cache_size: int
    fuzz_examples: int
    hypothesis_profile: str
    progress: bool
    scan_exp: str


def get_config() -> Config:
    dump = os.environ.get("FXOPT_DUMP_DIR")
    cache = os.environ.get("FXOPT_CACHE_DIR") or str(Path.home() / ".cache" / "fxopt")
    progress_env = os.environ.get("FXOPT_PROGRESS")
    progress = sys.stderr.isatty() if progress_env is None else progress_env not in ("0", "", "false")
    return Config(
        debug=_int("FXOPT_DEBUG", 0),
        dump_dir=Path(dump) if dump else None,
        cache_dir=Path(cache),
        backend=backend(),
        shape_cache_size=max(1, _int("FXOPT_SHAPE_CACHE_SIZE", 8)),
        fuzz_examples=_int("FXOPT_FUZZ_EXAMPLES", 200),
        hypothesis_profile=os.environ.get("FXOPT_HYPOTHESIS_PROFILE", "ci"),
        progress=progress,
        scan_exp=scan_exp(),
    )


SCAN_EXP_CHOICES = ("auto", "fma", "sfu")


def scan_exp() -> str:
    """FXOPT_SCAN_EXP: how the GPU selective-scan kernel evaluates exp(delta A) (read per call;
    ``auto`` is resolved per device by :func:`fxopt.codegen.scan_gluon.resolve_exp`)."""
    raw = os.environ.get("FXOPT_SCAN_EXP", "auto").strip().lower() or "auto"
    if raw not in SCAN_EXP_CHOICES:
        from .errors import FxoptError

        raise FxoptError(f"environment variable FXOPT_SCAN_EXP={raw!r} must be one of {', '.join(SCAN_EXP_CHOICES)}")
    return raw


# FXOPT_BACKEND is read on every fused-kernel launch (so a benchmark can switch
# backends between runs). os.environ.get costs ~1.5 us, as much as the rest of the
# launch key, so the hot path reads os.environ's underlying dict directly.
try:
    _ENV_DATA = os.environ._data  # type: ignore[attr-defined]
    _BACKEND_KEY = os.environ.encodekey("FXOPT_BACKEND")  # type: ignore[attr-defined]

    def backend_raw():
        """FXOPT_BACKEND as stored (bytes or None): a cheap cache-key component."""
        return _ENV_DATA.get(_BACKEND_KEY)
except AttributeError:  # pragma: no cover - non-CPython

    def backend_raw():
        return os.environ.get("FXOPT_BACKEND")


try:
    _SCAN_EXP_KEY = os.environ.encodekey("FXOPT_SCAN_EXP")  # type: ignore[attr-defined]

    def scan_exp_raw():
        """FXOPT_SCAN_EXP as stored (bytes or None): a cheap cache-key component."""
        return _ENV_DATA.get(_SCAN_EXP_KEY)
except (AttributeError, NameError):  # pragma: no cover - non-CPython

    def scan_exp_raw():
        return os.environ.get("FXOPT_SCAN_EXP")


def backend() -> str:
    """The codegen backend: triton (default), cuda or torch."""
    return os.environ.get("FXOPT_BACKEND", "triton")


def debug_log(level: int, msg: str) -> None:
    """Print ``msg`` to stderr when FXOPT_DEBUG >= level."""
    if get_config().debug >= level:
        print(f"[fxopt] {msg}", file=sys.stderr)
