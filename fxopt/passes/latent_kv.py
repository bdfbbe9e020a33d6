"""The ``latent_kv`` pass: GPTNeoX attention over a low-rank latent K/V cache (issue 13).

    opt = fxopt.optimize(model, (ids,), passes=[*fxopt.registry.DEFAULT_PASSES,
                                                fxopt.get_pass("latent_kv", rank=256)])
    opt(ids)                                            # attention through the latent factorisation
    fxopt.runtime.generate(opt, ids, max_new_tokens=32) # allocates and uses the latent cache
    fxopt.runtime.cache_bytes(opt, b, max_len)          # counts it

**What it finds** (:mod:`.latent_kv_match`): GPTNeoX attention structurally -- the fused
``query_key_value`` projection, the interleaved head split, the rotary embedding on a slice, SDPA or
HF's eager attention, and (in the runtime's prefill / decode graphs) the K/V cache writes. Every
candidate that is not of that form is left alone with a reason (``fxopt.explain(gm, "latent_kv")``).
The pass rewrites a graph's attentions all or none: the cache layout is per model, and a model
whose layers the pass only partly understands is not one to change the cache of.

**The math** (:mod:`fxopt.latent`): per layer ``M = [W_k_pass; W_v]`` is factored (SVD, optionally
whitened by calibration statistics: the inputs', or the loss gradients' and the inputs', with the v
ups refit to the attention-averaged inputs) into ``W_D`` (r x d) and per-head ups; q and the rotary part of
k are kept exactly. The cache holds ``c = x W_D^T`` (r values) and the post-rotary ``k_rot`` (H R)
per token instead of K and V (2 H hd). Biases stay exact in the up path.

**Per phase** (:mod:`.latent_kv_rewrite`):

* plain forwards and prefill reconstruct K / V from ``c`` and run the graph's own attention op on
  them (absorbed prefill scores cost ``(r + R) / hd`` times the flops, 7-33x at the Pythia-2.8B
  shape, and lose SDPA's fused kernels);
* decode (``decode="absorb"``, the default) absorbs k's up-projection into the query and attends
  over ``(c, k_rot)`` directly -- ``fxopt::latent_decode_attention`` (the Triton kernel on CUDA)
  for boolean key masks, the same math in ATen ops otherwise -- and applies v's up-projection after
  the weighted sum. Reconstructing at decode (``decode="reconstruct"``) re-materialises
  ``H (P + hd)`` values per cached token every step, i.e. more memory traffic than the MHA cache it
  replaced; absorbing streams ``r + H R`` values per cached token. The measurement behind the choice is
  ``benchmarks/latent_kv.py``'s phase rows (GPU; not yet run on the H200 at the time of writing);
  both decode modes are kept so the choice can be flipped per measurement.

**The cache** (:mod:`fxopt.runtime.cache_spec`): in a graph carrying a :class:`CacheSpec` with the
runtime's K/V entry ``(layers, 2, b, H, t, hd)``, the pass swaps it for
:meth:`fxopt.latent.LatentFactorization.cache_layout`'s entries (``latent (n, 1, b, t, r)`` and
``k_rot (n, 1, b, t, H, R)``; one latent entry per layer when the ranks differ), so the runtime
allocates the latent cache and ``cache_bytes`` counts it.

**Options**: ``rank="lossless"`` (each layer's numerical rank: outputs equal up to fp rounding) or an
int (clamped to the lossless rank); ``budget=f`` (cache <= f x MHA, ranks spread over the layers by
their spectra); ``calibration=`` a :class:`fxopt.latent.Calibration` or one activation tensor
``(..., d)`` per layer (layer inputs of ``query_key_value``; ``fxopt.latent.collect_calibration(model,
ids)`` measures them; with ``gradients=True, value_inputs=True`` it also measures what the loss-aware
objective needs); ``decode="absorb" | "reconstruct"``; ``damping``, ``energy``, ``objective``,
``refit_values`` as :func:`fxopt.latent.factorize`.

**Report**: ``PassResult.stats`` holds ``matches``, per layer ``layer<i>.rank``,
``layer<i>.lossless_rank``, ``layer<i>.kept_energy`` (a float fraction), ``layer<i>.bytes_before`` /
``layer<i>.bytes_after`` (cache bytes per token) and the totals; the full
:class:`fxopt.latent.LatentReport` is ``graph_module.meta["fxopt_latent_kv"]``
(:func:`latent_report`). The new weights live in the optimized graph module
(``graph_module.latent_kv``); the user's model is only read.

**Weights and templates**: the factorisation of a layer is computed once per weight tensor (cached
on the pass object, so the forward, prefill and decode graphs share it). optimize's layer templates
cannot express per-layer weights that are not the model's own, so graphs this pass rewrites are
captured whole: the pass refuses the template on every graph it rewrites
(:func:`fxopt.layer_generic.refuse_template`; optimize falls back, with a note). The runtime's
prefill / decode probes (1-3 of the layers over the whole model's cache) cannot be rewritten as
the whole model is (the latent cache is laid out for every layer): the pass declines them *and*
refuses the template, so the generation graphs are captured whole and rewritten -- declining
alone let a template fitted to the unchanged probes stand in, and ``generate`` ran over the MHA
cache for models of 4+ layers.
"""
from __future__ import annotations

import logging
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.fx
from torch.fx import Node

from ..graph_utils import propagate_meta
from ..layer_generic import refuse_template
from ..latent import (DEFAULT_DAMPING, AttentionShape, Calibration, LatentFactorization, LatentKVError, LatentLayer,
                      allocate_ranks, split_qkv, truncate)
from ..latent.plan import (calibrated_svd, calibration_notes, check_calibration, default_energy, resolve_objective,
                           value_gram_for)
from ..latent.budget import latent_bytes_per_token, mha_bytes_per_token
from ..ops.latent_attention import LATENT_DECODE_ATTENTION
from ..pass_base import Pass, PassResult
from ..runtime.cache_spec import CACHE_SPEC_KEY, CacheEntry, CacheSpec, replace_cache_inputs
from .latent_kv_match import INT_MAX, NoMatch, Site, aten, candidates, is_op, match_site, real_users, shape
from .latent_kv_rewrite import RULE, Builder, SiteRewrite

log = logging.getLogger("fxopt")

REPORT_KEY = "fxopt_latent_kv"
LATENT_OP = LATENT_DECODE_ATTENTION
DECODE_MODES = ("absorb", "reconstruct")


@dataclass
class Rejection:
    anchor: str
    kind: str
    message: str
    graph_node: Optional[str] = None

    def __str__(self) -> str:
        return f"{self.anchor}: [{self.kind}] {self.message}"


@dataclass
class _Plan:
    sites: list[Site] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    note: Optional[str] = None
    cache: Optional[CacheSpec] = None
    refuse_template: Optional[str] = None  # why optimize must not build a layer template from this graph


def latent_report(graph_module):
    """The :class:`fxopt.latent.LatentReport` the pass left on a graph (or an OptimizedModule), or None."""
    gm = getattr(graph_module, "graph_module", graph_module)
    return getattr(gm, "meta", {}).get(REPORT_KEY)


def _tensor(gm: torch.fx.GraphModule, n: Optional[Node]) -> Optional[torch.Tensor]:
    if n is None:
        return None
    obj = gm
    for part in str(n.target).split("."):
        obj = getattr(obj, part)
    return obj


class LatentKVPass(Pass):
    """GPTNeoX K/V projections -> a low-rank latent cache (module docstring)."""

    name = "latent_kv"
    fixpoint = False  # one rewrite per graph; a second run finds the latent form and leaves it

    def __init__(self, rank: Union[str, int] = "lossless", budget: Optional[float] = None,
                 calibration: Union[Calibration, Sequence[torch.Tensor], None] = None, *, decode: str = "absorb",
                 damping: float = DEFAULT_DAMPING, energy: Optional[str] = None, objective: Optional[str] = None,
                 refit_values: bool = True):
        if budget is not None and rank != "lossless":
            raise LatentKVError("latent_kv: give either rank= or budget=, not both (budget chooses the ranks)")
        if not (rank == "lossless" or (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1)):
            raise LatentKVError(f"latent_kv: rank must be 'lossless' or an int >= 1, got {rank!r}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not 0 < budget <= 1):
            raise LatentKVError(f"latent_kv: budget must be a fraction of the MHA cache in (0, 1], got {budget!r}")
        if decode not in DECODE_MODES:
            raise LatentKVError(f"latent_kv: decode must be one of {DECODE_MODES}, got {decode!r}")
        if energy is not None and energy not in ("relative", "absolute"):
            raise LatentKVError(f"latent_kv: energy must be 'relative' or 'absolute', got {energy!r}")
        self.rank, self.budget, self.decode, self.damping, self.energy = rank, budget, decode, damping, energy
        self.calibration = self._calibration(calibration)
        # the objective the calibration allows (None without one); a bad or unsatisfiable choice fails here
        self.objective = resolve_objective(self.calibration, objective)
        self.refit_values = bool(refit_values)
        self._svds: dict = {}
        self.last_rejections: list[Rejection] = []
        self.last_report = None

    @staticmethod
    def _calibration(cal) -> Optional[Calibration]:
        if cal is None or isinstance(cal, Calibration):
            return cal
        if isinstance(cal, torch.Tensor) and not cal.is_floating_point():
            raise LatentKVError(
                "latent_kv: calibration= got token ids; the pass sees graphs, not the model: measure the layer inputs "
                "first with fxopt.latent.collect_calibration(model, ids) and pass that Calibration")
        if isinstance(cal, (list, tuple)) and all(isinstance(x, torch.Tensor) for x in cal):
            return Calibration.from_activations(cal)
        raise LatentKVError("latent_kv: calibration must be a fxopt.latent.Calibration or one activation tensor "
                            f"(..., d) per layer, got {type(cal).__name__}")

    # ------------------------------------------------------------------ planning
    def _plan(self, gm: torch.fx.GraphModule) -> _Plan:
        plan = _Plan()
        graph = gm.graph
        spec = gm.meta.get(CACHE_SPEC_KEY)
        plan.cache = spec if isinstance(spec, CacheSpec) else None
        cands = candidates(graph)
        latent_ops = [n for n in graph.nodes if LATENT_OP is not None and is_op(n, LATENT_OP)]
        compressed = None
        if REPORT_KEY in gm.meta or latent_ops:
            compressed = "the graph's attention already runs over a latent cache (the latent_kv pass ran on it)"
        elif plan.cache is not None and not _is_kv_spec(plan.cache):
            compressed = (f"the graph's cache is not the runtime's K/V cache ({plan.cache.describe()}): it is already "
                          "compressed or of another kind, and the pass only replaces full K/V caches")
        if compressed is not None:
            for n in cands + latent_ops:
                plan.rejections.append(Rejection(n.name, "cache", compressed, n.name))
            plan.note = compressed
            return plan
        if not cands:
            plan.note = ("no attention in the graph (no scaled_dot_product_attention, no matmul of softmax weights): "
                         "nothing to compress")
            return plan
        cache_phs = {}
        if plan.cache is not None:
            phs = [n for n in graph.nodes if n.op == "placeholder"]
            cache_phs = {phs[-1]: 0} if phs else {}
        for n in cands:
            try:
                plan.sites.append(match_site(n, cache_phs))
            except NoMatch as exc:
                plan.rejections.append(Rejection(n.name, exc.kind, exc.message, exc.node.name if exc.node else None))
        if plan.rejections:
            why = f"{len(plan.rejections)} of {len(cands)} attention candidate(s) are not GPTNeoX's"
            for s in plan.sites:
                plan.rejections.append(Rejection(s.anchor.name, "all_or_none",
                                                 f"GPTNeoX attention, left alone: {why} and the pass rewrites a "
                                                 "graph's attentions all or none (one cache layout per model)"))
            plan.sites = []
            return plan
        self._check_layers(plan)
        return plan

    def _check_layers(self, plan: _Plan) -> None:
        sites = plan.sites
        shapes = {(s.hidden, s.heads, s.head_dim, s.rotary_dim) for s in sites}
        why = None
        if len(shapes) != 1:
            why = f"the layers have different attention shapes {sorted(shapes)}"
        elif plan.cache is not None:
            n_layers, _, _, H, _, hd = plan.cache.entries[0].shape
            layers = sorted(s.layer for s in sites)
            if layers == list(range(len(layers))) and len(layers) < n_layers:
                # optimize's layer-template probes (proxies holding 1-3 of the layers) take the whole
                # model's cache; the latent cache is laid out for every layer, so a probe cannot be
                # rewritten the way the whole model is. Declining it silently would let the template,
                # fitted to unchanged probes, stand for a model this pass never rewrote (the runtime
                # then generating over the MHA cache): refuse the template instead.
                why = (f"the graph holds attention layers 0-{len(layers) - 1} of the {n_layers} its cache has (a "
                       "layer-template probe): the latent cache is laid out for the whole model, whose graph is "
                       "captured whole instead")
                plan.refuse_template = why
            elif layers != list(range(n_layers)):
                why = (f"the sites write cache layers {layers}, the cache holds {n_layers} (every layer must be "
                       "found once)")
            elif (H, hd) != (sites[0].heads, sites[0].head_dim):
                why = f"the cache's heads x head_dim {H} x {hd} are not the attention's"
            sites.sort(key=lambda s: s.layer)
        elif any(s.writes for s in sites):
            why = "the graph writes K/V into tensors it has no CacheSpec for"
        else:
            for i, s in enumerate(sites):
                s.layer = i  # a plain forward: layers in graph order
        if why is not None:
            plan.rejections = [Rejection(s.anchor.name, "structure", why) for s in sites]
            plan.sites = []

    # ------------------------------------------------------------------ factorisation
    def _svd(self, gm, site: Site, layer: int, grams_ok: bool):
        w, b = _tensor(gm, site.weight), _tensor(gm, site.bias)
        cal = self.calibration if grams_ok else None
        key = (id(w), id(b), None if cal is None else id(cal), layer)
        hit = self._svds.get(key)
        if hit is not None:
            wref, bref, wv, bv, split, svd = hit
            if wref() is w and (b is None or bref() is b) and w._version == wv and (b is None or b._version == bv):
                return split, svd
        shp = AttentionShape(site.hidden, site.heads, site.head_dim, site.rotary_dim)
        split = split_qkv(w.detach(), None if b is None else b.detach(), shp)
        svd = calibrated_svd(split, cal, layer, self.objective if cal is not None else None, self.damping, w.dtype)
        self._svds[key] = (weakref.ref(w), None if b is None else weakref.ref(b), w._version,
                           None if b is None else b._version, split, svd)
        return split, svd

    def _factorize(self, gm, sites: list[Site]) -> LatentFactorization:
        shp = AttentionShape(sites[0].hidden, sites[0].heads, sites[0].head_dim, sites[0].rotary_dim)
        n = len(sites)
        notes: list[str] = []
        cal = self.calibration
        use_cal = cal is not None and not (self.rank == "lossless" and self.budget is None)
        if cal is not None and not use_cal:
            notes.append("calibration ignored at rank='lossless' (every layer keeps its whole numerical rank)")
        if use_cal:
            d = shp.hidden
            if any(tuple(g.shape) != (d, d) for g in cal.grams):
                raise LatentKVError(f"latent_kv: the calibration's second moments are not ({d}, {d})")
            if n > len(cal.grams):
                raise LatentKVError(f"latent_kv: the graph has {n} attention layers, the calibration {len(cal.grams)}")
            if n < len(cal.grams):
                # optimize's layer-template probes hold a subset of the layers; their graphs are discarded
                notes.append(f"calibration for {len(cal.grams)} layers, the graph has {n}: not applied (a layer-"
                             "template probe; the whole model's graph is calibrated)")
                use_cal = False
            else:
                check_calibration(cal, n, shp)
        objective = self.objective if use_cal else None
        energy = default_energy(objective, self.energy)
        w0 = _tensor(gm, sites[0].weight)
        dtype = w0.dtype
        cache_dtype = dtype
        pairs = [self._svd(gm, s, s.layer, use_cal) for s in sites]
        svds = [p[1] for p in pairs]
        if self.budget is not None:
            ranks = allocate_ranks([s.s for s in svds], [s.lossless_rank for s in svds], shp, self.budget,
                                   cache_dtype, energy)
            notes.append(f"budget {self.budget:g} of the MHA cache; ranks by {energy} kept energy per byte")
        elif self.rank == "lossless":
            ranks = [max(1, s.lossless_rank) for s in svds]
        else:
            ranks = []
            for i, s in enumerate(svds):
                cap = max(1, s.lossless_rank)
                if self.rank > cap:
                    notes.append(f"layer {i}: rank {self.rank} > lossless rank {cap}: using {cap}")
                ranks.append(min(self.rank, cap))
        value_grams = [value_gram_for(cal if use_cal else None, s.layer, objective, self.refit_values) for s in sites]
        if use_cal:
            notes += calibration_notes(cal, objective, self.damping, value_grams[0] is not None)
        layers = [truncate(split, svd, r, shp, dtype, value_gram=vg, damping=self.damping)
                  for (split, svd), r, vg in zip(pairs, ranks, value_grams)]
        return LatentFactorization(shp, layers, cache_dtype, notes)

    # ------------------------------------------------------------------ the pass
    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        gm = graph_module
        plan = self._plan(gm)
        self.last_rejections = list(plan.rejections)
        for r in plan.rejections:
            log.debug("latent_kv: left alone: %s", r)
        stats = {"matches": 0, f"rule:{RULE}": 0, "declined": len(plan.rejections)}
        if plan.refuse_template is not None:
            refuse_template(gm, f"latent_kv: {plan.refuse_template}")
        if not plan.sites:
            self.last_report = None
            return PassResult(gm, False, stats)
        fact = self._factorize(gm, plan.sites)
        views = None
        old_phs: list[Node] = []
        if plan.cache is not None:
            views, old_phs = self._swap_cache(gm, plan, fact)
        dead: list[Node] = []
        for site, lat in zip(plan.sites, fact.layers):
            dead += SiteRewrite(gm, site, lat, f"L{site.layer}").rewrite(views, self.decode)
            dead.append(site.anchor)
        if old_phs:
            dead += self._retarget_tail(gm, old_phs)
        _erase_dead(gm, dead + [u for ph in old_phs for u in ph.users])
        for ph in old_phs:
            if ph.users:
                raise LatentKVError(f"latent_kv: the old cache input {ph.name} is still read by "
                                    f"{', '.join(u.name for u in ph.users)}")
            gm.graph.erase_node(ph)
        report = fact.report()
        gm.meta[REPORT_KEY] = report
        # the rewritten layers read their own latent weights, not the model's: no layer template can
        # hold them (said here rather than left to the template's own checks to find)
        refuse_template(gm, "latent_kv: the rewritten attention layers read per-layer latent weights that are not "
                            "the model's own parameters")
        self.last_report = report
        stats.update(_report_stats(report))
        stats["matches"] = stats[f"rule:{RULE}"] = len(plan.sites)
        log.info("latent_kv: %d layer(s) rewritten, cache %.4f of MHA (%d -> %d bytes per token)", len(plan.sites),
                 report.cache_fraction, report.bytes_before, report.bytes_after)
        return PassResult(gm, True, stats)

    def _swap_cache(self, gm, plan: _Plan, fact: LatentFactorization):
        old_spec = plan.cache
        entries = tuple(CacheEntry(name, shp, dt) for name, shp, dt in fact.cache_layout())
        note = (f"latent_kv: K/V replaced by a rank-{'/'.join(map(str, sorted(set(fact.ranks))))} latent + post-rotary "
                f"k_rot ({fact.cache_bytes_per_token()} of {fact.mha_cache_bytes_per_token()} bytes per token)")
        new_spec = CacheSpec(entries, old_spec.notes + (note,))
        old, new = replace_cache_inputs(gm, new_spec)
        uniform = len(entries) == 2

        def views(layer: int, b: Builder) -> tuple[Node, Node]:
            lat_ph = new[0] if uniform else new[layer]
            lat_i = 0 if not uniform else layer
            c_view = b.call(aten.select.int, b.call(aten.select.int, lat_ph, 0, lat_i), 0, 0)
            kr_view = b.call(aten.select.int, b.call(aten.select.int, new[-1], 0, layer), 0, 0)
            return c_view, kr_view

        self._new_phs = new
        return views, old

    def _retarget_tail(self, gm, old_phs: list[Node]) -> list[Node]:
        """The step wrappers return the unconsumed rest of the cache (an empty slice): point it at the new
        one. Returns the old tail nodes (now unused)."""
        out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        new0 = self._new_phs[0]
        size0 = shape(new0)[0]
        roots = set(old_phs)

        def from_old(n) -> bool:
            while isinstance(n, Node) and is_op(n, aten.slice.Tensor, aten.select.int):
                n = n.args[0]
            return n in roots

        replaced: list[Node] = []

        def swap(a):
            if isinstance(a, Node) and from_old(a):
                replaced.append(a)
                b = Builder(gm, out)
                return b.call(aten.slice.Tensor, new0, 0, size0, INT_MAX)
            if isinstance(a, (list, tuple)):
                return type(a)(swap(x) for x in a)
            return a

        out.args = swap(out.args)
        return replaced

    # ------------------------------------------------------------------ explain
    def explain(self, graph_module: torch.fx.GraphModule, top: int = 5):
        """An :class:`fxopt.rewrite.explain.ExplainReport` of a run on a copy (the same matches and stats
        as running the pass): the attentions it rewrites and, for every candidate left alone, the kind
        of divergence and the reason. A hand-written pass has no rule table, so the report's ``rules``
        is empty and its ``note`` says it all; the candidates left alone are also in
        :attr:`last_rejections` (:class:`Rejection`: anchor, kind, message, graph node)."""
        from ..rewrite.explain import ExplainReport, copy_graph_module

        gm = getattr(graph_module, "graph_module", graph_module)
        work = copy_graph_module(gm)
        plan_note = self._plan(work).note  # what the run below will find (no mutation)
        result = self.call(work)
        rejected = self.last_rejections
        matched = [f"layer {r.layer}: rank {r.rank}/{r.lossless_rank}, kept energy {r.kept_energy:.6f}, "
                   f"{r.bytes_before} -> {r.bytes_after} cache bytes per token" for r in (self.last_report.rows
                                                                                      if self.last_report else [])]
        lines = [f"rule {RULE} (structural; contract: fp64_relative at rank='lossless', the truncation's "
                 f"error bound otherwise): {len(matched)} attention(s) rewritten, {len(rejected)} left alone"]
        lines += [f"  MATCH {m}" for m in matched]
        kinds = Counter(r.kind for r in rejected)
        for i, r in enumerate(rejected[:top], 1):
            where = f" (at {r.graph_node})" if r.graph_node and r.graph_node != r.anchor else ""
            lines.append(f"  {i}. {r.anchor}{where}: [{r.kind}] {r.message}")
        if len(rejected) > top:
            lines.append(f"  ... {len(rejected) - top} more; kinds: {', '.join(f'{k} x{v}' for k, v in kinds.items())}")
        if plan_note and not matched and not rejected:
            lines.append(f"  {plan_note}")
        return ExplainReport([], self.name, dict(result.stats), note="\n".join(lines))


def _module_of(n: Node) -> Optional[str]:
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    return list(stack.values())[-1][0]


def _is_kv_spec(spec: CacheSpec) -> bool:
    """The runtime's GPTNeoX K/V cache: one entry (layers, 2, b, H, t, hd)."""
    if len(spec.entries) != 1:
        return False
    e = spec.entries[0].shape
    return len(e) == 6 and e[1] == 2 and e[2] == "b" and e[4] == "t" and all(isinstance(e[i], int) for i in (0, 3, 5))


def _report_stats(report) -> dict:
    out: dict = {"bytes_per_token_before": report.bytes_before, "bytes_per_token_after": report.bytes_after}
    for r in report.rows:
        out[f"layer{r.layer}.rank"] = r.rank
        out[f"layer{r.layer}.lossless_rank"] = r.lossless_rank
        out[f"layer{r.layer}.kept_energy"] = r.kept_energy
        out[f"layer{r.layer}.bytes_before"] = r.bytes_before
        out[f"layer{r.layer}.bytes_after"] = r.bytes_after
    return out


def _erase_dead(gm: torch.fx.GraphModule, seeds: list[Node]) -> None:
    """Erase what the rewrite left unused: the seeds (old attention ops and K/V writes, which are
    not pure) and, through their inputs, every pure node that lost its last user."""
    graph = gm.graph
    explicit = {n for n in seeds}
    work = list(seeds)
    seen_erased: set = set()
    while work:
        n = work.pop()
        if n in seen_erased or getattr(n, "_erased", False) or n.op in ("placeholder", "output"):
            continue
        if real_users(n):
            continue
        # dropout counts as impure (random) for fx; the matcher admitted only inactive ones (p = 0 / eval)
        if n not in explicit and n.op == "call_function" and n.is_impure() and not is_op(n, aten.dropout.default):
            continue
        if n.op not in ("call_function", "get_attr"):
            continue
        for u in list(n.users):  # export's metadata asserts on it
            graph.erase_node(u)
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        seen_erased.add(n)
        work.extend(inputs)
