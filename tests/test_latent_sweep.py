"""benchmarks/latent_sweep.py --smoke: every code path of the GPU sweep on the CPU (the kernel under
TRITON_INTERPRET=1, tiny shapes), and the shared copy-bandwidth probe."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_latent_sweep_smoke(tmp_path):
    out = tmp_path / "sweep.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "latent_sweep.py"), "--smoke", "--json",
                        str(out)], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = res["rows"]
    # every variant was checked against the reference (and passed), and timed
    assert rows and all(x["ok"] and x["ms"] > 0 for x in rows)
    # the split round ran on the split regime: an explicit split count reached the launch
    assert any(x["n_splits"] == 3 for x in rows)
    assert len(res["best"]) == 6 and all(v["frac_of_copy"] > 0 for v in res["best"].values())
    # the printed TUNED table is valid Python and every entry is accepted by decode_config
    from fxopt.codegen.latent_decode import decode_config

    text = r.stdout[r.stdout.index("TUNED = {"):]
    table = ast.literal_eval(text[len("TUNED = "):text.index("}\n") + 1])
    assert table
    for key, cfg in table.items():
        es, r_pad, regime = key
        assert regime in ("split", "batch")
        decode_config(1, 3, r_pad, 4, 40, torch.float16, 132, tuned={}, **cfg)


def test_copy_bandwidth_probe_counts_read_and_write(monkeypatch):
    """The shared probe (CPU path): bytes moved = 2 x nbytes over the median copy time."""
    from fxopt.tools import bandwidth

    ticks = iter([0.0, 0.5, 1.0, 2.0, 3.0, 3.25])  # copies of 0.5, 1.0 and 0.25 s: median 0.5 s
    monkeypatch.setattr(bandwidth.time, "perf_counter", lambda: next(ticks))
    bw = bandwidth.copy_bandwidth("cpu", nbytes=4 * 1024, reps=3)
    assert bw == 2 * 4 * 1024 / 0.5


def test_latent_kv_uses_the_shared_probe():
    """benchmarks/latent_kv.py measures its copy bandwidth with the shared eager probe, not a graph
    replay (which read ~2/3 of the eager number on the H200)."""
    src = open(os.path.join(ROOT, "benchmarks", "latent_kv.py")).read()
    fn = src[src.index("def copy_bandwidth("):src.index("# ----------------------------------------------------------------------------- speed")]
    assert "fxopt.tools.bandwidth" in fn and "timed_ms" not in fn
