"""Which rewrite removed each node: the diff's attribution.

Three records, most specific first:

1. provenance on the new nodes (``meta["fxopt_provenance"]["from"]``): the nodes a rewrite
   replaced;
2. the erasure record the rewrite engine keeps on the rewritten module
   (``graph_module.meta[ERASED_KEY]``, see :mod:`fxopt.rewrite.driver`): every node a rewrite
   erased, also for rewrites that add nothing (cleanup's dropped checks and casts) and the inputs
   a rewrite left dead (a re-rolled loop's per-step slices). Graphs instantiated from a layer
   template name layer ``i``'s copy of node ``x`` ``x_L<i>`` (:mod:`fxopt.layer_generic`); their
   erasure record is the probe's, so a copy is looked up under its probe name;
3. orphans: a removed node not in either record (a pass outside the engine erased it as dead
   code) belongs to the rewrite that removed all of its users -- its rewrite orphaned it -- or,
   for a node without users (a metadata check), to the rewrite that removed what it checked.

What is left was removed by code that kept no record and did not orphan it through a recorded
rewrite: it is reported as such, never lumped into a rule.
"""
from __future__ import annotations

import re
from typing import Callable

import torch.fx
from torch.fx.node import Node

from ..graph_utils import ERASED_KEY

UNATTRIBUTED = "(no record: removed outside the rewrite engine)"

_LAYER_COPY = re.compile(r"^(?P<base>.+)_L(?P<layer>\d+)$")


def erasure_record(graph_module) -> dict[str, dict]:
    meta = getattr(graph_module, "meta", None)
    rec = meta.get(ERASED_KEY) if isinstance(meta, dict) else None
    return rec if isinstance(rec, dict) else {}


def erased_entry(record: dict[str, dict], name: str) -> tuple[dict, str] | None:
    """The record of ``name`` and the suffix that maps the probe's names to this graph's
    (``""``, or ``_L<i>`` for a layer template's copy)."""
    entry = record.get(name)
    if entry is not None:
        return entry, ""
    m = _LAYER_COPY.match(name)
    if m is not None:
        entry = record.get(m.group("base"))
        if entry is not None:
            return entry, f"_L{m.group('layer')}"
    return None


def propagate_orphans(before: torch.fx.Graph, removed: set[str], owner: dict[str, object],
                      assign: Callable[[str, object], None]) -> None:
    """Step 3: give each unowned removed node the owner of its removed users (all of them
    owned; the first user in graph order decides), or, when it has no users, of its first owned
    input; repeated until nothing changes."""
    pos = {n: i for i, n in enumerate(before.nodes)}
    nodes = [n for n in before.nodes if n.name in removed and n.name not in owner]
    changed = True
    while changed and nodes:
        changed = False
        left = []
        for n in reversed(nodes):  # users before their inputs: chains of dead code resolve in one sweep
            users = list(n.users)
            ins = [i for i in n.all_input_nodes if i.name in owner]
            if users and all(u.name in owner for u in users):
                assign(n.name, owner[min(users, key=pos.__getitem__).name])
                changed = True
            elif not users and ins:
                assign(n.name, owner[ins[0].name])
                changed = True
            else:
                left.append(n)
        nodes = left[::-1]
