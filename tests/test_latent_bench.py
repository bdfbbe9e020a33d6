"""benchmarks/latent_kv.py --smoke runs every code path of the benchmark on the CPU (tiny shapes)."""
from __future__ import annotations

import json
import os
import sys


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))


def test_latent_kv_benchmark_smoke(tmp_path, capsys):
    import latent_kv

    out = tmp_path / "latent_kv.json"
    latent_kv.main(["--smoke", "--json", str(out), "--device", "cpu"])
    res = json.loads(out.read_text())
    q = res["quality"]
    configs = [r["config"] for r in q["rows"]]
    assert configs[0] == "lossless" and "calibrated budget=0.3" in configs and "plain rank=d/16" in configs
    lossless = q["rows"][0]
    assert lossless["tokens_identical"] and abs(lossless["cache_fraction"] - 0.625) < 1e-12
    assert abs(lossless["bits_per_byte"] - q["model_bits_per_byte"]) < 1e-4
    for r in q["rows"]:
        if "budget=0.5" in r["config"]:
            assert r["cache_fraction"] <= 0.5
        if "budget=0.3" in r["config"]:
            assert r["cache_fraction"] <= 0.3
    s = res["speed"]
    assert s["kernel"] and all(r["ok"] for r in s["kernel"])
    assert {(r["phase"], r["k_mode"], r["v_mode"]) for r in s["phases"]} >= {
        ("prefill", "reconstruct", "reconstruct"), ("decode", "absorb", "after_sum")}
    mem = {r["cache"]: r for r in s["memory"]["rows"]}
    per_token = [mem[k]["bytes_per_token"] for k in mem if k.startswith("latent")]
    assert per_token == sorted(per_token, reverse=True) and all(p < mem["mha"]["bytes_per_token"] for p in per_token)
    assert all(mem[k]["vs_mha"] > 1 for k in mem if k.startswith("latent"))
    assert res["targets"] == {}  # a smoke run does not claim targets
    printed = capsys.readouterr().out
    assert "quality" in printed and "memory" in printed
