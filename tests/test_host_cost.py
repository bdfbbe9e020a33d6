"""benchmarks/host_cost.py --cpu runs here (stub kernels), so the GPU run is not the first time its
code paths execute, and its scan rows time the stubbed plan's replay (not a fresh plan launched
through the interpreter)."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def test_host_cost_cpu_mode_times_the_replays(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "host_cost.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "host_cost.py"), "--cpu", "--calls", "5",
                        "--json", str(out)], env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    scans = [row for row in rows if row["op"] == "scan"]
    assert len(scans) == 8 and len(rows) == 10
    assert {(row["dtype"], row["layout"]) for row in scans} == {
        (dt, lay) for dt in ("float32", "bfloat16") for lay in ("contiguous", "hf")}
    for row in scans:
        assert row["replayed"] is True, row
        assert row["launches"] in (1, 2) and 0 < row["host_us"] < 10_000, row
