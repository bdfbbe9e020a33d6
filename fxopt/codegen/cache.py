"""On-disk kernel cache, safe with several processes.

Layout under ``get_config().cache_dir``::

    triton/<kernel_name>_<key>.py       generated Triton modules (imported from there:
                                        Triton's JIT needs a real file for inspect)
    cuda/<symbol>_<key>/                load_inline build folders (one per source)
    cuda/<symbol>_<key>/kernel.cu       the standalone CUDA C (for nvcc -c checks)
    locks/<key>.lock                    fcntl locks held while compiling

``<key>`` is the first 20 hex digits of sha256(source + signature). Files are written
to a temp file in the same folder and ``os.replace``d into place (atomic), so a reader
never sees a half-written file. Compiles take an exclusive ``fcntl.flock`` so two
processes do not build the same extension at once (the second then finds it built).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from ..config import debug_log, get_config
from ..errors import CodegenError

_MODULES: dict[str, ModuleType] = {}
_EXTENSIONS: dict[str, object] = {}
_LOCK = threading.Lock()


def cache_key(source: str, signature: str = "") -> str:
    h = hashlib.sha256()
    h.update(source.encode())
    h.update(b"\0")
    h.update(signature.encode())
    return h.hexdigest()[:20]


def cache_root() -> Path:
    root = get_config().cache_dir
    root.mkdir(parents=True, exist_ok=True)
    return root


def atomic_write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file + rename); no-op if the same
    content is already there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        try:
            if path.read_text() == text:
                return path
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def file_lock(name: str):
    """An exclusive inter-process lock (``fcntl.flock``) named ``name``."""
    lock_dir = cache_root() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"{name}.lock"
    with open(path, "a+") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        try:
            yield
        finally:
            try:
                import fcntl

                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            except ImportError:  # pragma: no cover
                pass


def load_triton_module(kernel_name: str, source: str, signature: str = "") -> ModuleType:
    """Write ``source`` to the cache (once) and import it; memoised per process."""
    key = cache_key(source, signature)
    mod_name = f"fxopt_gen_{kernel_name}_{key}"
    with _LOCK:
        mod = _MODULES.get(mod_name)
        if mod is not None:
            return mod
        path = atomic_write(cache_root() / "triton" / f"{kernel_name}_{key}.py", source)
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise CodegenError(f"cannot import generated kernel module {path}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod  # triton resolves globals through the module
        try:
            spec.loader.exec_module(mod)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise CodegenError(f"generated Triton source {path} does not import: {exc}") from exc
        _MODULES[mod_name] = mod
        debug_log(2, f"codegen: loaded Triton module {path}")
        return mod


def build_cuda_extension(symbol: str, cuda_source: str, cpp_source: str, signature: str = ""):
    """Build (or load from the cache) a ``load_inline`` extension exposing ``run``."""
    key = cache_key(cuda_source + "\0" + cpp_source, signature)
    name = f"{symbol}_{key}"
    with _LOCK:
        ext = _EXTENSIONS.get(name)
        if ext is not None:
            return ext
    build_dir = cache_root() / "cuda" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(build_dir / "kernel.cu", cuda_source)
    from torch.utils.cpp_extension import load_inline

    with file_lock(name):
        try:
            ext = load_inline(
                name=name,
                cpp_sources=[cpp_source],
                cuda_sources=[cuda_source],
                functions=["run"],
                extra_cuda_cflags=["-O3"],
                extra_cflags=["-O2"],
                build_directory=str(build_dir),
                verbose=get_config().debug >= 2,
            )
        except Exception as exc:
            raise CodegenError(f"building CUDA extension {name} failed: {exc}") from exc
    with _LOCK:
        _EXTENSIONS[name] = ext
    return ext


def nvcc_path() -> str | None:
    """The nvcc executable, if installed (``$CUDA_HOME/bin`` or ``PATH``)."""
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base:
            cand = Path(base) / "bin" / "nvcc"
            if cand.exists():
                return str(cand)
    return shutil.which("nvcc")


def nvcc_compile_check(source: str, arch: str = "sm_80", workdir: Path | None = None) -> Path:
    """Compile ``source`` with ``nvcc -c`` (no GPU needed); returns the object file.
    Raises :class:`CodegenError` with nvcc's output on failure."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise CodegenError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    workdir = workdir or Path(tempfile.mkdtemp(prefix="fxopt_nvcc_"))
    src = atomic_write(workdir / "kernel.cu", source)
    obj = workdir / "kernel.o"
    proc = subprocess.run(
        [nvcc, "-c", f"-arch={arch}", "-O3", "-std=c++17", str(src), "-o", str(obj)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise CodegenError(f"nvcc failed on generated source:\n{proc.stdout}\n{proc.stderr}")
    return obj
