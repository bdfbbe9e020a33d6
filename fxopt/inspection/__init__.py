"""Inspection: before/after graph listings, a diff that attributes every change to a rule, and
an HTML picture. Everything here reads graphs; nothing mutates them.

* :mod:`.nodes` -- facts about one node (module path, layer group, ``dtype[shape]``, provenance);
* :mod:`.listing` -- :func:`format_graph`: one line per node;
* :mod:`.diff` / :mod:`.attribution` -- :func:`graph_diff`: nodes removed, added and re-wired,
  each rewrite (rule, replaced nodes, new nodes) and a per-rule summary; every removed node
  belongs to the rewrite that removed it (new nodes' provenance, the engine's erasure record,
  dead code its rewrite orphaned);
* :mod:`.groups`, :mod:`.drawing`, :mod:`.page` -- :func:`render_html`: one self-contained page,
  nodes grouped by model layer, search, a changed-only filter, expand/collapse all, a small
  before/after drawing per rewrite (a scan region as "L-step unrolled loop -> selective_scan");
* :mod:`.folder` -- :func:`write_inspection`: all of the above, the report and the source of the
  kernels that run into one folder;
* :mod:`.kernels` -- which kernel files the folder gets.
"""
from __future__ import annotations

from .diff import GraphDiff, Rewrite, RuleSummary, graph_diff
from .folder import iter_groups, write_inspection
from .listing import format_graph
from .nodes import format_node, format_value, layer_of, module_path
from .page import render_html

__all__ = [
    "GraphDiff",
    "Rewrite",
    "RuleSummary",
    "format_graph",
    "format_node",
    "format_value",
    "graph_diff",
    "iter_groups",
    "layer_of",
    "module_path",
    "render_html",
    "write_inspection",
]
