"""Logging through the ``fxopt`` loggers, FXOPT_DEBUG / FXOPT_DUMP_DIR as documented, and one
config snapshot as the only reader of the environment (issue 11)."""
from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxopt
from fxopt import config
from fxopt.config import read_environment
from fxopt.errors import FxoptError
from fxopt.rewrite.manager import PassManager

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fxopt"
aten = torch.ops.aten


def _env_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """Reads of the process environment: os.environ (any use but a store / delete), os.getenv,
    os.environb, posix.environ, and ``from os import environ/getenv``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("os", "posix"):
            if node.attr in ("environ", "environb", "getenv", "getenvb"):
                out.append((node.lineno, f"{node.value.id}.{node.attr}"))
        if isinstance(node, ast.ImportFrom) and node.module in ("os", "posix"):
            for a in node.names:
                if a.name in ("environ", "environb", "getenv", "getenvb"):
                    out.append((node.lineno, f"from {node.module} import {a.name}"))
    return out


def test_config_is_the_only_reader_of_the_environment():
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "fxopt/config.py":
            continue
        for line, what in _env_reads(ast.parse(path.read_text(), rel)):
            offenders.append(f"{rel}:{line}: {what}")
    assert offenders == [], "read the environment through fxopt.config:\n" + "\n".join(offenders)
    # config itself reads the public mapping, not os.environ's private storage
    src = (PKG / "config.py").read_text()
    assert "_data" not in src and "encodekey" not in src


def test_the_walk_finds_what_it_forbids():
    found = _env_reads(ast.parse("import os\nfrom os import getenv\na = os.environ.get('X')\nb = os.getenv('Y')\n"))
    assert sorted(w for _, w in found) == ["from os import getenv", "os.environ", "os.getenv"]


def test_no_diagnostics_printed_to_stderr():
    """Diagnostics go through logging; only the CLI writes to the terminal itself."""
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "fxopt/cli.py":
            continue
        tree = ast.parse(path.read_text(), rel)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                if any(k.arg == "file" for k in node.keywords):
                    offenders.append(f"{rel}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr == "print_exc":
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []


def test_snapshot_fields_and_errors(tmp_path):
    cfg = read_environment({"FXOPT_DEBUG": "2", "FXOPT_DUMP_DIR": str(tmp_path), "FXOPT_BACKEND": "cuda",
                            "CUDA_PATH": "/opt/cuda", "TRITON_INTERPRET": "1", "FXOPT_SCAN_EXP": " SFU ",
                            "FXOPT_SHAPE_CACHE_SIZE": "0", "FXOPT_PROGRESS": "0"})
    assert (cfg.debug, cfg.dump_dir, cfg.backend, cfg.cuda_home, cfg.triton_interpret, cfg.scan_exp) == (
        2, tmp_path, "cuda", Path("/opt/cuda"), True, "sfu")
    assert cfg.shape_cache_size == 1 and cfg.progress is False and cfg.dumps == tmp_path
    # CUDA_HOME wins over CUDA_PATH; FXOPT_DEBUG=3 alone dumps under the cache folder
    cfg = read_environment({"CUDA_HOME": "/a", "CUDA_PATH": "/b", "FXOPT_DEBUG": "3", "FXOPT_CACHE_DIR": str(tmp_path)})
    assert cfg.cuda_home == Path("/a") and cfg.dumps == tmp_path / "dumps" and cfg.triton_interpret is False
    assert read_environment({}).dumps is None and read_environment({}).cuda_home is None
    with pytest.raises(FxoptError, match="FXOPT_DEBUG='lots' must be an integer"):
        read_environment({"FXOPT_DEBUG": "lots"})


def test_hot_paths_read_the_process_snapshot(monkeypatch):
    """get_config() reads now; current() (what launches key on) changes only on refresh()."""
    monkeypatch.setenv("FXOPT_BACKEND", "torch")
    config.refresh()
    assert config.backend_raw() == "torch" and config.current().backend == "torch"
    monkeypatch.setenv("FXOPT_BACKEND", "cuda")
    assert config.get_config().backend == "cuda" and config.backend() == "cuda"
    assert config.backend_raw() == "torch"  # the snapshot stands until refreshed
    config.refresh()
    assert config.backend_raw() == "cuda"
    monkeypatch.delenv("FXOPT_SCAN_EXP", raising=False)
    config.refresh()
    monkeypatch.setenv("FXOPT_SCAN_EXP", "fma")
    assert config.scan_exp() == "fma" and config.scan_exp_raw() == "auto"
    config.refresh()
    assert config.scan_exp_raw() == "fma"


def test_nvcc_is_looked_up_under_the_configured_cuda_home(monkeypatch, tmp_path):
    from fxopt.codegen.cache import nvcc_path

    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\n")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert nvcc_path() == str(nvcc)


# --------------------------------------------------------------------------- FXOPT_DEBUG


class Toy(torch.nn.Module):
    def forward(self, a, b, c):
        return (a * b + c).relu() + a


def _toy_graph():
    xs = (torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8))
    return fxopt.capture(Toy(), xs), xs


def _run(gm):
    return PassManager(fxopt.registry.resolve_passes(["addcmul", "residual_add", "cleanup"])).run(gm)


def test_debug_levels_map_to_logging_levels(monkeypatch, caplog):
    gm, _ = _toy_graph()
    fx_logger = logging.getLogger("fxopt")
    monkeypatch.delenv("FXOPT_DEBUG", raising=False)
    with caplog.at_level(logging.NOTSET):  # the handler takes everything; the fxopt logger decides
        caplog.clear()
        _run(fxopt.optimize.__globals__["copy_graph_module"](gm))
        assert fx_logger.level == logging.NOTSET  # FXOPT_DEBUG unset: fxopt leaves its logger alone
        monkeypatch.setenv("FXOPT_DEBUG", "1")
        caplog.clear()
        _run(fxopt.optimize.__globals__["copy_graph_module"](gm))
        assert fx_logger.level == logging.INFO
        summaries = [r for r in caplog.records if r.name == "fxopt.rewrite.manager"]
        assert [r.levelno for r in summaries] == [logging.INFO] * len(summaries) and summaries
        assert any("pass addcmul round 1: 1 matches" in r.getMessage() for r in summaries)
        assert not [r for r in caplog.records if r.levelno < logging.INFO and r.name.startswith("fxopt")]
        monkeypatch.setenv("FXOPT_DEBUG", "2")
        caplog.clear()
        _run(fxopt.optimize.__globals__["copy_graph_module"](gm))
        declines = [r for r in caplog.records if r.name == "fxopt.rewrite" and r.levelno == logging.DEBUG]
        assert declines and all("declined" in r.getMessage() for r in declines)  # rule rejections at DEBUG
        monkeypatch.setenv("FXOPT_DEBUG", "0")
        _run(fxopt.optimize.__globals__["copy_graph_module"](gm))
        assert fx_logger.level == logging.NOTSET  # what FXOPT_DEBUG set is undone


def test_debug_writes_fxopt_lines_to_stderr_when_nothing_is_configured(tmp_path):
    code = ("import torch, fxopt\n"
            "m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())\n"
            "fxopt.optimize(m, (torch.randn(2, 4),))\n")
    env = {**os.environ, "FXOPT_DEBUG": "1", "FXOPT_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert any(ln.startswith("[fxopt] fxopt.capture: captured Sequential:") for ln in lines), res.stderr
    assert any(ln.startswith("[fxopt] fxopt.rewrite.manager: pass cleanup round 1:") for ln in lines), res.stderr
    env["FXOPT_DEBUG"] = "0"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "[fxopt]" not in res.stderr


# --------------------------------------------------------------------------- FXOPT_DUMP_DIR


def test_dump_dir_gets_each_changed_pass_graph(monkeypatch, tmp_path):
    gm, xs = _toy_graph()
    monkeypatch.setenv("FXOPT_DUMP_DIR", str(tmp_path / "dumps"))
    out, report = _run(gm)
    (run,) = (tmp_path / "dumps").iterdir()
    files = sorted(p.name for p in run.iterdir())
    changed = [r.name for r in report.records if r.modified]
    assert changed and len(changed) < len(report.records)  # some passes changed nothing: no file
    assert files == ["00_input.txt"] + [f"{i:02d}_{name}.txt" for i, name in enumerate(changed, 1)]
    first = (run / "00_input.txt").read_text()
    assert first.startswith(f"# {report.nodes_captured} nodes") and "aten.mul.Tensor" in first
    addcmul = (run / files[1]).read_text()
    assert "+ addcmul_default = aten.addcmul.default(" in addcmul and "<- rule " in addcmul
    last = (run / files[-1]).read_text()
    assert last == fxopt.inspection.format_graph(out)
    # a second run gets its own folder
    _run(fxopt.optimize.__globals__["copy_graph_module"](gm))
    assert len(list((tmp_path / "dumps").iterdir())) == 2


def test_debug_3_dumps_without_a_dump_dir(monkeypatch, tmp_path):
    gm, _ = _toy_graph()
    monkeypatch.delenv("FXOPT_DUMP_DIR", raising=False)
    monkeypatch.setenv("FXOPT_DEBUG", "3")
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path))
    _run(gm)
    (run,) = (tmp_path / "dumps").iterdir()
    assert (run / "00_input.txt").exists() and len(list(run.iterdir())) >= 2


def test_no_dumps_by_default(monkeypatch, tmp_path):
    gm, _ = _toy_graph()
    monkeypatch.delenv("FXOPT_DUMP_DIR", raising=False)
    monkeypatch.delenv("FXOPT_DEBUG", raising=False)
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path))
    _run(gm)
    assert not (tmp_path / "dumps").exists()
