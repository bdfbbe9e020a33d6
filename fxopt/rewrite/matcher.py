"""The structural matcher of traced pattern rules: does the pattern of a :class:`fxopt.Rule`
occur at a graph node, and if not, where does it stop?

Matching semantics (the contract of a match):

* Every pattern node maps to a distinct graph node with the same ``op`` and ``target``
  (``aten.mul.Tensor``...); arguments are compared after normalising against the op
  schema, so ``add(x, y)`` and ``add(x, y, alpha=1)`` are the same.
* Pattern inputs (the function's parameters) bind to graph nodes; one parameter used
  twice must bind the same node twice (``x * sigmoid(x)`` does not match
  ``x * sigmoid(y)``). Different parameters may bind the same node.
* Literals must be equal, with the same Python type and sign (``0.0`` is not ``-0.0``,
  ``2`` is not ``2.0``), unless named as a *wildcard*.
* Intermediates -- pattern nodes that are not pattern outputs -- must have no users
  outside the match (ignoring the metadata assertions export emits), since they are
  erased.
* ``aten.add.Tensor`` (with ``alpha == 1``) and ``aten.mul.Tensor`` are tried in both
  argument orders (``commutative=True``, the default; both are exactly commutative in
  IEEE arithmetic).
* After the structural match: optional dtype/rank checks of the bound inputs against the
  example inputs (``match_dtypes``/``match_ranks``), the ``extra_check(match)`` hook, and, for
  multi-output patterns, a check that splicing the replacement in cannot create a cycle. The
  driver then builds the replacement and checks it computes outputs of the same dtype and shape.

The backtracking search records the furthest point it reached and the first divergence there;
that is what :func:`fxopt.explain` ranks near misses by.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Iterator

import torch
import torch.fx
from torch.fx.node import Node

from ..errors import PatternError
from ..graph_utils import fake_mode_of, op_name
from .graph_ops import Positions, real_users
from .outcome import Attempt, Divergence

__all__ = ["Match", "Matcher", "lit_eq", "normalized_args", "fmt_lit", "compare_outputs", "cycle_check"]

aten = torch.ops.aten

# Targets whose two tensor operands may be swapped without changing a single bit.
_COMMUTATIVE = {aten.mul.Tensor, aten.add.Tensor}

_MISSING = object()


# --------------------------------------------------------------------------- literals


def lit_eq(a: Any, b: Any) -> bool:
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


def fmt_lit(v: Any) -> str:
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


def normalized_args(node: Node) -> list[tuple[str, Any]]:
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


class Match:
    """One match of a rule in a graph, handed to ``extra_check`` and to the rewriter.

    ``match["x"]`` / ``match.nodes["mul"]`` give the graph node for a pattern input
    (by parameter name) or a pattern node (by its traced name, see ``rule.describe()``);
    ``match.val(name)``, ``match.dtype(name)``, ``match.shape(name)`` give its fake value;
    ``match.literals`` the values bound to wildcards.
    """

    def __init__(self, rule, graph_module, nodes: dict[str, Node], inputs: dict[str, Node],
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


# --------------------------------------------------------------------------- matcher


class Matcher:
    """Backtracking matcher of one rule, reused for every candidate anchor in a graph."""

    def __init__(self, rule, graph_module: torch.fx.GraphModule):
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
        self.pargs = {n: normalized_args(n) for n in self.tr.nodes}
        self.comm = {
            n for n in self.tr.nodes
            if rule.commutative and n.target in _COMMUTATIVE and len(n.args) >= 2
            and all(lit_eq(v, 1) for k, v in self.pargs[n][2:] if k == "alpha")
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
            n_users, want = len(real_users(g)), len(pn.users)
            if n_users != want:
                others = [u.name for u in real_users(g)][:4]
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
        gargs = normalized_args(g)
        if len(pargs) != len(gargs):
            self._fail("structure", f"{len(pargs)} arguments in the pattern, {len(gargs)} in the graph", pn, g)
        else:
            orders = [None]
            if pn in self.comm and all(lit_eq(v, 1) for k, v in gargs[2:] if k == "alpha"):
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
                self._fail("literal", f"pattern {fmt_lit(pv)}, graph {fmt_lit(gv)}", pn, g, label)
                return
            yield from self._m_list(pn, g, label, pv, gv, 0)
            return
        for wname, sentinel in self.sentinels:
            if lit_eq(pv, sentinel):
                if isinstance(gv, Node) or type(gv) is not type(pv):
                    self._fail("literal", f"wildcard {wname} needs a {type(pv).__name__} literal, graph has "
                               f"{fmt_lit(gv)}", pn, g, label)
                    return
                if wname in self.lits:
                    if lit_eq(self.lits[wname], gv):
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
        if not lit_eq(pv, gv):
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

    def _semantic(self, m: Match, positions: "Positions | None", check_replacement: bool = True) -> Divergence | None:
        tr = self.tr
        inner = set(m.internal)
        for p, g in self.map.items():
            if p in self.out_set:
                continue
            extra = [u.name for u in real_users(g) if u not in inner]
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
            d = cycle_check(m, positions)
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
        return compare_outputs(self.tr, m, [env.get(ro) if isinstance(ro, Node) else ro for ro in rep.outputs])

    # ---------------------------------------------------------------- driver
    _mode = _MISSING

    def attempt(self, anchor: Node, positions: "Positions | None" = None, *, quick: bool = False,
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


def compare_outputs(tr, m: Match, rep_vals: list) -> Divergence | None:
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


def cycle_check(m: Match, positions: "Positions | None") -> Divergence | None:
    """Multi-output patterns: the replacement must go after all its inputs and before
    every outside user of the outputs. If some input is *reachable* from an output
    (through nodes outside the match), replacing would create a cycle: reject."""
    if positions is None:
        positions = Positions(m.graph_module.graph)
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

