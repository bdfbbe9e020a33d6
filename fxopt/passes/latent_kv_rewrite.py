"""Graph surgery of the ``latent_kv`` pass: one matched :class:`~.latent_kv_match.Site` onto its
:class:`~fxopt.latent.LatentLayer` (the math is :mod:`fxopt.latent.attention`'s).

Per site, always:

* the fused projection ``linear(x, W_qkv, b)`` (3d outputs) becomes ``linear(x, [W_q; W_krot; W_D],
  [b_q; b_krot; 0])`` (d + H R + r outputs): q and the rotary part of k exactly as before (their
  rotary nodes are kept and re-fed), and the latent ``c = x W_D^T``;

then, by phase:

* **reconstruct** (plain forwards, prefill; decode with ``decode="reconstruct"``): ``[k_pass | v] =
  c W_U^T + [b_kpass; b_v]`` per head, ``K = cat([k_rot_emb, k_pass], -1)``, and the original
  attention op runs on the reconstructed K / V (SDPA's fused kernels stay usable);
* **absorb** (decode, default): ``q_lat = q_pass k_up`` and the attention over the latent cache --
  ``fxopt::latent_decode_attention`` when the mask is a boolean key mask (the runtime's SDPA graphs),
  else the same math in ATen ops with the graph's own additive mask (HF's eager graphs) -- then
  ``o = c_hat v_up^T + v_bias``, which replaces the attention output (b, H, 1, hd); the k bias is
  dropped there (a per-query constant added to every score: softmax ignores it).

Cache graphs write ``c`` and ``transpose(k_rot_emb, 1, 2)`` into the latent cache views where the
originals wrote K and V; the caller swaps the cache placeholders
(:func:`fxopt.runtime.cache_spec.replace_cache_inputs`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.fx
from torch.fx import Node

from ..graph_utils import fake_mode_of, mark_provenance, propagate_meta
from ..latent import LatentLayer
from ..ops.latent_attention import LATENT_DECODE_ATTENTION
from .latent_kv_match import INT_MAX, Site, aten, is_op, real_users, shape

RULE = "latent_kv.attention"
WEIGHTS_MODULE = "latent_kv"


class Builder:
    """Inserts nodes before a point and gives each its fake value at once (later nodes need shapes)."""

    def __init__(self, gm: torch.fx.GraphModule, before: Node):
        self.gm = gm
        self.graph = gm.graph
        self.before = before
        self.mode = fake_mode_of(gm)
        self.nodes: list[Node] = []

    def call(self, target, *args, **kwargs) -> Node:
        with self.graph.inserting_before(self.before):
            n = self.graph.call_function(target, args, kwargs)
        propagate_meta(self.gm, [n], self.mode)
        self.nodes.append(n)
        return n

    def attr(self, name: str, tensor: torch.Tensor) -> Node:
        """A new tensor of the optimized module (never the user's model), as a get_attr."""
        holder = getattr(self.gm, WEIGHTS_MODULE, None)
        if holder is None:
            holder = torch.nn.Module()
            self.gm.add_submodule(WEIGHTS_MODULE, holder)
        base, i = name, 1
        while hasattr(holder, name):
            i += 1
            name = f"{base}_{i}"
        holder.register_buffer(name, tensor, persistent=True)
        with self.graph.inserting_before(self.before):
            n = self.graph.get_attr(f"{WEIGHTS_MODULE}.{name}")
        propagate_meta(self.gm, [n], self.mode)
        self.nodes.append(n)
        return n


def _heads_view(b: Builder, t: Node, batch: int, length: int, H: int, e: int) -> Node:
    """(b, L, H e) -> (b, H, L, e), as GPTNeoX's head split (a view)."""
    return b.call(aten.transpose.int, b.call(aten.view.default, t, [batch, length, H, e]), 1, 2)


class SiteRewrite:
    """Rewrites one site; ``cache_views(layer) -> (c_view (b, t, r), k_rot_view (b, t, H, R))`` builds
    the layer's latent cache views (cache graphs only)."""

    def __init__(self, gm: torch.fx.GraphModule, site: Site, lat: LatentLayer, tag: str):
        self.gm, self.s, self.lat, self.tag = gm, site, lat, tag

    # -------------------------------------------------------------------- projection
    def _projection(self, b: Builder) -> tuple[Node, Node]:
        s, lat = self.s, self.lat
        d, H, hd, R, r = s.hidden, s.heads, s.head_dim, s.rotary_dim, lat.rank
        w = torch.cat([lat.q_weight.reshape(-1, d), lat.k_rot_weight.reshape(-1, d), lat.down], 0).contiguous()
        bias = None
        if s.bias is not None:
            bias = torch.cat([lat.q_bias.reshape(-1), lat.k_rot_bias.reshape(-1),
                              torch.zeros(r, dtype=lat.q_bias.dtype, device=lat.q_bias.device)])
        args = [s.x, b.attr(f"{self.tag}_qkc_weight", w)]
        if bias is not None:
            args.append(b.attr(f"{self.tag}_qkc_bias", bias))
        lin = b.call(aten.linear.default, *args)
        L = s.length
        q = _heads_view(b, b.call(aten.slice.Tensor, lin, 2, 0, H * hd), s.batch, L, H, hd)
        k_rot = _heads_view(b, b.call(aten.slice.Tensor, lin, 2, H * hd, H * hd + H * R), s.batch, L, H, R)
        c = b.call(aten.slice.Tensor, lin, 2, H * hd + H * R, INT_MAX)
        # q and k[..., :R] now come from the new projection; their rotary nodes stay as they are
        s.q_head.replace_all_uses_with(q)
        s.k_rot_src.replace_all_uses_with(k_rot)
        return c, k_rot

    def _up(self, b: Builder, c: Node, k_rot_emb: Node, batch: int, length: int) -> tuple[Node, Node]:
        """Reconstructed ``(K, V)`` (b, H, length, hd) from ``c`` (b, length, r) and ``k_rot_emb`` (b, H, length, R)."""
        s, lat = self.s, self.lat
        H, P, hd = s.heads, s.head_dim - s.rotary_dim, s.head_dim
        args = [c, b.attr(f"{self.tag}_up_weight", lat.stacked_up().contiguous())]
        if lat.k_bias is not None:
            args.append(b.attr(f"{self.tag}_up_bias", torch.cat([lat.k_bias.reshape(-1), lat.v_bias.reshape(-1)])))
        up = b.call(aten.linear.default, *args)
        k_pass = _heads_view(b, b.call(aten.slice.Tensor, up, 2, 0, H * P), batch, length, H, P)
        v = _heads_view(b, b.call(aten.slice.Tensor, up, 2, H * P, INT_MAX), batch, length, H, hd)
        return b.call(aten.cat.default, [k_rot_emb, k_pass], -1), v

    # -------------------------------------------------------------------- phases
    def rewrite(self, views: Optional[Callable[[int, Builder], tuple[Node, Node]]], decode_mode: str) -> list[Node]:
        """Rewire the site; returns the nodes it made dead candidates (for the caller's clean-up)."""
        s = self.s
        old = [s.linear, s.q_head, s.k_head, s.v_head, s.k_emb, s.k_rot_src] + [w.node for w in s.writes]
        b = Builder(self.gm, s.linear)
        c, _ = self._projection(b)
        k_rot_emb = s.k_rot_emb  # the original rotation, now fed by the new projection
        if views is None:
            self._reconstruct_fresh(b, c, k_rot_emb)
        elif not s.decode:
            self._prefill(b, c, k_rot_emb, views)
        else:
            self._decode(c, k_rot_emb, views, decode_mode, b)
        mark_provenance(b.nodes, rule=RULE, pass_name="latent_kv", replaced=[s.linear, s.anchor])
        return old

    def _reconstruct_fresh(self, b: Builder, c: Node, k_rot_emb: Node) -> None:
        s = self.s
        b.before = s.anchor if s.kind == "sdpa" else _first_user(s.k_emb)
        K, V = self._up(b, c, k_rot_emb, s.batch, s.length)
        s.k_emb.replace_all_uses_with(K)
        s.v_head.replace_all_uses_with(V)

    def _prefill(self, b: Builder, c: Node, k_rot_emb: Node, views) -> None:
        s = self.s
        first_write = min((w.node for w in s.writes), key=_position(self.gm))
        b.before = first_write
        c_view, kr_view = views(s.layer, b)
        L = s.length
        b.call(aten.copy_.default, b.call(aten.slice.Tensor, c_view, 1, 0, L), c)
        b.call(aten.copy_.default, b.call(aten.slice.Tensor, kr_view, 1, 0, L),
               b.call(aten.transpose.int, k_rot_emb, 1, 2))
        # the old writes (no users) go with the caller's clean-up, with the views they wrote into
        self._reconstruct_fresh(b, c, k_rot_emb)

    def _decode(self, c: Node, k_rot_emb: Node, views, mode: str, b: Builder) -> None:
        s = self.s
        b.before = min((w.node for w in s.writes), key=_position(self.gm))
        slot = s.writes[0].slot
        c_view, kr_view = views(s.layer, b)
        c_cache = b.call(aten.index_copy_.default, c_view, 1, slot, c)
        kr_cache = b.call(aten.index_copy_.default, kr_view, 1, slot, b.call(aten.transpose.int, k_rot_emb, 1, 2))
        b.before = s.anchor
        if mode == "reconstruct":
            t = shape(c_cache)[1]
            K, V = self._up(b, c_cache, b.call(aten.permute.default, kr_cache, [0, 2, 1, 3]), s.batch, t)
            s.keys_in.replace_all_uses_with(K)
            s.values_in.replace_all_uses_with(V)
            return
        out = self._absorbed(b, c_cache, kr_cache)
        s.anchor.replace_all_uses_with(out)

    def _absorbed(self, b: Builder, c_cache: Node, kr_cache: Node) -> Node:
        """The attention output (b, H, 1, hd) over the latent cache, absorbed."""
        s, lat = self.s, self.lat
        H, R, hd, r = s.heads, s.rotary_dim, s.head_dim, lat.rank
        q = s.q_emb
        q_rot = b.call(aten.slice.Tensor, q, 3, 0, R)
        q_pass = b.call(aten.slice.Tensor, q, 3, R, INT_MAX)
        q_lat = b.call(aten.matmul.default, q_pass, b.attr(f"{self.tag}_k_up", lat.k_up.contiguous()))  # (b, H, 1, r)
        key_mask, lengths = _key_mask(b, s, shape(c_cache)[1])
        if key_mask is not None or s.mask is None:
            if lengths is None:
                lengths = b.call(aten.full.default, [s.batch], shape(c_cache)[1], dtype=torch.int32,
                                 device=c_cache.meta["val"].device)
            c_hat = b.call(LATENT_DECODE_ATTENTION,
                           b.call(aten.select.int, q_lat, 2, 0), b.call(aten.select.int, q_rot, 2, 0),
                           c_cache, kr_cache, lengths, None, float(s.scale), key_mask)
            c_hat = b.call(aten.unsqueeze.default, c_hat, 2)  # (b, H, 1, r)
        else:
            c_hat = self._absorbed_aten(b, q_lat, q_rot, c_cache, kr_cache)
        o = b.call(aten.matmul.default, c_hat, b.attr(f"{self.tag}_v_up_t", lat.v_up.transpose(1, 2).contiguous()))
        if lat.v_bias is not None:
            o = b.call(aten.add.Tensor, o, b.attr(f"{self.tag}_v_bias", lat.v_bias.reshape(1, H, 1, hd).contiguous()))
        return o

    def _absorbed_aten(self, b: Builder, q_lat: Node, q_rot: Node, c_cache: Node, kr_cache: Node) -> Node:
        """Absorbed scores with the graph's own (additive or boolean) mask, softmax as the graph's."""
        s = self.s
        c4 = b.call(aten.unsqueeze.default, c_cache, 1)                                  # (b, 1, t, r)
        kr = b.call(aten.permute.default, kr_cache, [0, 2, 3, 1])                         # (b, H, R, t)
        scores = b.call(aten.add.Tensor, b.call(aten.matmul.default, q_rot, kr),
                        b.call(aten.matmul.default, q_lat, b.call(aten.transpose.int, c4, 2, 3)))
        scores = b.call(aten.mul.Tensor, scores, float(s.scale))
        m = s.mask
        if m.meta["val"].dtype == torch.bool:
            scores = b.call(aten.masked_fill.Scalar, scores, b.call(aten.logical_not.default, m), float("-inf"))
        else:
            scores = b.call(aten.add.Tensor, scores, m)
        dt = q_lat.meta["val"].dtype
        w = b.call(aten.softmax.int, scores, -1, s.softmax_dtype or torch.promote_types(dt, torch.float32))
        if w.meta["val"].dtype != dt:
            w = b.call(aten.to.dtype, w, dt)
        return b.call(aten.matmul.default, w, c4)


def _first_user(n: Node) -> Node:
    users = real_users(n)
    nodes = list(n.graph.nodes)
    pos = {x: i for i, x in enumerate(nodes)}
    return min(users, key=lambda u: pos[u])


def _position(gm: torch.fx.GraphModule):
    pos = {x: i for i, x in enumerate(gm.graph.nodes)}
    return lambda n: pos[n]


def _key_mask(b: Builder, s: Site, t: int) -> tuple[Optional[Node], Optional[Node]]:
    """``(key_mask (b, t) bool, lengths (b,) int32 or None)`` for the decode op, when the site's mask is
    a boolean mask over keys only (b|1, 1, 1, t); ``(None, None)`` otherwise. ``lengths = slot + 1``
    when the mask is the runtime's ``key_mask & (arange(t) <= slot)``: the kernel then stops there
    instead of streaming the whole cache bucket."""
    m = s.mask
    if m is None:
        return None, None
    v = m.meta.get("val")
    if not isinstance(v, torch.Tensor) or v.dtype != torch.bool or v.dim() != 4 or v.shape[1] != 1 or v.shape[2] != 1:
        return None, None
    km = b.call(aten.reshape.default, b.call(aten.expand.default, m, [s.batch, 1, 1, t]), [s.batch, t])
    slot = s.writes[0].slot if s.writes else None
    lengths = None
    if slot is not None and _bounded_by_slot(m, slot, t):
        lengths = b.call(aten.to.dtype, b.call(aten.expand.default, b.call(aten.add.Tensor, slot, 1), [s.batch]),
                         torch.int32)
    return km, lengths


def _bounded_by_slot(m: Node, slot: Node, t: int) -> bool:
    """``m`` is ``(X & (arange(t) <= slot))`` seen through unsqueeze / expand / view."""
    while is_op(m, aten.unsqueeze.default, aten.expand.default, aten.view.default, aten.reshape.default):
        m = m.args[0]
    if not is_op(m, aten.__and__.Tensor, aten.logical_and.default, aten.bitwise_and.Tensor):
        return False
    for side in m.args[:2]:
        if (is_op(side, aten.le.Tensor) and side.args[1] is slot and is_op(side.args[0], aten.arange.default)
                and list(side.args[0].args) == [t]):
            return True
    return False
