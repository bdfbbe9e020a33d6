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


    def raises(**kw):
        raise RuntimeError("factory exploded on purpose")


    def bad_args():
        return Net(), "not a tuple of inputs"


    def bad_kwargs():
        return Net(), (torch.randn(2, 16),), ["not", "a", "dict"]


    def empty():
        return ()


    NOT_CALLABLE = 3
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
    assert "<span class=g>layers.3</span>" in html_text and 'class="new row"' in html_text  # rows carry "row" for the search filter
    assert "cli_test_add3" in (out / "report.txt").read_text()


def test_inspect_factory_errors(tmp_path, capsys, factory_module):
    # a bare model without config.vocab_size: no example inputs can be made
    rc = main(["inspect", f"{factory_module}:model_only", "--out", str(tmp_path), "--quiet"])
    assert rc == 2 and "return (model, example_args)" in _error_line(capsys)
    rc = main(["inspect", f"{factory_module}:not_a_model", "--out", str(tmp_path), "--quiet"])
    assert rc == 2 and "not a torch.nn.Module" in _error_line(capsys)
    rc = main(["inspect", f"{factory_module}:nope", "--out", str(tmp_path), "--quiet"])
    assert rc == 2 and "has no attribute 'nope'" in _error_line(capsys)
    rc = main(["inspect", "no_such_module_xyz:f", "--quiet"])
    assert rc == 2 and "cannot import module" in _error_line(capsys)
    rc = main(["inspect", "not_a_demo", "--quiet"])
    err = _error_line(capsys)
    assert rc == 2 and "gpt_neox" in err and "package.module:factory" in err


def test_inspect_unknown_pass_is_a_clear_error(tmp_path, capsys):
    rc = main(["inspect", "gpt_neox", "--passes", "no_such_pass", "--out", str(tmp_path), "--quiet"])
    err = _error_line(capsys)
    assert rc == 2 and "no_such_pass" in err


def test_passes_and_models_commands(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert out.strip()
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("gpt_neox", "gpt_neox_serial", "hf_mamba", "seed_mamba", "pkg.mod:factory"):
        assert name in out


def _error_line(capsys) -> str:
    """The one ``fxopt: error:`` line a bad input must produce (last on stderr; no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("fxopt: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    return errors[0]


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
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("fxopt: error:")
    r = _run("--help")
    assert r.returncode == 0 and "inspect" in r.stdout


# --------------------------------------------------------------------------- bad input: one line, exit 2


def _bad_command(capsys, *argv) -> str:
    """Run ``python -m fxopt ARGV`` in-process; it must fail with exit 2 and one error line."""
    rc = main(list(argv))
    line = _error_line(capsys)
    assert rc == 2, line
    return line


def _bad(capsys, *argv) -> str:
    return _bad_command(capsys, "inspect", *argv)


def test_factory_that_raises(tmp_path, capsys, factory_module):
    line = _bad(capsys, f"{factory_module}:raises", "--out", str(tmp_path / "o"), "--quiet")
    assert f"factory '{factory_module}:raises' raised RuntimeError: factory exploded on purpose" in line
    assert "FXOPT_DEBUG=1" in line


def test_factory_that_raises_with_debug_shows_the_traceback(tmp_path, capsys, factory_module, monkeypatch):
    monkeypatch.setenv("FXOPT_DEBUG", "1")
    rc = main(["inspect", f"{factory_module}:raises", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" in err and "factory exploded on purpose" in err
    assert err.strip().splitlines()[-1].startswith("fxopt: error: factory")


def test_factory_module_that_raises_on_import(tmp_path, capsys, monkeypatch):
    (tmp_path / "fxopt_cli_broken_mod.py").write_text("raise ValueError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fxopt_cli_broken_mod", None)
    line = _bad(capsys, "fxopt_cli_broken_mod:build", "--quiet")
    assert "importing module 'fxopt_cli_broken_mod' raised ValueError: broken at import" in line


@pytest.mark.parametrize(
    "model, key, suggestion",
    [("gpt_neox", "nonsense_key", None), ("gpt_neox", "hidden_sise", "hidden_size"),
     ("hf_mamba", "statesize", "state_size"), ("seed_mamba", "dmodel", "d_model")],
)
def test_set_unknown_key_is_refused(tmp_path, capsys, model, key, suggestion):
    line = _bad(capsys, model, "--set", f"{key}=3", "--out", str(tmp_path / "o"), "--quiet", "--passes", "")
    assert f"--set {key}:" in line and "has no field" in line and "its fields:" in line
    if suggestion:
        assert f"did you mean {suggestion}" in line
    assert not (tmp_path / "o").exists()


def test_set_legacy_config_keys_are_accepted():
    """transformers folds old names into other fields: they are known, not typos."""
    from fxopt.cli import check_demo_overrides

    check_demo_overrides("gpt_neox", {"rotary_pct": 0.5, "hidden_size": 32})
    check_demo_overrides("hf_mamba", {"state_size": 8})
    check_demo_overrides("seed_mamba", {"d_model": 32, "n_layer": 1})


@pytest.mark.parametrize(
    "setting, expect",
    [("hidden_size=-5", "rejects --set hidden_size=-5"), ("hidden_size=abc", "expected int"),
     ("num_attention_heads=0", "ZeroDivisionError"),
     ("intermediate_size=-4", "building it with --set intermediate_size=-4")],
)
def test_set_invalid_value_is_refused(tmp_path, capsys, setting, expect):
    line = _bad(capsys, "gpt_neox", "--set", setting, "--out", str(tmp_path / "o"), "--quiet")
    assert "model 'gpt_neox'" in line and expect in line


def test_set_invalid_value_of_a_dataclass_demo(tmp_path, capsys):
    line = _bad(capsys, "seed_mamba", "--set", "d_model='wide'", "--out", str(tmp_path / "o"), "--quiet")
    assert "model 'seed_mamba'" in line and "failed" in line


def test_set_unknown_factory_argument_is_refused(tmp_path, capsys, factory_module):
    line = _bad(capsys, f"{factory_module}:build", "--set", "dd=8", "--out", str(tmp_path / "o"), "--quiet")
    assert "does not take 'dd'" in line and "did you mean d" in line and "it takes: d, n" in line


@pytest.mark.parametrize("item, expect", [("novalue", "KEY=VALUE"), ("=3", "not a configuration key"),
                                          ("a b=3", "not a configuration key")])
def test_set_malformed(capsys, item, expect):
    assert expect in _bad(capsys, "gpt_neox", "--set", item, "--quiet")


def test_set_twice_and_layers_conflict(capsys):
    assert "given twice" in _bad(capsys, "gpt_neox", "--set", "hidden_size=32", "--set", "hidden_size=64")
    line = _bad(capsys, "gpt_neox", "--layers", "2", "--set", "num_hidden_layers=3")
    assert "--layers and --set num_hidden_layers" in line


def test_layers_with_a_factory(capsys, factory_module):
    assert "--layers works with the demo models only" in _bad(capsys, f"{factory_module}:build", "--layers", "2")


def test_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("keep me")
    assert f"--out {f} is a file" in _bad(capsys, "gpt_neox", "--out", str(f), "--quiet")
    assert "is a file, so no folder can be made below it" in _bad(capsys, "gpt_neox", "--out", str(f / "sub"))
    assert f.read_text() == "keep me"


def test_out_that_is_not_writable(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if os.geteuid() == 0:
        # root may write anywhere: answer as access(2) does for the folder's (non-root) owner
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if Path(p) == ro and m & os.W_OK
                            else real_access(p, m, *a, **k))
    assert "is not writable" in _bad(capsys, "gpt_neox", "--out", str(ro), "--quiet")
    assert "is not writable" in _bad(capsys, "gpt_neox", "--out", str(ro / "new" / "deeper"), "--quiet")


def test_out_write_failure_is_a_clear_error(tmp_path, capsys, monkeypatch):
    """The folder passed the early check but writing fails later (disk full, permissions changed)."""
    import fxopt.inspection

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fxopt.inspection, "write_inspection", fail)
    line = _bad(capsys, "gpt_neox", "--layers", "1", "--seq-len", "4", "--passes", "", "--out",
                str(tmp_path / "o"), "--quiet")
    assert "writing the inspection failed" in line and "No space left on device" in line


def test_device_not_available_or_nonsense(capsys):
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        assert f"has {n} CUDA device(s)" in _bad(capsys, "gpt_neox", "--device", f"cuda:{n}", "--quiet")
    else:
        line = _bad(capsys, "gpt_neox", "--device", "cuda", "--quiet")
        assert "no CUDA device is available" in line and "--device cpu" in line
    assert "--device 'nonsense' is not a torch device" in _bad(capsys, "gpt_neox", "--device", "nonsense")
    assert "--device meta holds no data" in _bad(capsys, "gpt_neox", "--device", "meta")


@pytest.mark.parametrize(
    "argv, expect",
    [(["--seq-len", "-3"], "argument --seq-len: expected a positive integer, got '-3'"),
     (["--seq-len", "0"], "argument --seq-len"), (["--seq-len", "abc"], "argument --seq-len"),
     (["--batch", "0"], "argument --batch"), (["--layers", "0"], "argument --layers"),
     (["--layers", "-1"], "argument --layers"), (["--heartbeat", "-1"], "argument --heartbeat"),
     (["--dtype", "fp8"], "argument --dtype: invalid choice"), (["--seed", "-1"], "argument --seed"),
     (["--seed", str(2**64)], "argument --seed")],
)
def test_bad_option_values(capsys, argv, expect):
    line = _bad(capsys, "gpt_neox", *argv)
    assert expect in line and "--help" in line


def test_missing_model_and_unknown_command(capsys):
    assert "required: MODEL" in _bad_command(capsys, "inspect")
    assert "invalid choice: 'bogus'" in _bad_command(capsys, "bogus")


def test_unknown_pass_among_blank_items(capsys):
    line = _bad(capsys, "gpt_neox", "--passes", "scan,, bogus_pass ,", "--quiet")
    assert "no pass named 'bogus_pass'" in line


@pytest.mark.parametrize(
    "spec, expect",
    [("mod_xyz:", "one ':' between"), (":build", "one ':' between"), ("a:b:c", "one ':' between"),
     ("mod_xyz:1bad", "one ':' between"), ("some/dir/mod:f", "not a file path"),
     ("fxopt_cli_nope.py:f", "drop the .py"), (".relative:f", "importing module '.relative' raised TypeError"),
     ("gpt-neox", "did you mean gpt_neox")],
)
def test_bad_model_spellings(capsys, spec, expect):
    assert expect in _bad(capsys, spec, "--quiet")


@pytest.mark.parametrize(
    "factory, expect",
    [("bad_args", "example_args must be a tuple"), ("bad_kwargs", "example_kwargs must be a dict"),
     ("empty", "got a tuple of length 0"),
     ("NOT_CALLABLE", "is not a callable that returns a model (its type is int)")],
)
def test_factory_returning_the_wrong_thing(tmp_path, capsys, factory_module, factory, expect):
    assert expect in _bad(capsys, f"{factory_module}:{factory}", "--out", str(tmp_path / "o"), "--quiet")


def test_unexpected_failure_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("something fxopt did not see coming")

    monkeypatch.setattr(fxopt, "optimize", boom)
    rc = main(["inspect", "gpt_neox", "--layers", "1", "--seq-len", "4", "--out", str(tmp_path / "o"), "--quiet"])
    line = _error_line(capsys)
    assert rc == 1 and "RuntimeError: something fxopt did not see coming" in line and "FXOPT_DEBUG=1" in line


def test_bad_inputs_through_python_dash_m(tmp_path):
    """The real entry point: each bad input is exactly one stderr line, exit code 2."""
    f = tmp_path / "a_file"
    f.write_text("x")
    for argv in (["inspect", "gpt_neox", "--seq-len", "-3"], ["inspect", "gpt_neox", "--device", "nonsense"],
                 ["inspect", "gpt_neox", "--out", str(f)], ["inspect", "gpt_neox", "--set", "nonsense_key=3"],
                 ["inspect"]):
        r = _run(*argv)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("fxopt: error:"), (argv, r.stderr)


def test_model_with_a_bad_vocab_size(tmp_path, capsys, monkeypatch, factory_module):
    mod = __import__(factory_module)

    def with_vocab(vocab):
        def make():
            net = mod.Net()
            net.config = type("Cfg", (), {"vocab_size": vocab})()
            return net
        return make

    for vocab in ("many", 0, -3):
        monkeypatch.setattr(mod, "vocab_model", with_vocab(vocab), raising=False)
        line = _bad(capsys, f"{factory_module}:vocab_model", "--out", str(tmp_path / "o"), "--quiet")
        assert f"config.vocab_size is {vocab!r}, not a positive integer" in line
