"""The ``scan`` pass: re-roll an unrolled first-order linear recurrence into one scan op.

What it recognises (structurally, not by spelling):

* a chain of steps ``h_t = a_t * h_{t-1} + b_t`` (``add(mul(a, h), b)`` in any operand order, or
  ``addcmul(b, a, h)``), where ``a_t`` / ``b_t`` are the t-th slices (``select``, ``unbind``
  item, ``slice`` + ``squeeze``) along one axis of tensors computed before the loop, for
  t = 0, 1, ..., L-1 covering the axis; ``h_{-1}`` is any tensor defined before the loop
  (zeros or a given initial state);
* what the loop produces: per-step readouts ``y_t = sum_k h_t[..k..] * C_t[..k..]`` (einsum,
  matmul, bmm, mul+sum, through float casts and size-1 views; see :mod:`.scan_expr`) stacked
  along one axis; or the states themselves stacked (the contraction after the stack is left
  as is); and/or the final state.

Each loop becomes one call of ``fxopt::linear_scan``; when the prologue is Mamba's
discretisation (``a = exp(delta (x) A)``, ``b = delta (x) B (x) u``) it becomes
``fxopt::selective_scan`` instead, with the epilogue ``+ u * D`` and the gate ``* silu(z)`` /
``* (z * sigmoid(z))`` folded in, so no (b, l, d, n) tensor is materialised.

It does not fire when a step deviates (a nonlinearity inside, a skipped/reordered index, a
different source tensor for some ``a_t``), or when an intermediate state or readout is used
outside the loop. Every rejected candidate is recorded with its reason: see
``fxopt.explain(gm, "scan")``, :func:`explain_scan` and ``ScanPass.last_rejections``.

In the rewrite engine the recogniser is one callable rule, :data:`SCAN_RULE`, tried at every
add/addcmul: one walk over the graph (once per sweep, ``ctx.memo``) finds the chains of steps;
at a chain's first step the rule checks the chain, its readout and prologue
(:func:`_recognise`: every check that can refuse the rewrite) and proposes the op
(:func:`_emit`); the driver splices it in and erases the loop (in bulk: linear time).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx
from torch.fx import Node

from ..ops import scan as scan_ops  # registers the custom ops; its entry points are what graphs call
from ..rewrite import Declined, Divergence, NodeRule, RewritePass, decline, emit
from ..testing.contracts import fp64_relative
from .scan_expr import Expr, NotTracked, dtype_of, shape_cache, shape_of, strip_casts, track

aten = torch.ops.aten
SELECTIVE_SCAN = torch.ops.fxopt.selective_scan.default
LINEAR_SCAN = torch.ops.fxopt.linear_scan.default

_MAX_INT = 2**62


@dataclass
class Rejection:
    where: str  # name of the first step node of the candidate
    reason: str
    steps: int = 0

    def __str__(self) -> str:
        return f"scan candidate at {self.where} ({self.steps} steps): {self.reason}"


@dataclass
class _Chain:
    steps: list = field(default_factory=list)  # step nodes h_t
    muls: list = field(default_factory=list)  # the a*h mul nodes (None for addcmul)
    a_sl: list = field(default_factory=list)  # slice nodes
    b_sl: list = field(default_factory=list)
    h0: Optional[Node] = None
    a_base: Optional[Node] = None
    b_base: Optional[Node] = None
    a_axis: int = 0
    b_axis: int = 0
    broken: Optional[str] = None
    alias: dict = field(default_factory=dict)  # step index -> no-op casts of that state feeding the next step


# ----------------------------------------------------------------------------------------------
# slices
# ----------------------------------------------------------------------------------------------
def _slice_info(node) -> Optional[tuple]:
    """(base, axis, index) if ``node`` is the index-th slice of ``base`` along ``axis`` with that
    axis removed; None otherwise."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    t = node.target
    if t == aten.select.int:
        base, ax, idx = node.args[0], node.args[1], node.args[2]
        shp = shape_of(base)
        if shp is None or not isinstance(idx, int):
            return None
        ax = ax % len(shp)
        idx = idx % shp[ax] if shp[ax] else idx
        return base, ax, idx
    if t is operator.getitem:
        src = node.args[0]
        if isinstance(src, Node) and src.op == "call_function" and src.target == aten.unbind.int:
            base = src.args[0]
            shp = shape_of(base)
            if shp is None:
                return None
            ax = (src.args[1] if len(src.args) > 1 else src.kwargs.get("dim", 0)) % len(shp)
            return base, ax, node.args[1]
        return None
    if t in (aten.squeeze.dim, aten.squeeze.dims):
        inner = node.args[0]
        if isinstance(inner, Node) and inner.op == "call_function" and inner.target == aten.slice.Tensor:
            base = inner.args[0]
            shp = shape_of(base)
            if shp is None:
                return None
            ax = (inner.args[1] if len(inner.args) > 1 else 0) % len(shp)
            dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
            if [d % len(shp) for d in dims] != [ax]:
                return None
            start = inner.args[2] if len(inner.args) > 2 else 0
            end = inner.args[3] if len(inner.args) > 3 else _MAX_INT
            step = inner.args[4] if len(inner.args) > 4 else 1
            if not isinstance(start, int) or step != 1:
                return None
            start = start % shp[ax] if start < 0 else start
            if min(end, shp[ax]) != start + 1:
                return None
            return base, ax, start
    return None


_ASSERTS = tuple(t for t in (getattr(aten, "_assert_tensor_metadata", None),) if t is not None)
_ASSERTS = tuple(getattr(t, "default", t) for t in _ASSERTS)


_ASSERT_T = _ASSERTS[0] if _ASSERTS else object()


def _is_assert(u: Node) -> bool:
    """Export's ``_assert_tensor_metadata`` checks: users that go away with the value."""
    return u.target is _ASSERT_T


def _users(n: Node):
    return [u for u in n.users if not _is_assert(u)]


def _strip_noop(node):
    """Look through casts to the dtype the value already has (export keeps ``x.to(x.dtype)``)."""
    while (isinstance(node, Node) and node.op == "call_function"
           and node.target in (aten.to.dtype, aten._to_copy.default, aten.alias.default)
           and isinstance(node.args[0], Node) and dtype_of(node.args[0]) == dtype_of(node)
           and shape_of(node.args[0]) == shape_of(node)):
        node = node.args[0]
    return node


# ----------------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------------
def _step_candidates(node: Node):
    """Yield (a, h_prev, b, mul_node) interpretations of ``node`` as ``h = a * h_prev + b``."""
    if node.op != "call_function":
        return
    t = node.target
    if t == aten.add.Tensor and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
        x, y = node.args
        for m, other in ((x, y), (y, x)):
            if isinstance(m, Node) and m.op == "call_function" and m.target == aten.mul.Tensor and isinstance(other, Node):
                p, q = m.args[0], m.args[1]
                if isinstance(p, Node) and isinstance(q, Node):
                    yield p, q, other, m
                    yield q, p, other, m
    elif t == aten.addcmul.default and node.kwargs.get("value", 1) == 1 and (len(node.args) < 4 or node.args[3] == 1):
        b, p, q = node.args[0], node.args[1], node.args[2]
        if all(isinstance(v, Node) for v in (b, p, q)):
            yield p, q, b, None
            yield q, p, b, None


class _Graph:
    """The graph and its node order (valid while the engine inserts nodes)."""

    def __init__(self, gm: torch.fx.GraphModule, position=None):
        self.gm = gm
        if position is None:
            order = {n: i for i, n in enumerate(gm.graph.nodes)}
            position = order.__getitem__
        self.position = position


def _find_chains(g: _Graph, rejections: list) -> list:
    chain_of: dict = {}  # step node -> chain
    chains: list = []
    for node in g.gm.graph.nodes:
        if node.op != "call_function" or node.target not in (aten.add.Tensor, aten.addcmul.default):
            continue
        best = None
        for a, hp, b, m in _step_candidates(node):
            ai, bi = _slice_info(a), _slice_info(b)
            if ai is None or bi is None:
                continue
            if _slice_info(hp) is not None and _strip_noop(hp) not in chain_of:
                continue  # h_prev must be a state, not another slice
            cand = (a, hp, b, m, ai, bi)
            if _strip_noop(hp) in chain_of:
                best = cand
                break
            if best is None:
                best = cand
        if best is None:
            continue
        a, hp, b, m, ai, bi = best
        hp_node = hp
        hp = _strip_noop(hp)
        if hp in chain_of:
            ch = chain_of[hp]
            if hp_node is not hp:
                x = hp_node
                while x is not hp:
                    ch.alias.setdefault(len(ch.steps) - 1, set()).add(x)
                    x = x.args[0]
            if ch.steps[-1] is not hp:
                ch.broken = ch.broken or f"the state {hp.name} feeds two different next steps"
                continue
            prev_ai = _slice_info(ch.a_sl[-1])
            if ai[0] is not ch.a_base or ai[1] != ch.a_axis:
                ch.broken = ch.broken or f"step {node.name}: a_t comes from {ai[0].name}, not {ch.a_base.name}"
                continue
            if bi[0] is not ch.b_base or bi[1] != ch.b_axis:
                ch.broken = ch.broken or f"step {node.name}: b_t comes from {bi[0].name}, not {ch.b_base.name}"
                continue
            if ai[2] != prev_ai[2] + 1 or bi[2] != ai[2]:
                ch.broken = ch.broken or (f"step {node.name}: slice index a={ai[2]}, b={bi[2]} after {prev_ai[2]} "
                                          "(steps must be consecutive and in order)")
                continue
        else:
            ch = _Chain(h0=hp, a_base=ai[0], b_base=bi[0], a_axis=ai[1], b_axis=bi[1])
            chains.append(ch)
            if ai[2] != 0 or bi[2] != 0:
                ch.broken = f"the first step {node.name} reads slice a={ai[2]}, b={bi[2]}, not 0"
        ch.steps.append(node)
        ch.muls.append(m)
        ch.a_sl.append(a)
        ch.b_sl.append(b)
        chain_of[node] = ch
    return chains


# ----------------------------------------------------------------------------------------------
# readouts
# ----------------------------------------------------------------------------------------------
def _region(y: Node, stops: set, limit: int = 32) -> Optional[list]:
    """Nodes strictly between ``stops`` and ``y`` (inclusive of y), walking inputs backwards."""
    seen = []
    stack = [y]
    visited = set()
    while stack:
        n = stack.pop()
        if n in visited or n in stops:
            continue
        visited.add(n)
        seen.append(n)
        if len(seen) > limit:
            return None
        for inp in n.all_input_nodes:
            if inp in stops:
                continue
            stack.append(inp)
    return seen


@dataclass
class _Readout:
    mode: str  # "ys" | "states" | "final"
    stack: Optional[Node] = None
    stack_dim: int = 0
    regions: list = field(default_factory=list)
    c_base: Optional[Node] = None
    c_axis: int = 0
    exprs: list = field(default_factory=list)


def _analyse_readout(ch: _Chain, g: _Graph) -> _Readout:
    steps = ch.steps
    L = len(steps)
    # users of each state other than the next step
    def nxt_user(i):
        if i + 1 >= L:
            return None
        return ch.muls[i + 1] if ch.muls[i + 1] is not None else steps[i + 1]

    def extra_users(i):
        """Users of state i (and of its no-op-cast aliases) other than the next step."""
        al = ch.alias.get(i, set())
        allowed = set(al)
        nu = nxt_user(i)
        if nu is not None:
            allowed.add(nu)
        out = [u for u in _users(steps[i]) if u not in allowed]
        for x in al:
            out.extend(u for u in _users(x) if u not in allowed)
        return out

    # the a*h mul must only feed its step
    for i, m in enumerate(ch.muls):
        if m is not None and len(_users(m)) != 1:
            raise NotTracked(f"the product {m.name} of step {i} is also used outside the recurrence")
    first_extra = extra_users(0)
    if L > 1 and not first_extra:
        # maybe only the final state is used
        for i in range(L - 1):
            if extra_users(i):
                raise NotTracked(f"state {steps[i].name} (step {i}) is used outside the loop")
        return _Readout(mode="final")
    # find the stack node by a short forward walk from step 0's extra users
    stack = None
    frontier = list(first_extra)
    seen = set()
    for _ in range(12):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if n.op == "call_function" and n.target in (aten.stack.default,):
                stack = n
                break
            nxt.extend(n.users)
        if stack is not None or not nxt:
            break
        frontier = nxt
    if stack is None:
        if L == 1:
            return _Readout(mode="final")
        raise NotTracked(f"state {steps[0].name} is used outside the loop and no stack of per-step values follows")
    items = stack.args[0]
    sdim = stack.args[1] if len(stack.args) > 1 else stack.kwargs.get("dim", 0)
    if len(items) != L:
        raise NotTracked(f"{stack.name} stacks {len(items)} values but the loop has {L} steps")
    rank_item = len(shape_of(items[0]))
    sdim = sdim % (rank_item + 1)
    if all(items[i] is steps[i] for i in range(L)):
        for i in range(L - 1):
            bad = [u for u in extra_users(i) if u is not stack]
            if bad:
                raise NotTracked(f"state {steps[i].name} is used outside the loop by {bad[0].name}")
        return _Readout(mode="states", stack=stack, stack_dim=sdim)
    ro = _Readout(mode="ys", stack=stack, stack_dim=sdim)
    sig0 = None
    c0 = None
    for i in range(L):
        y = items[i]
        if not isinstance(y, Node):
            raise NotTracked("stack of non-nodes")
        stops = {steps[i]}
        reg = None
        if i > 0 and sig0 is not None:
            fast = _same_structure(ro.regions[0][0], y, steps[0], steps[i], ch.alias.get(0, set()), ch.alias.get(i, set()), c0, i, ro)
            if fast is not None:
                reg, cnode = fast
                if _region_ok(reg, y, stack, ch.alias.get(i, set()), nxt_user(i)) and all(
                        u in set(reg) or u in ch.alias.get(i, set()) for u in extra_users(i) if i < L - 1):
                    ro.regions.append(reg)
                    ro.exprs.append(None)
                    continue
        # the C slice: a leaf of the readout expression
        try:
            e = track(y, stops)
        except NotTracked as exc:
            raise NotTracked(f"readout of step {i} ({y.name}) is not a contraction: {exc}") from None
        if len(e.factors) != 2:
            raise NotTracked(f"readout of step {i} ({y.name}) has {len(e.factors)} factors, expected state x C_t")
        hs = [f for f in e.factors if f[0] is steps[i]]
        cs = [f for f in e.factors if f[0] is not steps[i]]
        if len(hs) != 1 or len(cs) != 1:
            raise NotTracked(f"readout of step {i} ({y.name}) is not linear in the state")
        cnode = cs[0][0]
        ci = _slice_info(cnode)
        if ci is None:
            raise NotTracked(f"readout of step {i}: {cnode.name} is not a time slice of a tensor computed before the loop")
        if i == 0:
            ro.c_base, ro.c_axis = ci[0], ci[1]
        elif ci[0] is not ro.c_base or ci[1] != ro.c_axis:
            raise NotTracked(f"readout of step {i} reads {ci[0].name}, not {ro.c_base.name}")
        if ci[2] != i:
            raise NotTracked(f"readout of step {i} reads slice {ci[2]} of {ci[0].name}")
        reg = _region(y, {steps[i], cnode})
        if reg is None:
            raise NotTracked(f"readout of step {i} is too large")
        regset = set(reg)
        al = ch.alias.get(i, set())
        nu = nxt_user(i)
        for n in reg:
            for u in _users(n):
                if n in al and (u is nu or u in al):
                    continue
                if u not in regset and not (n is y and u is stack):
                    raise NotTracked(f"readout value {n.name} of step {i} is used outside the loop by {u.name}")
        # state users: next step, the region
        for u in extra_users(i):
            if u not in regset and u not in al and i < L - 1:
                raise NotTracked(f"state {steps[i].name} (step {i}) is used outside the loop by {u.name}")
        sig = _expr_signature(e, steps[i], cnode)
        if sig0 is None:
            sig0 = sig
            c0 = cnode
        elif sig != sig0:
            raise NotTracked(f"readout of step {i} contracts differently from step 0")
        ro.regions.append(reg)
        ro.exprs.append(e)
    return ro


def _region_ok(reg, y, stack, al, nu) -> bool:
    regset = set(reg)
    for n in reg:
        for u in _users(n):
            if n in al and (u is nu or u in al):
                continue
            if u not in regset and not (n is y and u is stack):
                return False
    return True


def _same_structure(y0: Node, yt: Node, h0: Node, ht: Node, al0: set, alt: set, c0: Node, t: int, ro) -> Optional[tuple]:
    """Is the readout of step t a copy of step 0's (same ops and literals, the state of step t in
    place of step 0's, the t-th slice of the same C in place of the 0-th)? Returns (region, C_t)."""
    pairs = [(y0, yt)]
    seen = {}
    reg = []
    ct = None
    while pairs:
        a, b = pairs.pop()
        if a in seen:
            if seen[a] is not b:
                return None
            continue
        seen[a] = b
        if a is h0:
            if b is not ht:
                return None
            continue
        if a is c0:
            info = _slice_info(b)
            if info is None or info[0] is not ro.c_base or info[1] != ro.c_axis or info[2] != t:
                return None
            ct = b
            continue
        if a.op != b.op or a.target != b.target or len(a.args) != len(b.args) or a.kwargs != b.kwargs:
            return None
        reg.append(b)
        for x, z in zip(a.args, b.args):
            if isinstance(x, Node):
                if not isinstance(z, Node):
                    return None
                pairs.append((x, z))
            elif isinstance(x, (list, tuple)):
                if not isinstance(z, (list, tuple)) or len(x) != len(z):
                    return None
                for x2, z2 in zip(x, z):
                    if isinstance(x2, Node) != isinstance(z2, Node):
                        return None
                    if isinstance(x2, Node):
                        pairs.append((x2, z2))
                    elif x2 != z2:
                        return None
            elif x != z:
                return None
    if ct is None:
        return None
    return reg, ct


def _expr_signature(e: Expr, h: Node, c: Node):
    """Slots renumbered by first appearance: (h dims, c dims, out) -- equal for equal readouts."""
    ren = {}

    def r(s):
        if s is None:
            return None
        if s not in ren:
            ren[s] = len(ren)
        return ren[s]

    hs = [sl for n, sl in e.factors if n is h][0]
    cs = [sl for n, sl in e.factors if n is c][0]
    return tuple(r(s) for s in hs), tuple(r(s) for s in cs), tuple(r(s) for s in e.out), tuple(e.size[s] for s in e.out)


# ----------------------------------------------------------------------------------------------
# rewriting
# ----------------------------------------------------------------------------------------------
class _Builder:
    """The engine's Builder plus the scan's view helper."""

    def __init__(self, b):
        self.b = b

    def call(self, target, *args, **kwargs) -> Node:
        return self.b.call(target, *args, **kwargs)

    def view_to(self, leaf: Node, slots: tuple, target_slots: list, sizes: dict) -> Node:
        """A view of ``leaf`` (whose dims carry ``slots``; None = size-1 broadcast dim) with dims
        ordered as ``target_slots`` (a slot absent from the leaf becomes a size-1 dim; a size-1
        leaf dim whose slot the target lacks is dropped)."""
        x = leaf
        shp = shape_of(leaf)
        drop = [i for i, s in enumerate(slots) if s is None or (s not in target_slots and shp[i] == 1)]
        keep = [s for i, s in enumerate(slots) if i not in drop]
        if drop:
            x = self.call(aten.squeeze.dims, x, drop)
        missing = [s for s in keep if s not in target_slots]
        if missing:
            raise NotTracked("a tensor has a dimension the op layout has no place for")
        order = sorted(range(len(keep)), key=lambda i: target_slots.index(keep[i]))
        if order != list(range(len(keep))):
            x = self.call(aten.permute.default, x, order)
        cur = [keep[i] for i in order]
        for j, s in enumerate(target_slots):
            if s not in cur:
                x = self.call(aten.unsqueeze.default, x, j)
                cur.insert(j, s)
        return x


def _time_first_view(b: _Builder, base: Node, axis: int) -> Node:
    return base if axis == 0 else b.call(aten.movedim.int, base, axis, 0)


def _is_zeros(node: Node) -> bool:
    if node.op != "call_function":
        return False
    t = node.target
    if t in (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default):
        return True
    if t in (aten.full.default, aten.new_full.default, aten.full_like.default):
        val = node.args[-1] if t != aten.full_like.default else node.args[1]
        return val == 0
    return False


@dataclass
class _Selective:
    u: tuple
    delta: tuple
    A: tuple
    B: tuple
    pos_batch: Optional[int]
    pos_d: int
    pos_n: int
    pos_t: int


def _selective_form(ch: _Chain, state_slots: list, k_pos: int) -> Optional[_Selective]:
    """Recognise a = exp(delta (x) A), b = delta (x) B (x) u on the a/b bases (same shape, same
    time axis). Positions are dims of the base tensors."""
    ab, bb = ch.a_base, ch.b_base
    if shape_of(ab) != shape_of(bb) or ch.a_axis != ch.b_axis:
        return None
    if not (ab.op == "call_function" and ab.target == aten.exp.default):
        return None
    try:
        ea = track(ab.args[0], set())
        eb = track(bb, set())
    except NotTracked:
        return None
    if ea.contracted() or eb.contracted() or len(ea.factors) != 2 or len(eb.factors) != 3:
        return None
    rank = len(shape_of(ab))
    pa = {s: i for i, s in enumerate(ea.out)}
    pb = {s: i for i, s in enumerate(eb.out)}

    def posmap(f, p, size):
        node, sl = f
        return node, sl, tuple(p.get(s) if s is not None else None for s in sl)

    fa = [posmap(f, pa, ea.size) for f in ea.factors]
    fb = [posmap(f, pb, eb.size) for f in eb.factors]
    t = ch.a_axis
    # state position of the contracted (n) dim: state dims are base dims without t
    n_pos = k_pos if k_pos < t else k_pos + 1
    delta = None
    for x in fa:
        for y in fb:
            if strip_casts(x[0]) is strip_casts(y[0]) and x[2] == y[2]:
                delta = (x, y)
    if delta is None:
        return None
    dl = delta[0]
    Af = [x for x in fa if x is not dl][0]
    rest = [y for y in fb if y is not delta[1]]
    if t not in dl[2] or n_pos in dl[2]:
        return None
    if t in Af[2] or n_pos not in Af[2]:
        return None
    d_positions = [p for p in Af[2] if p is not None and p != n_pos]
    if len(d_positions) != 1:
        return None
    d_pos = d_positions[0]
    others = [p for p in range(rank) if p not in (t, n_pos, d_pos)]
    if len(others) > 1:
        return None
    pos_batch = others[0] if others else None
    ufs = [y for y in rest if n_pos not in y[2]]
    bfs = [y for y in rest if n_pos in y[2]]
    if len(ufs) != 1 or len(bfs) != 1:
        return None
    uf, bf = ufs[0], bfs[0]
    if d_pos in bf[2] or t not in uf[2]:
        return None
    return _Selective(u=uf, delta=dl, A=Af, B=bf, pos_batch=pos_batch, pos_d=d_pos, pos_n=n_pos, pos_t=t)


def _pos_view(b: _Builder, f: tuple, target_pos: list) -> Node:
    """View of factor leaf f=(node, slots, positions) with dims ordered as target_pos (positions;
    None entries of target_pos become size-1 dims)."""
    node, _, pos = f
    tp = [p if p is not None else ("new", i) for i, p in enumerate(target_pos)]
    return b.view_to(node, pos, tp, {})


@dataclass
class _Plan:
    """Everything :func:`_recognise` decided about one loop; :func:`_emit` only builds it."""

    ch: _Chain
    ro: _Readout
    anchor: Node
    h0: Optional[Node]
    state_dtype: object
    last_ext: list
    hsl: Optional[list] = None
    k_pos: Optional[int] = None
    e0: Optional[Expr] = None
    sel: Optional["_Selective"] = None
    epilogue: Optional["_Epilogue"] = None

    @property
    def op(self) -> str:
        return "selective_scan" if self.sel is not None else "linear_scan"

    @property
    def folded(self) -> list:
        return self.epilogue.folded if self.epilogue is not None else []


def _recognise(g: _Graph, ch: _Chain, fold_selective: bool) -> _Plan:
    """Every check that can refuse re-rolling ``ch`` (raises NotTracked with the reason)."""
    L = len(ch.steps)
    a_shape, b_shape = shape_of(ch.a_base), shape_of(ch.b_base)
    if a_shape is None or b_shape is None:
        raise NotTracked("dynamic shapes")
    if a_shape[ch.a_axis] != L or b_shape[ch.b_axis] != L:
        raise NotTracked(f"the loop runs {L} steps over an axis of length {a_shape[ch.a_axis]}")
    # h0 must be defined before the loop (it is: it is an input of step 0); it must not be a
    # state of the same chain.
    h_last = ch.steps[-1]
    S = list(shape_of(h_last))
    state_dtype = dtype_of(h_last)
    for i, st in enumerate(ch.steps):
        if list(shape_of(st)) != S or dtype_of(st) != state_dtype:
            raise NotTracked(f"step {i} changes the state's shape or dtype")
    if dtype_of(h_last) not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise NotTracked("the state is not floating point")
    ro = _analyse_readout(ch, g)

    # final-state users outside the loop (allowed: the op returns h_last)
    readout_nodes = set()
    for reg in ro.regions:
        readout_nodes.update(reg)
    last_ext = [u for u in _users(h_last) if u not in readout_nodes and u is not ro.stack]

    # where to insert: before the node that consumes the loop's results
    if ro.mode == "final":
        anchor = min(last_ext, key=g.position) if last_ext else None
        if anchor is None:
            raise NotTracked("the loop's results are unused")
    else:
        anchor = ro.stack
        if last_ext and min(g.position(n) for n in last_ext) < g.position(ro.stack):
            anchor = min(last_ext, key=g.position)
    h0 = None if _is_zeros(ch.h0) else ch.h0
    if h0 is not None and shape_of(h0) is None:
        raise NotTracked("h0 has no static shape")
    plan = _Plan(ch, ro, anchor, h0, state_dtype, last_ext)
    if ro.mode == "ys":
        e0: Expr = ro.exprs[0]
        hsl = [sl for n, sl in e0.factors if n is ch.steps[0]][0]
        csl_node = [n for n, sl in e0.factors if n is not ch.steps[0]][0]
        csl = [sl for n, sl in e0.factors if n is csl_node][0]
        contracted = [s for s in e0.contracted()]
        if len(contracted) != 1 or contracted[0] not in hsl or hsl.count(contracted[0]) != 1:
            raise NotTracked("the readout must contract exactly one state dimension with C_t")
        k = contracted[0]
        if any(s is not None and s not in hsl for s in csl):
            raise NotTracked("C_t has a dimension the state does not have")
        if any(s is None for s in hsl):
            raise NotTracked("the readout broadcasts the state")
        for s in e0.out:
            if s not in hsl and e0.size[s] != 1:
                raise NotTracked("the readout output has a dimension the state does not have")
        plan.hsl, plan.k_pos, plan.e0 = hsl, hsl.index(k), e0
        sel = _selective_form(ch, list(hsl), plan.k_pos) if fold_selective else None
        if sel is not None:
            plan.sel = sel
            plan.epilogue = _selective_epilogue(plan)
    return plan


def _emit(b, plan: _Plan) -> list:
    """Build the op for ``plan``: [the loop's output (stack or folded epilogue), the final state]
    (the output is left out when only the final state is used)."""
    bb = _Builder(b)
    try:
        if plan.sel is not None:
            out_node, hl_node = _emit_selective(bb, plan)
        else:
            out_node, hl_node = _emit_linear(bb, plan)
    except NotTracked as exc:
        raise Declined(Divergence("structure", str(exc)), progress=len(plan.ch.steps)) from None
    return [hl_node] if plan.ro.mode == "final" else [out_node, hl_node]


def _scan_rule(node: Node, ctx, fold_selective: bool = True):
    """A chain of steps h_t = a_t * h_{t-1} + b_t starting here -> one selective/linear scan op."""
    with shape_cache(ctx.cache("scan.shapes")):
        g = _Graph(ctx.graph_module, ctx.position)
        chains = ctx.memo("scan.chains", lambda: {ch.steps[0]: ch for ch in _find_chains(g, [])})
        ch = chains.get(node)
        if ch is None:
            return None  # not the first step of a recurrence
        steps = len(ch.steps)
        if ch.broken:
            return decline(ch.broken, kind="chain", progress=steps)
        try:
            plan = _recognise(g, ch, fold_selective)
        except NotTracked as exc:
            return decline(str(exc), kind="structure", progress=steps)
    ro = plan.ro
    outputs = [ch.steps[-1]] if ro.mode == "final" else [(plan.folded[-1] if plan.folded else ro.stack), ch.steps[-1]]
    # everything of the loop (the erase candidates; a still-used slice stays)
    matched = list(plan.folded[::-1]) + ([ro.stack] if ro.stack is not None else [])
    for i in range(steps - 1, -1, -1):
        if ro.regions:
            matched.extend(ro.regions[i])
        matched.extend(ch.alias.get(i, ()))
        matched.append(ch.steps[i])
        if ch.muls[i] is not None:
            matched.append(ch.muls[i])
        matched.append(ch.a_sl[i])
        matched.append(ch.b_sl[i])
    cache = ctx.cache("scan.shapes")

    def build(b):
        with shape_cache(cache):
            return _emit(b, plan)

    info = dict(op=plan.op, steps=steps, first=ch.steps[0].name, mode=ro.mode, folded=[n.name for n in plan.folded])
    return emit(outputs, build, matched=matched, before=plan.anchor, label=plan.op, info=info,
                sources=list(ch.steps) + ([ro.stack] if ro.stack is not None else []) + plan.folded,
                only_users={ch.steps[-1]: plan.last_ext}, erase_unused_inputs=True)


def _make_rule(fold_selective: bool) -> NodeRule:
    return NodeRule("scan", lambda node, ctx: _scan_rule(node, ctx, fold_selective),
                    anchors=[aten.add.Tensor, aten.addcmul.default], contract=fp64_relative(2.0),
                    labels=("selective_scan", "linear_scan"), keep_declines=True, progress_unit="steps",
                    description=_scan_rule.__doc__, source=f"{__file__}:{_scan_rule.__code__.co_firstlineno}")


SCAN_RULE = _make_rule(True)


class ScanPass(RewritePass):
    """Re-roll unrolled linear recurrences into ``fxopt::selective_scan`` / ``fxopt::linear_scan``.

    ``last_rejections`` / ``last_matches``: what the last call on this object declined (with
    reasons) and re-rolled."""

    def __init__(self, fold_selective: bool = True):
        self.fold_selective = fold_selective
        super().__init__("scan", [SCAN_RULE if fold_selective else _make_rule(False)], max_iterations=1,
                         fixpoint=False)
        self.last_rejections: list[Rejection] = []
        self.last_matches: list[dict] = []

    def call(self, gm: torch.fx.GraphModule):
        result = super().call(gm)
        self.last_rejections = [Rejection(d.anchor, d.divergence.message, d.progress) for d in result.declines]
        self.last_matches = [r.info for r in result.rewrites]
        return result

@dataclass
class _Epilogue:
    """What the selective op folds in after the loop: ``+ u * D`` and the gate."""

    folded: list  # the epilogue nodes folded into the op, in order
    D: Optional[tuple]
    z: Optional[Node]
    out: Node  # the last node the op replaces (the stack, or the last folded node)
    out_pos: list  # its dims as base positions
    st_pos: list  # state dims as base positions
    slot_pos: dict  # readout slot -> base position


def _selective_epilogue(plan: _Plan) -> _Epilogue:
    ch, ro, sel, hsl, e0 = plan.ch, plan.ro, plan.sel, plan.hsl, plan.e0
    t = sel.pos_t
    # state slot -> base position
    st_pos = [p if p < t else p + 1 for p in range(len(hsl))]
    slot_pos = {hsl[i]: st_pos[i] for i in range(len(hsl))}
    # stack dims -> base positions: y_t out slots + time at stack_dim
    ypos = [slot_pos.get(s) for s in e0.out]
    ypos.insert(ro.stack_dim, t)
    folded = []
    Dn = None
    z = None
    cur = ro.stack
    if len(cur.users) == 1:
        nxt = next(iter(cur.users))
        if nxt.op == "call_function" and nxt.target == aten.add.Tensor and nxt.kwargs.get("alpha", 1) == 1 and shape_of(nxt) == shape_of(cur):
            other = nxt.args[1] if nxt.args[0] is cur else nxt.args[0]
            Dn = _match_D(other, cur, ypos, sel)
            if Dn is not None:
                folded.append(nxt)
                cur = nxt
    if Dn is not None and len(cur.users) == 1:
        nxt = next(iter(cur.users))
        if nxt.op == "call_function" and nxt.target == aten.mul.Tensor and shape_of(nxt) == shape_of(cur):
            other = nxt.args[1] if nxt.args[0] is cur else nxt.args[0]
            zz = _match_gate(other, cur)
            if zz is not None:
                folded.append(nxt)
                cur = nxt
                z = zz
    return _Epilogue(folded, Dn, z, cur, ypos, st_pos, slot_pos)


def _emit_linear(b: _Builder, plan: _Plan):
    ch, ro, h0, hsl, k_pos, e0, state_dtype = plan.ch, plan.ro, plan.h0, plan.hsl, plan.k_pos, plan.e0, plan.state_dtype
    S = list(shape_of(ch.steps[-1]))
    r = len(S)
    perm = list(range(r))
    if ro.mode == "ys":
        perm = [i for i in range(r) if i != k_pos] + [k_pos]

    def canon(base, axis):
        x = _time_first_view(b, base, axis)
        shp = shape_of(x)
        for _ in range(r + 1 - len(shp)):
            x = b.call(aten.unsqueeze.default, x, 1)
        if perm != list(range(r)):
            x = b.call(aten.permute.default, x, [0] + [p + 1 for p in perm])
        return x

    a = canon(ch.a_base, ch.a_axis)
    bb = canon(ch.b_base, ch.b_axis)
    h0c = None
    if h0 is not None:
        x = h0
        for _ in range(r - len(shape_of(h0))):
            x = b.call(aten.unsqueeze.default, x, 0)
        if perm != list(range(r)):
            x = b.call(aten.permute.default, x, perm)
        h0c = x
    C = None
    out_dtype = state_dtype
    if ro.mode == "ys":
        csl_node = [n for n, sl in e0.factors if n is not ch.steps[0]][0]
        csl = [sl for n, sl in e0.factors if n is csl_node][0]
        # C_t dims -> state slots in canonical order; C base dims = C_t dims with time inserted
        target = [hsl[p] for p in perm]
        cbase = _time_first_view(b, ro.c_base, ro.c_axis)
        C = b.view_to(cbase, (("T",) + tuple(csl)), ["T"] + target, {})
        out_dtype = dtype_of(ro.stack)
    elif ro.mode == "states":
        out_dtype = dtype_of(ro.stack)
    # The graph entry point (same semantics as the op; skips the dispatcher when no autograd,
    # tracing or mode needs it: the fast launch path).
    op = b.call(scan_ops.linear_scan, a, bb, h0c, C, out_dtype, state_dtype)
    y = b.call(operator.getitem, op, 0)
    hl = b.call(operator.getitem, op, 1)
    inv = [perm.index(i) for i in range(r)]
    if perm != list(range(r)):
        hl = b.call(aten.permute.default, hl, inv)
    out = None
    if ro.mode == "ys":
        # y: (L, state dims without k in perm order) -> y_t's out order, then stack dim
        rem = [hsl[p] for p in perm[:-1]]
        yo = list(e0.out)
        yt = b.view_to(y, ("T",) + tuple(rem), ["T"] + [s if s in rem else ("one", i) for i, s in enumerate(yo)], {})
        out = yt if ro.stack_dim == 0 else b.call(aten.movedim.int, yt, 0, ro.stack_dim)
    elif ro.mode == "states":
        yy = y
        if perm != list(range(r)):
            yy = b.call(aten.permute.default, y, [0] + [p + 1 for p in inv])
        out = yy if ro.stack_dim == 0 else b.call(aten.movedim.int, yy, 0, ro.stack_dim)
    return out, hl


def _emit_selective(b: _Builder, plan: _Plan):
    ch, ro, sel, h0, e0, epi = plan.ch, plan.ro, plan.sel, plan.h0, plan.e0, plan.epilogue
    t = sel.pos_t
    tb = [sel.pos_batch, sel.pos_d, t]
    u = _pos_view(b, sel.u, tb)
    delta = _pos_view(b, sel.delta, tb)
    A = _pos_view(b, sel.A, [sel.pos_d, sel.pos_n])
    Bm = _pos_view(b, sel.B, [sel.pos_batch, sel.pos_n, t])
    # C: the C base's dims: C_t slots (as in the readout) with time at c_axis.
    csl_node = [n for n, sl in e0.factors if n is not ch.steps[0]][0]
    csl = list([sl for n, sl in e0.factors if n is csl_node][0])
    cpos = [epi.slot_pos.get(s) if s is not None else None for s in csl]
    cpos.insert(ro.c_axis, t)
    C = _pos_view(b, (ro.c_base, None, tuple(cpos)), [sel.pos_batch, sel.pos_n, t])
    Dv = _pos_view(b, epi.D, [sel.pos_d]) if epi.D is not None else None
    zc = _pos_view(b, (epi.z, None, tuple(epi.out_pos)), tb) if epi.z is not None else None
    h0c = None
    if h0 is not None:
        # h0 has the state's dims (maybe fewer, right-aligned)
        hp = list(epi.st_pos)[len(epi.st_pos) - len(shape_of(h0)):]
        h0c = _pos_view(b, (h0, None, tuple(hp)), [sel.pos_batch, sel.pos_d, sel.pos_n])
    op = b.call(scan_ops.selective_scan, u, delta, A, Bm, C, Dv, zc, h0c, dtype_of(epi.out))
    y = b.call(operator.getitem, op, 0)
    hl = b.call(operator.getitem, op, 1)
    # y (batch, d, t) -> the replaced node's layout
    yv = b.view_to(y, tuple(tb), [p if p in tb else ("one", i) for i, p in enumerate(epi.out_pos)], {})
    # final state (batch, d, n) -> state dims
    hlv = b.view_to(hl, (sel.pos_batch, sel.pos_d, sel.pos_n), list(epi.st_pos), {})
    if dtype_of(hlv) != plan.state_dtype:
        hlv = b.call(aten.to.dtype, hlv, plan.state_dtype)
    return yv, hlv


def _match_D(other, stack, stack_pos, sel: _Selective):
    """other == u * D (u the same leaf as in b's prologue, laid out like the stack)."""
    try:
        e = track(other, set())
    except NotTracked:
        return None
    if e.contracted() or len(e.factors) != 2:
        return None
    r = len(stack_pos)
    if len(e.out) > r:
        return None
    outpos = [None] * (r - len(e.out)) + list(stack_pos)
    outpos = list(stack_pos)[r - len(e.out):]
    pmap = {s: outpos[i] for i, s in enumerate(e.out)}
    facs = [(n, sl, tuple(pmap.get(s) if s is not None else None for s in sl)) for n, sl in e.factors]
    us = [f for f in facs if strip_casts(f[0]) is strip_casts(sel.u[0])]
    if len(us) != 1:
        return None
    uf = us[0]
    if tuple(p for p in uf[2] if p is not None) != tuple(p for p in sel.u[2] if p is not None):
        return None
    Df = [f for f in facs if f is not uf][0]
    if [p for p in Df[2] if p is not None] != [sel.pos_d]:
        return None
    return Df


def _match_gate(other, cur):
    """other == silu(z) or z * sigmoid(z) with z of cur's shape; returns z."""
    if not isinstance(other, Node) or other.op != "call_function":
        return None
    if other.target == aten.silu.default:
        z = other.args[0]
    elif other.target == aten.mul.Tensor and all(isinstance(x, Node) for x in other.args):
        x, y = other.args
        if isinstance(y, Node) and y.op == "call_function" and y.target == aten.sigmoid.default and y.args[0] is x:
            z = x
        elif isinstance(x, Node) and x.op == "call_function" and x.target == aten.sigmoid.default and x.args[0] is y:
            z = y
        else:
            return None
    else:
        return None
    if shape_of(z) != shape_of(cur):
        return None
    return z


def explain_scan(gm: torch.fx.GraphModule) -> list:
    """Why the scan pass would not re-roll candidates of ``gm``, furthest first (read-only):
    the near misses of ``fxopt.explain(gm, "scan")``."""
    from ..rewrite import explain

    return explain(gm, ScanPass())["scan"].near_misses


