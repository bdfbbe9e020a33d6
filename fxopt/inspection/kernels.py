"""The ``kernels/`` folder: the source of the kernels the rewritten graph runs, one file each.

Sources come from :func:`fxopt.codegen.kernel_sources` (each op family registers a provider that
says, for a node's shapes, dtypes and device, which kernel its launch runs and returns that
kernel's source -- not whole modules, and under ``TRITON_INTERPRET=1`` the kernel, not Triton's
interpreter)."""
from __future__ import annotations

import re


def kernel_sources(graph_module) -> dict[str, str]:
    try:
        from .. import codegen
    except ImportError:  # pragma: no cover - codegen needs nothing optional to import
        return {}
    fn = getattr(codegen, "kernel_sources", None)  # looked up per call: tests replace it
    return dict(fn(graph_module) or {}) if fn is not None else {}


def kernel_filename(name: str, source: str, used: set[str]) -> str:
    """A file name for kernel ``name``: its language's extension, unique within ``used``."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "kernel"
    if "@triton.jit" in source or "import triton" in source or "@gluon.jit" in source:
        ext = ".py"
    elif "__global__" in source or "#include" in source:
        ext = ".cu"
    else:
        ext = ".txt"
    if stem.endswith(ext):
        stem = stem[: -len(ext)]
    fname, k = stem + ext, 1
    while fname in used:
        k += 1
        fname = f"{stem}_{k}{ext}"
    used.add(fname)
    return fname
