"""On-disk kernel cache, safe with several processes and with other users on the machine.

Layout under the cache root (``get_config().cache_dir``, FXOPT_CACHE_DIR)::

    triton/<kernel_name>_<key>.py       generated Triton modules (written for tracebacks and
                                        for reading; executed from the text in memory)
    cuda/<symbol>_<key>/                load_inline build folders (one per source)
    cuda/<symbol>_<key>/kernel.cu       the standalone CUDA C (for nvcc -c checks)
    locks/<key>.lock                    fcntl locks held while compiling

``<key>`` is the first 20 hex digits of sha256(source + signature). Files are written
to a temp file in the same folder and ``os.replace``d into place (atomic), so a reader
never sees a half-written file. Compiles take an exclusive ``fcntl.flock`` so two
processes do not build the same extension at once (the second then finds it built).

Trust: what the cache holds runs as the user (Python modules, shared libraries), so the
root and every folder under it must be writable by the user alone. The root is created
0700; a root that is not a folder, is owned by someone else, is writable by group or
others, is not writable, or sits below a folder another user could move it out of (one
owned by another non-root user, or group/world-writable without the sticky bit) is
refused with a warning on ``logging.getLogger("fxopt")``, and the process uses a private
temporary folder (``mkdtemp``, removed at exit) instead: kernels still work, they are
just rebuilt each run. The same happens when writing an entry fails.

Generated Python never goes through the import system, so no ``__pycache__`` ``.pyc`` is
ever read or written: :func:`load_triton_module` compiles the very text whose hash names
the entry, and puts that text in ``linecache`` (where ``inspect``, and so Triton's JIT,
read kernel source) marked as not backed by a file, so what Triton compiles is that text
too. A cached file whose bytes differ (stale, truncated, not UTF-8, unreadable) is
rewritten; one that cannot be rewritten is bypassed through the fallback folder.

CUDA extensions are built by torch's ``load_inline`` in ``cuda/<name>/`` (0700, checked like
the root), so a planted ``.so`` or ``build.ninja`` needs write access to the user's own
folder. A torch ``lock`` file left there by a killed build (which would make every later
build wait forever) is removed while we hold the name's flock, and a cached library that
no longer loads is wiped and rebuilt once.

Triton's own cache (TRITON_CACHE_DIR, default ``~/.triton/cache``) is Triton's; fxopt does
not point it anywhere.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import linecache
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import types
from pathlib import Path
from typing import Callable, TypeVar

from ..config import get_config
from ..errors import CodegenError

log = logging.getLogger("fxopt")  # tests and users filter its warnings by this name

_MODULES: dict[str, types.ModuleType] = {}
_EXTENSIONS: dict[str, object] = {}
_LOCK = threading.Lock()
# configured root (as text) -> the private temporary folder used instead, for this process
_FALLBACKS: dict[str, Path] = {}
_FALLBACK_LOCK = threading.Lock()

_T = TypeVar("_T")


class _Refused(Exception):
    """A cache folder that must not be used (never leaves this module)."""


def cache_key(source: str, signature: str = "") -> str:
    h = hashlib.sha256()
    h.update(source.encode())
    h.update(b"\0")
    h.update(signature.encode())
    return h.hexdigest()[:20]


# --------------------------------------------------------------------------- folders


def _uid() -> int | None:
    """The effective uid; None where there are no POSIX owners (Windows: mode checks only)."""
    geteuid = getattr(os, "geteuid", None)
    return geteuid() if geteuid is not None else None


def _check_private(path: Path) -> None:
    """Refuse ``path`` unless it is a folder that only the current user can write."""
    st = os.stat(path)  # follows a symlink: the folder that would really be used
    if not stat.S_ISDIR(st.st_mode):
        raise _Refused(f"{path} is not a folder")
    uid = _uid()
    if uid is not None and st.st_uid != uid:
        raise _Refused(f"{path} is owned by uid {st.st_uid}, not by you (uid {uid})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _Refused(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})")
    if not os.access(path, os.W_OK | os.X_OK):
        raise _Refused(f"{path} is not writable")


def _check_ancestors(path: Path) -> None:
    """Refuse ``path`` if someone else could rename it away and put their own folder there."""
    uid = _uid()
    for parent in path.parents:
        st = os.stat(parent)
        if uid is not None and st.st_uid not in (0, uid):
            raise _Refused(f"{path} is inside {parent}, which is owned by uid {st.st_uid}")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            raise _Refused(
                f"{path} is inside {parent}, which others can write (mode {stat.S_IMODE(st.st_mode):04o}, "
                "no sticky bit)"
            )


def _private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if missing, then check it is private."""
    try:
        path.mkdir(mode=0o700, exist_ok=True)
    except FileExistsError:
        raise _Refused(f"{path} exists and is not a folder") from None
    except OSError as exc:
        raise _Refused(f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        _check_private(path)
    except OSError as exc:
        raise _Refused(f"cannot inspect {path}: {exc.strerror or exc}") from None
    return path


def _subdir(root: Path, *parts: str) -> Path:
    path = root
    for part in parts:
        path = _private_dir(path / part)
    return path


def _open_root(configured: Path) -> Path:
    path = Path(os.path.abspath(os.path.expanduser(configured)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _Refused(f"cannot create {path.parent}: {exc.strerror or exc}") from None
    _private_dir(path)
    real = Path(os.path.realpath(path))
    try:
        _check_ancestors(real)
    except OSError as exc:
        raise _Refused(f"cannot inspect the folders above {real}: {exc.strerror or exc}") from None
    return real


def _fall_back(configured: Path, reason: str) -> Path:
    """The private temporary root used, for the rest of this process, instead of ``configured``."""
    with _FALLBACK_LOCK:
        root = _FALLBACKS.get(str(configured))
        if root is None:
            try:
                root = Path(os.path.realpath(tempfile.mkdtemp(prefix="fxopt-cache-")))  # created 0700
            except OSError as exc:
                raise CodegenError(
                    f"kernel cache {configured} is not usable ({reason}), and no private temporary folder could be "
                    f"made either ({exc}); set FXOPT_CACHE_DIR to a folder only you can write"
                ) from exc
            atexit.register(shutil.rmtree, root, ignore_errors=True)
            _FALLBACKS[str(configured)] = root
            log.warning(
                "fxopt: not using kernel cache %s: %s. Using the private temporary folder %s for this process "
                "instead (kernels are rebuilt every run). Point FXOPT_CACHE_DIR at a folder that only you can "
                "write (fxopt creates it with mode 0700).",
                configured, reason, root,
            )
        return root


def cache_root() -> Path:
    """The kernel cache's root folder: FXOPT_CACHE_DIR if it is safe to use, else a private
    temporary folder (see the module docstring)."""
    configured = get_config().cache_dir
    fallback = _FALLBACKS.get(str(configured))
    if fallback is not None:
        return fallback
    try:
        return _open_root(configured)
    except _Refused as exc:
        return _fall_back(configured, str(exc))


def _with_root(op: Callable[[Path], _T]) -> tuple[Path, _T]:
    """Run ``op(root)``; if it fails on the file system, once more in the fallback root."""
    configured = get_config().cache_dir
    root = cache_root()
    try:
        return root, op(root)
    except (_Refused, OSError) as exc:
        if root == _FALLBACKS.get(str(configured)):
            raise CodegenError(f"kernel cache folder {root} failed: {exc}") from exc
        root = _fall_back(configured, str(exc))
    try:
        return root, op(root)
    except (_Refused, OSError) as exc:
        raise CodegenError(f"kernel cache folder {root} failed: {exc}") from exc


# --------------------------------------------------------------------------- files


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + rename); no-op if exactly these
    bytes are already there. Anything else there (other bytes, undecodable text, an
    unreadable file) is replaced."""
    want = data.encode() if isinstance(data, str) else bytes(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        if os.stat(path).st_size == len(want) and path.read_bytes() == want:
            return path
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(want)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def _flock(lock_dir: Path, name: str):
    with open(lock_dir / f"{name}.lock", "a+") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def file_lock(name: str):
    """An exclusive inter-process lock (``fcntl.flock``) named ``name``."""
    _, lock_dir = _with_root(lambda root: _subdir(root, "locks"))
    with _flock(lock_dir, name):
        yield


# --------------------------------------------------------------------------- Triton modules


def _exec_source(mod_name: str, path: Path, source: str) -> types.ModuleType:
    """A module made by executing ``source`` itself (not whatever the file or a .pyc holds)."""
    filename = str(path)
    lines = source.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    # mtime None: linecache.checkcache never swaps this entry for the file's current bytes
    linecache.cache[filename] = (len(source), None, lines, filename)
    try:
        code = compile(source, filename, "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise CodegenError(f"generated Triton source {path} does not compile: {exc}") from exc
    mod = types.ModuleType(mod_name)
    mod.__file__ = filename
    sys.modules[mod_name] = mod  # triton resolves globals through the module
    try:
        exec(code, mod.__dict__)
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise CodegenError(f"generated Triton source {path} does not import: {exc}") from exc
    return mod


def load_triton_module(kernel_name: str, source: str, signature: str = "") -> types.ModuleType:
    """Write ``source`` to the cache (once) and execute it as a module; memoised per process."""
    key = cache_key(source, signature)
    mod_name = f"fxopt_gen_{kernel_name}_{key}"
    with _LOCK:
        mod = _MODULES.get(mod_name)
        if mod is not None:
            return mod
        filename = f"{kernel_name}_{key}.py"
        _, path = _with_root(lambda root: atomic_write(_subdir(root, "triton") / filename, source))
        mod = _exec_source(mod_name, path, source)
        _MODULES[mod_name] = mod
        log.debug("loaded Triton module %s", path)
        return mod


# --------------------------------------------------------------------------- CUDA extensions


def _remove_build_outputs(build_dir: Path) -> None:
    """Empty a build folder except the sources we wrote (a fresh build follows)."""
    for entry in build_dir.iterdir():
        if entry.name == "kernel.cu":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def build_cuda_extension(symbol: str, cuda_source: str, cpp_source: str, signature: str = ""):
    """Build (or load from the cache) a ``load_inline`` extension exposing ``run``."""
    key = cache_key(cuda_source + "\0" + cpp_source, signature)
    name = f"{symbol}_{key}"
    with _LOCK:
        ext = _EXTENSIONS.get(name)
        if ext is not None:
            return ext

    def prepare(root: Path) -> tuple[Path, Path]:
        build_dir = _subdir(root, "cuda", name)
        atomic_write(build_dir / "kernel.cu", cuda_source)
        return build_dir, _subdir(root, "locks")

    _, (build_dir, lock_dir) = _with_root(prepare)
    from torch.utils.cpp_extension import load_inline

    def build(extra_cflags: list[str]):
        return load_inline(
            name=name,
            cpp_sources=[cpp_source],
            cuda_sources=[cuda_source],
            functions=["run"],
            extra_cuda_cflags=["-O3"],
            extra_cflags=extra_cflags,
            build_directory=str(build_dir),
            verbose=get_config().debug >= 2,
        )

    with _flock(lock_dir, name):
        # torch's own lock file: under our flock no live build of this name owns it, so one that
        # is there was left by a killed build and would make load_inline wait for ever
        with contextlib.suppress(FileNotFoundError):
            os.unlink(build_dir / "lock")
        had_library = any(build_dir.glob(f"{name}*.so"))
        try:
            ext = build(["-O2"])
        except Exception as exc:
            if not had_library:
                raise CodegenError(f"building CUDA extension {name} failed: {exc}") from exc
            # a library from an earlier run that does not load (truncated by a killed link, ...):
            # build from scratch; the extra flag makes torch's in-process versioner build again
            log.warning("fxopt: cached CUDA extension %s did not load (%s); rebuilding it", name, exc)
            _remove_build_outputs(build_dir)
            try:
                ext = build(["-O2", "-DFXOPT_REBUILD=1"])
            except Exception as exc2:
                raise CodegenError(f"building CUDA extension {name} failed: {exc2}") from exc2
    with _LOCK:
        _EXTENSIONS[name] = ext
    return ext


# --------------------------------------------------------------------------- nvcc


def nvcc_path() -> str | None:
    """The nvcc executable, if installed (``$CUDA_HOME/bin`` or ``PATH``)."""
    for base in (get_config().cuda_home, "/usr/local/cuda"):
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
