"""``fxopt.explain(graph_module, rule)``: why does a rule (not) match?

For every candidate anchor -- a graph node computing the same op as the pattern's
(first) output -- the matcher is run without touching the graph, and the candidates
are ranked by how far they got: how many pattern nodes (inputs included) were matched
at the furthest point, and the first divergence there (different op, literal 1.0 vs
2.0, an intermediate with another user, dtype, shape, extra_check, a replacement
that would change the output dtype, a cycle). When the graph has no candidate at all
the report says so, and points out ops with the same name at another overload or
namespace (the usual sign of a pattern traced at another IR).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch.fx

from .graph_utils import op_name
from .pattern import Attempt, RewritePass, Rule, _as_rules, _index_by_target, _Matcher, _Positions

__all__ = ["explain", "ExplainReport", "RuleExplanation", "NearMiss"]


def _module_of(node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _cls = list(stack.values())[-1]
    return str(path).replace("L['self'].", "").replace("L__self___", "") or None


@dataclass
class NearMiss:
    """One candidate anchor that did not match (or did: ``matched``)."""

    anchor: str
    module: str | None
    progress: int
    total: int
    matched: bool
    divergence: object | None  # fxopt.pattern.Divergence

    def __str__(self) -> str:
        where = f" in {self.module}" if self.module else ""
        if self.matched:
            return f"{self.anchor}{where}: MATCH"
        return f"{self.anchor}{where}: reached {self.progress}/{self.total} pattern nodes; {self.divergence}"


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

    def lines(self) -> list[str]:
        out = [f"rule {self.rule} (defined at {self.source})"]
        if self.note:
            out.append(f"  {self.note}")
            return out
        out.append(
            f"  anchor op {self.anchor_op}: {self.candidates} candidate(s), {len(self.matches)} match(es)"
            + (f": {', '.join(self.matches[:8])}{' ...' if len(self.matches) > 8 else ''}" if self.matches else "")
        )
        if self.near_misses:
            shown = self.near_misses[: self.top]
            out.append(f"  near misses (best {len(shown)} of {len(self.near_misses)}, ranked by pattern nodes matched):")
            for i, nm in enumerate(shown, 1):
                out.append(f"    {i}. {nm}")
            if len(self.reasons) > 1 or len(self.near_misses) > len(shown):
                summary = ", ".join(f"{k} x{v}" for k, v in self.reasons.most_common())
                out.append(f"  divergence kinds over all candidates: {summary}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


@dataclass
class ExplainReport:
    rules: list[RuleExplanation]

    @property
    def matched(self) -> bool:
        return any(r.matches for r in self.rules)

    def __getitem__(self, name: str) -> RuleExplanation:
        for r in self.rules:
            if r.rule == name:
                return r
        raise KeyError(name)

    def __str__(self) -> str:
        return "\n".join(line for r in self.rules for line in r.lines())

    __repr__ = __str__


def _similar_ops(graph_module, rule: Rule) -> list[str]:
    """Ops in the graph with the anchor's base name at another overload/namespace."""
    want = rule.anchor_op  # e.g. aten.mul.Tensor
    base = want.split(".")[1] if want.count(".") >= 1 else want
    counts: Counter = Counter()
    for n in graph_module.graph.nodes:
        if n.op == "call_function":
            name = op_name(n)
            parts = name.split(".")
            if len(parts) >= 2 and parts[1] in (base, f"{base}_", f"_{base}") and name != want:
                counts[name] += 1
    return [f"{k} x{v}" for k, v in counts.most_common(5)]


def _explain_rule(graph_module: torch.fx.GraphModule, rule: Rule, idx, top: int) -> RuleExplanation:
    anchor_op = rule.anchor_op
    cands = idx.get(rule.anchor_target, [])
    if not cands:
        similar = _similar_ops(graph_module, rule)
        note = f"no candidates: the graph has no {anchor_op}"
        if similar:
            note += (f" (it has {', '.join(similar)}: was the pattern traced at another IR, or does the model "
                     "use another overload?)")
        return RuleExplanation(rule.name, rule.source, anchor_op, 0, [], [], note=note, top=top)
    matcher = _Matcher(rule, graph_module)
    positions = _Positions(graph_module.graph) if len(rule.traced_pattern.outputs) > 1 else None
    attempts: list[tuple[int, Attempt]] = []
    for i, c in enumerate(cands):
        attempts.append((i, matcher.attempt(c, positions)))
    matches = [a.anchor.name for _, a in attempts if a.matched]
    misses = [(i, a) for i, a in attempts if not a.matched]
    misses.sort(key=lambda t: (-t[1].progress, t[0]))
    near = [NearMiss(a.anchor.name, _module_of(a.anchor), a.progress, a.total, False, a.divergence) for _, a in misses]
    reasons = Counter(a.divergence.kind for _, a in misses if a.divergence is not None)
    return RuleExplanation(rule.name, rule.source, anchor_op, len(cands), matches, near, reasons=reasons, top=top)


def explain(graph_module: torch.fx.GraphModule, rule, top: int = 5) -> ExplainReport:
    """Report, for each rule of ``rule`` (a Rule, RuleSet, list of rules or RewritePass),
    its matches and its ranked near misses in ``graph_module``. Read-only.

    Structural passes that are not rule tables (``"scan"``) explain themselves: give
    the pass or its registered name and its own ``explain(gm, top)`` report comes back."""
    gm = getattr(graph_module, "graph_module", graph_module)  # an OptimizedModule works too
    if isinstance(rule, str):
        from .registry import get_pass

        rule = get_pass(rule)
    if not isinstance(rule, RewritePass) and callable(getattr(rule, "explain", None)):
        return rule.explain(gm, top=top)
    rules = _as_rules(rule)
    idx = _index_by_target(gm.graph)
    return ExplainReport([_explain_rule(gm, r, idx, top) for r in rules])
