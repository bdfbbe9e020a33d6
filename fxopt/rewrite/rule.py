"""Rules are data: a name, a source location, a contract, and a way to look at one node.

Two kinds, one interface (``anchors``, ``attempt(node, ctx)``), so the driver and
:func:`fxopt.explain` treat them alike:

* :class:`Rule` -- a traced pattern/replacement pair. Both are plain PyTorch functions traced
  with :func:`fxopt.capture.capture_function`, the very path that captures models, so they sit
  at exactly the ATen level of captured graphs (a pattern traced at another IR would silently
  never match)::

      silu_rule = Rule("mul_sigmoid_to_silu",
                       pattern=lambda x: x * torch.sigmoid(x),
                       replacement=lambda x: torch.nn.functional.silu(x),
                       example_inputs=(torch.randn(8),), contract=ulp(1))

  The structural match is :mod:`fxopt.rewrite.matcher`'s (its docstring states the contract of
  a match); near misses come with the pattern node and the graph node where they stopped.

* :class:`NodeRule` -- a callable that looks at one node (of its ``anchors`` ops) and returns a
  :class:`~fxopt.rewrite.outcome.Replacement` or declines with a reason (tinygrad's
  ``(UPat, fn)`` rules, where ``fn`` may return None)::

      @node_rule("to_same_dtype", anchors=[aten.to.dtype], contract=bitwise)
      def to_same_dtype(node):
          x, dtype = node.args[0], node.args[1]
          if x.meta["val"].dtype != dtype:
              return decline(f"casts {x.meta['val'].dtype} to {dtype}")
          return replace(node, x)

  Structural recognisers that need a whole-graph analysis (the scan pass's chains of steps)
  compute it once per sweep with ``ctx.memo(key, fn)``.

Neither kind keeps statistics: hit counts live in the run's context and come back in the
pass's result and the report.
"""
from __future__ import annotations

import functools
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.fx
from torch.fx.node import Node

from ..errors import PatternError
from ..graph_utils import op_name
from .graph_ops import Positions, index_by_target, is_assert
from .matcher import Match, Matcher, fmt_lit, lit_eq, normalized_args
from .outcome import Attempt, Declined, Divergence, Replacement, _Decline

__all__ = ["RuleBase", "Rule", "NodeRule", "node_rule", "RuleSet", "as_rules", "trace_function"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def caller_location() -> str:
    """``file:line`` of the frame that constructed a rule (skipping the engine's own frames)."""
    frame = sys._getframe(1)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _HERE:
        frame = frame.f_back
    if frame is None:  # pragma: no cover
        return "<unknown>"
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _contract_name(contract) -> str:
    if contract is None:
        return "unstated"
    return getattr(contract, "name", None) or str(contract)


class RuleBase:
    """What the driver needs of a rule. Subclasses set ``name``, ``source``, ``contract`` and
    implement ``anchors`` (targets of the nodes to try, or None for every call) and
    ``attempt(node, ctx) -> Attempt | None`` (None: not a candidate, nothing to say)."""

    kind = "rule"
    name: str
    source: str
    contract: Any = None
    description: str | None = None
    # stats keys the rule reports under (``rule:<label>``); default: its name
    labels: tuple[str, ...] = ()
    # keep every decline in PassResult.declines even when nobody is explaining or debugging
    keep_declines: bool = False
    # what a decline's ``progress`` counts (shown by explain), e.g. "steps"
    progress_unit: str | None = None

    @property
    def anchors(self):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def reach(self) -> int | None:
        """How many edges upstream of its anchor a rewrite can reach (None: unbounded). Sweeps
        after the first look only this far downstream of what the last sweep changed."""
        return None

    def prepare(self) -> None:
        """Called once before a run touches any graph (trace patterns, validate)."""

    def attempt(self, node: Node, ctx) -> Attempt | None:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def stat_labels(self) -> tuple[str, ...]:
        return tuple(self.labels) or (self.name,)

    @property
    def contract_name(self) -> str:
        return _contract_name(self.contract)

    @property
    def anchor_op(self) -> str:
        anchors = self.anchors
        if anchors is None:
            return "any call"
        return " | ".join(_target_name(t) for t in anchors)

    def __add__(self, other) -> "RuleSet":
        return RuleSet([self]) + other

    def __radd__(self, other) -> "RuleSet":
        if isinstance(other, int) and other == 0:  # sum([rule, rule, ...])
            return RuleSet([self])
        return RuleSet([]) + other + self

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} at {self.source}>"


def _target_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target.namespace, target._schema.name.split("::")[-1]
        return f"{ns}.{name}.{target._overloadname}" if target._overloadname else f"{ns}.{name}"
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


# --------------------------------------------------------------------------- tracing


def _positional_names(fn: Callable, n: int) -> list[str]:
    try:
        params = [
            p for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:n]]
    names += [f"arg{i}" for i in range(len(names), n)]
    return names


def trace_function(fn: Callable, example_inputs: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> torch.fx.GraphModule:
    """Trace ``fn(*example_inputs, **kwargs)`` at the IR of captured models.

    This is the ONE place the pattern language turns a function into a graph; it goes
    through :func:`fxopt.capture.capture_function`, the same path as model capture.
    Export's guard/assert nodes are removed and dead code eliminated.
    """
    from ..capture import capture_function

    call = functools.partial(fn, **kwargs) if kwargs else fn
    try:
        gm = capture_function(call, tuple(example_inputs))
    except Exception as exc:  # noqa: BLE001 - one clear error for a malformed rule
        raise PatternError(
            f"could not trace {getattr(fn, '__qualname__', fn)!r} on the example inputs: {type(exc).__name__}: {exc}"
        ) from exc
    graph = gm.graph
    for node in reversed(list(graph.nodes)):
        if is_assert(node) and not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    return gm


@dataclass
class _Traced:
    """A traced pattern or replacement, preprocessed for matching."""

    gm: torch.fx.GraphModule
    inputs: list[Node]  # placeholders, in parameter order
    input_names: list[str]
    outputs: list[Node | Any]  # flattened outputs (nodes, or a placeholder)
    nodes: list[Node]  # computing nodes, topological order
    names: dict[Node, str]  # display name of every node (placeholders: parameter names)

    @classmethod
    def build(cls, gm: torch.fx.GraphModule, fn: Callable) -> "_Traced":
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        names_list = _positional_names(fn, len(inputs))
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        outs = list(torch.utils._pytree.tree_leaves(out_node.args[0]))
        nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        names = {n: n.name for n in nodes}
        names.update(dict(zip(inputs, names_list)))
        return cls(gm, inputs, names_list, outs, nodes, names)


# --------------------------------------------------------------------------- pattern rules


class Rule(RuleBase):
    """A named rewrite rule: ``pattern(*inputs)`` becomes ``replacement(*inputs)``.

    Parameters
    ----------
    name: the rule's name (reported in pass stats as ``rule:<name>`` and in provenance).
    pattern, replacement: plain PyTorch functions with the same positional parameters,
        returning a tensor or a tuple of tensors (multi-output patterns: same count).
    example_inputs: arguments to trace both with. Shapes and dtypes do not restrict
        matching (unless ``match_dtypes``/``match_ranks``), but shape-dependent code
        (``view(2, 3)``) bakes the example's sizes in as literals.
    extra_check: ``extra_check(match) -> bool`` side condition, run after the
        structural match; a False rejects the match.
    wildcards: ``{"name": sentinel}``: every literal in the traced pattern equal to
        ``sentinel`` (same type) matches any literal of the same type; the value is bound
        to ``name`` (consistently, if the sentinel appears several times), given in
        ``match.literals`` and passed to the replacement as a keyword argument (the
        replacement is traced once per distinct set of values). Choose a sentinel that
        does not otherwise occur, e.g. ``alpha=-1234.5``.
    commutative: try ``aten.add.Tensor`` (alpha 1) / ``aten.mul.Tensor`` in both orders.
    match_dtypes / match_ranks: the nodes bound to inputs must have the example inputs'
        dtypes / number of dimensions.
    contract: the numerical contract the rewrite keeps (``fxopt.testing.bitwise``,
        ``ulp(1)``...), shown by ``describe()`` and ``fxopt.explain``.
    """

    kind = "pattern"

    def __init__(
        self,
        name: str,
        pattern: Callable,
        replacement: Callable,
        example_inputs: Sequence[Any],
        extra_check: Callable[[Match], bool] | None = None,
        *,
        wildcards: Mapping[str, Any] | None = None,
        commutative: bool = True,
        match_dtypes: bool = False,
        match_ranks: bool = False,
        description: str | None = None,
        contract: Any = None,
    ):
        if not callable(pattern) or not callable(replacement):
            raise PatternError(f"rule {name!r}: pattern and replacement must be callables")
        self.name = name
        self.pattern = pattern
        self.replacement = replacement
        self.example_inputs = tuple(example_inputs)
        self.extra_check = extra_check
        self.wildcards = dict(wildcards or {})
        self.commutative = commutative
        self.match_dtypes = match_dtypes
        self.match_ranks = match_ranks
        self.description = description or (inspect.getdoc(pattern) if not _is_lambda(pattern) else None)
        self.source = caller_location()
        self.contract = contract
        self._pattern: _Traced | None = None
        self._replacements: dict[tuple, _Traced] = {}
        self._wildcard_defaults: dict[str, Any] = {}

    # ---------------------------------------------------------------- tracing (lazy)
    @property
    def traced_pattern(self) -> _Traced:
        if self._pattern is None:
            gm = trace_function(self.pattern, self.example_inputs)
            tr = _Traced.build(gm, self.pattern)
            self._validate_pattern(tr)
            self._pattern = tr
        return self._pattern

    @property
    def pattern_graph(self) -> torch.fx.GraphModule:
        return self.traced_pattern.gm

    def _validate_pattern(self, tr: _Traced) -> None:
        where = f"rule {self.name!r} (defined at {self.source})"
        if not tr.nodes:
            raise PatternError(f"{where}: the pattern computes nothing (it returns its input)")
        for o in tr.outputs:
            if not isinstance(o, Node) or o.op == "placeholder":
                raise PatternError(f"{where}: every pattern output must be computed by the pattern, got {o!r}")
        for i, (p, name) in enumerate(zip(tr.inputs, tr.input_names)):
            if not p.users:
                ex = self.example_inputs[i] if i < len(self.example_inputs) else None
                hint = (f" (its example value {ex!r} is not a tensor, so tracing baked it in as a literal: use "
                        f"wildcards={{{name!r}: <sentinel>}} for a scalar that may vary)"
                        if not isinstance(ex, torch.Tensor) else "")
                raise PatternError(f"{where}: pattern input {name!r} is not used by the traced pattern{hint}")
        for n in tr.nodes:
            if n.op != "call_function":
                raise PatternError(
                    f"{where}: pattern node {n.name} is a {n.op} ({n.target}); patterns may only call functions "
                    "(no tensor constants or parameters: pass them in as inputs)"
                )
        # every pattern node must be connected to the first output through shared nodes
        if len(tr.outputs) > 1:
            import networkx as nx

            g = nx.Graph()
            g.add_nodes_from(tr.nodes + tr.inputs)
            for n in tr.nodes:
                for i in n.all_input_nodes:
                    g.add_edge(i, n)
            comp = nx.node_connected_component(g, tr.outputs[0])
            if any(o not in comp for o in tr.outputs):
                raise PatternError(
                    f"{where}: the outputs of a multi-output pattern must share at least one input or "
                    "intermediate (otherwise it is two rules)"
                )
        flat = _literal_positions(tr)
        for wname, sentinel in self.wildcards.items():
            if not any(lit_eq(sentinel, v) for _, _, v in flat):
                listing = "\n".join(f"    {tr.names[n]} = {op_name(n)}({', '.join(f'{k}={fmt_lit(v)}' for k, v in normalized_args(n))})" for n in tr.nodes)
                raise PatternError(
                    f"{where}: wildcard {wname!r}: sentinel {sentinel!r} does not occur as a literal in the "
                    f"traced pattern:\n{listing}"
                )
            self._wildcard_defaults[wname] = sentinel

    def traced_replacement(self, literals: Mapping[str, Any] | None = None) -> _Traced:
        literals = dict(literals or {})
        key = tuple(sorted((k, type(v).__name__, repr(v)) for k, v in literals.items()))
        tr = self._replacements.get(key)
        if tr is None:
            gm = trace_function(self.replacement, self.example_inputs, literals)
            tr = _Traced.build(gm, self.replacement)
            pat = self.traced_pattern
            if len(tr.inputs) != len(pat.inputs):
                raise PatternError(
                    f"rule {self.name!r} (defined at {self.source}): replacement takes {len(tr.inputs)} inputs, "
                    f"pattern takes {len(pat.inputs)}"
                )
            if len(tr.outputs) != len(pat.outputs):
                raise PatternError(
                    f"rule {self.name!r} (defined at {self.source}): replacement returns {len(tr.outputs)} "
                    f"values, pattern returns {len(pat.outputs)}"
                )
            for n in tr.nodes:
                if n.op != "call_function":
                    raise PatternError(
                        f"rule {self.name!r}: replacement node {n.name} is a {n.op}; replacements may only call "
                        "functions (pass tensors in as inputs)"
                    )
            self._replacements[key] = tr
        return tr

    @property
    def anchor_target(self):
        return self.traced_pattern.outputs[0].target

    @property
    def anchor_op(self) -> str:
        return op_name(self.traced_pattern.outputs[0])

    def describe(self) -> str:
        """The traced pattern, one line per node (names usable in ``match.nodes``)."""
        tr = self.traced_pattern
        lines = [f"rule {self.name} ({self.source}): inputs {', '.join(tr.input_names)}; contract {self.contract_name}"]
        for n in tr.nodes:
            args = ", ".join(f"{k}={fmt_lit(v) if not isinstance(v, Node) else tr.names[v]}" for k, v in normalized_args(n))
            lines.append(f"  {tr.names[n]} = {op_name(n)}({args})")
        lines.append(f"  -> {', '.join(tr.names[o] for o in tr.outputs)}")
        return "\n".join(lines)

    # ---------------------------------------------------------------- engine interface
    @property
    def anchors(self) -> tuple:
        return (self.anchor_target,)

    @property
    def reach(self) -> int:
        return _pattern_depth(self.traced_pattern)

    def prepare(self) -> None:
        self.traced_pattern  # noqa: B018 - trace (and validate) before touching a graph

    def attempt(self, node: Node, ctx) -> Attempt | None:
        matcher = ctx.memo(("fxopt.rewrite.matcher", id(self)), lambda: Matcher(self, ctx.graph_module))
        multi = len(self.traced_pattern.outputs) > 1
        att = matcher.attempt(node, ctx.positions if multi else None, quick=not ctx.diagnose,
                              check_replacement=False)
        if att is not None and att.matched:
            att.replacement = self._replacement(att.match, ctx)
        return att

    def _replacement(self, m: Match, ctx) -> Replacement:
        """Where and what to splice in for match ``m``: the traced replacement, copied in right
        before the (single) output; for several outputs, before the earliest outside user of
        any of them, or, when an input comes later than that (no cycle: checked), after the
        last input, the graph then re-sorted."""
        after = None
        before = m.outputs[0]
        if len(m.outputs) > 1:
            pos = ctx.positions
            inner = set(m.internal)
            users = [u for o in m.outputs for u in o.users if u not in inner]
            before = min(users, key=pos.__getitem__) if users else m.internal[-1].next
            last_in = max(m.inputs.values(), key=pos.__getitem__, default=None)
            if last_in is not None and pos[before] < pos[last_in]:
                before, after = None, last_in
        pattern = self.traced_pattern

        def build(b):
            try:
                rep = self.traced_replacement(m.literals)
            except PatternError as exc:
                raise Declined(Divergence("replacement", str(exc))) from None
            env: dict[Node, Any] = {p: m.inputs[name] for p, name in zip(rep.inputs, pattern.input_names)}
            for n in rep.nodes:
                env[n] = b.copy(n, env)
            return [env[o] if isinstance(o, Node) else o for o in rep.outputs]

        return Replacement(list(m.outputs), build, list(m.internal), before=before, after=after)

    def find_matches(self, graph_module: torch.fx.GraphModule) -> list[Match]:
        """Every match in the graph (possibly overlapping; nothing is changed)."""
        matcher = Matcher(self, graph_module)
        cands = index_by_target(graph_module.graph).get(self.anchor_target, [])
        positions = Positions(graph_module.graph) if len(self.traced_pattern.outputs) > 1 else None
        out = []
        for c in cands:
            a = matcher.attempt(c, positions)
            if a.matched:
                out.append(a.match)
        return out


# --------------------------------------------------------------------------- callable rules


class NodeRule(RuleBase):
    """A rule written as a function of one node: ``fn(node)`` or ``fn(node, ctx)`` returns a
    Replacement (``replace``, ``replace_call``, ``erase``, ``emit``), ``decline(reason)``, or
    None (not a candidate). It is tried on nodes whose target is one of ``anchors`` (None:
    every call_function node).

    ``ctx`` (a :class:`fxopt.rewrite.driver.RewriteContext`) offers the graph module,
    ``ctx.position(node)`` (graph order, valid while nodes are inserted), ``ctx.memo(key, fn)``
    (an analysis computed once per sweep) and ``ctx.cache(key)`` (a dict for this run).

    contract: the numerical contract of the rewrite; reach: see :attr:`RuleBase.reach`;
    labels: the variant names the rule reports hits under (each Replacement picks one with
    ``label=``); keep_declines / progress_unit: see :class:`RuleBase`.
    """

    kind = "callable"

    def __init__(self, name: str, fn: Callable, *, anchors: Iterable | None = None, contract: Any = None,
                 description: str | None = None, reach: int | None = None, labels: Sequence[str] = (),
                 keep_declines: bool = False, progress_unit: str | None = None, source: str | None = None):
        if not callable(fn):
            raise PatternError(f"rule {name!r}: fn must be a callable, got {type(fn).__name__}")
        self.name = name
        self.fn = fn
        self._anchors = tuple(anchors) if anchors is not None else None
        self.contract = contract
        self.description = description or inspect.getdoc(fn)
        self._reach = reach
        self.labels = tuple(labels)
        self.keep_declines = keep_declines
        self.progress_unit = progress_unit
        self.source = source or caller_location()
        self._takes_ctx = _positional_arity(fn) >= 2

    @property
    def anchors(self):
        return self._anchors

    @property
    def reach(self) -> int | None:
        return self._reach

    def attempt(self, node: Node, ctx) -> Attempt | None:
        out = self.fn(node, ctx) if self._takes_ctx else self.fn(node)
        if out is None:
            return None
        if isinstance(out, Replacement):
            return Attempt(node, True, replacement=out)
        if isinstance(out, _Decline):
            return Attempt(node, False, out.progress, out.total, out.divergence)
        raise PatternError(
            f"rule {self.name!r} (defined at {self.source}) returned {type(out).__name__}; a callable rule returns "
            "a Replacement (fxopt.rewrite.replace / replace_call / erase / emit), decline(reason) or None"
        )

    def describe(self) -> str:
        lines = [f"rule {self.name} ({self.source}): callable, anchors {self.anchor_op}, contract {self.contract_name}"]
        if self.description:
            lines += [f"  {line}" for line in self.description.splitlines()]
        return "\n".join(lines)


def node_rule(name: str, **options) -> Callable[[Callable], NodeRule]:
    """Decorator form of :class:`NodeRule`: ``@node_rule("name", anchors=[...], contract=...)``."""
    source = caller_location()

    def wrap(fn: Callable) -> NodeRule:
        return NodeRule(name, fn, source=options.pop("source", source), **options)

    return wrap


def _positional_arity(fn: Callable) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return 2
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _is_lambda(fn) -> bool:
    return getattr(fn, "__name__", "") == "<lambda>"


def _literal_positions(tr: _Traced) -> list[tuple[Node, str, Any]]:
    out = []

    def walk(n, label, v):
        if isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(n, f"{label}[{i}]", x)
        elif not isinstance(v, Node):
            out.append((n, label, v))

    for n in tr.nodes:
        for k, v in normalized_args(n):
            walk(n, k, v)
    return out


class RuleSet:
    """An ordered collection of rules; ``RuleSet([...]) + rule + other_set``."""

    def __init__(self, rules: Iterable[RuleBase] = (), *, name: str | None = None):
        self.name = name
        self.rules: list[RuleBase] = []
        for r in rules:
            self._add(r)

    def _add(self, r) -> None:
        if isinstance(r, RuleSet):
            for x in r.rules:
                self._add(x)
            return
        if not isinstance(r, RuleBase):
            raise PatternError(f"a RuleSet holds rules (fxopt.Rule, fxopt.NodeRule), got {type(r).__name__}")
        if any(x.name == r.name and x is not r for x in self.rules):
            raise PatternError(f"two different rules named {r.name!r} in one RuleSet ({r.source})")
        if all(x is not r for x in self.rules):
            self.rules.append(r)

    def __add__(self, other) -> "RuleSet":
        out = RuleSet(self.rules)
        out._add(other)
        return out

    def __radd__(self, other) -> "RuleSet":
        if isinstance(other, int) and other == 0:  # sum([...])
            return RuleSet(self.rules)
        out = RuleSet([])
        out._add(other)
        out._add(self)
        return out

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __getitem__(self, name: str) -> RuleBase:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(name)

    def __repr__(self) -> str:
        return f"RuleSet([{', '.join(r.name for r in self.rules)}])"


def as_rules(rules) -> list[RuleBase]:
    """A rule, a RuleSet, a rule table of a pass (anything with ``.rules``) or an iterable of
    those, as a flat list of rules."""
    if isinstance(rules, RuleBase):
        return [rules]
    if isinstance(rules, RuleSet):
        return list(rules.rules)
    inner = getattr(rules, "rules", None)
    if inner is not None and not callable(inner):
        return as_rules(inner)
    return list(RuleSet(rules))


def _pattern_depth(tr: _Traced) -> int:
    """Longest path (in edges) from a pattern input or node to a pattern output."""
    depth: dict[Node, int] = {}
    for n in reversed(tr.nodes):
        d = 0 if n in tr.outputs else -1
        for u in n.users:
            if u in depth and depth[u] >= 0:
                d = max(d, depth[u] + 1)
        depth[n] = d
    best = max(depth.values(), default=0)
    return best + 1  # inputs sit one step further up


