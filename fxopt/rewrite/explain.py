"""``fxopt.explain(graph_module, pass_or_rule)``: what a pass's rules do to a graph, and why the
candidates that did not fire did not.

The explanation is the rewrite itself, run on a copy of the graph: the same driver, the same
order, the same checks (the structural match, side conditions, the replacement's dtype and shape,
a callable rule's own reasons), so explain never claims a candidate would fire that the pass
refuses, nor the reverse, and rewrites that expose or consume other candidates are accounted
for. The user's graph is not touched. Differences from a normal run: every candidate gets a
full diagnosis (pattern rules skip their quick pre-filter) and every decline is recorded.

Per rule the report lists its matches and its near misses ranked by how far they got (pattern
rules: pattern nodes matched, inputs included; callable rules: the progress they report, e.g.
the scan rule's number of steps) with the first divergence: a different op, literal 1.0 vs 2.0,
an intermediate with another user, dtype, shape, a side condition, a replacement that would
change the output dtype, a cycle, or a callable rule's reason. When the graph has no candidate
the report says so and points out ops of the same name at another overload or namespace (the
usual sign of a pattern traced at another IR).
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch.fx

from ..errors import FxoptError, UnknownPassError
from ..graph_utils import op_name
from .driver import RewritePass
from .outcome import Divergence
from .pass_base import Pass
from .rule import RuleBase, RuleSet, as_rules

__all__ = ["explain", "ExplainReport", "RuleExplanation", "NearMiss"]


@dataclass
class NearMiss:
    """One candidate anchor that did not become a rewrite."""

    anchor: str
    module: str | None
    progress: int
    total: int | None
    matched: bool
    divergence: Divergence | None
    unit: str | None = None

    @property
    def reason(self) -> str:
        return self.divergence.message if self.divergence is not None else ""

    def __str__(self) -> str:
        where = f" in {self.module}" if self.module else ""
        if self.matched:
            return f"{self.anchor}{where}: MATCH"
        if self.total is not None:
            unit = self.unit or "pattern nodes"
            return f"{self.anchor}{where}: reached {self.progress}/{self.total} {unit}; {self.divergence}"
        if self.unit:
            return f"{self.anchor}{where} ({self.progress} {self.unit}): {self.divergence}"
        return f"{self.anchor}{where}: {self.divergence}"


@dataclass
class RuleExplanation:
    rule: str
    source: str
    anchor_op: str
    candidates: int
    matches: list[str]
    near_misses: list[NearMiss]  # ranked, best first (all of them; __str__ shows ``top``)
    note: str | None = None
    reasons: Counter = field(default_factory=Counter)
    top: int = 5
    kind: str = "pattern"
    contract: str = "unstated"
    silent: int = 0  # candidates a callable rule declined without giving a reason

    def lines(self) -> list[str]:
        out = [f"rule {self.rule} ({self.kind} rule, contract {self.contract}; defined at {self.source})"]
        if self.note:
            out.append(f"  {self.note}")
            return out
        out.append(
            f"  anchor op {self.anchor_op}: {self.candidates} candidate(s), {len(self.matches)} match(es)"
            + (f": {', '.join(self.matches[:8])}{' ...' if len(self.matches) > 8 else ''}" if self.matches else "")
        )
        if self.near_misses:
            shown = self.near_misses[: self.top]
            out.append(f"  near misses: {len(self.near_misses)} candidate(s) rejected, furthest first "
                       f"(best {len(shown)} shown):")
            for i, nm in enumerate(shown, 1):
                out.append(f"    {i}. {nm}")
            if len(self.reasons) > 1 or len(self.near_misses) > len(shown):
                summary = ", ".join(f"{k} x{v}" for k, v in self.reasons.most_common())
                out.append(f"  divergence kinds over all candidates: {summary}")
        if self.silent:
            out.append(f"  {self.silent} more candidate(s) declined without a reason (not of the rule's form)")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


@dataclass
class ExplainReport:
    rules: list[RuleExplanation]
    pass_name: str | None = None
    stats: dict = field(default_factory=dict)
    note: str | None = None

    @property
    def matched(self) -> bool:
        return self.matches > 0

    @property
    def matches(self) -> int:
        if not self.rules:  # a hand-written pass: only its own count is known
            return int(self.stats.get("matches", 0))
        return sum(len(r.matches) for r in self.rules)

    def __getitem__(self, name: str) -> RuleExplanation:
        for r in self.rules:
            if r.rule == name:
                return r
        raise KeyError(name)

    def __str__(self) -> str:
        lines = []
        if self.pass_name is not None:
            lines.append(f"pass {self.pass_name}: {self.matches} rewrite(s) on a copy of the graph")
        if self.note:
            lines.append(f"  {self.note}")
        lines += [line for r in self.rules for line in r.lines()]
        return "\n".join(lines)

    __repr__ = __str__


def _similar_ops(graph_module, rule: RuleBase) -> list[str]:
    """Ops in the graph with an anchor's base name at another overload/namespace."""
    wanted = [a.strip() for a in rule.anchor_op.split("|")]
    bases = {w.split(".")[1] for w in wanted if w.count(".") >= 1}
    counts: Counter = Counter()
    for n in graph_module.graph.nodes:
        if n.op == "call_function":
            name = op_name(n)
            parts = name.split(".")
            if len(parts) >= 2 and any(parts[1] in (b, f"{b}_", f"_{b}") for b in bases) and name not in wanted:
                counts[name] += 1
    return [f"{k} x{v}" for k, v in counts.most_common(5)]


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule over a copy of ``gm``'s graph (same node names; fake values and parameters
    shared, not copied), to rewrite without touching ``gm``."""
    old = gm.graph
    graph = torch.fx.Graph(tracer_cls=getattr(old, "_tracer_cls", None))
    graph._codegen = old._codegen  # how inputs/outputs are (un)flattened: read-only, shared
    out_val, old_out = graph.graph_copy(old, {}, return_output_node=True)
    new_out = graph.output(out_val, type_expr=getattr(old_out, "type", None))
    new_out.meta = copy.copy(old_out.meta)
    out = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    out.meta = dict(getattr(gm, "meta", {}) or {})
    return out


def _resolve(what) -> tuple[Pass, list[str] | None]:
    """(the pass to run, the names of the rules to report, None = all)."""
    if isinstance(what, str):
        from ..registry import available_passes, get_pass

        names = available_passes()
        if what in names:
            return get_pass(what), None
        tables = [(n, get_pass(n)) for n in names]
        # a rule name ("dead_view", "residual_add.tree"), or "<pass>.<rule>"
        owner, _, tail = what.partition(".")
        for pname, rule_name in [(n, what) for n in names] + ([(owner, tail)] if owner in names else []):
            p = dict(tables)[pname]
            if isinstance(p, RewritePass) and any(r.name == rule_name for r in p.rules):
                return p, [rule_name]
        raise UnknownPassError(
            f"no pass or rule named {what!r}; passes: {', '.join(names)}. Rules: "
            + "; ".join(f"{n}: {', '.join(r.name for r in p.rules)}" for n, p in tables if isinstance(p, RewritePass))
        )
    if isinstance(what, Pass):
        return what, None
    if isinstance(what, (RuleBase, RuleSet)) or (isinstance(what, (list, tuple)) and what):
        rules = as_rules(what)
        return RewritePass(getattr(what, "name", None) or "explain", rules), None
    raise FxoptError(f"fxopt.explain takes a pass name, a rule name, a Pass, a Rule/NodeRule/RuleSet or a list of "
                     f"rules; got {type(what).__name__}: {what!r}")


def _explain_hand_written(gm: torch.fx.GraphModule, p: Pass, top: int) -> ExplainReport:
    """A pass that is not a rule table: its own ``explain(gm, top)`` if it has one, else what it
    does to a copy (there are no rules to give near misses for)."""
    own = getattr(p, "explain", None)
    if callable(own):
        return own(gm, top=top)
    work = copy_graph_module(gm)
    p.requires(work)
    result = p.call(work)
    stats = dict(getattr(result, "stats", {}) or {})
    return ExplainReport([], p.name, stats, note=(
        f"{type(p).__name__} is hand-written, not a rule table: it made {stats.get('matches', 0)} rewrite(s) on a "
        "copy, and there are no rules to report near misses for; write it as an fxopt.RewritePass of Rules / "
        "NodeRules (see examples/custom_pass.py) to get them"))


def explain(graph_module, rule, top: int = 5) -> ExplainReport:
    """Report, for each rule of ``rule`` (a pass name or a rule name, a RewritePass, a Rule,
    NodeRule, RuleSet or list of rules), its matches and ranked near misses in ``graph_module``
    (an OptimizedModule works too). Read-only: the rewrite runs on a copy."""
    gm = getattr(graph_module, "graph_module", graph_module)
    if not isinstance(gm, torch.fx.GraphModule):
        raise FxoptError(f"fxopt.explain needs a torch.fx.GraphModule (or an OptimizedModule), got {type(gm).__name__}")
    p, only = _resolve(rule)
    if not isinstance(p, RewritePass):
        return _explain_hand_written(gm, p, top)
    work = copy_graph_module(gm)
    ctx = p.make_context(work, diagnose=True)
    p.requires(work)
    p.rewrite(ctx)

    erased: set[str] = set()
    matches: dict[str, list[str]] = {r.name: [] for r in p.rules}
    for rec in ctx.rewrites:
        matches[rec.rule].append(rec.anchor)
        erased.update(rec.erased)
    latest: dict[tuple[str, str], object] = {}
    for d in ctx.declines:
        latest[(d.rule, d.anchor)] = d
    positions = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    out = []
    for r in p.rules:
        if only is not None and r.name not in only:
            continue
        won = set(matches[r.name])
        misses = [d for (rn, anchor), d in latest.items()
                  if rn == r.name and anchor not in won and anchor not in erased]
        misses.sort(key=lambda d: (-d.progress, positions.get(d.anchor, len(positions))))
        near = [NearMiss(d.anchor, d.module, d.progress, d.total, False, d.divergence, r.progress_unit)
                for d in misses]
        cands = len(dict.fromkeys(ctx.candidates.get(r.name, ())))
        note = None
        if cands == 0:
            note = f"no candidates: the graph has no {r.anchor_op}"
            similar = _similar_ops(gm, r) if r.anchors is not None else []
            if similar:
                note += (f" (it has {', '.join(similar)}: was the pattern traced at another IR, or does the model "
                         "use another overload?)")
        reasons = Counter(nm.divergence.kind for nm in near if nm.divergence is not None)
        out.append(RuleExplanation(r.name, r.source, r.anchor_op, cands, matches[r.name], near, note=note,
                                   reasons=reasons, top=top, kind=r.kind, contract=r.contract_name,
                                   silent=ctx.silent.get(r.name, 0)))
    return ExplainReport(out, p.name, dict(ctx.stats))
