"""Statistics belong to a run (issue 11): three optimize runs report the same hits, no rule or
pass object counts anything across runs, and no module keeps a finished graph's nodes alive."""
from __future__ import annotations

import gc
import logging
import weakref

import torch
import torch.nn.functional as F

import fxopt
from fxopt.models.seed_mamba import seed_mamba
from fxopt.registry import available_passes, get_pass


def _state(obj) -> dict:
    """An object's attributes, lazily filled trace caches aside."""
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else id(v))
            for k, v in vars(obj).items() if k not in ("_pattern", "_replacements", "_wildcard_defaults")}


def test_three_runs_report_the_same_hits_and_nothing_global_grows():
    silu = fxopt.Rule("silu", lambda x: x * torch.sigmoid(x), lambda x: F.silu(x), (torch.randn(4),))
    model = seed_mamba(n_layer=2)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    library_rules = [r for name in available_passes() for r in getattr(get_pass(name), "rules", [])]
    assert library_rules, "the library passes are rule tables"
    reports, states = [], []
    for _ in range(3):
        opt = fxopt.optimize(model, (ids,), passes=[*fxopt.registry.DEFAULT_PASSES, silu])
        reports.append((opt.report().matches, opt.report().rule_hits))
        states.append([_state(r) for r in [silu, *library_rules]])
    assert reports[0] == reports[1] == reports[2]
    matches, hits = reports[0]
    assert matches["scan"] == 2 and matches["silu"] == 0  # the gate is folded into the scan first
    assert hits["selective_scan"] == 2
    assert states[0] == states[1] == states[2]  # no counter on any rule object
    assert not any(hasattr(r, "hits") for r in [silu, *library_rules])


def test_a_pass_object_reused_gives_the_same_stats_each_run():
    p = get_pass("cleanup")
    model = seed_mamba(n_layer=1)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    stats = [p(fxopt.capture(model, (ids,))).stats for _ in range(3)]
    assert stats[0] == stats[1] == stats[2] and stats[0]["matches"] > 0


def test_scan_keeps_no_node_of_a_finished_graph_alive():
    model = seed_mamba(n_layer=1)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    gm = fxopt.capture(model, (ids,))
    probe = weakref.ref(next(n for n in gm.graph.nodes if n.op == "call_function"))
    assert get_pass("scan")(gm).matches == 1
    del gm
    gc.collect()
    assert probe() is None, "a module-level cache still holds the graph's nodes"


def test_rule_rejections_are_logged_at_debug_on_the_fxopt_logger(caplog):
    class Reordered(torch.nn.Module):  # a recurrence whose steps run out of order
        def forward(self, a, b):
            h = torch.zeros_like(a[:, 0])
            for t in (0, 2, 1, 3):
                h = a[:, t] * h + b[:, t]
            return h

    gm = fxopt.capture(Reordered(), (torch.rand(2, 4, 3), torch.randn(2, 4, 3)))
    with caplog.at_level(logging.DEBUG, logger="fxopt"):
        get_pass("scan")(gm)
    msgs = [r.getMessage() for r in caplog.records if r.name.startswith("fxopt")]
    assert any("rule scan declined" in m and "consecutive" in m for m in msgs), msgs
