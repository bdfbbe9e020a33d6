"""FXOPT_DUMP_DIR: the graph after every pass that changed it, as readable listings.

One folder per pass-manager run, ``<dir>/<run>/``, holding ``00_input.txt`` (the graph the run
started from) and ``<nn>_<pass>.txt`` for each pass run that modified the graph, numbered in
the order they ran (a pass that runs again in a later round gets a new number). The listing is
:func:`fxopt.inspection.format_graph`'s: one line per node with shape, module and, for nodes a
rule made, the rule and what it replaced.
"""
from __future__ import annotations

import itertools
import logging
import os
import re
import time
from pathlib import Path

import torch.fx

from ..inspection.listing import format_graph

log = logging.getLogger("fxopt.rewrite.dump")

_RUNS = itertools.count(1)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "graph"


class GraphDumper:
    """Writes one run's listings into ``root/<run>/``."""

    def __init__(self, root: Path, label: str = ""):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run = f"{stamp}-{os.getpid()}-{next(_RUNS):03d}" + (f"-{_safe(label)}" if label else "")
        self.folder = Path(root) / run
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count = 0
        log.info("dumping graphs to %s", self.folder)

    def dump(self, graph_module: torch.fx.GraphModule, what: str) -> Path:
        path = self.folder / f"{self.count:02d}_{_safe(what)}.txt"
        self.count += 1
        path.write_text(format_graph(graph_module), encoding="utf-8")
        return path
