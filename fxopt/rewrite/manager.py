"""Runs passes in order to a fixpoint and records a report.

In the spirit of ``torch.fx.passes.infra.pass_manager``: when a pass fails or breaks the graph,
the error names that pass and the passes that ran before it. Each pass runs through
:func:`fxopt.rewrite.pass_base.run_pass`, which checks its result (truthful ``modified``, lint,
fake values of what it changed) and recompiles the module once if it changed the graph.

Each run logs one INFO line per pass on ``fxopt.rewrite.manager`` (FXOPT_DEBUG=1 shows them)
and, with FXOPT_DUMP_DIR set (or FXOPT_DEBUG=3), dumps the graph after every pass that changed
it (:mod:`fxopt.rewrite.dump`). Node counts leave out export's input-shape guard
(:func:`fxopt.graph_utils.node_count`), so they agree with graphs instantiated from templates.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch.fx

from ..config import get_config
from ..errors import PassError
from ..graph_utils import node_count
from ..logs import configure as configure_logging
from .pass_base import Pass, PassResult, run_pass
from .verify import lint

__all__ = ["PassManager", "Report", "PassRecord", "lint"]

log = logging.getLogger("fxopt.rewrite.manager")


@dataclass
class PassRecord:
    name: str
    round: int
    matches: int
    nodes_before: int
    nodes_after: int
    seconds: float
    modified: bool
    stats: dict[str, int] = field(default_factory=dict)


@dataclass
class Report:
    """What optimize() did. ``str(report)`` is a table; ``report.matches`` maps pass
    name -> total rewrites (every pass that ran appears, with 0 if it never fired)."""

    records: list[PassRecord] = field(default_factory=list)
    capture_seconds: float = 0.0
    nodes_captured: int = 0
    nodes_final: int = 0
    model: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def matches(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.name] = out.get(r.name, 0) + r.matches
        return out

    @property
    def rule_hits(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            for k, v in r.stats.items():
                if k.startswith("rule:"):
                    out[k[5:]] = out.get(k[5:], 0) + int(v)
        return out

    @property
    def pass_seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "capture_seconds": self.capture_seconds,
            "pass_seconds": self.pass_seconds,
            "nodes_captured": self.nodes_captured,
            "nodes_final": self.nodes_final,
            "matches": self.matches,
            "rule_hits": self.rule_hits,
            "passes": [r.__dict__ for r in self.records],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        head = ("pass", "round", "matches", "nodes before", "nodes after", "time (s)")
        rows = [(r.name, str(r.round), str(r.matches), str(r.nodes_before), str(r.nodes_after), f"{r.seconds:.3f}")
                for r in self.records]
        rows.append(("capture", "", "", "", str(self.nodes_captured), f"{self.capture_seconds:.3f}"))
        rows.append(("total", "", str(sum(self.matches.values())), str(self.nodes_captured), str(self.nodes_final),
                     f"{self.capture_seconds + self.pass_seconds:.3f}"))
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        lines = [f"fxopt report for {self.model}" if self.model else "fxopt report", fmt(head),
                 "  ".join("-" * w for w in widths)]
        lines += [fmt(r) for r in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


class PassManager:
    def __init__(self, passes: Sequence[Pass], *, max_rounds: int = 4, run_lint: bool = True):
        self.passes = list(passes)
        self.max_rounds = max_rounds
        self.run_lint = run_lint  # kept for compatibility: every pass run is checked (run_pass)

    def run(self, graph_module: torch.fx.GraphModule, report: Report | None = None) -> tuple[torch.fx.GraphModule, Report]:
        report = report or Report()
        cfg = get_config()
        configure_logging(cfg)
        if not report.records:  # the graph the passes start from is the captured one
            report.nodes_captured = node_count(graph_module)
        dumper = None
        if cfg.dumps is not None:
            from .dump import GraphDumper

            dumper = GraphDumper(cfg.dumps, report.model or str(graph_module.meta.get("fxopt_model", "")))
            dumper.dump(graph_module, "input")
        # version counts graph modifications; a pass that left version v unchanged
        # would leave it unchanged again, so it is skipped until someone modifies.
        version = 0
        clean_at: dict[int, int] = {}
        done: list[str] = []
        gm = graph_module
        for rnd in range(1, self.max_rounds + 1):
            any_modified = False
            for i, p in enumerate(self.passes):
                if clean_at.get(i) == version or (rnd > 1 and not p.fixpoint):
                    continue
                before = node_count(gm)
                t0 = time.perf_counter()
                ran_before = f"passes run before it: {', '.join(done) or 'none'}"
                try:
                    result: PassResult = run_pass(p, gm)
                except PassError as exc:
                    if exc.pass_name is None:
                        exc.pass_name = p.name
                    if exc.pass_name == p.name and not exc.predecessors:
                        exc.predecessors = tuple(done)
                        exc.args = (f"{exc.args[0]} ({ran_before})", *exc.args[1:]) if exc.args else exc.args
                    raise
                except Exception as exc:  # noqa: BLE001 - name the pass that failed
                    raise PassError(f"pass {p.name!r} failed with {type(exc).__name__}: {exc} ({ran_before})",
                                    pass_name=p.name, predecessors=tuple(done)) from exc
                gm = result.graph_module
                seconds = time.perf_counter() - t0
                after = node_count(gm)
                report.records.append(PassRecord(p.name, rnd, result.matches, before, after,
                                                 seconds, result.modified, dict(result.stats)))
                log.info("pass %s round %d: %d matches, %d -> %d nodes, %.3f s", p.name, rnd, result.matches,
                         before, after, seconds)
                if dumper is not None and result.modified:
                    dumper.dump(gm, p.name)
                done.append(p.name)
                if result.modified:
                    version += 1
                    any_modified = True
                clean_at[i] = version if not result.modified else -1
            if not any_modified:
                break
        report.nodes_final = node_count(gm)
        return gm, report
