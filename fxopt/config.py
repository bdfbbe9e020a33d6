"""The one place where fxopt reads its environment.

:func:`read_environment` is the only code in fxopt that reads ``os.environ`` (a test walks the
package to keep it so); everything else asks for a :class:`Config` snapshot:

* :func:`get_config` -- a fresh snapshot, read when asked for (not at import), so
  ``monkeypatch.setenv`` shows at the next call. Entry points (optimize, capture, the pass
  manager, the kernel cache) use it.
* :func:`current` -- the process snapshot for hot paths (every fused-kernel launch keys its
  launcher on the backend and the scan's exp mode; re-reading the environment there would cost
  as much as the rest of the launch key). Taken on first use; :func:`refresh` re-takes it after
  ``os.environ`` was changed in-process (benchmarks that switch backends between runs do).

| variable                    | meaning                                              | default              |
|-----------------------------|------------------------------------------------------|----------------------|
| FXOPT_DEBUG                 | log level of the ``fxopt`` logger: 0 warnings only,  | 0                    |
|                             | 1 INFO (pass summaries), 2 DEBUG (rule rejections,   |                      |
|                             | cycle checks), 3 DEBUG plus graph dumps (below)      |                      |
| FXOPT_DUMP_DIR              | dump each pass's graph after each pass that changed  | unset (no dumps;     |
|                             | it: ``<dir>/<run>/<nn>_<pass>.txt``                  | FXOPT_DEBUG=3: cache |
|                             |                                                      | dir/dumps)           |
| FXOPT_CACHE_DIR             | on-disk kernel cache                                 | ~/.cache/fxopt       |
| FXOPT_BACKEND               | codegen backend: triton, cuda, torch                 | triton               |
| FXOPT_SHAPE_CACHE_SIZE      | specialisations kept per OptimizedModule             | 8                    |
| FXOPT_FUZZ_EXAMPLES         | examples for the fuzz tests                          | 200                  |
| FXOPT_HYPOTHESIS_PROFILE    | hypothesis profile for the tests (ci, dev)           | ci                   |
| FXOPT_PROGRESS              | log capture progress for long captures (0/1)         | 1 when stderr is tty |
| FXOPT_SCAN_EXP              | exp(delta A) in the GPU selective scan: auto (sfu    | auto                 |
|                             | on GPUs where its bias correction was calibrated:    |                      |
|                             | sm_90; fma elsewhere), fma (FMA-pipe polynomial,     |                      |
|                             | <= 1 ulp, unbiased: the contract by construction) or |                      |
|                             | sfu (the special-function unit, bias-corrected:      |                      |
|                             | within the contract as measured, ~1.5x faster at     |                      |
|                             | large sizes); see fxopt/codegen/exp2.py              |                      |
| FXOPT_REGION_EMIT           | how region kernels address slices / cats: parts     | parts                |
|                             | (each contiguous column part of an output is its own |                      |
|                             | dense tile at a constant column offset) or rows (the |                      |
|                             | earlier emission: every value over the whole row,    |                      |
|                             | cats as where-selects; kept for side-by-side timing) |                      |
| CUDA_HOME / CUDA_PATH       | where nvcc is looked for (then /usr/local/cuda, PATH)| unset                |
| TRITON_INTERPRET            | Triton's interpreter (read here for fxopt's own      | unset                |
|                             | interpreter workarounds; Triton reads it itself)     |                      |
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from . import logs

SCAN_EXP_CHOICES = ("auto", "fma", "sfu")
BACKENDS = ("triton", "cuda", "torch")
REGION_EMIT_CHOICES = ("parts", "rows")


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
    cuda_home: Path | None = None  # CUDA_HOME, else CUDA_PATH
    triton_interpret: bool = False
    region_emit: str = "parts"

    @property
    def dumps(self) -> Path | None:
        """Where pass-by-pass graph dumps go: FXOPT_DUMP_DIR, or with FXOPT_DEBUG=3 and no
        FXOPT_DUMP_DIR ``<cache dir>/dumps``; None: no dumps."""
        if self.dump_dir is not None:
            return self.dump_dir
        return self.cache_dir / "dumps" if self.debug >= 3 else None


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:  # a clear message beats a ValueError from deep inside
        from .errors import FxoptError

        raise FxoptError(f"environment variable {name}={raw!r} must be an integer") from exc


def _scan_exp(env: Mapping[str, str]) -> str:
    raw = env.get("FXOPT_SCAN_EXP", "auto").strip().lower() or "auto"
    if raw not in SCAN_EXP_CHOICES:
        from .errors import FxoptError

        raise FxoptError(f"environment variable FXOPT_SCAN_EXP={raw!r} must be one of {', '.join(SCAN_EXP_CHOICES)}")
    return raw


def _region_emit(env: Mapping[str, str]) -> str:
    raw = env.get("FXOPT_REGION_EMIT", "parts").strip().lower() or "parts"
    if raw not in REGION_EMIT_CHOICES:
        from .errors import FxoptError

        raise FxoptError(f"environment variable FXOPT_REGION_EMIT={raw!r} must be one of "
                         f"{', '.join(REGION_EMIT_CHOICES)}")
    return raw


def read_environment(env: Mapping[str, str] | None = None) -> Config:
    """A snapshot of every knob from ``env`` (default: ``os.environ``). The only reader."""
    env = os.environ if env is None else env
    dump = env.get("FXOPT_DUMP_DIR")
    cache = env.get("FXOPT_CACHE_DIR") or str(Path.home() / ".cache" / "fxopt")
    progress_env = env.get("FXOPT_PROGRESS")
    progress = sys.stderr.isatty() if progress_env is None else progress_env not in ("0", "", "false")
    cuda = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    return Config(
        debug=_int(env, "FXOPT_DEBUG", 0),
        dump_dir=Path(dump) if dump else None,
        cache_dir=Path(cache),
        backend=env.get("FXOPT_BACKEND", "triton"),
        shape_cache_size=max(1, _int(env, "FXOPT_SHAPE_CACHE_SIZE", 8)),
        fuzz_examples=_int(env, "FXOPT_FUZZ_EXAMPLES", 200),
        hypothesis_profile=env.get("FXOPT_HYPOTHESIS_PROFILE", "ci"),
        progress=progress,
        scan_exp=_scan_exp(env),
        cuda_home=Path(cuda) if cuda else None,
        triton_interpret=env.get("TRITON_INTERPRET", "0") not in ("0", "", "false", "False"),
        region_emit=_region_emit(env),
    )


def get_config() -> Config:
    """The environment as it is now (a fresh snapshot)."""
    return read_environment()


_CURRENT: Config | None = None


def current() -> Config:
    """The process snapshot hot paths read (taken on first use; see :func:`refresh`)."""
    cfg = _CURRENT
    return cfg if cfg is not None else refresh()


def refresh() -> Config:
    """Re-read the environment into the process snapshot (after changing ``os.environ``)."""
    global _CURRENT
    _CURRENT = read_environment()
    return _CURRENT


def scan_exp() -> str:
    """FXOPT_SCAN_EXP as set now: how the GPU selective-scan kernel evaluates exp(delta A)
    (``auto`` is resolved per device by :func:`fxopt.codegen.scan_config.resolve_exp`)."""
    return get_config().scan_exp


def backend() -> str:
    """FXOPT_BACKEND as set now: triton (default), cuda or torch."""
    return get_config().backend


def backend_raw() -> str:
    """The launch paths' backend (the process snapshot): a cheap cache-key component."""
    cfg = _CURRENT
    return (cfg if cfg is not None else refresh()).backend


def scan_exp_raw() -> str:
    """The launch paths' FXOPT_SCAN_EXP (the process snapshot): a cheap cache-key component."""
    cfg = _CURRENT
    return (cfg if cfg is not None else refresh()).scan_exp


def region_emit_raw() -> str:
    """The launch paths' FXOPT_REGION_EMIT (the process snapshot): a cheap cache-key component."""
    cfg = _CURRENT
    return (cfg if cfg is not None else refresh()).region_emit


def debug_log(level: int, msg: str, logger: str = "fxopt") -> None:
    """Log ``msg`` on the ``fxopt`` logger: level 1 at INFO, 2 and up at DEBUG (kept for code
    written against the old FXOPT_DEBUG printer; new code logs through :mod:`fxopt.logs`)."""
    logs.configure(get_config())
    logs.logging.getLogger(logger).log(logs.level_for(level) or logs.logging.INFO, "%s", msg)
