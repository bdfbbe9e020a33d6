"""The one driver every rewrite goes through: which node each rule is tried at, in what order,
how a proposed Replacement is checked and spliced in, provenance, and per-run statistics.

A :class:`RewritePass` is a list of :class:`Phase` s; a phase is a rule table plus a walk order.
One *sweep* of a phase visits the graph's call nodes in order (``forward``: graph order;
``reverse``: last node first, which makes greedy structural rules take maximal regions) and at
each node tries the rules anchored at its op, in table order; the first rule whose
Replacement applies wins the node. Nodes inserted during a sweep are seen by the next one;
sweeps repeat (at most ``max_sweeps``) until one changes nothing, and when every rule of the
phase has a bounded :attr:`~fxopt.rewrite.rule.RuleBase.reach`, a later sweep looks only that
far downstream of what the previous sweep changed.

Applying a Replacement (:func:`apply_replacement`):

1. ``build`` inserts its nodes through a :class:`Builder` (fake values propagated as they go);
2. every new value must have the dtype and shape of the node it replaces, else everything built
   is removed again and the candidate counts as declined (so do a ``Declined`` raised inside
   ``build`` and a replacement op that fails on the inputs' fake values);
3. each new node's ``meta["fxopt_provenance"]`` names the rule (or the variant it reported), the
   pass, the replaced nodes and the rule's source line;
4. users of each output move to its new value (users inside the match stay), and matched nodes
   left without users are erased (with export's metadata checks on them; pure nodes that only
   fed them too when the Replacement says ``erase_unused_inputs``).

Statistics live in the run's :class:`RewriteContext` (``matches``, ``rule:<label>`` for every
label of every rule, zeros included) and come back in the PassResult; nothing is counted on
rule objects. Lint and recompile are not the driver's: :func:`fxopt.rewrite.pass_base.run_pass`
does them once per pass that changed the graph.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx
from torch.fx.node import Node

from ..errors import PatternError
from ..graph_utils import ERASED_KEY, PROVENANCE_KEY, fake_mode_of, mark_provenance, op_name, propagate_meta
from .graph_ops import Positions, erase_dead, is_live, stable_toposort
from .outcome import Attempt, Declined, Divergence, Replacement
from .pass_base import Pass, PassResult
from .rule import RuleBase, RuleSet, as_rules

__all__ = ["RewriteContext", "Builder", "Phase", "RewritePass", "apply_rules", "find_matches",
           "RewriteRecord", "DeclineRecord"]

log = logging.getLogger("fxopt.rewrite")

_UNSET = object()


@dataclass
class RewriteRecord:
    """One applied rewrite (``PassResult.rewrites``)."""

    rule: str
    label: str
    anchor: str
    added: list[str]
    erased: list[str]
    info: dict = field(default_factory=dict)


@dataclass
class DeclineRecord:
    """One declined candidate (``PassResult.declines``; kept for rules with ``keep_declines``,
    and for every rule while explaining)."""

    rule: str
    anchor: str
    module: str | None
    progress: int
    total: int | None
    divergence: Divergence


def module_of(node: Node) -> str | None:
    """The model submodule a node came from (``layers.0.mixer``), from export's module stack."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _cls = list(stack.values())[-1]
    return str(path).replace("L['self'].", "").replace("L__self___", "") or None


class RewriteContext:
    """The state of one pass run over one graph; rules see it as ``ctx``.

    ``stats`` / ``rewrites`` / ``declines`` are this run's and nobody else's. ``diagnose`` is set
    by :func:`fxopt.explain`: rules then skip shortcuts that only save time (pattern rules'
    quick rejection) and every decline is recorded.
    """

    def __init__(self, graph_module: torch.fx.GraphModule, pass_name: str, *, diagnose: bool = False):
        self.graph_module = graph_module
        self.pass_name = pass_name
        self.diagnose = diagnose
        self.stats: dict[str, int] = {"matches": 0}
        self.rewrites: list[RewriteRecord] = []
        self.declines: list[DeclineRecord] = []
        self.candidates: dict[str, list[str]] = defaultdict(list)  # diagnose only: rule -> anchors tried
        self.silent: dict[str, int] = defaultdict(int)  # diagnose only: candidates declined without a reason
        self._positions: Positions | None = None
        self._memo: dict = {}
        self._caches: dict = {}
        self._made_by: dict[str, set] = defaultdict(set)
        self._fake_mode = _UNSET
        self.last_added: list[Node] = []
        self.verified: set[Node] = set()  # fake values derived here (see PassResult.verified)
        self.erased_by: dict[str, dict] = {}  # erased node name -> the rewrite that erased it

    # ---------------------------------------------------------------- for rules
    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph

    @property
    def positions(self) -> Positions:
        if self._positions is None:
            self._positions = Positions(self.graph)
        return self._positions

    def position(self, node: Node) -> int:
        """An order key: ``position(a) < position(b)`` iff ``a`` comes before ``b``."""
        return self.positions[node]

    def memo(self, key, compute: Callable[[], Any]):
        """``compute()`` once per sweep (a whole-graph analysis a rule consults at every node)."""
        try:
            return self._memo[key]
        except KeyError:
            value = self._memo[key] = compute()
            return value

    def cache(self, key) -> dict:
        """A dict that lives as long as this run (and no longer: it may hold graph nodes)."""
        return self._caches.setdefault(key, {})

    @property
    def fake_mode(self):
        if self._fake_mode is _UNSET:
            self._fake_mode = fake_mode_of(self.graph_module)
        return self._fake_mode

    # ---------------------------------------------------------------- for the driver
    def init_stats(self, rules: Iterable[RuleBase]) -> None:
        for r in rules:
            for label in r.stat_labels:
                self.stats.setdefault(f"rule:{label}", 0)

    def new_sweep(self) -> None:
        self._memo.clear()

    def declined(self, rule: RuleBase, node: Node, att: Attempt) -> None:
        div = att.divergence or Divergence("declined", "declined")
        if self.diagnose or rule.keep_declines:
            self.declines.append(DeclineRecord(rule.name, node.name, module_of(node), att.progress, att.total, div))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: rule %s declined at %s (%s): %s", self.pass_name, rule.name, node.name, op_name(node), div)

    def result(self) -> PassResult:
        if self.erased_by:  # copy on write: copied graph modules share their meta's values
            merged = dict(self.graph_module.meta.get(ERASED_KEY) or {})
            merged.update(self.erased_by)
            self.graph_module.meta[ERASED_KEY] = merged
        return PassResult(self.graph_module, self.stats["matches"] > 0, dict(self.stats),
                          rewrites=list(self.rewrites), declines=list(self.declines),
                          verified={n for n in self.verified if is_live(n)})


class Builder:
    """Inserts a Replacement's nodes at one place of the graph and propagates their fake values.

    ``b.call(target, *args, **kwargs)`` / ``b.op(target, args, kwargs, val=...)`` add a call
    (``val`` sets the fake value instead of propagating it); ``b.copy(node, env)`` copies a node
    of another graph (a traced replacement) with its inputs mapped through ``env``;
    ``b.constant(tensor)`` adds a tensor the graph module holds. A call whose target fails on its
    inputs' fake values declines the whole Replacement; a declined Replacement leaves nothing
    behind (nodes and constants are removed)."""

    def __init__(self, ctx: RewriteContext, *, before: Node | None = None, after: Node | None = None):
        if (before is None) == (after is None):
            raise PatternError("a Replacement is inserted either before or after one node")
        self.ctx = ctx
        self.graph_module = ctx.graph_module
        self.graph = ctx.graph
        self.new: list[Node] = []
        self._before = before
        self._cursor = after
        self._buffers: list[str] = []

    def _inserting(self):
        return self.graph.inserting_before(self._before) if self._before is not None else \
            self.graph.inserting_after(self._cursor)

    def _placed(self, node: Node) -> Node:
        self.new.append(node)
        if self._before is None:
            self._cursor = node
        return node

    def op(self, target, args: Sequence = (), kwargs: dict | None = None, *, val: Any = _UNSET) -> Node:
        with self._inserting():
            node = self.graph.call_function(target, tuple(args), dict(kwargs or {}))
        self._placed(node)
        if val is not _UNSET:
            node.meta["val"] = val
        else:
            self._propagate(node)
        return node

    def call(self, target, *args, **kwargs) -> Node:
        return self.op(target, args, kwargs)

    def copy(self, node: Node, env: dict) -> Node:
        with self._inserting():
            new = self.graph.node_copy(node, lambda a: env[a])
        new.meta = {}
        self._placed(new)
        self._propagate(new)
        return new

    def constant(self, tensor: torch.Tensor, name: str = "fxopt_constant") -> Node:
        """A new tensor held by the graph module (a buffer under a fresh ``name``, e.g. weights a
        rewrite derives from the model's) and a ``get_attr`` node reading it. The user's model is
        not touched: the buffer lives on the GraphModule being rewritten."""
        gm = self.graph_module
        qual, i = name, 0
        while hasattr(gm, qual):
            i += 1
            qual = f"{name}_{i}"
        gm.register_buffer(qual, tensor)
        self._buffers.append(qual)
        with self._inserting():
            node = self.graph.get_attr(qual)
        self._placed(node)
        mode = self.ctx.fake_mode
        node.meta["val"] = mode.from_tensor(tensor) if mode is not None else tensor
        self.ctx.verified.add(node)
        return node

    def _propagate(self, node: Node) -> None:
        mode = self.ctx.fake_mode
        if mode is None or any("val" not in i.meta for i in node.all_input_nodes):
            return  # a graph without fake values: nothing to propagate or check against
        try:
            propagate_meta(self.graph_module, [node], mode)
            self.ctx.verified.add(node)
        except Exception as exc:  # noqa: BLE001 - the replacement does not apply to these inputs
            first = (str(exc).splitlines() or [""])[0]
            raise Declined(Divergence("replacement", f"the replacement's {op_name(node)} fails on these inputs: "
                                      f"{type(exc).__name__}: {first}", graph_node=node.name,
                                      graph_op=op_name(node))) from None

    def rollback(self) -> None:
        for n in reversed(self.new):  # nothing outside uses them yet: users were not re-pointed
            self.graph.erase_node(n)
        self.new.clear()
        for qual in self._buffers:
            delattr(self.graph_module, qual)
        self._buffers.clear()


def _short(dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_values(outputs: Sequence[Node], values: Sequence[Any]) -> Divergence | None:
    """Every new value must have the dtype and shape of the node it replaces."""
    for i, (old, new) in enumerate(zip(outputs, values)):
        ov = old.meta.get("val")
        nv = new.meta.get("val") if isinstance(new, Node) else new
        if not isinstance(ov, torch.Tensor) or not isinstance(nv, torch.Tensor):
            continue
        if nv.dtype != ov.dtype:
            return Divergence("dtype", f"the replacement would change output {i} ({old.name}) from {_short(ov.dtype)} "
                              f"to {_short(nv.dtype)}", graph_node=old.name, graph_op=op_name(old))
        if tuple(nv.shape) != tuple(ov.shape):
            return Divergence("shape", f"the replacement would change output {i} ({old.name}) from shape "
                              f"{tuple(ov.shape)} to {tuple(nv.shape)}", graph_node=old.name, graph_op=op_name(old))
    return None


def apply_replacement(ctx: RewriteContext, rule: RuleBase, anchor: Node, rep: Replacement) -> Divergence | None:
    """Splice ``rep`` in (see the module docstring). Returns why not, leaving the graph as it was;
    on success the new nodes are in ``ctx.last_added``."""
    ctx.last_added = []
    made = ctx._made_by[rule.name]
    if rep.matched and made and all(n in made for n in rep.matched):
        # the rule would rewrite its own replacement again: that never terminates
        return Divergence("structure", "the candidate is this rule's own replacement")
    label = rep.label or rule.name
    if label not in rule.stat_labels:
        raise PatternError(f"rule {rule.name!r} (defined at {rule.source}) reported variant {label!r}, "
                           f"not one of its labels {rule.stat_labels}")
    if rep.after is not None:
        b = Builder(ctx, after=rep.after)
    else:
        b = Builder(ctx, before=rep.before or (rep.outputs[0] if rep.outputs else anchor))
    try:
        values = list(rep.build(b)) if callable(rep.build) else list(rep.build)
        if len(values) != len(rep.outputs):
            raise PatternError(f"rule {rule.name!r} (defined at {rule.source}) built {len(values)} values for "
                               f"{len(rep.outputs)} outputs")
        why = check_values(rep.outputs, values)
        if why is not None:
            raise Declined(why)
    except Declined as exc:
        b.rollback()
        return exc.divergence
    except BaseException:
        b.rollback()
        raise
    if b.new:
        sources = rep.sources if rep.sources is not None else rep.matched
        mark_provenance(b.new, rule=label, pass_name=ctx.pass_name, replaced=list(sources), source=rule.source)
        details = {k: v for k, v in rep.info.items() if isinstance(v, (bool, int, float, str))}
        if details:  # e.g. the scan's step count: inspection draws "L-step unrolled loop -> selective_scan"
            for n in b.new:
                n.meta[PROVENANCE_KEY]["info"] = details
    matched = set(rep.matched)
    only = rep.only_users or {}
    for old, new in zip(rep.outputs, values):
        if new is old:
            continue
        # where check_values compared the two values (same dtype and shape), the moved users'
        # values still fit: run_pass need not re-run them
        compared = isinstance(old.meta.get("val"), torch.Tensor) and isinstance(
            new.meta.get("val") if isinstance(new, Node) else None, torch.Tensor)
        movers = list(only[old]) if old in only else [u for u in old.users if u not in matched]
        if old in only:
            for u in movers:
                u.replace_input_with(old, new)
        else:
            old.replace_all_uses_with(new, delete_user_cb=lambda u: u not in matched)
        if compared:
            ctx.verified.update(movers)
    erased_names = [n.name for n in rep.matched]  # names before erasing (erased nodes keep them)
    erased = erase_dead(ctx.graph_module, rep.matched, upstream=rep.erase_unused_inputs)
    if rep.after is not None:
        stable_toposort(ctx.graph)
        if ctx._positions is not None:
            ctx._positions.renumber()
    made.update(b.new)
    ctx.last_added = list(b.new)
    ctx.stats["matches"] += 1
    ctx.stats[f"rule:{label}"] = ctx.stats.get(f"rule:{label}", 0) + 1
    for k, v in rep.counts.items():
        ctx.stats[k] = ctx.stats.get(k, 0) + int(v)
    erased_set = {n.name for n in erased}
    record = RewriteRecord(rule.name, label, anchor.name, [n.name for n in b.new],
                           [nm for nm in erased_names if nm in erased_set] + sorted(erased_set.difference(erased_names)),
                           dict(rep.info))
    ctx.rewrites.append(record)
    # inspection attributes every removed node, also those a rewrite consumed without adding
    # anything (cleanup's erase/replace) and those it left dead (a re-rolled loop's steps)
    who = {"rule": label, "pass": ctx.pass_name, "source": rule.source, "anchor": anchor.name}
    for nm in record.erased:
        ctx.erased_by[nm] = who
    return None


# ----------------------------------------------------------------------------------- phases


@dataclass
class Phase:
    """A rule table and how to walk the graph with it."""

    rules: RuleSet
    order: str = "forward"  # "forward" (graph order) or "reverse" (last node first)
    max_sweeps: int = 8

    def __post_init__(self):
        self.rules = self.rules if isinstance(self.rules, RuleSet) else RuleSet(as_rules(self.rules))
        if self.order not in ("forward", "reverse"):
            raise PatternError(f"phase order must be 'forward' or 'reverse', got {self.order!r}")
        if self.max_sweeps < 1:
            raise PatternError(f"max_sweeps must be >= 1, got {self.max_sweeps}")


def _downstream(starts: Iterable[Node], depth: int) -> set[Node]:
    seen: set[Node] = set()
    frontier = [n for n in starts if is_live(n)]
    for _ in range(depth + 1):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            nxt.extend(n.users)
        frontier = nxt
    return seen


def run_phase(ctx: RewriteContext, phase: Phase) -> None:
    rules = list(phase.rules)
    for r in rules:
        r.prepare()
    by_target: dict[Any, list[RuleBase]] = defaultdict(list)
    everywhere: list[RuleBase] = []
    for r in rules:
        if r.anchors is None:
            everywhere.append(r)
        else:
            for t in dict.fromkeys(r.anchors):
                by_target[t].append(r)
    order = {id(r): i for i, r in enumerate(rules)}
    reaches = [r.reach for r in rules]
    depth = None if any(d is None for d in reaches) else max(reaches, default=0)
    graph = ctx.graph
    dirty: list[Node] | None = None
    for _sweep in range(phase.max_sweeps):
        ctx.new_sweep()
        nodes = list(graph.nodes)
        if phase.order == "reverse":
            nodes.reverse()
        if dirty is not None:
            region = _downstream(dirty, depth)
            nodes = [n for n in nodes if n in region]
        changed: list[Node] = []
        for node in nodes:
            if node.op != "call_function" or not is_live(node):
                continue
            cands = by_target.get(node.target, ())
            if everywhere:
                cands = sorted([*cands, *everywhere], key=lambda r: order[id(r)])
            for rule in cands:
                if ctx.diagnose:
                    ctx.candidates[rule.name].append(node.name)
                att = rule.attempt(node, ctx)
                if att is None:
                    if ctx.diagnose:
                        ctx.silent[rule.name] += 1
                    continue
                if not att.matched:
                    ctx.declined(rule, node, att)
                    continue
                rep = att.replacement
                why = apply_replacement(ctx, rule, node, rep)
                if why is not None:
                    ctx.declined(rule, node, Attempt(node, False, att.progress, att.total, why))
                    continue
                # a new match must contain a node this rewrite created or re-wired
                changed.extend(ctx.last_added)
                changed.extend(getattr(att.match, "inputs", {}).values())
                break
        if not changed:
            break
        dirty = changed if depth is not None else None


# ----------------------------------------------------------------------------------- passes


class RewritePass(Pass):
    """A pass that is a rule table: ``RewritePass(name, rules)`` (one forward phase swept to a
    fixpoint, at most ``max_iterations`` sweeps) or ``RewritePass(name, phases=[Phase(...), ...])``.
    Stats: ``{"matches": total, "rule:<label>": hits}`` of this run; ``PassResult.rewrites`` and
    ``.declines`` say what fired where and (for rules that keep them) what declined and why."""

    def __init__(self, name: str, rules=None, *, phases: Sequence[Phase] | None = None, max_iterations: int = 8,
                 order: str = "forward", fixpoint: bool = True, counters: Sequence[str] = (),
                 description: str | None = None):
        if (rules is None) == (phases is None):
            raise PatternError(f"RewritePass {name!r}: give either rules or phases")
        self.name = name
        self.fixpoint = fixpoint
        if phases is None:
            phases = [Phase(RuleSet(as_rules(rules)), order, max_iterations)]
        self.phases = list(phases)
        self.rules = RuleSet([r for p in self.phases for r in p.rules])  # also checks names are unique
        self.counters = tuple(counters)  # extra stats (Replacement.counts) reported even when 0
        if description is not None:
            self.__doc__ = description

    def make_context(self, graph_module: torch.fx.GraphModule, *, diagnose: bool = False) -> RewriteContext:
        ctx = RewriteContext(graph_module, self.name, diagnose=diagnose)
        ctx.init_stats(self.rules)
        for k in self.counters:
            ctx.stats.setdefault(k, 0)
        return ctx

    def rewrite(self, ctx: RewriteContext) -> None:
        """Run every phase on ``ctx``'s graph."""
        for phase in self.phases:
            run_phase(ctx, phase)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        ctx = self.make_context(graph_module)
        self.rewrite(ctx)
        return ctx.result()

    def __repr__(self) -> str:
        return f"<fxopt RewritePass {self.name!r}: {', '.join(r.name for r in self.rules)}>"


def apply_rules(graph_module: torch.fx.GraphModule, rules, *, pass_name: str = "rewrite",
                max_iterations: int = 8) -> dict[str, int]:
    """Apply ``rules`` to ``graph_module`` in place (one forward phase, at most ``max_iterations``
    sweeps). Returns the stats ``{"matches": n, "rule:<name>": hits}``; no lint, no recompile."""
    p = RewritePass(pass_name, as_rules(rules), max_iterations=max_iterations)
    return p.call(graph_module).stats


def find_matches(graph_module: torch.fx.GraphModule, rule) -> list:
    """Every match of a traced pattern rule in the graph (possibly overlapping; nothing changes)."""
    return rule.find_matches(graph_module)
