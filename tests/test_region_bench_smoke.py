"""benchmarks/blocks.py --smoke: the benchmark's code paths run on CPU (interpreter), so the GPU
run the coordinator does is not the first time they execute."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_blocks_smoke(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path / "cache"))
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "blocks.py"
    spec = importlib.util.spec_from_file_location("fxopt_bench_blocks", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "blocks.json"
    assert mod.main(["--smoke", "--emit", "rows,parts", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["smoke"]
    assert set(res) == {"neox_add_2ln", "mamba_add_rmsnorm", "bias_gelu", "rotary_qk"}
    assert res["rotary_qk"]["contract"] == "bitwise" and all(r["holds"] for r in res.values())
    assert all(r["bytes"] > 0 and r["kernel"].startswith("fxopt_region_") for r in res.values())
