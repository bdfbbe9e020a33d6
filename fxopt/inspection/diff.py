"""What changed between two graphs of one capture, every change attributed to a rule
(attribution: :mod:`fxopt.inspection.attribution`)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.fx.node import Node

from ..graph_utils import PROVENANCE_KEY, is_input_guard
from .attribution import UNATTRIBUTED, erased_entry, erasure_record, propagate_orphans
from .nodes import format_node, format_value, graph_of, group_of, no_gc, opn, provenance, short_list


@dataclass
class Rewrite:
    """One application of a rule: ``replaced`` (the names recorded by the pass) became ``added``."""

    rule: str
    pass_name: str
    source: str | None
    replaced: list[str]
    removed: list[str]  # those of ``replaced`` that exist in ``before`` and not in ``after``
    added: list[str]
    group: str
    info: dict = field(default_factory=dict)  # the rule's details (the scan: steps)
    orphaned: list[str] = field(default_factory=list)  # of ``removed``: dead code this rewrite left

    @property
    def summary(self) -> str:
        """A scan region reads "L-step unrolled loop -> selective_scan"; other rewrites name
        their rule."""
        steps = self.info.get("steps")
        if isinstance(steps, int) and self.pass_name == "scan":
            return f"{steps}-step unrolled loop -> {self.rule}"
        return self.rule

    def __str__(self) -> str:
        src = f"  [{self.source}]" if self.source else ""
        what = f" {self.summary}:" if self.summary != self.rule else ""
        extra = f" (+{len(self.orphaned)} left dead)" if self.orphaned else ""
        return (
            f"[{self.rule}] (pass {self.pass_name}) @ {self.group}:{what} "
            f"{short_list(self.replaced, 12) or '(nothing)'} -> {short_list(self.added, 12) or '(erased)'}{extra}{src}"
        )


@dataclass
class RuleSummary:
    rule: str
    pass_name: str
    source: str | None = None
    rewrites: int = 0
    added: int = 0
    removed: int = 0
    groups: list[str] = field(default_factory=list)


@dataclass
class GraphDiff:
    """The difference between two graphs of one capture (``before`` -> ``after``)."""

    before_nodes: int
    after_nodes: int
    removed: list[str]  # node names, in before's order
    added: list[str]  # node names, in after's order
    rewired: list[str]  # surviving nodes whose inputs changed
    rewrites: list[Rewrite]
    rules: dict[str, RuleSummary]
    removed_by: dict[str, str]  # removed node -> the rule whose rewrite removed it (absent: no record)
    op_counts_before: Counter
    op_counts_after: Counter
    before_inputs: list[str] = field(default_factory=list)  # dtype[shape] of each input
    after_inputs: list[str] = field(default_factory=list)
    _before: torch.fx.Graph | None = field(default=None, repr=False, compare=False)
    _after: torch.fx.Graph | None = field(default=None, repr=False, compare=False)

    @property
    def same_inputs(self) -> bool:
        return self.before_inputs == self.after_inputs

    def inputs_note(self) -> str | None:
        """When ``before`` was built for other input shapes than ``after`` (a length-generic
        template: the unrolled graph at the real length is never built, ``before`` is the capture
        at the probe length and ``after`` the graph instantiated for the real one), say so: the
        counts are those of the graphs shown."""
        if self.same_inputs:
            return None
        return (f"before is the capture for inputs {', '.join(self.before_inputs) or '()'} (a probe: the graph "
                f"at the real size was never built); after is the graph that runs, for inputs "
                f"{', '.join(self.after_inputs) or '()'}, instantiated from the probe's rewritten graph")

    @property
    def unattributed_removed(self) -> list[str]:
        return [n for n in self.removed if n not in self.removed_by]

    @property
    def op_delta(self) -> dict[str, tuple[int, int]]:
        keys = set(self.op_counts_before) | set(self.op_counts_after)
        out = {}
        for k in sorted(keys):
            b, a = self.op_counts_before.get(k, 0), self.op_counts_after.get(k, 0)
            if a != b:
                out[k] = (b, a)
        return out

    def summary(self) -> str:
        """Counts and the per-rule table (no per-node lists)."""
        lines = [
            f"graph diff: {self.before_nodes} -> {self.after_nodes} nodes "
            f"({len(self.removed)} removed, {len(self.added)} added, {len(self.rewired)} rewired, "
            f"{len(self.rewrites)} rewrites)"
        ]
        note = self.inputs_note()
        if note:
            lines.append(f"note: {note}")
        if self.rules or self.unattributed_removed:
            rows = [("rule", "pass", "rewrites", "+nodes", "-nodes", "groups")]
            for r in self.rules.values():
                groups = short_list(r.groups, 4)
                rows.append((r.rule, r.pass_name, str(r.rewrites), str(r.added), str(r.removed), groups))
            un = self.unattributed_removed
            if un:
                rows.append((UNATTRIBUTED, "-", "-", "0", str(len(un)), ""))
            lines.append("")
            lines.append("per rule:")
            lines.extend("  " + l for l in text_table(rows))
        elif not self.removed and not self.added:
            lines.append("no changes")
        delta = self.op_delta
        if delta:
            lines.append("")
            lines.append("op counts (before -> after):")
            rows = [(k, f"{b} -> {a}", f"({a - b:+d})") for k, (b, a) in delta.items()]
            lines.extend("  " + l for l in text_table(rows))
        return "\n".join(lines)

    @no_gc
    def __str__(self) -> str:
        lines = [self.summary()]
        if self.rewrites:
            lines += ["", f"rewrites ({len(self.rewrites)}):"]
            lines += ["  " + str(r) for r in self.rewrites]
        if self.removed:
            lines += ["", f"removed ({len(self.removed)}):"]
            dead = {n for rw in self.rewrites for n in rw.orphaned}
            for name in self.removed:
                node = lookup(self._before, name)
                desc = format_node(node) if node is not None else name
                by = self.removed_by.get(name)
                how = ", left dead" if name in dead else ""
                lines.append(f"  - {desc}" + (f"  [by {by}{how}]" if by else "  [no record]"))
        if self.added:
            lines += ["", f"added ({len(self.added)}):"]
            for name in self.added:
                node = lookup(self._after, name)
                lines.append(f"  + {format_node(node) if node is not None else name}")
        if self.rewired:
            lines += ["", f"rewired ({len(self.rewired)}): surviving nodes whose inputs changed"]
            for name in self.rewired:
                node = lookup(self._after, name)
                lines.append(f"  ~ {format_node(node) if node is not None else name}")
        return "\n".join(lines) + "\n"


_LOOKUP_CACHE: dict[int, tuple[int, dict[str, Node]]] = {}


def index_nodes(graph: torch.fx.Graph) -> dict[str, Node]:
    return {n.name: n for n in graph.nodes}


def lookup(graph: torch.fx.Graph | None, name: str) -> Node | None:
    if graph is None:
        return None
    key = id(graph)
    cached = _LOOKUP_CACHE.get(key)
    size = len(graph.nodes)
    if cached is None or cached[0] != size:
        if len(_LOOKUP_CACHE) > 8:
            _LOOKUP_CACHE.clear()
        cached = (size, index_nodes(graph))
        _LOOKUP_CACHE[key] = cached
    return cached[1].get(name)


def text_table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def input_values(graph: torch.fx.Graph) -> list[str]:
    """``dtype[shape]`` of each graph input (what a graph was captured or instantiated for)."""
    return [format_value(n.meta.get("val")) for n in graph.find_nodes(op="placeholder")]


@no_gc
def graph_diff(before, after) -> GraphDiff:
    """Compare two graphs of one capture. Nodes are matched by name (passes keep surviving
    nodes' names); a node present in both whose ``after`` version carries provenance the
    ``before`` one lacks counts as removed and re-added (rewritten in place). export's
    input-shape guard is not counted (:func:`fxopt.graph_utils.node_count`). Every removed node
    is attributed to the rewrite that removed it (:mod:`fxopt.inspection.attribution`)."""
    gb, ga = graph_of(before), graph_of(after)
    bidx = {n.name: n for n in gb.nodes if not is_input_guard(n)}
    aidx = {n.name: n for n in ga.nodes if not is_input_guard(n)}
    rewritten_in_place = {
        name
        for name, n in aidx.items()
        if PROVENANCE_KEY in n.meta and name in bidx and PROVENANCE_KEY not in bidx[name].meta
    }
    removed = [name for name in bidx if name not in aidx or name in rewritten_in_place]
    added = [name for name in aidx if name not in bidx or name in rewritten_in_place]
    removed_set = set(removed)

    rewired = []
    for name, an in aidx.items():
        bn = bidx.get(name)
        if bn is None or name in rewritten_in_place:
            continue
        if [i.name for i in an.all_input_nodes] != [i.name for i in bn.all_input_nodes]:
            rewired.append(name)

    # 1. new nodes grouped into rewrites by their provenance record
    rewrites: dict[tuple, Rewrite] = {}
    owner: dict[str, Rewrite] = {}
    for name in added:
        node = aidx[name]
        prov = provenance(node)
        if prov is None:
            key = ("(unknown)", "(unknown)", None, ())
        else:
            key = (
                str(prov.get("rule") or "?"),
                str(prov.get("pass") or "?"),
                prov.get("source"),
                tuple(str(x) for x in (prov.get("from") or ())),
            )
        rw = rewrites.get(key)
        if rw is None:
            replaced = list(key[3])
            info = prov.get("info") if prov is not None else None
            rw = Rewrite(
                rule=key[0],
                pass_name=key[1],
                source=key[2],
                replaced=replaced,
                removed=[],
                added=[],
                group=group_of(node),
                info=dict(info) if isinstance(info, dict) else {},
            )
            rewrites[key] = rw
            for r in replaced:
                if r in removed_set and r not in owner:
                    owner[r] = rw
                    rw.removed.append(r)
        rw.added.append(name)

    # 2. the engine's erasure record: rewrites that added nothing, and what rewrites left dead
    record = erasure_record(after)
    by_rule: dict[str, list[Rewrite]] = {}
    for rw in rewrites.values():
        by_rule.setdefault(rw.rule, []).append(rw)
    replaced_by = {(rw.rule, r): rw for rw in rewrites.values() for r in rw.replaced}
    erased_only: dict[tuple, Rewrite] = {}
    for name in removed:
        if name in owner:
            continue
        hit = erased_entry(record, name)
        if hit is None:
            continue
        entry, suffix = hit
        rule, pname = str(entry.get("rule") or "?"), str(entry.get("pass") or "?")
        anchor = f"{entry.get('anchor')}{suffix}"
        rw = replaced_by.get((rule, anchor)) or erased_only.get((rule, pname, anchor))
        if rw is None:
            anchor_node = bidx.get(anchor)
            rw = erased_only[(rule, pname, anchor)] = Rewrite(
                rule=rule, pass_name=pname, source=entry.get("source"), replaced=[], removed=[], added=[],
                group=group_of(anchor_node if anchor_node is not None else bidx[name]))
        owner[name] = rw
        rw.removed.append(name)
        if not rw.added:
            rw.replaced.append(name)

    # 3. dead code a recorded rewrite orphaned
    def assign(name: str, rw: Rewrite) -> None:
        owner[name] = rw
        rw.removed.append(name)
        rw.orphaned.append(name)

    propagate_orphans(gb, removed_set, owner, assign)

    all_rewrites = list(rewrites.values()) + list(erased_only.values())
    order = {name: i for i, name in enumerate(removed)}
    removed_by: dict[str, str] = {}
    rules: dict[str, RuleSummary] = {}
    for rw in all_rewrites:
        rw.removed.sort(key=order.__getitem__)
        rs = rules.get(rw.rule)
        if rs is None:
            rs = rules[rw.rule] = RuleSummary(rule=rw.rule, pass_name=rw.pass_name, source=rw.source)
        rs.rewrites += 1
        rs.added += len(rw.added)
        rs.removed += len(rw.removed)
        for r in rw.removed:
            removed_by[r] = rw.rule
        if rw.group not in rs.groups:
            rs.groups.append(rw.group)

    return GraphDiff(
        before_nodes=len(bidx),
        after_nodes=len(aidx),
        removed=removed,
        added=added,
        rewired=rewired,
        rewrites=all_rewrites,
        rules=rules,
        removed_by=removed_by,
        op_counts_before=Counter(opn(n) for n in bidx.values()),
        op_counts_after=Counter(opn(n) for n in aidx.values()),
        before_inputs=input_values(gb),
        after_inputs=input_values(ga),
        _before=gb,
        _after=ga,
    )
