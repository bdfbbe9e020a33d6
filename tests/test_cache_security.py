"""The kernel cache runs what it holds as the user: it must only use a folder the user alone can
write, execute exactly the text whose hash names an entry (never a planted ``.pyc``), and heal or
bypass broken entries and folders instead of raising (fxopt/codegen/cache.py).

These tests run as root here, and the kernel never refuses root a write: where a test needs the
kernel's answer for an ordinary user, it says so and patches the one call that asks."""
from __future__ import annotations

import importlib._bootstrap_external as bootstrap_external
import importlib.util
import inspect
import linecache
import logging
import os
import stat
import sys
import tempfile
from pathlib import Path

import pytest

from fxopt.codegen import cache
from fxopt.errors import CodegenError

IS_ROOT = os.geteuid() == 0
OTHER_UID = 65534  # nobody


@pytest.fixture(autouse=True)
def _fresh_cache_state(monkeypatch):
    # each test starts like a new process: nothing memoised, no fallback chosen yet
    monkeypatch.setattr(cache, "_MODULES", {})
    monkeypatch.setattr(cache, "_EXTENSIONS", {})
    monkeypatch.setattr(cache, "_FALLBACKS", {}, raising=False)


def _source(tag: str) -> str:
    return f"VALUE = {tag!r}\n\ndef f():\n    return VALUE\n"


def _entry(root: Path, name: str, source: str, signature: str = "") -> Path:
    return root / "triton" / f"{name}_{cache.cache_key(source, signature)}.py"


def _load(name: str, source: str):
    mod = cache.load_triton_module(name, source)
    sys.modules.pop(mod.__name__, None)
    return mod


def _assert_refused(caplog, refused: Path, mod, expected_reason: str):
    """The module loaded from a private folder elsewhere, nothing was written into ``refused``,
    and the warning (on the 'fxopt' logger) names the folder and the reason."""
    assert mod.f() == mod.VALUE
    assert not Path(mod.__file__).resolve().is_relative_to(refused.resolve())
    fallback = Path(mod.__file__).parents[1]
    assert stat.S_IMODE(fallback.stat().st_mode) == 0o700 and fallback.stat().st_uid == os.geteuid()
    msgs = [r.getMessage() for r in caplog.records if r.name == "fxopt" and r.levelno == logging.WARNING]
    assert len(msgs) == 1, msgs
    assert str(refused) in msgs[0] and expected_reason in msgs[0] and "FXOPT_CACHE_DIR" in msgs[0], msgs[0]


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.is_dir() else []


# --------------------------------------------------------------------------- what runs


def _plant_pyc(py: Path, marker: Path, kind: str) -> Path:
    """A .pyc beside ``py`` that Python's import system would take for it: it writes ``marker``."""
    evil = compile(f"open({str(marker)!r}, 'w').write('ran')\nVALUE = 'evil'\ndef f():\n    return VALUE\n",
                   str(py), "exec")
    if kind == "timestamp":  # header matches the .py's mtime and size: loaded without reading the .py
        st = py.stat()
        data = bootstrap_external._code_to_timestamp_pyc(evil, int(st.st_mtime), st.st_size)
    else:  # an unchecked hash-based .pyc is loaded whatever the .py holds
        data = bootstrap_external._code_to_hash_pyc(evil, b"\0" * 8, checked=False)
    pyc = Path(importlib.util.cache_from_source(str(py)))
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(data)
    return pyc


@pytest.mark.parametrize("kind", ["timestamp", "unchecked_hash"])
def test_planted_pyc_never_runs(tmp_path, monkeypatch, kind):
    root = tmp_path / "cache"
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(root))
    src = _source("good")
    first = _load("pyc_probe", src)
    assert first.f() == "good"
    py = _entry(root, "pyc_probe", src)
    assert py.read_text() == src
    assert not (py.parent / "__pycache__").exists()  # nothing the import system could pick up later
    marker = tmp_path / "marker"
    _plant_pyc(py, marker, kind)
    monkeypatch.setattr(cache, "_MODULES", {})  # a later process
    again = _load("pyc_probe", src)
    assert not marker.exists(), "the planted .pyc ran"
    assert again.f() == "good"


def test_inspect_reads_the_checked_text_not_the_file(tmp_path, monkeypatch):
    """Triton's JIT reads a kernel's text through inspect; it must get the text that was hashed."""
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path / "cache"))
    src = _source("seen")
    mod = _load("inspect_probe", src)
    Path(mod.__file__).write_text(_source("swapped") + "# longer, so size and mtime differ\n")
    linecache.checkcache()
    assert inspect.getsource(mod) == src
    assert inspect.getsourcelines(mod.f)[1] == 3


def test_triton_kernel_loads_and_runs_through_the_cache(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path / "cache"))
    src = (
        "import triton\nimport triton.language as tl\n\n@triton.jit\n"
        "def plus_one(x_ptr, y_ptr, N: tl.constexpr):\n"
        "    i = tl.arange(0, N)\n    tl.store(y_ptr + i, tl.load(x_ptr + i) + 1)\n"
    )
    mod = cache.load_triton_module("plus_one", src, signature="interpret=True")
    x = torch.arange(8, dtype=torch.float32)
    y = torch.empty_like(x)
    mod.plus_one[(1,)](x, y, N=8)
    assert torch.equal(y, x + 1)


# --------------------------------------------------------------------------- the cache folder


def test_new_cache_dir_is_private(tmp_path, monkeypatch):
    root = tmp_path / "a" / "b" / "cache"
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(root))
    mod = _load("private_probe", _source("p"))
    assert Path(mod.__file__).parent == root / "triton"
    for d in (root, root / "triton"):
        st = d.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid(), (d, oct(st.st_mode))
    assert stat.S_IMODE(Path(mod.__file__).stat().st_mode) & 0o077 == 0
    with cache.file_lock("probe"):
        pass
    assert stat.S_IMODE((root / "locks").stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777, 0o722])
def test_group_or_world_writable_dir_is_refused(tmp_path, monkeypatch, caplog, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(shared))
    with caplog.at_level(logging.WARNING, logger="fxopt"):
        mod = _load("shared_probe", _source("s"))
    _assert_refused(caplog, shared, mod, "writable by group or others")
    assert _tree(shared) == []
    # one warning per process, not per kernel
    with caplog.at_level(logging.WARNING, logger="fxopt"):
        _load("shared_probe2", _source("s2"))
    assert len([r for r in caplog.records if r.name == "fxopt"]) == 1


def _owned_by_someone_else(path: Path, monkeypatch) -> None:
    if IS_ROOT:
        os.chown(path, OTHER_UID, OTHER_UID)
        return
    # an ordinary user cannot chown: report another owner for this one folder
    real_stat = os.stat

    def fake_stat(p, *a, **kw):
        st = real_stat(p, *a, **kw)
        if os.path.realpath(p) == os.path.realpath(path):
            fields = list(st[:10])
            fields[stat.ST_UID] = os.geteuid() + 1
            return os.stat_result(fields)
        return st

    monkeypatch.setattr(os, "stat", fake_stat)


def test_dir_owned_by_another_user_is_refused(tmp_path, monkeypatch, caplog):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    _owned_by_someone_else(theirs, monkeypatch)
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(theirs))
    with caplog.at_level(logging.WARNING, logger="fxopt"):
        mod = _load("owner_probe", _source("o"))
    _assert_refused(caplog, theirs, mod, "owned by uid")
    assert _tree(theirs) == []


def test_symlink_to_a_shared_dir_is_refused(tmp_path, monkeypatch, caplog):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    link = tmp_path / "link"
    link.symlink_to(shared)
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(link))
    with caplog.at_level(logging.WARNING, logger="fxopt"):
        mod = _load("link_probe", _source("l"))
    _assert_refused(caplog, link, mod, "writable by group or others")
    assert _tree(shared) == []


def test_dir_inside_a_folder_others_can_write_is_refused(tmp_path, monkeypatch, caplog):
    """Whoever can write the parent can rename the user's folder away and put their own there."""
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    os.chmod(open_parent, 0o777)  # no sticky bit
    mine = open_parent / "cache"
    mine.mkdir(mode=0o700)
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(mine))
    with caplog.at_level(logging.WARNING, logger="fxopt"):
        mod = _load("ancestor_probe", _source("a"))
    _assert_refused(caplog, mine, mod, "others can write")
    assert _tree(mine) == []


def test_file_where_the_dir_should_be(tmp_path, monkeypatch, caplog):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(a_file))
    with caplog.at_level(logging.WARNING, logger="fxopt"):
        mod = _load("file_probe", _source("f"))
        with cache.file_lock("file_probe"):
            pass
    _assert_refused(caplog, a_file, mod, "not a folder")
    assert a_file.read_text() == "not a folder"


def test_file_where_a_parent_or_subfolder_should_be(tmp_path, monkeypatch, caplog):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(a_file / "cache"))
    with caplog.at_level(logging.WARNING, logger="fxopt"):
        mod = _load("parent_probe", _source("pp"))
    _assert_refused(caplog, a_file / "cache", mod, "cannot create")

    caplog.clear()
    root = tmp_path / "cache2"
    root.mkdir(mode=0o700)
    (root / "triton").write_text("x")
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(root))
    with caplog.at_level(logging.WARNING, logger="fxopt"):
        mod = _load("sub_probe", _source("sp"))
    _assert_refused(caplog, root, mod, "not a folder")


def test_read_only_dir_is_bypassed(tmp_path, monkeypatch, caplog):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o700)
    os.chmod(ro, 0o500)
    if IS_ROOT:
        # root may write anywhere; give the answer access(2) gives the folder's (non-root) owner
        real_access = os.access

        def access(p, mode, *a, **kw):
            if os.path.realpath(p) == str(ro) and mode & os.W_OK:
                return False
            return real_access(p, mode, *a, **kw)

        monkeypatch.setattr(os, "access", access)
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(ro))
    with caplog.at_level(logging.WARNING, logger="fxopt"):
        mod = _load("ro_probe", _source("r"))
    _assert_refused(caplog, ro, mod, "not writable")
    assert _tree(ro) == []


def test_write_that_fails_is_bypassed(tmp_path, monkeypatch, caplog):
    """The folder looks fine but writing an entry fails (read-only mount, quota, ...)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(root))
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*a, dir=None, **kw):
        if dir is not None and Path(dir).resolve().is_relative_to(root):
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkstemp(*a, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    with caplog.at_level(logging.WARNING, logger="fxopt"):
        mod = _load("write_probe", _source("w"))
    _assert_refused(caplog, root, mod, "Permission denied")
    assert not list((root / "triton").iterdir())


def test_no_usable_folder_at_all_is_a_clear_error(tmp_path, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(a_file))

    def no_tmp(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "mkdtemp", no_tmp)
    with pytest.raises(CodegenError, match="FXOPT_CACHE_DIR"):
        cache.load_triton_module("nowhere_probe", _source("n"))


# --------------------------------------------------------------------------- entries


def test_non_utf8_entry_is_healed(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(root))
    src = _source("u")
    py = _entry(root, "utf8_probe", src)
    py.parent.mkdir(parents=True, mode=0o700)
    os.chmod(root, 0o700)
    py.write_bytes(b"\xff\xfe\x00garbage \xc3\x28\n")
    mod = _load("utf8_probe", src)
    assert mod.f() == "u"
    assert py.read_bytes() == src.encode()  # healed for the next run


def test_stale_entry_with_other_code_is_rewritten_and_not_run(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(root))
    src = _source("fresh")
    py = _entry(root, "stale_probe", src)
    py.parent.mkdir(parents=True, mode=0o700)
    os.chmod(root, 0o700)
    marker = tmp_path / "marker"
    py.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    mod = _load("stale_probe", src)
    assert mod.f() == "fresh" and not marker.exists()
    assert py.read_text() == src


def test_entry_that_cannot_be_replaced_is_bypassed(tmp_path, monkeypatch, caplog):
    root = tmp_path / "cache"
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(root))
    src = _source("d")
    py = _entry(root, "dir_probe", src)
    py.mkdir(parents=True)  # a folder where the entry should be: unreadable as a file, not replaceable
    for d in (root, root / "triton"):
        os.chmod(d, 0o700)
    with caplog.at_level(logging.WARNING, logger="fxopt"):
        mod = _load("dir_probe", src)
    _assert_refused(caplog, root, mod, str(py))
    assert py.is_dir()


def test_atomic_write_handles_bytes_and_undecodable_files(tmp_path):
    p = tmp_path / "x.py"
    p.write_bytes(b"\xff\xff")
    cache.atomic_write(p, "print('é')\n")
    assert p.read_text(encoding="utf-8") == "print('é')\n"
    cache.atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"


# --------------------------------------------------------------------------- CUDA extensions


CU, CPP = "// cuda source\n", "// cpp binding\n"


def _ext_name(symbol="k"):
    return f"{symbol}_{cache.cache_key(CU + chr(0) + CPP, '')}"


class FakeLoadInline:
    """Stands in for torch's load_inline (no CUDA here) and behaves like it where it matters: it
    waits on a ``lock`` file in the build folder, and loads a ``<name>.so`` that is already there
    (ninja sees it up to date) instead of building."""

    def __init__(self):
        self.calls = []

    def __call__(self, *, name, build_directory, extra_cflags, **kw):
        d = Path(build_directory)
        self.calls.append({"dir": d, "extra_cflags": list(extra_cflags), "flags": kw})
        if (d / "lock").exists():
            raise RuntimeError("load_inline would wait for ever on a stale lock file")
        version = sum(1 for c in self.calls[:-1] if c["dir"] == d and c["extra_cflags"] != extra_cflags)
        lib = d / (f"{name}.so" if version == 0 else f"{name}_v{version}.so")
        if lib.exists():
            data = lib.read_bytes()
            if data == b"corrupt":
                raise ImportError(f"{lib}: invalid ELF header")
            return {"loaded": data.decode(), "dir": d}
        lib.write_bytes(b"built")
        return {"loaded": "built", "dir": d}


@pytest.fixture
def fake_load_inline(monkeypatch):
    import torch.utils.cpp_extension as cpp_ext

    fake = FakeLoadInline()
    monkeypatch.setattr(cpp_ext, "load_inline", fake)
    return fake


def test_cuda_build_dir_is_private(tmp_path, monkeypatch, fake_load_inline):
    root = tmp_path / "cache"
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(root))
    ext = cache.build_cuda_extension("k", CU, CPP)
    assert ext["loaded"] == "built"
    d = fake_load_inline.calls[0]["dir"]
    assert d == root / "cuda" / _ext_name()
    for p in (root, root / "cuda", d):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
    assert (d / "kernel.cu").read_text() == CU


def test_cuda_planted_library_in_a_shared_cache_is_not_loaded(tmp_path, monkeypatch, caplog, fake_load_inline):
    shared = tmp_path / "shared"
    planted = shared / "cuda" / _ext_name()
    planted.mkdir(parents=True)
    (planted / f"{_ext_name()}.so").write_bytes(b"planted")
    for p in (shared, shared / "cuda", planted):
        os.chmod(p, 0o777)
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(shared))
    with caplog.at_level(logging.WARNING, logger="fxopt"):
        ext = cache.build_cuda_extension("k", CU, CPP)
    assert ext["loaded"] == "built"
    assert not ext["dir"].resolve().is_relative_to(shared.resolve())
    assert any("writable by group or others" in r.getMessage() for r in caplog.records if r.name == "fxopt")


def test_cuda_shared_build_subfolder_is_refused(tmp_path, monkeypatch, caplog, fake_load_inline):
    """A private root whose cuda/<name> folder someone opened up (older fxopt, a stray chmod)."""
    root = tmp_path / "cache"
    build = root / "cuda" / _ext_name()
    build.mkdir(parents=True)
    os.chmod(root, 0o700)
    os.chmod(build, 0o777)
    (build / f"{_ext_name()}.so").write_bytes(b"planted")
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(root))
    with caplog.at_level(logging.WARNING, logger="fxopt"):
        ext = cache.build_cuda_extension("k", CU, CPP)
    assert ext["loaded"] == "built" and not ext["dir"].resolve().is_relative_to(root.resolve())


def test_cuda_stale_torch_lock_file_is_removed(tmp_path, monkeypatch, fake_load_inline):
    root = tmp_path / "cache"
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(root))
    build = root / "cuda" / _ext_name()
    build.mkdir(parents=True)
    for p in (root, root / "cuda", build):
        os.chmod(p, 0o700)
    (build / "lock").write_text("")  # left by a build that was killed
    ext = cache.build_cuda_extension("k", CU, CPP)
    assert ext["loaded"] == "built" and ext["dir"] == build


def test_cuda_cached_library_that_does_not_load_is_rebuilt(tmp_path, monkeypatch, caplog, fake_load_inline):
    root = tmp_path / "cache"
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(root))
    build = root / "cuda" / _ext_name()
    build.mkdir(parents=True)
    for p in (root, root / "cuda", build):
        os.chmod(p, 0o700)
    (build / f"{_ext_name()}.so").write_bytes(b"corrupt")  # truncated by a killed link
    (build / "main.o").write_bytes(b"stale")
    with caplog.at_level(logging.WARNING, logger="fxopt"):
        ext = cache.build_cuda_extension("k", CU, CPP)
    assert ext["loaded"] == "built"
    assert len(fake_load_inline.calls) == 2
    assert not (build / "main.o").exists() and not (build / f"{_ext_name()}.so").exists()  # next run builds clean
    assert (build / "kernel.cu").read_text() == CU
    assert any("rebuilding" in r.getMessage() for r in caplog.records if r.name == "fxopt")


def test_cuda_build_failure_without_a_cached_library_is_not_retried(tmp_path, monkeypatch):
    import torch.utils.cpp_extension as cpp_ext

    calls = []

    def failing(**kw):
        calls.append(kw)
        raise RuntimeError("nvcc: error in kernel")

    monkeypatch.setattr(cpp_ext, "load_inline", failing)
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(CodegenError, match="nvcc: error in kernel"):
        cache.build_cuda_extension("k", CU, CPP)
    assert len(calls) == 1


_BUILD_SCRIPT = """
import sys
from fxopt.codegen import elementwise as ew
from fxopt.codegen.cache import build_cuda_extension
tree = ew.parse_tree("t0=add(x0,x1);t1=add(t0,x2)->t1")
sym, cu = ew.emit_cuda(tree)
ext = build_cuda_extension(sym, cu, ew.emit_cuda_binding(tree), signature="cache-security-test")
print(ext.__file__)
"""


def test_cuda_real_build_reload_and_heal(tmp_path):
    """The real load_inline: build, load from the cache in a new process, and rebuild a cached
    library that a killed link left truncated."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or cache.nvcc_path() is None:
        pytest.skip("needs a CUDA device (and nvcc)")
    import subprocess

    env = dict(os.environ, FXOPT_CACHE_DIR=str(tmp_path / "cache"))
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")

    def run():
        r = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT], env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stderr[-4000:]
        return Path(r.stdout.strip().splitlines()[-1]), r.stderr

    lib, _ = run()
    assert lib.resolve().is_relative_to((tmp_path / "cache" / "cuda").resolve())
    assert stat.S_IMODE(lib.parent.stat().st_mode) == 0o700
    mtime = lib.stat().st_mtime_ns
    again, _ = run()  # a new process loads the cached library
    assert again == lib and lib.stat().st_mtime_ns == mtime
    lib.write_bytes(lib.read_bytes()[:64])  # truncated, newer than its objects: ninja sees it up to date
    healed, _ = run()  # loads (the script prints only after load_inline imported it): rebuilt
    assert healed.stat().st_size > 64
