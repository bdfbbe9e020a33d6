"""write_inspection: listings, diff, report, graph.html and the kernels that run, in one folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
import torch.fx
from torch.fx.node import Node

from .diff import graph_diff
from .kernels import kernel_filename, kernel_sources
from .listing import format_graph
from .nodes import graph_of, group_of
from .page import render_html


def _unpack(obj) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule, Any]:
    if hasattr(obj, "graph_module") and hasattr(obj, "original_graph_module"):
        rep = getattr(obj, "report", None)
        report = rep() if callable(rep) else rep
        return obj.original_graph_module, obj.graph_module, report
    if isinstance(obj, (tuple, list)) and len(obj) in (2, 3):
        return obj[0], obj[1], (obj[2] if len(obj) == 3 else None)
    raise TypeError(
        "write_inspection takes an fxopt.OptimizedModule or a (before, after[, report]) tuple of "
        f"GraphModules, got {type(obj).__name__}"
    )


def write_inspection(obj, out_dir, *, title: str | None = None, progress=None) -> dict[str, Path]:
    """Write ``before.txt``, ``after.txt``, ``diff.txt``, ``graph.html``, ``report.txt`` and
    ``kernels/`` (generated kernel source, when the graph has fused kernels) into ``out_dir``.

    ``obj`` is an ``fxopt.OptimizedModule`` or a ``(before, after[, report])`` tuple.
    ``progress`` is an optional ``callable(str)`` told about each file. Returns the paths
    by key: before, after, diff, html, report, kernels."""
    before, after, report = _unpack(obj)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda msg: None)
    paths: dict[str, Path] = {}

    say("writing before.txt")
    paths["before"] = out / "before.txt"
    paths["before"].write_text(format_graph(before), encoding="utf-8")
    say("writing after.txt")
    paths["after"] = out / "after.txt"
    paths["after"].write_text(format_graph(after), encoding="utf-8")

    say("diffing")
    diff = graph_diff(before, after)
    paths["diff"] = out / "diff.txt"
    paths["diff"].write_text(str(diff), encoding="utf-8")

    kdir = out / "kernels"
    kdir.mkdir(exist_ok=True)
    links: dict[str, str] = {}
    used: set[str] = set()
    for name, src in kernel_sources(after).items():
        fname = kernel_filename(name, src, used)
        (kdir / fname).write_text(src, encoding="utf-8")
        links[name] = f"kernels/{fname}"
    paths["kernels"] = kdir

    paths["report"] = out / "report.txt"
    report_text = (str(report).rstrip() + "\n\n") if report is not None else ""
    paths["report"].write_text(report_text + diff.summary() + "\n", encoding="utf-8")

    say("writing graph.html")
    if title is None:
        model = getattr(before, "meta", {}).get("fxopt_model") if hasattr(before, "meta") else None
        title = f"fxopt inspection: {model}" if model else "fxopt inspection"
    paths["html"] = out / "graph.html"
    paths["html"].write_text(render_html(before, after, report, title=title, diff=diff, kernels=links), encoding="utf-8")
    return paths


def iter_groups(gm) -> Iterable[tuple[str, list[Node]]]:
    """(group name, nodes) in order of first appearance -- the grouping the picture uses."""
    groups: dict[str, list[Node]] = {}
    for n in graph_of(gm).nodes:
        groups.setdefault(group_of(n), []).append(n)
    return groups.items()
