"""``python -m fxopt``: inspect, passes, models."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fxopt
from fxopt.cli import _parse_sets, main

REPO = Path(__file__).resolve().parents[1]


# A user factory module: a small layered model plus a user pass that fuses (a + b) + c.
FACTORY_SRC = textwrap.dedent(
    '''
    import torch
    import torch.fx
    from fxopt import Pass, PassResult, register_pass
    from fxopt.graph_utils import mark_provenance, propagate_meta

    aten = torch.ops.aten


    def add3(a, b, c):
        return (a + b) + c


    @register_pass("cli_test_add3", replace=True)
    class Add3(Pass):
        """(a + b) + c -> add3(a, b, c) (test pass)."""

        name = "cli_test_add3"

        def call(self, gm):
            g, n = gm.graph, 0
            for node in list(g.nodes):
                if node.op != "call_function" or node.target is not aten.add.Tensor or node.kwargs:
                    continue
                inner = node.args[0]
                if not (isinstance(inner, torch.fx.Node) and inner.target is aten.add.Tensor
                        and len(inner.users) == 1 and not inner.kwargs):
                    continue
                if not all(isinstance(a, torch.fx.Node) for a in (*inner.args, node.args[1])):
                    continue
                with g.inserting_before(node):
                    new = g.call_function(add3, (inner.args[0], inner.args[1], node.args[1]))
                propagate_meta(gm, [new])
                mark_provenance([new], rule="add3", pass_name=self.name, replaced=[inner, node])
                node.replace_all_uses_with(new)
                g.erase_node(node)
                g.erase_node(inner)
                n += 1
            gm.recompile()
            return PassResult(gm, n > 0, {"matches": n})


    class Block(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.a = torch.nn.Linear(d, d)
            self.b = torch.nn.Linear(d, d)

        def forward(self, x):
            return (self.a(x) + self.b(x)) + x


    class Net(torch.nn.Module):
        def __init__(self, d=16, n=3):
            super().__init__()
            self.layers = torch.nn.ModuleList(Block(d) for _ in range(n))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x


    def build(d=16, n=3):
        return Net(d, n), (torch.randn(2, d),)


    def model_only():
        return Net()


    def not_a_model():
        return 42
    '''
)


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    name = "fxopt_cli_test_factory"
    (tmp_path / f"{name}.py").write_text(FACTORY_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    yield name
    sys.modules.pop(name, None)


def _run(*argv, cwd=REPO):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "fxopt", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_inspect_demo_model_end_to_end(tmp_path, capsys):
    out = tmp_path / "neox"
    rc = main(["inspect", "gpt_neox", "--seq-len", "8", "--layers", "3", "--out", str(out), "--passes", "",
               "--heartbeat", "0", "--check"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for f in ("before.txt", "after.txt", "diff.txt", "graph.html", "report.txt"):
        assert (out / f).is_file(), f
    assert (out / "kernels").is_dir()
    # progress phases with elapsed seconds on stderr; report + file list on stdout
    for phase in ("building model gpt_neox", "capturing and running passes", "writing inspection"):
        assert phase in captured.err
    assert "done in" in captured.err and "max |optimized - eager|" in captured.err
    assert "fxopt report" in captured.out and "graph.html" in captured.out
    assert "gpt_neox.layers.2" in (out / "graph.html").read_text()


def test_inspect_factory_with_user_pass(tmp_path, capsys, factory_module):
    out = tmp_path / "f"
    rc = main(["inspect", f"{factory_module}:build", "--passes", "cli_test_add3", "--out", str(out), "--quiet",
               "--set", "n=4"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.err == ""  # --quiet
    diff = (out / "diff.txt").read_text()
    assert "rewrites (4)" in diff and "[add3] (pass cli_test_add3) @ layers.0" in diff
    html_text = (out / "graph.html").read_text()
    assert "<span class=g>layers.3</span>" in html_text and 'class="new"' in html_text
    assert "cli_test_add3" in (out / "report.txt").read_text()


def test_inspect_factory_errors(tmp_path, capsys, factory_module):
    # a bare model without config.vocab_size: no example inputs can be made
    rc = main(["inspect", f"{factory_module}:model_only", "--out", str(tmp_path), "--quiet"])
    assert rc == 1 and "return (model, example_args)" in capsys.readouterr().err
    rc = main(["inspect", f"{factory_module}:not_a_model", "--out", str(tmp_path), "--quiet"])
    assert rc == 1 and "not a torch.nn.Module" in capsys.readouterr().err
    rc = main(["inspect", f"{factory_module}:nope", "--out", str(tmp_path), "--quiet"])
    assert rc == 1 and "has no attribute 'nope'" in capsys.readouterr().err
    rc = main(["inspect", "no_such_module_xyz:f", "--quiet"])
    assert rc == 1 and "cannot import module" in capsys.readouterr().err
    rc = main(["inspect", "not_a_demo", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "gpt_neox" in err and "package.module:factory" in err


def test_inspect_unknown_pass_is_a_clear_error(tmp_path, capsys):
    rc = main(["inspect", "gpt_neox", "--passes", "no_such_pass", "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("fxopt: error:") and "no_such_pass" in err and "Traceback" not in err


def test_passes_and_models_commands(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert out.strip()
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("gpt_neox", "gpt_neox_serial", "hf_mamba", "seed_mamba", "pkg.mod:factory"):
        assert name in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "inspect" in capsys.readouterr().out


def test_parse_sets():
    assert _parse_sets(["a=1", "b=2.5", "c=true", "d=hello", "e=[1, 2]", "f=None"]) == {
        "a": 1, "b": 2.5, "c": True, "d": "hello", "e": [1, 2], "f": None
    }
    with pytest.raises(fxopt.FxoptError, match="KEY=VALUE"):
        _parse_sets(["novalue"])


def test_python_dash_m_subprocess(tmp_path):
    r = _run("passes")
    assert r.returncode == 0, r.stderr
    r = _run("inspect", "definitely_not_a_model", "--quiet")
    assert r.returncode == 1
    assert "fxopt: error:" in r.stderr and "Traceback" not in r.stderr
    r = _run("--help")
    assert r.returncode == 0 and "inspect" in r.stdout
