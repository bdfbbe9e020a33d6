"""The page's grouping: after's nodes in graph order with each removed node placed where it
stood, split by model layer."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.fx.node import Node

from ..graph_utils import is_input_guard
from .diff import GraphDiff, Rewrite
from .nodes import INPUTS_GROUP, OUTPUTS_GROUP, group_of, opn


@dataclass
class Row:
    kind: str  # "new", "rm", "rw", ""
    node: Node


@dataclass
class Group:
    name: str
    rows: list[Row] = field(default_factory=list)
    n_before: int = 0
    n_after: int = 0
    n_new: int = 0
    n_rm: int = 0
    n_rw: int = 0
    rewrites: list[Rewrite] = field(default_factory=list)
    ops_after: Counter = field(default_factory=Counter)
    ops_before: Counter = field(default_factory=Counter)
    first_index: int = 1 << 62  # position of the first compute row in the merged order


def merged_groups(gb: torch.fx.Graph, ga: torch.fx.Graph, diff: GraphDiff) -> list[Group]:
    """After's nodes in order, with each removed node inserted right after the last node
    that preceded it in ``before`` and survived; then split by layer group."""
    removed = set(diff.removed)
    added = set(diff.added)
    rewired = set(diff.rewired)
    anchored: dict[str | None, list[Node]] = {}
    last_survivor: str | None = None
    for n in gb.nodes:
        if n.name in removed:
            anchored.setdefault(last_survivor, []).append(n)
        else:
            last_survivor = n.name

    groups: dict[str, Group] = {}

    def grp(name: str) -> Group:
        g = groups.get(name)
        if g is None:
            g = groups[name] = Group(name)
        return g

    # group of each before node, reused for surviving after nodes (same name, same meta)
    group_by_name: dict[str, str] = {}
    for n in gb.nodes:
        if is_input_guard(n):  # not counted (graph_utils.node_count), not shown
            continue
        gname = group_of(n)
        group_by_name[n.name] = gname
        g = grp(gname)
        g.n_before += 1
        g.ops_before[opn(n)] += 1
    counter = 0

    def add_removed(anchor: str | None) -> None:
        nonlocal counter
        for rn in anchored.get(anchor, ()):
            g = grp(group_by_name[rn.name])
            g.rows.append(Row("rm", rn))
            g.n_rm += 1
            counter += 1
            if rn.op not in ("get_attr", "placeholder"):
                g.first_index = min(g.first_index, counter)

    add_removed(None)
    for n in ga.nodes:
        if is_input_guard(n):
            continue
        name = n.name
        kind = "new" if name in added else ("rw" if name in rewired else "")
        gname = group_by_name.get(name) if kind != "new" else None
        g = grp(gname if gname is not None else group_of(n))
        counter += 1
        if n.op not in ("get_attr", "placeholder"):
            g.first_index = min(g.first_index, counter)
        g.rows.append(Row(kind, n))
        g.n_after += 1
        g.ops_after[opn(n)] += 1
        if kind == "new":
            g.n_new += 1
        elif kind == "rw":
            g.n_rw += 1
        add_removed(name)  # only surviving names are anchors
    for rw in diff.rewrites:
        grp(rw.group).rewrites.append(rw)
    return sorted(groups.values(), key=_group_order_key)


def _group_order_key(g: Group) -> tuple:
    """Inputs first, outputs last, the rest by their first compute node (parameters sit at
    the top of exported graphs and would otherwise decide the order)."""
    if g.name == INPUTS_GROUP:
        return (0, 0)
    if g.name == OUTPUTS_GROUP:
        return (3, 0)
    if g.first_index < (1 << 62):
        return (1, g.first_index)
    return (2, 0)


def group_signature(g: Group) -> tuple:
    return tuple((r.kind, opn(r.node)) for r in g.rows if r.node.op not in ("get_attr", "placeholder"))

