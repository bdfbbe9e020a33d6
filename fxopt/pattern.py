"""A pattern language for custom passes: rules written as plain PyTorch functions.

A :class:`Rule` pairs a *pattern* and a *replacement*, both ordinary Python functions
over tensors, with example inputs. Both are traced with :func:`fxopt.capture.capture_function`
-- the very path that captures models -- so they sit at exactly the ATen level of
captured graphs (a pattern traced at another IR would silently never match)::

    silu_rule = Rule(
        "mul_sigmoid_to_silu",
        pattern=lambda x: x * torch.sigmoid(x),
        replacement=lambda x: torch.nn.functional.silu(x),
        example_inputs=(torch.randn(8),),
    )
    result = RewritePass("silu", [silu_rule])(graph_module)

The design imitates tinygrad's ``symbolic.py`` rule tables (each rule one entry, named,
with its source location and a hit counter) and Inductor's pattern/replacement pairs
(``fuse_attention.py``): the user writes the algebra, the library does the graph work.

Matching semantics (the contract of a match):

* Every pattern node maps to a distinct graph node with the same ``op`` and ``target``
  (``aten.mul.Tensor``...); arguments are compared after normalising against the op
  schema, so ``add(x, y)`` and ``add(x, y, alpha=1)`` are the same.
* Pattern inputs (the function's parameters) bind to graph nodes; one parameter used
  twice must bind the same node twice (``x * sigmoid(x)`` does not match
  ``x * sigmoid(y)``). Different parameters may bind the same node.
* Literals must be equal, with the same Python type and sign (``0.0`` is not ``-0.0``,
  ``2`` is not ``2.0``), unless named as a *wildcard* (see ``wildcards=``).
* Intermediates -- pattern nodes that are not pattern outputs -- must have no users
  outside the match (ignoring the metadata assertions export emits), since they are
  erased.
* ``aten.add.Tensor`` (with ``alpha == 1``) and ``aten.mul.Tensor`` are tried in both
  argument orders (``commutative=True``, the default; both are exactly commutative in
  IEEE arithmetic).
* After the structural match: optional dtype/rank checks of the bound inputs against the
  example inputs (``match_dtypes``/``match_ranks``), the ``extra_check(match)`` hook, a
  check that the replacement computes outputs of the same dtype and shape as the nodes
  it replaces (run on the fake values, before touching the graph), and, for
  multi-output patterns, a check that splicing the replacement in cannot create a cycle.
  A rejected match leaves the graph untouched; :func:`fxopt.explain` reports why.

Matching is near-linear: candidate anchors are found through an index of the graph's
nodes by target, built once per sweep, and each candidate is matched backwards from it.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.fx
from torch.fx.node import Node

from .config import debug_log, get_config
from .errors import PatternError
from .graph_utils import fake_mode_of, mark_provenance, op_name, propagate_meta
from .pass_base import Pass, PassResult

__all__ = [
    "Rule",
    "RuleSet",
    "RewritePass",
    "Match",
    "Divergence",
    "Attempt",
    "trace_function",
    "find_matches",
    "apply_rules",
    "check_acyclic",
]

aten = torch.ops.aten

# Nodes export inserts that compute nothing: shape/dtype assertions on a value. They are
# ignored when counting an intermediate's users, stripped from traced patterns, and
# erased together with the node they assert on.
_ASSERT_TARGETS = {
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
    aten.sym_constrain_range.default,
}
for _name in ("_assert_async",):
    _pkt = getattr(aten, _name, None)
    if _pkt is not None:
        _ASSERT_TARGETS.update(getattr(_pkt, o) for o in _pkt.overloads())

# Targets whose two tensor operands may be swapped without changing a single bit.
_COMMUTATIVE = {aten.mul.Tensor, aten.add.Tensor}

_MISSING = object()


def _is_assert(node: Node) -> bool:
    return (node.op == "call_function" and node.target in _ASSERT_TARGETS) or (
        node.op == "call_module" and str(node.target).startswith("_guards_fn")
    )


def _real_users(node: Node) -> list[Node]:
    return [u for u in node.users if not _is_assert(u)]


def _caller_location(depth: int = 2) -> str:
    """``file:line`` of the frame that constructed a rule (skipping fxopt internals)."""
    frame = sys._getframe(depth)
    here = os.path.abspath(__file__)
    while frame is not None and os.path.abspath(frame.f_code.co_filename) == here:
        frame = frame.f_back
    if frame is None:  # pragma: no cover
        return "<unknown>"
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


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
    from .capture import capture_function

    call = functools.partial(fn, **kwargs) if kwargs else fn
    try:
        gm = capture_function(call, tuple(example_inputs))
    except Exception as exc:  # noqa: BLE001 - one clear error for a malformed rule
        raise PatternError(
            f"could not trace {getattr(fn, '__qualname__', fn)!r} on the example inputs: {type(exc).__name__}: {exc}"
        ) from exc
    graph = gm.graph
    for node in reversed(list(graph.nodes)):
        if _is_assert(node) and not node.users:
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


# --------------------------------------------------------------------------- literals


def _lit_eq(a: Any, b: Any) -> bool:
    """Exact literal equality: same type, same value, same sign of zero, NaN == NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - exotic literal types
        return a is b


def _fmt_lit(v: Any) -> str:
    if isinstance(v, Node):
        return f"node {v.name}"
    return repr(v)


@functools.lru_cache(maxsize=None)
def _schema_args(target) -> tuple | None:
    schema = getattr(target, "_schema", None)
    if schema is None:
        return None
    return tuple(
        (a.name, a.default_value if a.has_default_value() else _MISSING) for a in schema.arguments
    )


def _normalized_args(node: Node) -> list[tuple[str, Any]]:
    """``[(argument name, value)]`` of a call, defaults filled in from the op schema so
    that spelling differences (positional vs keyword, explicit default) disappear."""
    spec = _schema_args(node.target) if node.op == "call_function" else None
    if spec is None:
        out = [(f"arg{i}", a) for i, a in enumerate(node.args)]
        out += sorted(node.kwargs.items())
        return out
    out = []
    for i, (name, default) in enumerate(spec):
        if i < len(node.args):
            v = node.args[i]
        elif name in node.kwargs:
            v = node.kwargs[name]
        else:
            v = default
        out.append((name, v))
    return out


# --------------------------------------------------------------------------- match objects


@dataclass
class Divergence:
    """Where and why a candidate stopped matching."""

    kind: str  # op | literal | users | binding | overlap | dtype | rank | extra_check | replacement | cycle | structure
    message: str
    pattern_node: str | None = None
    pattern_op: str | None = None
    graph_node: str | None = None
    graph_op: str | None = None
    argument: str | None = None

    def __str__(self) -> str:
        where = ""
        if self.pattern_node is not None:
            where = f"pattern {self.pattern_node} ({self.pattern_op})"
            if self.graph_node is not None:
                where += f" vs graph {self.graph_node} ({self.graph_op})"
            if self.argument:
                where += f", argument {self.argument}"
            where += ": "
        return f"[{self.kind}] {where}{self.message}"


@dataclass
class Attempt:
    """The result of trying one candidate anchor: a match, or how far it got."""

    anchor: Node
    matched: bool
    progress: int  # pattern nodes (inputs included) matched at the furthest failure
    total: int
    divergence: Divergence | None = None
    match: "Match | None" = None


class Match:
    """One match of a rule in a graph, handed to ``extra_check`` and to the rewriter.

    ``match["x"]`` / ``match.nodes["mul"]`` give the graph node for a pattern input
    (by parameter name) or a pattern node (by its traced name, see ``rule.describe()``);
    ``match.val(name)``, ``match.dtype(name)``, ``match.shape(name)`` give its fake value;
    ``match.literals`` the values bound to wildcards.
    """

    def __init__(self, rule: "Rule", graph_module, nodes: dict[str, Node], inputs: dict[str, Node],
                 outputs: list[Node], literals: dict[str, Any], internal: list[Node]):
        self.rule = rule
        self.graph_module = graph_module
        self.nodes = nodes
        self.inputs = inputs
        self.outputs = outputs
        self.literals = literals
        self.internal = internal  # matched computing graph nodes, topological order

    @property
    def anchor(self) -> Node:
        return self.outputs[0]

    def __getitem__(self, name: str) -> Node:
        if name in self.inputs:
            return self.inputs[name]
        return self.nodes[name]

    def val(self, name: str):
        return self[name].meta.get("val")

    def dtype(self, name: str):
        v = self.val(name)
        return getattr(v, "dtype", None)

    def shape(self, name: str):
        v = self.val(name)
        return tuple(v.shape) if hasattr(v, "shape") else None

    def __repr__(self) -> str:
        return f"<Match {self.rule.name} at {[o.name for o in self.outputs]}>"


# --------------------------------------------------------------------------- rules


class Rule:
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
    """

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
        self.source = _caller_location()
        self.hits = 0
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
            if not any(_lit_eq(sentinel, v) for _, _, v in flat):
                listing = "\n".join(f"    {tr.names[n]} = {op_name(n)}({', '.join(f'{k}={_fmt_lit(v)}' for k, v in _normalized_args(n))})" for n in tr.nodes)
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
        lines = [f"rule {self.name} ({self.source}): inputs {', '.join(tr.input_names)}"]
        for n in tr.nodes:
            args = ", ".join(f"{k}={_fmt_lit(v) if not isinstance(v, Node) else tr.names[v]}" for k, v in _normalized_args(n))
            lines.append(f"  {tr.names[n]} = {op_name(n)}({args})")
        lines.append(f"  -> {', '.join(tr.names[o] for o in tr.outputs)}")
        return "\n".join(lines)

    # ---------------------------------------------------------------- use
    def __add__(self, other) -> "RuleSet":
        return RuleSet([self]) + other

    def __radd__(self, other) -> "RuleSet":
        if isinstance(other, int) and other == 0:  # sum([rule, rule, ...])
            return RuleSet([self])
        return RuleSet([]) + other + self

    def find_matches(self, graph_module: torch.fx.GraphModule) -> list[Match]:
        return find_matches(graph_module, self)

    def __repr__(self) -> str:
        return f"<Rule {self.name!r} at {self.source}, {self.hits} hits>"


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
        for k, v in _normalized_args(n):
            walk(n, k, v)
    return out


class RuleSet:
    """An ordered collection of rules; ``RuleSet([...]) + rule + other_set``."""

    def __init__(self, rules: Iterable[Rule] = ()):
        self.rules: list[Rule] = []
        for r in rules:
            self._add(r)

    def _add(self, r) -> None:
        if isinstance(r, RuleSet):
            for x in r.rules:
                self._add(x)
            return
        if not isinstance(r, Rule):
            raise PatternError(f"a RuleSet holds Rule objects, got {type(r).__name__}")
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

    def __getitem__(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(name)

    def __repr__(self) -> str:
        return f"RuleSet([{', '.join(r.name for r in self.rules)}])"


def _as_rules(rules) -> list[Rule]:
    if isinstance(rules, Rule):
        return [rules]
    if isinstance(rules, RewritePass):
        return list(rules.rules)
    return list(RuleSet(rules))


# --------------------------------------------------------------------------- matcher


class _Matcher:
    """Backtracking matcher of one rule, reused for every candidate anchor in a graph."""

    def __init__(self, rule: Rule, graph_module: torch.fx.GraphModule):
        self.rule = rule
        self.gm = graph_module
        self.tr = rule.traced_pattern
        self.out_set = set(self.tr.outputs)
        self.total = len(self.tr.nodes) + len(self.tr.inputs)
        # wildcard sentinels
        self.sentinels = list(rule._wildcard_defaults.items())
        self.example_vals = [
            x if isinstance(x, torch.Tensor) else None for x in rule.example_inputs
        ]
        self.pos_of_input = {p: i for i, p in enumerate(self.tr.inputs)}
        self.pargs = {n: _normalized_args(n) for n in self.tr.nodes}
        self.comm = {
            n for n in self.tr.nodes
            if rule.commutative and n.target in _COMMUTATIVE and len(n.args) >= 2
            and all(_lit_eq(v, 1) for k, v in self.pargs[n][2:] if k == "alpha")
        }

    def quick_reject(self, pn: Node, g: Any, depth: int = 3) -> bool:
        """A cheap necessary condition (ops along positional arguments, no bindings):
        True only when ``g`` certainly cannot match ``pn``. Used to skip most candidate
        anchors of big graphs before the backtracking matcher runs."""
        if pn.op == "placeholder":
            return not isinstance(g, Node)
        if not isinstance(g, Node) or g.target != pn.target or g.op != pn.op:
            return True
        if depth == 0:
            return False
        pa, ga = pn.args, g.args

        def bad(order) -> bool:
            for i, p in enumerate(pa):
                if isinstance(p, Node) and p.op != "placeholder":
                    j = order(i)
                    if j < len(ga) and self.quick_reject(p, ga[j], depth - 1):
                        return True
            return False

        if not bad(lambda i: i):
            return False
        if pn in self.comm and len(ga) >= 2:
            return bad(lambda i: 1 - i if i < 2 else i)
        return True

    # ---------------------------------------------------------------- state
    def _reset(self):
        self.map: dict[Node, Node] = {}
        self.rev: dict[Node, Node] = {}
        self.bind: dict[Node, Node] = {}
        self.lits: dict[str, Any] = {}
        self.best: tuple[int, Divergence] | None = None

    def _progress(self) -> int:
        return len(self.map) + len(self.bind)

    def _fail(self, kind: str, message: str, pn: Node | None = None, gn: Any = None, argument: str | None = None):
        prog = self._progress()
        if self.best is None or prog > self.best[0]:
            d = Divergence(
                kind,
                message,
                pattern_node=self.tr.names.get(pn, getattr(pn, "name", None)) if pn is not None else None,
                pattern_op=(op_name(pn) if pn is not None and pn.op != "placeholder" else ("input" if pn is not None else None)),
                graph_node=gn.name if isinstance(gn, Node) else None,
                graph_op=op_name(gn) if isinstance(gn, Node) else None,
                argument=argument,
            )
            self.best = (prog, d)

    # ---------------------------------------------------------------- structural
    def _m_node(self, pn: Node, g: Any, parent: Node | None, gparent: Node | None, argument: str | None) -> Iterator[None]:
        if pn.op == "placeholder":
            name = self.tr.names[pn]
            if not isinstance(g, Node):
                self._fail("literal", f"pattern input {name} is a tensor, graph passes literal {g!r}", parent, gparent, argument)
                return
            prev = self.bind.get(pn)
            if prev is not None:
                if prev is g:
                    yield
                else:
                    self._fail("binding", f"pattern input {name} is used twice; the graph uses {prev.name} and {g.name}",
                               pn, g, argument)
                return
            if g in self.rev:
                self._fail("binding", f"pattern input {name} would bind {g.name}, which is inside the match", pn, g, argument)
                return
            ex = self.example_vals[self.pos_of_input[pn]] if self.pos_of_input[pn] < len(self.example_vals) else None
            v = g.meta.get("val")
            if ex is not None and isinstance(v, torch.Tensor):
                if self.rule.match_dtypes and v.dtype != ex.dtype:
                    self._fail("dtype", f"input {name}: dtype {_short(v.dtype)} vs pattern {_short(ex.dtype)}", pn, g, argument)
                    return
                if self.rule.match_ranks and v.dim() != ex.dim():
                    self._fail("rank", f"input {name}: shape {tuple(v.shape)} vs pattern rank {ex.dim()} "
                               f"{tuple(ex.shape)}", pn, g, argument)
                    return
            self.bind[pn] = g
            yield
            del self.bind[pn]
            return
        if not isinstance(g, Node):
            self._fail("literal", f"expected a {op_name(pn)} node, graph has literal {g!r}", parent, gparent, argument)
            return
        mapped = self.map.get(pn)
        if mapped is not None:
            if mapped is g:
                yield
            else:
                self._fail("binding", f"pattern node {self.tr.names[pn]} is reached as {mapped.name} and as {g.name}",
                           pn, g, argument)
            return
        if g in self.rev or g in self.bind.values():
            self._fail("overlap", f"graph node {g.name} is already part of this match", pn, g, argument)
            return
        if g.op != pn.op or g.target != pn.target:
            self._fail("op", f"different op: pattern {op_name(pn)}, graph {op_name(g)}", pn, g, argument)
            return
        if pn not in self.out_set:
            n_users, want = len(_real_users(g)), len(pn.users)
            if n_users != want:
                others = [u.name for u in _real_users(g)][:4]
                self._fail(
                    "users",
                    f"intermediate {g.name} has {n_users} users ({', '.join(others)}{'...' if n_users > 4 else ''}), "
                    f"the pattern allows {want}: it would still be needed after the rewrite",
                    pn, g, argument,
                )
                return
        self.map[pn] = g
        self.rev[g] = pn
        pargs = self.pargs[pn]
        gargs = _normalized_args(g)
        if len(pargs) != len(gargs):
            self._fail("structure", f"{len(pargs)} arguments in the pattern, {len(gargs)} in the graph", pn, g)
        else:
            orders = [None]
            if pn in self.comm and all(_lit_eq(v, 1) for k, v in gargs[2:] if k == "alpha"):
                orders.append((1, 0))
            for order in orders:
                ga = gargs if order is None else [gargs[1], gargs[0]] + gargs[2:]
                pairs = [(pk, pv, gv, gk) for (pk, pv), (gk, gv) in zip(pargs, ga)]
                yield from self._m_seq(pn, g, pairs, 0)
        del self.map[pn]
        del self.rev[g]

    def _m_seq(self, pn, g, pairs, i) -> Iterator[None]:
        if i == len(pairs):
            yield
            return
        pk, pv, gv, gk = pairs[i]
        for _ in self._m_val(pn, g, pk if pk == gk else f"{pk} (graph {gk})", pv, gv):
            yield from self._m_seq(pn, g, pairs, i + 1)

    def _m_val(self, pn, g, label, pv, gv) -> Iterator[None]:
        if isinstance(pv, Node):
            yield from self._m_node(pv, gv, pn, g, f"{self.tr.names[pn]}.{label}")
            return
        if isinstance(pv, (list, tuple)):
            if not isinstance(gv, (list, tuple)) or len(gv) != len(pv):
                self._fail("literal", f"pattern {_fmt_lit(pv)}, graph {_fmt_lit(gv)}", pn, g, label)
                return
            yield from self._m_list(pn, g, label, pv, gv, 0)
            return
        for wname, sentinel in self.sentinels:
            if _lit_eq(pv, sentinel):
                if isinstance(gv, Node) or type(gv) is not type(pv):
                    self._fail("literal", f"wildcard {wname} needs a {type(pv).__name__} literal, graph has "
                               f"{_fmt_lit(gv)}", pn, g, label)
                    return
                if wname in self.lits:
                    if _lit_eq(self.lits[wname], gv):
                        yield
                    else:
                        self._fail("literal", f"wildcard {wname} is {self.lits[wname]!r} elsewhere, {gv!r} here",
                                   pn, g, label)
                    return
                self.lits[wname] = gv
                yield
                del self.lits[wname]
                return
        if isinstance(gv, Node):
            self._fail("literal", f"pattern literal {pv!r}, graph passes node {gv.name}", pn, g, label)
            return
        if not _lit_eq(pv, gv):
            self._fail("literal", f"literal {pv!r} in the pattern, {gv!r} in the graph", pn, g, label)
            return
        yield

    def _m_list(self, pn, g, label, pv, gv, i) -> Iterator[None]:
        if i == len(pv):
            yield
            return
        for _ in self._m_val(pn, g, f"{label}[{i}]", pv[i], gv[i]):
            yield from self._m_list(pn, g, label, pv, gv, i + 1)

    def _m_rest(self) -> Iterator[None]:
        """Multi-output patterns: grow the match forward from matched nodes until every
        pattern node is mapped."""
        todo = next((n for n in self.tr.nodes if n not in self.map), None)
        if todo is None:
            yield
            return
        # the first unmatched node (topological order) with a matched input
        for u in self.tr.nodes:
            if u in self.map:
                continue
            src = next((i for i in u.all_input_nodes if i in self.map or i in self.bind), None)
            if src is not None:
                break
        else:  # pragma: no cover - excluded by _validate_pattern
            self._fail("structure", "pattern is not connected")
            return
        gsrc = self.map.get(src) or self.bind[src]
        found = False
        for cand in list(gsrc.users):
            if cand.target != u.target or cand.op != u.op or cand in self.rev:
                continue
            found = True
            for _ in self._m_node(u, cand, None, None, None):
                yield from self._m_rest()
        if not found:
            self._fail("op", f"no user of {gsrc.name} is a {op_name(u)} (needed for pattern output "
                       f"{self.tr.names[u]})", u, gsrc)

    # ---------------------------------------------------------------- semantic checks
    def _build_match(self) -> Match:
        tr = self.tr
        nodes = {tr.names[p]: g for p, g in self.map.items()}
        inputs = {tr.names[p]: g for p, g in self.bind.items()}
        lits = dict(self.lits)
        internal = [self.map[p] for p in tr.nodes]
        outputs = [self.map[o] for o in tr.outputs]
        return Match(self.rule, self.gm, nodes, inputs, outputs, lits, internal)

    def _semantic(self, m: Match, positions: "_Positions | None", check_replacement: bool = True) -> Divergence | None:
        tr = self.tr
        inner = set(m.internal)
        for p, g in self.map.items():
            if p in self.out_set:
                continue
            extra = [u.name for u in _real_users(g) if u not in inner]
            if extra:
                return Divergence("users", f"intermediate {g.name} is also used by {', '.join(extra[:4])}",
                                  tr.names[p], op_name(p), g.name, op_name(g))
        for p, g in self.bind.items():
            if g in inner:
                return Divergence("binding", f"input {tr.names[p]} bound to {g.name}, which is inside the match",
                                  tr.names[p], "input", g.name, op_name(g))
        if self.rule.extra_check is not None:
            try:
                ok = self.rule.extra_check(m)
            except Exception as exc:  # noqa: BLE001 - a broken check rejects, loudly in explain
                return Divergence("extra_check", f"extra_check raised {type(exc).__name__}: {exc}",
                                  tr.names[tr.outputs[0]], op_name(tr.outputs[0]), m.anchor.name, op_name(m.anchor))
            if not ok:
                return Divergence("extra_check", "extra_check rejected the match",
                                  tr.names[tr.outputs[0]], op_name(tr.outputs[0]), m.anchor.name, op_name(m.anchor))
        if check_replacement:
            d = self._check_replacement(m)
            if d is not None:
                return d
        if len(tr.outputs) > 1:
            d = _cycle_check(m, positions)
            if d is not None:
                return d
        return None

    def _check_replacement(self, m: Match) -> Divergence | None:
        """Run the replacement on the fake values of the bound inputs: it must produce
        outputs of the same dtype and shape as the nodes it replaces."""
        try:
            rep = self.rule.traced_replacement(m.literals)
        except PatternError as exc:
            return Divergence("replacement", str(exc))
        in_vals = [m.inputs[name].meta.get("val", None) for name in self.tr.input_names]
        if any(not isinstance(v, torch.Tensor) for v in in_vals):
            return None  # graph without fake values: nothing to check against
        mode = fake_mode_of(self.gm) if self._mode is _MISSING else self._mode
        self._mode = mode
        env: dict[Node, Any] = dict(zip(rep.inputs, in_vals))
        try:
            with (mode if mode is not None else contextlib.nullcontext()):
                for n in rep.nodes:
                    args = torch.fx.node.map_arg(n.args, lambda a: env[a])
                    kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a])
                    env[n] = n.target(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            return Divergence("replacement", f"the replacement fails on these inputs: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}",
                              self.tr.names[self.tr.outputs[0]], op_name(self.tr.outputs[0]), m.anchor.name, op_name(m.anchor))
        return _compare_outputs(self.tr, m, [env.get(ro) if isinstance(ro, Node) else ro for ro in rep.outputs])

    # ---------------------------------------------------------------- driver
    _mode = _MISSING

    def attempt(self, anchor: Node, positions: "_Positions | None" = None, *, quick: bool = False,
                check_replacement: bool = True) -> Attempt | None:
        """Try to match with pattern output 0 at ``anchor``. With ``quick``, a candidate
        that certainly does not match returns None without a diagnosis."""
        first = self.tr.outputs[0]
        if quick and self.quick_reject(first, anchor):
            return None
        self._reset()
        semantic_fail: Divergence | None = None
        for _ in self._m_node(first, anchor, None, None, None):
            for _ in self._m_rest():
                m = self._build_match()
                d = self._semantic(m, positions, check_replacement)
                if d is None:
                    return Attempt(anchor, True, self.total, self.total, None, m)
                if semantic_fail is None:
                    semantic_fail = d
        if semantic_fail is not None:
            return Attempt(anchor, False, self.total, self.total, semantic_fail)
        prog, d = self.best if self.best is not None else (0, Divergence("op", "no match"))
        return Attempt(anchor, False, prog, self.total, d)


def _compare_outputs(tr: _Traced, m: Match, rep_vals: list) -> Divergence | None:
    """The replacement's outputs must have the dtype and shape of the nodes they replace."""
    for i, (rv, go) in enumerate(zip(rep_vals, m.outputs)):
        gv = go.meta.get("val")
        if not isinstance(gv, torch.Tensor) or not isinstance(rv, torch.Tensor):
            continue
        pname, pop = tr.names[tr.outputs[i]], op_name(tr.outputs[i])
        if rv.dtype != gv.dtype:
            return Divergence("dtype", f"the replacement would change output {i} from {_short(gv.dtype)} to "
                              f"{_short(rv.dtype)}", pname, pop, go.name, op_name(go))
        if tuple(rv.shape) != tuple(gv.shape):
            return Divergence("shape", f"the replacement would change output {i} from shape {tuple(gv.shape)} "
                              f"to {tuple(rv.shape)}", pname, pop, go.name, op_name(go))
    return None


def _short(dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- ordering / cycles


class _Positions:
    """Order keys of graph nodes, kept valid while we insert (sparse integers)."""

    SPACING = 1 << 24

    def __init__(self, graph: torch.fx.Graph):
        self.graph = graph
        self._renumber()

    def _renumber(self):
        self.pos = {n: i * self.SPACING for i, n in enumerate(self.graph.nodes)}

    def __getitem__(self, node: Node) -> int:
        p = self.pos.get(node)
        if p is None:  # a node someone else inserted: renumber once
            self._renumber()
            p = self.pos[node]
        return p

    def inserted(self, node: Node) -> None:
        prev, nxt = node.prev, node.next
        lo = self.pos.get(prev, -self.SPACING) if prev.op != "root" else -self.SPACING
        hi = self.pos.get(nxt) if nxt.op != "root" else None
        if hi is None:
            hi = lo + 2 * self.SPACING
        mid = (lo + hi) // 2
        if mid <= lo or mid >= hi or prev.op != "root" and prev not in self.pos:
            self._renumber()
        else:
            self.pos[node] = mid


def _cycle_check(m: Match, positions: "_Positions | None") -> Divergence | None:
    """Multi-output patterns: the replacement must go after all its inputs and before
    every outside user of the outputs. If some input is *reachable* from an output
    (through nodes outside the match), replacing would create a cycle: reject."""
    if positions is None:
        positions = _Positions(m.graph_module.graph)
    inner = set(m.internal)
    inputs = list(m.inputs.values())
    if not inputs:
        return None
    last_in = max(positions[i] for i in inputs)
    # forward search from the outputs' outside users, bounded by the last input's position
    frontier = [u for o in m.outputs for u in o.users if u not in inner]
    seen: set[Node] = set()
    input_set = set(inputs)
    while frontier:
        n = frontier.pop()
        if n in seen or positions[n] > last_in:
            continue
        seen.add(n)
        if n in input_set:
            return Divergence("cycle", f"input {n.name} depends on an output of the match: replacing would create a "
                              "cycle", None, None, n.name, op_name(n))
        frontier.extend(n.users)
    return None


def check_acyclic(graph_module: torch.fx.GraphModule) -> None:
    """Raise PatternError if the data-flow graph has a cycle or is not in topological
    order (networkx for the cycle search, fx lint for the order)."""
    import networkx as nx

    from .graph_utils import to_networkx

    g = to_networkx(graph_module)
    if not nx.is_directed_acyclic_graph(g):
        cyc = nx.find_cycle(g)
        raise PatternError(f"graph has a cycle: {cyc}")
    graph_module.graph.lint()


def _stable_toposort(graph: torch.fx.Graph) -> None:
    """Reorder ``graph`` topologically, keeping the current order where it is valid."""
    import heapq

    order = {n: i for i, n in enumerate(graph.nodes)}
    indeg = {n: len(set(n.all_input_nodes)) for n in graph.nodes}
    heap = [(order[n], n.name, n) for n in graph.nodes if indeg[n] == 0]
    heapq.heapify(heap)
    out = []
    while heap:
        _, _, n = heapq.heappop(heap)
        out.append(n)
        for u in n.users:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(heap, (order[u], u.name, u))
    if len(out) != len(order):
        raise PatternError("graph has a cycle")
    # placeholders must stay first, output last (they are)
    cursor = None
    for n in out:
        if cursor is not None:
            cursor.append(n)
        cursor = n


# --------------------------------------------------------------------------- rewriting


def _index_by_target(graph: torch.fx.Graph) -> dict[Any, list[Node]]:
    idx: dict[Any, list[Node]] = defaultdict(list)
    for n in graph.nodes:
        if n.op == "call_function":
            idx[n.target].append(n)
    return idx


def _is_live(node: Node) -> bool:
    return not getattr(node, "_erased", False)


def find_matches(graph_module: torch.fx.GraphModule, rule: Rule) -> list[Match]:
    """Every match of ``rule`` in the graph (possibly overlapping; nothing is changed)."""
    matcher = _Matcher(rule, graph_module)
    cands = _index_by_target(graph_module.graph).get(rule.anchor_target, [])
    out = []
    positions = _Positions(graph_module.graph) if len(rule.traced_pattern.outputs) > 1 else None
    for c in cands:
        a = matcher.attempt(c, positions)
        if a.matched:
            out.append(a.match)
    return out


def _apply_match(graph_module: torch.fx.GraphModule, m: Match, pass_name: str, positions: "_Positions | None",
                 has_meta: bool) -> tuple[list[Node], Divergence | None]:
    """Splice the replacement in for match ``m``. The replacement is inserted and its
    fake values propagated first; if it fails or would change an output's dtype or shape,
    it is removed again and the graph is left exactly as it was (returns the reason)."""
    rule = m.rule
    graph = graph_module.graph
    rep = rule.traced_replacement(m.literals)
    pat = rule.traced_pattern
    inner = set(m.internal)
    # where: single output -> right before the anchor (every input precedes it);
    # multi output -> right before the earliest outside user of any output, or, when an
    # input comes later than that (no cycle: checked), after the last input + re-sort.
    resort = False
    if len(m.outputs) == 1:
        before = m.outputs[0]
    else:
        users = [u for o in m.outputs for u in o.users if u not in inner]
        before = min(users, key=lambda u: positions[u]) if users else m.internal[-1].next
        last_in = max((positions[i] for i in m.inputs.values()), default=-1)
        resort = positions[before] < last_in
    env: dict[Node, Any] = {p: m.inputs[name] for p, name in zip(rep.inputs, pat.input_names)}
    new_nodes: list[Node] = []
    cursor = max(m.inputs.values(), key=lambda i: positions[i]) if resort else None
    for n in rep.nodes:
        with (graph.inserting_after(cursor) if resort else graph.inserting_before(before)):
            new = graph.node_copy(n, lambda a: env[a])
        cursor = new
        new.meta = {}
        env[n] = new
        new_nodes.append(new)
    rep_out = [env[ro] if isinstance(ro, Node) else ro for ro in rep.outputs]
    if has_meta and all(isinstance(i.meta.get("val"), torch.Tensor) for i in m.inputs.values()):
        why = None
        try:
            propagate_meta(graph_module, new_nodes)
        except Exception as exc:  # noqa: BLE001 - the replacement does not apply to these inputs
            why = Divergence("replacement", f"the replacement fails on these inputs: {type(exc).__name__}: "
                             f"{(str(exc).splitlines() or [''])[0]}")
        if why is None:
            why = _compare_outputs(pat, m, [r.meta.get("val") if isinstance(r, Node) else r for r in rep_out])
        if why is not None:
            for n in reversed(new_nodes):
                graph.erase_node(n)
            return [], why
    mark_provenance(new_nodes, rule=rule.name, pass_name=pass_name, replaced=m.internal, source=rule.source)
    for go, repl in zip(m.outputs, rep_out):
        go.replace_all_uses_with(repl, delete_user_cb=lambda u: u not in inner)
    for g in reversed(m.internal):
        for u in list(g.users):
            if _is_assert(u) and not u.users:
                graph.erase_node(u)
        graph.erase_node(g)
    if resort:
        _stable_toposort(graph)
        positions._renumber()
    elif positions is not None:
        for n in new_nodes:
            positions.inserted(n)
    return new_nodes, None


def apply_rules(graph_module: torch.fx.GraphModule, rules, *, pass_name: str = "rewrite",
                max_iterations: int = 8) -> dict[str, int]:
    """Apply ``rules`` to ``graph_module`` in place, sweeping until nothing matches (at
    most ``max_iterations`` sweeps). Returns ``{"matches": n, "rule:<name>": hits}``."""
    rules = _as_rules(rules)
    stats: dict[str, int] = {"matches": 0}
    for r in rules:
        stats[f"rule:{r.name}"] = 0
        r.traced_pattern  # noqa: B018 - trace (and validate) before touching the graph
    graph = graph_module.graph
    has_meta = fake_mode_of(graph_module) is not None
    depth = max(_pattern_depth(r.traced_pattern) for r in rules) if rules else 0
    dirty: list[Node] | None = None  # None: first sweep looks at the whole graph
    made_by: dict[str, set[Node]] = defaultdict(set)
    for _ in range(max_iterations):
        changed = 0
        if dirty is None:
            idx = _index_by_target(graph)
        else:
            # a new match must contain a node created or re-wired by the last sweep, so
            # its anchor lies within `depth` steps downstream of one: look only there
            region = _downstream(dirty, depth)
            idx = defaultdict(list)
            for n in graph.nodes:  # graph order
                if n in region and n.op == "call_function":
                    idx[n.target].append(n)
        dirty = []
        positions = None
        for r in rules:
            cands = idx.get(r.anchor_target)
            if not cands:
                continue
            matcher = _Matcher(r, graph_module)
            multi = len(r.traced_pattern.outputs) > 1
            if multi and positions is None:
                positions = _Positions(graph)
            for c in cands:
                if not _is_live(c):
                    continue
                a = matcher.attempt(c, positions if multi else None, quick=True, check_replacement=False)
                if a is None or not a.matched:
                    continue
                if made_by[r.name] and all(n in made_by[r.name] for n in a.match.internal):
                    continue  # the rule would rewrite its own replacement again: never terminates
                new, why = _apply_match(graph_module, a.match, pass_name, positions, has_meta)
                if why is not None:
                    continue
                made_by[r.name].update(new)
                dirty.extend(new)
                dirty.extend(a.match.inputs.values())
                r.hits += 1
                stats[f"rule:{r.name}"] += 1
                stats["matches"] += 1
                changed += 1
        if not changed:
            break
    return stats


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


def _downstream(starts: Iterable[Node], depth: int) -> set[Node]:
    seen: set[Node] = set()
    frontier = [n for n in starts if _is_live(n)]
    for _ in range(depth + 1):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            nxt.extend(n.users)
        frontier = nxt
    return seen


class RewritePass(Pass):
    """An :class:`fxopt.Pass` applying a rule set to a fixpoint (bounded by
    ``max_iterations`` sweeps). Stats: ``{"matches": total, "rule:<name>": hits}``.

    ``recompile=True`` regenerates the module's code after a modification so the
    GraphModule can be called right away; a pass manager that recompiles at the end
    anyway may pass ``recompile=False``."""

    def __init__(self, name: str, rules, *, max_iterations: int = 8, recompile: bool = True):
        self.name = name
        self.rules = RuleSet(_as_rules(rules))
        self.max_iterations = max_iterations
        self.recompile = recompile

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        stats = apply_rules(graph_module, self.rules, pass_name=self.name, max_iterations=self.max_iterations)
        modified = stats["matches"] > 0
        if modified and get_config().debug >= 2:  # whole-graph networkx cycle check + fx lint
            check_acyclic(graph_module)
            debug_log(2, f"{self.name}: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
        if modified and self.recompile:
            graph_module.recompile()
        return PassResult(graph_module, modified, stats)

    def __repr__(self) -> str:
        return f"<fxopt RewritePass {self.name!r}: {', '.join(r.name for r in self.rules)}>"
