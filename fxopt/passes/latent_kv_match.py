"""Finding GPTNeoX attention in a captured ATen graph, for the ``latent_kv`` pass.

One :class:`Site` per attention, found structurally from the attention op back to the fused
projection (the shapes HF's ``GPTNeoXAttention.forward`` produces, at any batch and length)::

    qkv    = linear(x, W (3d, d), b?)                          the fused projection
    heads  = chunk(transpose(view(qkv, [b, L, H, 3 hd]), 1, 2), 3, -1)    heads interleaved
    q, k, v = heads[0], heads[1], heads[2]                      (b, H, L, hd)
    q_emb  = cat([rot(q[..., :R]), q[..., R:]], -1)             rotary on a slice (R = hd: alias(q))
    k_emb  = cat([rot(k[..., :R]), k[..., R:]], -1)
    rot(t) = t * cos + cat([-t[..., R/2:], t[..., :R/2]], -1) * sin    (HF's rotate_half)

then either ``scaled_dot_product_attention(q_emb, K, V, mask?, 0.0, is_causal?, scale=s)`` or HF's
eager form ``matmul(dropout(softmax(matmul(q_emb, K^T) * s + mask?, -1, fp32).to(dt)), V)``.
``K, V`` are ``k_emb, v`` themselves (a plain forward or a prefill, which also copies them into the
cache) or the cache views after ``index_copy_(view, 2, slot, k_emb / v)`` (a decode step). Cache
views are addressed through ``select`` / ``slice`` on dimension 0 of the runtime's K/V cache
``(layers, 2, b, H, t, hd)`` (:mod:`fxopt.runtime.neox`), which gives each site its layer.

Anything else is a :class:`NoMatch` with a kind and a reason (what :func:`fxopt.explain` shows).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import Node

aten = torch.ops.aten
INT_MAX = 2**63 - 1
SDPA = aten.scaled_dot_product_attention.default
_ASSERT = getattr(aten, "_assert_tensor_metadata", None)
_ASSERT = _ASSERT.default if _ASSERT is not None else None
_SOFTMAX = (aten.softmax.int, aten._softmax.default)
_DROPOUT = (aten.dropout.default,)


class NoMatch(Exception):
    """A candidate attention that is not GPTNeoX's (or cannot be rewritten): ``kind`` and why."""

    def __init__(self, kind: str, message: str, node: Optional[Node] = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.node = node


def _fail(kind: str, message: str, node: Optional[Node] = None):
    raise NoMatch(kind, message, node)


def is_op(n, *targets) -> bool:
    return isinstance(n, Node) and n.op == "call_function" and n.target in targets


def val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def shape(n) -> tuple:
    v = val(n)
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else ()


def real_users(n: Node) -> list[Node]:
    """Users that compute something (export's metadata asserts do not count)."""
    return [u for u in n.users if not is_op(u, _ASSERT)]


def _arg(n: Node, i: int, name: str, default=None):
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


@dataclass
class CacheWrite:
    node: Node          # the copy_ / index_copy_
    dest: Node          # the cache view written (b, H, t, hd), before any slice
    layer: int
    kv: int             # 0 keys, 1 values
    slot: Optional[Node] = None   # index_copy_'s position tensor (decode)


@dataclass
class Site:
    """One GPTNeoX attention found in the graph (module docstring for the letters)."""

    anchor: Node                 # the attention op (SDPA) or eager's final matmul: output (b, H, L, hd)
    kind: str                    # "sdpa" | "eager"
    x: Node
    linear: Node
    weight: Node                 # get_attr (3d, d)
    bias: Optional[Node]
    heads: int
    head_dim: int
    rotary_dim: int
    batch: int
    length: int
    q_head: Node
    k_head: Node
    v_head: Node
    q_emb: Node
    k_rot_src: Node              # k[..., :R] (slice or alias) the rotation reads
    k_rot_emb: Node              # the rotated k[..., :R]
    k_emb: Node
    cos: Node
    sin: Node
    keys_in: Node                # what attention reads as keys (k_emb or the cache view after its write)
    values_in: Node
    scale: float
    mask: Optional[Node]
    is_causal: bool
    writes: list[CacheWrite] = field(default_factory=list)
    layer: Optional[int] = None
    # eager only: the nodes between scores and the output (for the absorbed rewrite)
    softmax_dtype: Optional[torch.dtype] = None

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def decode(self) -> bool:
        return any(w.node.target is aten.index_copy_.default for w in self.writes)

    def describe(self) -> str:
        where = f"layer {self.layer}" if self.layer is not None else self.anchor.name
        return (f"{where}: {self.kind} attention, H={self.heads}, hd={self.head_dim}, R={self.rotary_dim}, "
                f"{'bias' if self.bias is not None else 'no bias'}")


# ----------------------------------------------------------------------------- candidates

def candidates(graph: torch.fx.Graph) -> list[Node]:
    """Attention ops: SDPA, and matmuls of softmax weights (HF's eager attention)."""
    out = []
    for n in graph.nodes:
        if is_op(n, SDPA):
            out.append(n)
        elif is_op(n, aten.matmul.default) and _softmax_of(n.args[0]) is not None:
            out.append(n)
    return out


def _strip(n, targets) -> Node:
    while is_op(n, *targets):
        n = n.args[0]
    return n


def _softmax_of(p) -> Optional[Node]:
    """The softmax behind eager attention weights (through dropout, a cast, an alias)."""
    p = _strip(p, _DROPOUT + (aten.to.dtype, aten.alias.default, aten._to_copy.default))
    return p if is_op(p, *_SOFTMAX) else None


# ----------------------------------------------------------------------------- the attention op

def _parse_sdpa(n: Node) -> dict:
    q, k, v = n.args[:3]
    mask = _arg(n, 3, "attn_mask")
    dropout = _arg(n, 4, "dropout_p", 0.0)
    causal = bool(_arg(n, 5, "is_causal", False))
    scale = n.kwargs.get("scale", n.args[6] if len(n.args) > 6 else None)
    if n.kwargs.get("enable_gqa", False):
        _fail("attention", "SDPA with enable_gqa (grouped keys): GPTNeoX has one key head per query head", n)
    if dropout not in (0, 0.0):
        _fail("attention", f"attention dropout p={dropout} is active (a training graph): the cache path is for inference", n)
    hd = shape(q)[-1] if shape(q) else 1
    return dict(q=q, k=k, v=v, mask=mask, causal=causal, scale=float(hd ** -0.5 if scale is None else scale),
                softmax_dtype=None)


def _scaled(n) -> Optional[tuple[Node, float]]:
    """``(mm, s)`` for ``mm * s`` (either order) with a Python scalar ``s``."""
    if is_op(n, aten.mul.Tensor):
        a, b = n.args[:2]
        if isinstance(b, (int, float)) and isinstance(a, Node):
            return a, float(b)
        if isinstance(a, (int, float)) and isinstance(b, Node):
            return b, float(a)
    return None


def _scores(s) -> tuple[Node, float, Optional[Node]]:
    """``(matmul, scale, mask)`` for eager's scores ``matmul * scale (+ mask)``, also in the addcmul
    pass's spelling ``add(mask, matmul, alpha=scale)``."""
    mask = None
    scaled = _scaled(s)
    if scaled is None and is_op(s, aten.add.Tensor) and len(s.args) == 2:
        a, b = s.args
        alpha = s.kwargs.get("alpha", 1)
        if alpha == 1:
            for x, m in ((a, b), (b, a)):
                if _scaled(x) is not None and isinstance(m, Node):
                    scaled, mask = _scaled(x), m
                    break
        elif isinstance(b, Node) and is_op(b, aten.matmul.default) and isinstance(a, Node):
            scaled, mask = (b, float(alpha)), a
    if scaled is None or not is_op(scaled[0], aten.matmul.default):
        _fail("attention", "scores are not matmul(q, k^T) * scale (+ mask)", s)
    mm = scaled[0]
    if len(real_users(s)) != 1 or (mask is not None and is_op(s, aten.add.Tensor) and s.args[0] is not mask
                                   and len(real_users(s.args[0])) != 1):
        _fail("users", "the attention scores are used outside the attention", s)
    return mm, scaled[1], mask


def _parse_eager(n: Node) -> dict:
    p, v = n.args[0], n.args[1]
    d = p
    while is_op(d, *_DROPOUT):
        if d.args[1] not in (0, 0.0) and (len(d.args) < 3 or d.args[2]):
            _fail("attention", f"attention dropout p={d.args[1]} is active (a training graph)", d)
        d = d.args[0]
    d = _strip(d, (aten.to.dtype, aten.alias.default, aten._to_copy.default))
    sm = d
    if len(sm.args) < 2 or _dim(sm.args[1], len(shape(sm))) != len(shape(sm)) - 1:
        _fail("attention", "softmax is not over the last (key) axis", sm)
    mm, scale, mask = _scores(sm.args[0])
    q, kt = mm.args
    if not (is_op(kt, aten.transpose.int) and {_dim(kt.args[1], 4), _dim(kt.args[2], 4)} == {2, 3}):
        _fail("attention", "keys are not transposed as k.transpose(2, 3)", kt)
    if len(real_users(kt)) != 1 or len(real_users(mm)) != 1:
        _fail("users", "the attention scores are used outside the attention", mm)
    return dict(q=q, k=kt.args[0], v=v, mask=mask, causal=False, scale=scale,
                softmax_dtype=sm.args[2] if len(sm.args) > 2 else None)


# ----------------------------------------------------------------------------- rotary and heads

def _rot_slice(t: Node, R_expected: Optional[int] = None):
    """``(head, R)`` for ``t = head[..., :R]`` (a slice, or alias when R = hd)."""
    if is_op(t, aten.alias.default):
        return t.args[0], shape(t)[-1]
    if t.op == "call_function" and t.target is operator.getitem:  # R = hd after the cleanup pass dropped the alias
        return t, shape(t)[-1]
    if is_op(t, aten.slice.Tensor) and _dim(t.args[1], 4) == 3 and (t.args[2] if len(t.args) > 2 else 0) in (0, None):
        return t.args[0], shape(t)[-1]
    _fail("rotary", "the rotated part is not a slice [..., :R] of a head", t)


def _products(r: Node) -> Optional[list[tuple]]:
    """The two products of ``a * b + c * d``: an ``add`` of two ``mul`` or, after the addcmul pass,
    ``addcmul(a * b, c, d)`` (value 1)."""
    if is_op(r, aten.add.Tensor) and len(r.args) == 2 and r.kwargs.get("alpha", 1) == 1:
        a, b = r.args
        if is_op(a, aten.mul.Tensor) and is_op(b, aten.mul.Tensor):
            return [tuple(a.args[:2]), tuple(b.args[:2])]
    if is_op(r, aten.addcmul.default) and r.kwargs.get("value", 1) == 1 and (len(r.args) < 4 or r.args[3] == 1):
        c, t1, t2 = r.args[:3]
        if is_op(c, aten.mul.Tensor):
            return [tuple(c.args[:2]), (t1, t2)]
    return None


def _rotation(r: Node) -> tuple[Node, Node, Node]:
    """``(src, cos, sin)`` for ``r = src * cos + cat([-src[..., R/2:], src[..., :R/2]], -1) * sin``
    (either product first, factors in either order)."""
    prods = _products(r)
    if prods is None:
        _fail("rotary", "not the rotary embedding t * cos + rotate_half(t) * sin", r)
    half = [(p, i) for p in prods for i in (0, 1) if is_op(p[i], aten.cat.default)]
    if len(half) != 1:
        _fail("rotary", "rotate_half(t) = cat([-t[..., R/2:], t[..., :R/2]], -1) is not one factor of the "
              "rotary embedding", r)
    (hp, hi), = half
    half_cat, sin = hp[hi], hp[1 - hi]
    other = prods[1] if hp is prods[0] else prods[0]
    if len(half_cat.args[0]) != 2:
        _fail("rotary", "rotate_half is not cat([-t[..., R/2:], t[..., :R/2]], -1)", half_cat)
    neg, lo = half_cat.args[0]
    src = neg.args[0].args[0] if is_op(neg, aten.neg.default) and is_op(neg.args[0], aten.slice.Tensor) else None
    if src is None or src not in other:
        _fail("rotary", "rotate_half does not rotate the tensor multiplied by cos", half_cat)
    cos = other[1] if other[0] is src else other[0]
    R = shape(src)[-1] if shape(src) else 0
    ok = (neg.args[0].args[2] == R // 2 and is_op(lo, aten.slice.Tensor) and lo.args[0] is src
          and lo.args[2] in (0, None) and lo.args[3] == R // 2)
    if not ok:
        _fail("rotary", "rotate_half is not cat([-t[..., R/2:], t[..., :R/2]], -1) of the rotated slice", half_cat)
    if not (isinstance(cos, Node) and isinstance(sin, Node)):
        _fail("rotary", "cos / sin are not tensors", r)
    return src, cos, sin


def _embedded(e: Node, what: str) -> tuple[Node, Node, Node, Node, Node, Node]:
    """``(head, rot_src, rot_emb, pass_slice, cos, sin)`` for ``e = cat([rot(head[..., :R]), head[..., R:]], -1)``."""
    if not (is_op(e, aten.cat.default) and len(e.args[0]) == 2 and _dim(e.args[1] if len(e.args) > 1 else 0, 4) == 3):
        _fail("rotary", f"{what} is not cat([rotary(t[..., :R]), t[..., R:]], -1) (GPTNeoX's partial rotary)", e)
    rot_emb, pas = e.args[0]
    src, cos, sin = _rotation(rot_emb)
    head, R = _rot_slice(src)
    if not (is_op(pas, aten.slice.Tensor) and pas.args[0] is head and _dim(pas.args[1], 4) == 3 and pas.args[2] == R):
        _fail("rotary", f"the pass-through part of {what} is not t[..., R:] of the same head", pas)
    return head, src, rot_emb, pas, cos, sin


def _heads(q_head: Node, k_head: Node, v_head: Node):
    """The fused projection behind three heads: ``(linear, x, weight, bias, H, hd)``."""
    for i, h in enumerate((q_head, k_head, v_head)):
        if not (h.op == "call_function" and h.target is operator.getitem and h.args[1] == i):
            _fail("head split", "q, k, v are not items 0, 1, 2 of one chunk: the head split is not GPTNeoX's "
                  "chunk(view(qkv, (b, L, H, 3*hd)).transpose(1, 2), 3, -1)", h)
    chunk = q_head.args[0]
    if not (k_head.args[0] is chunk and v_head.args[0] is chunk and is_op(chunk, aten.chunk.default)
            and chunk.args[1] == 3 and _dim(chunk.args[2] if len(chunk.args) > 2 else 0, 4) == 3):
        _fail("head split", "q, k, v are not chunk(..., 3, -1) of one tensor: not GPTNeoX's interleaved head split",
              chunk if isinstance(chunk, Node) else q_head)
    tr = chunk.args[0]
    if not (is_op(tr, aten.transpose.int) and {_dim(tr.args[1], 4), _dim(tr.args[2], 4)} == {1, 2}):
        _fail("head split", "the chunked tensor is not view(qkv, (b, L, H, 3*hd)).transpose(1, 2)", tr)
    vw = tr.args[0]
    if not (is_op(vw, aten.view.default, aten.reshape.default) and len(shape(vw)) == 4):
        _fail("head split", "the heads are not a 4-d view (b, L, H, 3*hd) of the projection", vw)
    lin = vw.args[0]
    b, L, H, three_hd = shape(vw)
    if not is_op(lin, aten.linear.default) or shape(lin) != (b, L, H * three_hd):
        _fail("projection", "the heads are not a view of one linear (b, L, 3d) projection", lin)
    if three_hd % 3:
        _fail("head split", f"head width {three_hd} is not 3 * head_dim", vw)
    hd = three_hd // 3
    x, w = lin.args[:2]
    bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    d = H * hd
    if not (isinstance(w, Node) and w.op == "get_attr"):
        _fail("projection", "the query_key_value weight is not a parameter of the graph (get_attr)", lin)
    if shape(w) != (3 * d, d):
        _fail("projection", f"query_key_value weight is {shape(w)}, GPTNeoX's is (3d, d) = ({3 * d}, {d})", w)
    if bias is not None and not (isinstance(bias, Node) and bias.op == "get_attr" and shape(bias) == (3 * d,)):
        _fail("projection", "the query_key_value bias is not a (3d,) parameter of the graph", lin)
    for n, users in ((lin, 1), (vw, 1), (tr, 1), (chunk, 3)):
        if len(real_users(n)) != users:
            _fail("users", f"{n.name} is used outside the attention (the fused projection must be rewritten whole)", n)
    return lin, x, w, bias, H, hd, b, L


# ----------------------------------------------------------------------------- cache addressing

def cache_address(n: Node, cache_phs: dict[Node, int]) -> Optional[tuple[int, int]]:
    """``(layer, kv)`` of a view ``select(select(X, 0, layer'), 0, kv)`` of the runtime's K/V cache,
    ``X`` a chain of ``slice(·, 0, start)`` from a cache placeholder (layer = layer' + the starts)."""
    if not (is_op(n, aten.select.int) and n.args[1] == 0):
        return None
    kv = int(n.args[2])
    layer_node = n.args[0]
    if not (is_op(layer_node, aten.select.int) and layer_node.args[1] == 0):
        return None
    layer = int(layer_node.args[2])
    x = layer_node.args[0]
    while is_op(x, aten.slice.Tensor):
        if x.args[1] != 0 or (len(x.args) > 4 and x.args[4] != 1):
            return None
        layer += int(x.args[2] or 0)
        x = x.args[0]
    if x not in cache_phs or layer < 0 or kv not in (0, 1):
        return None
    return layer, kv


def _prefill_write(u: Node, value: Node, cache_phs) -> Optional[CacheWrite]:
    """``copy_(slice(view, 2, 0, L), value)`` into a cache view."""
    if not (is_op(u, aten.copy_.default) and u.args[1] is value):
        return None
    dst = u.args[0]
    if not (is_op(dst, aten.slice.Tensor) and _dim(dst.args[1], 4) == 2 and dst.args[2] in (0, None)):
        _fail("cache", "the K/V copy into the cache is not cache[..., :L, :]", u)
    addr = cache_address(dst.args[0], cache_phs)
    if addr is None:
        _fail("cache", "K/V are copied into a tensor that is not a view of the graph's K/V cache", u)
    return CacheWrite(u, dst.args[0], addr[0], addr[1])


def _decode_write(n: Node, value: Node, cache_phs) -> Optional[CacheWrite]:
    if not (is_op(n, aten.index_copy_.default) and n.args[3] is value):
        return None
    if _dim(n.args[1], 4) != 2:
        _fail("cache", "the decode write is not index_copy_ along the cache's position axis", n)
    addr = cache_address(n.args[0], cache_phs)
    if addr is None:
        _fail("cache", "the decode step writes K/V into a tensor that is not a view of the graph's K/V cache", n)
    return CacheWrite(n, n.args[0], addr[0], addr[1], slot=n.args[2])


# ----------------------------------------------------------------------------- one site

def match_site(anchor: Node, cache_phs: dict[Node, int]) -> Site:
    """The :class:`Site` of an attention candidate, or :class:`NoMatch`."""
    if is_op(anchor, SDPA):
        kind, a = "sdpa", _parse_sdpa(anchor)
    else:
        kind, a = "eager", _parse_eager(anchor)
    q_emb, K, V = a["q"], a["k"], a["v"]
    if len(shape(q_emb)) != 4:
        _fail("attention", "the query is not (b, H, L, hd)", anchor)
    writes: list[CacheWrite] = []
    k_emb, v_head = K, V
    dk = _decode_write(K, K.args[3], cache_phs) if is_op(K, aten.index_copy_.default) else None
    dv = _decode_write(V, V.args[3], cache_phs) if is_op(V, aten.index_copy_.default) else None
    if (dk is None) != (dv is None):
        _fail("cache", "keys and values are not both read from the cache after their decode write", anchor)
    if dk is not None:
        writes += [dk, dv]
        k_emb, v_head = dk.node.args[3], dv.node.args[3]
    q_head, _q_src, _q_rot, _q_pass, q_cos, q_sin = _embedded(q_emb, "the query")
    k_head, k_src, k_rot_emb, _k_pass, cos, sin = _embedded(k_emb, "the key")
    if (q_cos, q_sin) != (cos, sin):
        _fail("rotary", "q and k are rotated with different cos / sin tables", k_rot_emb)
    lin, x, w, bias, H, hd, b, L = _heads(q_head, k_head, v_head)
    R = shape(k_src)[-1]
    if R == 0 or R % 2:
        _fail("rotary", f"rotary width {R} (must be even and > 0)", k_src)
    if shape(cos)[-1] != R or shape(sin)[-1] != R:
        _fail("rotary", "cos / sin do not have the rotary width", cos)
    # every intermediate is used by the attention (and the cache write) only
    allowed_k = {anchor} if K is k_emb else {K}
    allowed_v = {anchor} if V is v_head else {V}
    if kind == "eager" and K is k_emb:
        allowed_k = {u for u in real_users(k_emb) if is_op(u, aten.transpose.int)}
    for u in real_users(k_emb):
        if u in allowed_k:
            continue
        wr = _prefill_write(u, k_emb, cache_phs) if dk is None else None
        if wr is None:
            _fail("users", f"the rotated keys are also used by {u.name} ({u.target}): their full values are needed "
                  "outside the attention", u)
        writes.append(wr)
    for u in real_users(v_head):
        if u in allowed_v:
            continue
        wr = _prefill_write(u, v_head, cache_phs) if dv is None else None
        if wr is None:
            _fail("users", f"the values are also used by {u.name} ({u.target}) outside the attention", u)
        writes.append(wr)
    whole = k_src is k_head  # R = hd: the rotation reads the head itself
    if (not whole and (len(real_users(k_head)) != 2 or len(real_users(k_src)) != 3)) or \
            (whole and len(real_users(k_head)) != 4):
        _fail("users", "the key head (or its rotary slice) is used outside the rotary embedding", k_head)
    kinds = sorted(w_.kv for w_ in writes)
    if writes and kinds != [0, 1]:
        _fail("cache", f"expected one key and one value cache write, found {len(writes)}", anchor)
    layer = None
    if writes:
        if writes[0].layer != writes[1].layer:
            _fail("cache", f"keys go to layer {writes[0].layer} of the cache and values to layer {writes[1].layer}", anchor)
        if {w_.kv: w_ for w_ in writes}[0].node.args[1 if writes[0].node.target is aten.copy_.default else 3] is not k_emb:
            _fail("cache", "the key slot of the cache receives something other than the rotated keys", anchor)
        layer = writes[0].layer
        if dk is not None and dk.slot is not dv.slot:
            _fail("cache", "keys and values are written at different positions", anchor)
    return Site(anchor=anchor, kind=kind, x=x, linear=lin, weight=w, bias=bias, heads=H, head_dim=hd, rotary_dim=R,
                batch=b, length=L, q_head=q_head, k_head=k_head, v_head=v_head, q_emb=q_emb, k_rot_src=k_src,
                k_rot_emb=k_rot_emb, k_emb=k_emb, cos=cos, sin=sin, keys_in=K, values_in=V, scale=a["scale"],
                mask=a["mask"], is_causal=a["causal"], writes=writes, layer=layer, softmax_dtype=a["softmax_dtype"])
