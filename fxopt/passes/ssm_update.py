"""The ``ssm_update`` pass: Mamba's single-step decode math -> two fused in-place ops.

A generation decode step (:mod:`fxopt.runtime.mamba`) computes, per layer, HF's torch
``causal_conv1d_update`` and ``selective_state_update``: ~6 and ~25 ATen calls that read and
write the conv window and the SSM state. This pass finds both structurally and replaces them:

* rule ``state_update``: ``copy_(state, state.float() * exp(dt'.float()[..., None] * A) +
  (dt'.float()[..., None] * B.float()[:, None]) * x.float()[..., None])`` with
  ``dt' = softplus(dt + dt_bias.to(dt.dtype))``, read out by ``matmul(new, C[..., None])``,
  ``+ x * D``, ``* silu(z)`` -> ``fxopt::selective_state_update(state, x, dt, A, B, C, D, z,
  dt_bias)``; when ``A`` is ``-exp(A_log.float())`` of a parameter (HF's mixer computes it every
  step), the op takes ``A_log`` and computes ``A`` itself (two kernels per layer and step fewer);
* rule ``conv_update``: ``w = cat([conv_state, x], -1)``, ``copy_(conv_state, w[..., -k:])``,
  ``silu(conv1d(w, weight, bias, groups=d)[..., -1:])`` -> ``fxopt::conv_state_update(x,
  conv_state, weight, bias)``.

Both ops write the state where the matched ``copy_`` wrote it; the pass places the op at the
position of the last node it replaces and declines when anything between the ``copy_`` and that
position touches the state's storage (any view of the same cache input), when an intermediate is
used outside the match (e.g. the discretised ``exp(dt A)`` read elsewhere), when a cast differs
from the reference's (a ``.float()`` where the reference keeps the dtype), when the readout is
not the reference's (another contraction, a missing gate, another activation than silu), or when
softplus has non-default ``beta``/``threshold``. Every declined candidate is recorded with its
reason in ``SSMUpdatePass.last_rejections``.

Contract: on the CPU the ops *are* the references (:mod:`fxopt.ops.ssm_update`), so the rewrite
is ``bitwise``; on CUDA the Triton kernels meet ``fp64_relative(2)`` against them.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx
from torch.fx import Node

from ..graph_utils import mark_provenance, propagate_meta
from ..ops import ssm_update as ops
from ..pass_base import Pass, PassResult

aten = torch.ops.aten
_INT_MAX = 2**63 - 1
_CASTS = {aten.to.dtype, aten._to_copy.default}
_VIEWS = {aten.select.int, aten.slice.Tensor, aten.view.default, aten.reshape.default, aten.transpose.int,
          aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default, aten.permute.default, aten.expand.default,
          aten.narrow.default, aten.alias.default, aten.as_strided.default, aten.t.default, aten.unflatten.int,
          aten.flatten.using_ints, aten.unbind.int, aten.split.Tensor, aten.chunk.default}
_ASSERT = getattr(aten, "_assert_tensor_metadata", None)
_ASSERT = _ASSERT.default if _ASSERT is not None else None


class _NoMatch(Exception):
    pass


def _fail(why: str):
    raise _NoMatch(why)


def _is(n, *targets) -> bool:
    return isinstance(n, Node) and n.op == "call_function" and n.target in targets


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def _dtype(n):
    v = _val(n)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _cast_target(n: Node) -> Optional[torch.dtype]:
    """The dtype a pure cast node casts to (None if it is not a plain dtype cast)."""
    if n.target is aten.to.dtype:
        extra = dict(zip(("non_blocking", "copy", "memory_format"), n.args[2:]))
        extra.update({k: v for k, v in n.kwargs.items()})
        if extra.get("copy") or extra.get("memory_format") not in (None, torch.preserve_format):
            return None
        return n.args[1] if len(n.args) > 1 else n.kwargs.get("dtype")
    if n.target is aten._to_copy.default and set(n.kwargs) <= {"dtype"} and len(n.args) == 1:
        return n.kwargs.get("dtype")
    return None


class _Match:
    """Nodes a candidate consumes (erased when the rule fires) and helpers to walk casts."""

    def __init__(self):
        self.nodes: list[Node] = []

    def take(self, n: Node) -> Node:
        if n not in self.nodes:
            self.nodes.append(n)
        return n

    def casts(self, n, dtype: Optional[torch.dtype] = None, *, exact: bool = True) -> Node:
        """Through dtype casts (taking them); with ``dtype``: the value must reach ``dtype`` as the
        reference does, i.e. the base already has it or the casts end in it."""
        first = n
        while _is(n, *_CASTS) and _cast_target(n) is not None:
            self.take(n)
            n = n.args[0]
        if dtype is not None and exact:
            if _dtype(first) != dtype:
                _fail(f"{first.name} is {_dtype(first)}, the reference has {dtype} there")
        return n

    def op(self, n, *targets, what: str) -> Node:
        if not _is(n, *targets):
            _fail(f"{what}: expected {'/'.join(str(t) for t in targets)}, found {getattr(n, 'name', n)!r}")
        return self.take(n)


def _operands(n: Node) -> tuple:
    return tuple(n.args[:2])


def _unsqueezed(m: _Match, n, dims: tuple[int, ...], what: str) -> Node:
    u = m.op(n, aten.unsqueeze.default, what=what)
    if u.args[1] not in dims:
        _fail(f"{what}: unsqueeze at dim {u.args[1]}, expected {dims}")
    return u.args[0]


def _view_ancestors(n: Node) -> set[Node]:
    out = set()
    while isinstance(n, Node):
        out.add(n)
        if n.op == "call_function" and (n.target in _VIEWS or n.target is aten.to.dtype or n.target is operator.getitem):
            n = n.args[0]
        else:
            break
    return out


def _check_interference(graph_nodes: list[Node], pos: dict[Node, int], end: Node, state: Node,
                        matched: set[Node]) -> None:
    """Between the first matched node and ``end`` (where the op goes, reading and writing the state
    there), no node outside the match may touch the state's storage (use the state or a view it is
    made from): the op moves the read and the write of the state to ``end``."""
    anc = _view_ancestors(state)
    start = min(pos[n] for n in matched)
    for n in graph_nodes[start + 1: pos[end]]:
        if n in matched or _is(n, _ASSERT):
            continue
        if any(a in anc for a in n.all_input_nodes):
            _fail(f"{n.name} uses the state's storage between its write and the readout")


@dataclass
class Rejection:
    rule: str
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.rule} candidate at {self.where}: {self.reason}"


# ----------------------------------------------------------------------------------------------
# rule: state_update
# ----------------------------------------------------------------------------------------------
def _match_state_update(copy: Node):
    m = _Match()
    m.take(copy)
    dst, src = copy.args[0], copy.args[1]
    state = dst  # the reference copies into the state itself; export may name it by a no-op .float() alias
    while _is(state, aten.to.dtype) and _cast_target(state) == _dtype(state.args[0]):
        m.take(state)
        state = state.args[0]
    if _is(state, *_CASTS):
        _fail("the copy_ target is a real cast (a copy), not the state")
    sdt = _dtype(state)
    new = m.casts(src, sdt)
    add = m.op(new, aten.add.Tensor, what="new state")
    if add.kwargs.get("alpha", 1) != 1 or len(add.args) > 2:
        _fail("new state add has alpha != 1")
    found = None
    for a, b in (_operands(add), _operands(add)[::-1]):
        if _is(a, aten.mul.Tensor):
            for s, da in (_operands(a), _operands(a)[::-1]):
                if isinstance(s, Node) and _is(da, aten.exp.default):
                    sub = _Match()
                    try:
                        base = sub.casts(s, torch.float32)
                    except _NoMatch:
                        continue
                    if base is state:
                        found = (a, s, da, b, sub)
                        break
        if found:
            break
    if found is None:
        _fail("new state is not state.float() * exp(...) + ...")
    mul_s, s_f, exp_da, dbx, sub = found
    m.take(mul_s)
    for n in sub.nodes:
        m.take(n)
    m.take(exp_da)
    # dA = exp(dt.float()[..., None] * A.float())
    mul_da = m.op(exp_da.args[0], aten.mul.Tensor, what="exp argument")
    ops_da = _operands(mul_da)
    dt_sp = A = None
    for u, a in (ops_da, ops_da[::-1]):
        if _is(u, aten.unsqueeze.default) and u.args[1] in (2, -1):
            sub2 = _Match()
            try:
                dt_base = sub2.casts(u.args[0], torch.float32)
                A_node = sub2.casts(a, torch.float32)
            except _NoMatch:
                continue
            for n in [u, *sub2.nodes]:
                m.take(n)
            dt_sp, A = dt_base, A_node
            break
    if dt_sp is None:
        _fail("exp argument is not dt.float()[..., None] * A.float()")
    # dBx = (dt.float()[..., None] * B.float()[:, None, :]) * x.float()[..., None]
    mul_x = m.op(dbx, aten.mul.Tensor, what="dBx")
    x = B = None
    for db, ux in (_operands(mul_x), _operands(mul_x)[::-1]):
        if _is(db, aten.mul.Tensor) and _is(ux, aten.unsqueeze.default) and ux.args[1] in (2, -1):
            for ud, ub in (_operands(db), _operands(db)[::-1]):
                if (_is(ud, aten.unsqueeze.default) and ud.args[1] in (2, -1) and _is(ub, aten.unsqueeze.default)
                        and ub.args[1] == 1):
                    sub3 = _Match()
                    try:
                        if sub3.casts(ud.args[0], torch.float32) is not dt_sp:
                            continue
                        B_node = sub3.casts(ub.args[0], torch.float32)
                        x_node = sub3.casts(ux.args[0], torch.float32)
                    except _NoMatch:
                        continue
                    for n in [db, ud, ub, ux, *sub3.nodes]:
                        m.take(n)
                    x, B = x_node, B_node
                    break
        if x is not None:
            break
    if x is None:
        _fail("dBx is not (dt.float()[..., None] * B.float()[:, None]) * x.float()[..., None]")
    # dt' = softplus(dt + dt_bias.to(dt.dtype)), the bias optional, softplus optional
    dt, dt_bias, softplus = dt_sp, None, False
    if _is(dt, aten.softplus.default):
        beta = dt.args[1] if len(dt.args) > 1 else dt.kwargs.get("beta", 1)
        threshold = dt.args[2] if len(dt.args) > 2 else dt.kwargs.get("threshold", 20)
        if beta != 1 or threshold != 20:
            _fail(f"softplus(beta={beta}, threshold={threshold}) is not the reference's softplus")
        m.take(dt)
        dt, softplus = dt.args[0], True
    if _is(dt, aten.add.Tensor) and dt.kwargs.get("alpha", 1) == 1 and len(dt.args) == 2:
        raw, bias = dt.args
        if isinstance(bias, Node) and _is(bias, *_CASTS) and _cast_target(bias) == _dtype(raw):
            m.take(dt)
            b0 = bias
            while _is(b0, *_CASTS) and _cast_target(b0) is not None:
                m.take(b0)
                inner = b0.args[0]
                if _is(inner, *_CASTS) and _cast_target(inner) not in (torch.float32, torch.float64):
                    _fail("dt_bias goes through a narrowing cast")
                b0 = inner
            dt, dt_bias = raw, b0
    # readout: matmul(new.to(C.dtype), C[..., None]).squeeze(-1)
    readers = [u for u in new.users if u is not src and u is not copy and not _is(u, _ASSERT)]
    if src is not new:
        readers += [u for u in src.users if u is not copy and not _is(u, _ASSERT)]
    if len(readers) != 1:
        _fail(f"the new state has {len(readers)} readers besides the state write, expected the readout")
    r = readers[0]
    if _is(r, *_CASTS):
        m.take(r)
        rs = [u for u in r.users if not _is(u, _ASSERT)]
        if len(rs) != 1:
            _fail("the readout cast has several users")
        r_cast, r = r, rs[0]
    else:
        r_cast = None
    mm = m.op(r, aten.matmul.default, what="readout")
    if mm.args[0] is not (r_cast if r_cast is not None else new):
        _fail("the new state is not the matmul's left operand")
    C = _unsqueezed(m, mm.args[1], (-1, 2), "readout C")
    if (r_cast is not None and _cast_target(r_cast) != _dtype(C)) or (r_cast is None and _dtype(new) != _dtype(C)):
        _fail("the new state is not cast to C's dtype for the readout")
    out = _single_user(mm)
    sq = m.op(out, aten.squeeze.dim, what="readout squeeze")
    if sq.args[1] not in (-1, 2):
        _fail("readout squeeze on another dim")
    final = sq
    # + x * D
    D = None
    nxt = _single_user(final)
    if _is(nxt, aten.add.Tensor) and nxt.kwargs.get("alpha", 1) == 1 and len(nxt.args) == 2:
        other = nxt.args[1] if nxt.args[0] is final else nxt.args[0]
        if _is(other, aten.mul.Tensor):
            for xx, dd in (_operands(other), _operands(other)[::-1]):
                sub4 = _Match()
                if isinstance(xx, Node) and sub4.casts(xx) is x and _dtype(xx) == _dtype(x) and isinstance(dd, Node):
                    for n in [nxt, other, *sub4.nodes]:
                        m.take(n)
                    D, final = dd, nxt
                    break
    if D is None:
        _fail("the readout is not followed by + x * D")
    # * silu(z)
    z = None
    nxt = _single_user(final)
    if _is(nxt, aten.mul.Tensor):
        for yy, g in (_operands(nxt), _operands(nxt)[::-1]):
            if yy is final and _is(g, aten.silu.default):
                m.take(nxt)
                m.take(g)
                z, final = g.args[0], nxt
                break
    if z is None:
        _fail("the readout is not gated by * silu(z)")
    nxt = _single_user(final)
    if _is(nxt, *_CASTS) and _cast_target(nxt) == _dtype(x):
        m.take(nxt)
        final = nxt
    elif _dtype(final) != _dtype(x):
        _fail(f"the output is {_dtype(final)}, not x's dtype {_dtype(x)}")
    # A = -exp(A_log.float()) computed from a parameter every step (HF's mixer): folded into the op
    a_is_log = False
    if _is(A, aten.neg.default) and _is(A.args[0], aten.exp.default):
        sub5 = _Match()
        base = sub5.casts(A.args[0].args[0])
        if base.op in ("get_attr", "placeholder") and all(_dtype(c) == torch.float32 for c in sub5.nodes) \
                and _dtype(A.args[0]) == torch.float32:
            for n in [A, A.args[0], *sub5.nodes]:
                m.take(n)
            A, a_is_log = base, True
    args = (state, x, dt, A, B, C, D, z, dt_bias, softplus, a_is_log)
    return m, final, state, args


def _single_user(n: Node) -> Optional[Node]:
    users = [u for u in n.users if not _is(u, _ASSERT)]
    return users[0] if len(users) == 1 else None


# ----------------------------------------------------------------------------------------------
# rule: conv_update
# ----------------------------------------------------------------------------------------------
def _match_conv_update(copy: Node):
    m = _Match()
    m.take(copy)
    state, src = copy.args[0], copy.args[1]
    sval = _val(state)
    if not isinstance(sval, torch.Tensor) or sval.dim() != 3:
        _fail("the copy_ target is not a (b, d, k) window")
    k = sval.shape[-1]
    sl = m.op(src, aten.slice.Tensor, what="window tail")
    if tuple(sl.args[1:]) not in ((2, -k, _INT_MAX), (-1, -k, _INT_MAX)):
        _fail(f"the window tail is slice{tuple(sl.args[1:])}, not [..., -{k}:]")
    window = sl.args[0]
    cat = m.casts(window)
    m.op(cat, aten.cat.default, what="window")
    parts = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else 0
    if dim not in (-1, 2) or len(parts) != 2 or parts[0] is not state:
        _fail("the window is not cat([conv_state, x], -1)")
    x = parts[1]
    xv = _val(x)
    if not isinstance(xv, torch.Tensor) or xv.dim() != 3:
        _fail("x is not (b, d, l)")
    readers = [u for u in window.users if u is not sl and not _is(u, _ASSERT)]
    if len(readers) != 1:
        _fail("the window has other readers than the state write and the conv")
    conv = m.op(readers[0], aten.conv1d.default, what="conv")
    args = list(conv.args) + [None] * (7 - len(conv.args))
    _, weight, bias, stride, padding, dilation, groups = args[:7]
    d = xv.shape[1]
    if conv.args[0] is not window or tuple(stride or [1]) != (1,) or tuple(padding or [0]) != (0,) \
            or tuple(dilation or [1]) != (1,) or groups != d:
        _fail("not a depthwise conv1d with stride 1, no padding, groups = channels")
    wv = _val(weight)
    if not isinstance(wv, torch.Tensor) or tuple(wv.shape) != (d, 1, k) or (wv.dtype != _dtype(window)):
        _fail("the conv weight is not (d, 1, k) in the window's dtype")
    tail = m.op(_single_user(conv), aten.slice.Tensor, what="conv tail")
    if tuple(tail.args[1:]) not in ((2, -xv.shape[2], _INT_MAX), (-1, -xv.shape[2], _INT_MAX)):
        _fail("the conv output is not cut to the last step")
    act = _single_user(tail)
    if not _is(act, aten.silu.default):
        _fail("the activation is not silu")
    m.take(act)
    final = act
    nxt = _single_user(final)
    if _is(nxt, *_CASTS) and _cast_target(nxt) == xv.dtype:
        m.take(nxt)
        final = nxt
    elif _dtype(final) != xv.dtype:
        _fail("the output is not in x's dtype")
    return m, final, state, (x, state, weight, bias, True)


_RULES = (
    ("state_update", _match_state_update, ops.SELECTIVE_STATE_UPDATE),
    ("conv_update", _match_conv_update, ops.CONV_STATE_UPDATE),
)


class SSMUpdatePass(Pass):
    """Fuse Mamba's decode-step state updates (see the module docstring)."""

    name = "ssm_update"
    fixpoint = False

    def __init__(self):
        self.last_rejections: list[Rejection] = []

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        self.last_rejections = []
        graph = graph_module.graph
        stats = {"matches": 0, "rule:state_update": 0, "rule:conv_update": 0}
        for rule, matcher, target in _RULES:
            nodes = list(graph.nodes)
            pos = {n: i for i, n in enumerate(nodes)}
            for copy in [n for n in nodes if _is(n, aten.copy_.default)]:
                if getattr(copy, "_erased", False) or copy not in pos:
                    continue
                try:
                    m, final, state, args = matcher(copy)
                    matched = set(m.nodes)
                    for n in m.nodes:
                        if n is final:
                            continue
                        for u in n.users:  # (the copy_ too: export names the state after it by the copy_)
                            if u not in matched and not _is(u, _ASSERT):
                                _fail(f"{n.name} is also used by {u.name}, outside the match")
                    if any(a is not None and isinstance(a, Node) and pos.get(a, -1) > pos[final]
                           for a in args if isinstance(a, Node)):
                        _fail("an input is computed after the readout")
                    _check_interference(nodes, pos, final, state, matched)
                except _NoMatch as exc:
                    self.last_rejections.append(Rejection(rule, copy.name, str(exc)))
                    continue
                with graph.inserting_before(final):
                    new = graph.call_function(target, tuple(args))
                propagate_meta(graph_module, [new])
                mark_provenance([new], rule=rule, pass_name=self.name, replaced=[n for n in nodes if n in matched])
                final.replace_all_uses_with(new)
                for n in reversed(nodes):
                    if n in matched:
                        for u in list(n.users):
                            if _is(u, _ASSERT):
                                graph.erase_node(u)
                        graph.erase_node(n)
                stats["matches"] += 1
                stats[f"rule:{rule}"] += 1
                nodes = list(graph.nodes)
                pos = {n: i for i, n in enumerate(nodes)}
        if stats["matches"]:
            graph_module.recompile()
        return PassResult(graph_module, bool(stats["matches"]), stats)


def explain_ssm_update(graph_module: torch.fx.GraphModule) -> str:
    """Why each candidate ``copy_`` of a state was not fused (runs the pass on a copy)."""
    from ..graph_utils import copy_graph_module

    p = SSMUpdatePass()
    p(copy_graph_module(graph_module))
    if not p.last_rejections:
        return "ssm_update: no rejected candidate"
    return "ssm_update: rejected candidates:\n" + "\n".join(f"  {r}" for r in p.last_rejections)
