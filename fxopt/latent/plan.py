"""``factorize``: every layer of an HF GPTNeoX model to latent form, with a per-layer report.

``factorize(model, rank="lossless" | int, budget=None, calibration=None)``:

* ``rank="lossless"`` (default): each layer keeps its numerical rank (plain SVD; see
  :mod:`fxopt.latent.factor`); outputs equal the model's up to fp rounding;
* ``rank=int``: that rank in every layer (clamped to the layer's lossless rank, with a note);
* ``budget=f``: a cache of at most ``f`` x the MHA cache, ranks spread over the layers by their
  spectra (:func:`fxopt.latent.budget.allocate_ranks`);
* ``calibration``: a :class:`~fxopt.latent.calibration.Calibration`, per-layer activations, or
  token ids (b, L) to collect one from, and ``objective``:

  - ``"inputs"``: the truncations minimise the k_pass / v output error on those inputs (whitened SVD);
  - ``"loss"`` (the default when the statistics allow it: token ids, or a Calibration collected
    with ``gradients=True``): they minimise the K-FAC estimate of the model's loss increase
    (two-sided whitened SVD), a budget is spread over the layers by that estimate
    (``energy="absolute"``: loss units in every layer), and when the calibration holds the
    attention-averaged input statistics (``value_inputs=True``; collected for token ids) the v
    up-projections are refit to them (``refit_values``). See :mod:`fxopt.latent.factor`.

The model is only read: the new weights are fresh tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .budget import allocate_ranks, latent_bytes_per_token, mha_bytes_per_token
from .calibration import Calibration, collect_calibration
from .factor import DEFAULT_DAMPING, LatentLayer, LayerSVD, layer_svd, truncate, whitening
from .layout import AttentionShape, LatentKVError, SplitQKV, attention_shape_of, split_qkv

OBJECTIVES = ("inputs", "loss")


@dataclass
class LayerReport:
    layer: int
    rank: int
    lossless_rank: int
    kept_energy: float
    metric: str
    bytes_before: int   # per token
    bytes_after: int    # per token


@dataclass
class LatentReport:
    rows: list[LayerReport]
    cache_dtype: torch.dtype
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows)

    @property
    def cache_fraction(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def __str__(self) -> str:
        dt = str(self.cache_dtype).replace("torch.", "")
        lines = [f"latent KV ({dt} cache; bytes per token)",
                 f"{'layer':>5} {'rank':>6} {'lossless':>8} {'kept energy':>12} {'metric':>9} {'MHA B':>8} {'latent B':>9}"]
        for r in self.rows:
            lines.append(f"{r.layer:>5} {r.rank:>6} {r.lossless_rank:>8} {r.kept_energy:>12.6f} {r.metric:>9} "
                         f"{r.bytes_before:>8} {r.bytes_after:>9}")
        lines.append(f"{'all':>5} {sum(r.rank for r in self.rows):>6} {'':>8} {'':>12} {'':>9} "
                     f"{self.bytes_before:>8} {self.bytes_after:>9}  ({self.cache_fraction:.4f} of MHA)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"cache_dtype": str(self.cache_dtype), "cache_fraction": self.cache_fraction,
                "bytes_per_token_before": self.bytes_before, "bytes_per_token_after": self.bytes_after,
                "layers": [r.__dict__.copy() for r in self.rows], "notes": list(self.notes)}


@dataclass
class LatentFactorization:
    """Per-layer :class:`LatentLayer` weights and what they cost."""

    shape: AttentionShape
    layers: list[LatentLayer]
    cache_dtype: torch.dtype
    notes: list[str] = field(default_factory=list)

    @property
    def ranks(self) -> list[int]:
        return [layer.rank for layer in self.layers]

    def cache_bytes_per_token(self) -> int:
        return sum(latent_bytes_per_token(self.shape, r, self.cache_dtype) for r in self.ranks)

    def mha_cache_bytes_per_token(self) -> int:
        return len(self.layers) * mha_bytes_per_token(self.shape, self.cache_dtype)

    def cache_layout(self) -> list[tuple[str, tuple, torch.dtype]]:
        """The cache a generation graph over this factorisation holds, in the terms of the runtime's
        ``CacheSpec`` (issue 12): ``(name, shape, dtype)`` with the symbols ``"b"`` (batch) and ``"t"``
        (cache length), for ``fxopt.runtime.cache_spec.CacheEntry(name, shape, dtype)``.

        Uniform ranks: ``latent (n, 1, b, t, r)`` and ``k_rot (n, 1, b, t, H, R)``, stacked so that every
        layer's graph is the same (optimize's layer templates), layer ``i`` reading the contiguous views
        ``latent[i, 0]`` (b, t, r) and ``k_rot[i, 0]`` (b, t, H, R) the decode kernel takes as they are.
        Axis 1 has the fixed size 1 for the reason the runtime's K/V cache has a fixed 2 there
        (length templates cut inputs along axis 1). Ranks that differ per layer (``budget=``): one
        ``latent_<i> (1, 1, b, t, r_i)`` per layer, then the stacked ``k_rot``."""
        n = len(self.layers)
        H, R = self.shape.heads, self.shape.rotary_dim
        ranks = self.ranks
        k_rot = ("k_rot", (n, 1, "b", "t", H, R), self.cache_dtype)
        if len(set(ranks)) == 1:
            return [("latent", (n, 1, "b", "t", ranks[0]), self.cache_dtype), k_rot]
        return [(f"latent_{i}", (1, 1, "b", "t", r), self.cache_dtype) for i, r in enumerate(ranks)] + [k_rot]

    def cache_bytes(self, batch_size: int, max_length: int) -> int:
        """Bytes of every tensor of :meth:`cache_layout` for this batch and length."""
        es = torch.empty((), dtype=self.cache_dtype).element_size()
        env = {"b": int(batch_size), "t": int(max_length)}
        total = 0
        for _, shape, _ in self.cache_layout():
            n = 1
            for dim in shape:
                n *= env[dim] if isinstance(dim, str) else dim
            total += n * es
        return total

    def report(self) -> LatentReport:
        rows = [LayerReport(i, l.rank, l.lossless_rank, l.kept_energy, l.metric,
                            mha_bytes_per_token(self.shape, self.cache_dtype),
                            latent_bytes_per_token(self.shape, l.rank, self.cache_dtype))
                for i, l in enumerate(self.layers)]
        notes = list(self.notes) + [f"layer {i}: {n}" for i, l in enumerate(self.layers) for n in l.notes]
        return LatentReport(rows, self.cache_dtype, notes)

    def to(self, dtype: torch.dtype) -> "LatentFactorization":
        return LatentFactorization(self.shape, [l.to(dtype) for l in self.layers], self.cache_dtype, list(self.notes))


CalibrationLike = Union[Calibration, Tensor, Sequence[Tensor], None]


def resolve_objective(cal: Optional[Calibration], objective: Optional[str]) -> Optional[str]:
    """``"inputs"`` or ``"loss"`` for a calibration (None without one); ``objective=None`` picks
    ``"loss"`` when the calibration has gradient statistics."""
    if objective is not None and objective not in OBJECTIVES:
        raise LatentKVError(f"objective must be one of {OBJECTIVES} (or None: the best the calibration allows), "
                            f"got {objective!r}")
    if cal is None:
        return None
    if objective is None:
        return "loss" if cal.grad_grams is not None else "inputs"
    if objective == "loss" and cal.grad_grams is None:
        raise LatentKVError("objective='loss' needs the loss gradients' statistics: pass token ids as calibration, "
                            "or collect_calibration(model, ids, gradients=True, value_inputs=True)")
    return objective


def default_energy(objective: Optional[str], energy: Optional[str]) -> str:
    """``energy=None``: ``"absolute"`` under the loss objective (discarded energies are loss
    estimates, comparable across layers), ``"relative"`` otherwise."""
    if energy is None:
        return "absolute" if objective == "loss" else "relative"
    if energy not in ("relative", "absolute"):
        raise LatentKVError(f"energy must be 'relative' or 'absolute', got {energy!r}")
    return energy


def check_calibration(cal: Calibration, n_layers: int, shape: AttentionShape) -> None:
    """Every statistic of ``cal`` fits a model of ``n_layers`` layers of ``shape``."""
    d, m = shape.hidden, shape.stacked_rows
    if len(cal.grams) != n_layers or any(tuple(g.shape) != (d, d) for g in cal.grams):
        raise LatentKVError(f"calibration has {len(cal.grams)} second moments of shape "
                            f"{tuple(cal.grams[0].shape) if cal.grams else ()}; the model needs {n_layers} of ({d}, {d})")
    if cal.grad_grams is not None and (len(cal.grad_grams) != n_layers
                                       or any(tuple(g.shape) != (m, m) for g in cal.grad_grams)):
        raise LatentKVError(f"calibration gradient statistics do not fit: the model needs {n_layers} of ({m}, {m})")
    if cal.value_grams is not None and (len(cal.value_grams) != n_layers
                                        or any(tuple(g.shape) != (shape.heads, d, d) for g in cal.value_grams)):
        raise LatentKVError(f"calibration value statistics do not fit: the model needs {n_layers} of "
                            f"({shape.heads}, {d}, {d})")


def calibrated_svd(split: SplitQKV, cal: Optional[Calibration], layer: int, objective: Optional[str], damping: float,
                   storage_dtype: torch.dtype) -> LayerSVD:
    """Layer ``layer``'s SVD in the metric ``objective`` picks (plain without calibration)."""
    if cal is None:
        return layer_svd(split, storage_dtype=storage_dtype)
    rows = whitening(cal.grad_grams[layer], damping) if objective == "loss" else None
    return layer_svd(split, whiten=whitening(cal.grams[layer], damping), weight_rows=rows, storage_dtype=storage_dtype)


def value_gram_for(cal: Optional[Calibration], layer: int, objective: Optional[str], refit_values: bool):
    """The statistics the v refit uses for ``layer``, or None when there is no refit."""
    if cal is None or objective != "loss" or not refit_values or cal.value_grams is None:
        return None
    return cal.value_grams[layer]


def calibration_notes(cal: Calibration, objective: str, damping: float, refit: bool) -> list[str]:
    what = ("k_pass / v output error on the calibration inputs" if objective == "inputs" else
            "K-FAC loss estimate (loss gradients x inputs)")
    notes = [f"calibrated on {cal.tokens} tokens (damping {damping:g}): truncations minimise the {what}"]
    if refit:
        notes.append("v up-projections refit to the heads' attention-averaged inputs")
    return notes


def _calibration_for(model, calibration: CalibrationLike, n_layers: int, shape: AttentionShape,
                     objective: Optional[str]) -> Optional[Calibration]:
    if calibration is None:
        return None
    if isinstance(calibration, Calibration):
        cal = calibration
    elif isinstance(calibration, Tensor) and not calibration.is_floating_point():
        full = objective != "inputs"
        cal = collect_calibration(model, calibration, gradients=full, value_inputs=full)
    elif isinstance(calibration, (list, tuple)) and all(isinstance(x, Tensor) for x in calibration):
        cal = Calibration.from_activations(calibration)
    else:
        raise LatentKVError(
            "calibration must be a fxopt.latent.Calibration, token ids (batch, length), or one activation "
            f"tensor (..., d) per layer; got {type(calibration).__name__}")
    check_calibration(cal, n_layers, shape)
    return cal


def factorize(model, rank: Union[str, int] = "lossless", budget: Optional[float] = None,
              calibration: CalibrationLike = None, *, objective: Optional[str] = None, refit_values: bool = True,
              damping: float = DEFAULT_DAMPING, energy: Optional[str] = None, dtype: Optional[torch.dtype] = None,
              cache_dtype: Optional[torch.dtype] = None) -> LatentFactorization:
    """Latent factorisation of every attention layer of an HF GPTNeoX model (module docstring).

    ``objective``: ``"inputs"`` | ``"loss"`` | None (``"loss"`` when the calibration allows it);
    ``refit_values``: under ``"loss"``, refit the v up-projections when the statistics are there;
    ``energy``: how a budget weighs the layers (None: ``"absolute"`` under ``"loss"``, else
    ``"relative"``); ``dtype``: of the new weights (default: the model's); ``cache_dtype``: of the
    cache the bytes are counted in (default: ``dtype``)."""
    shape = attention_shape_of(model)
    layers = model.gpt_neox.layers
    if budget is not None and rank != "lossless":
        raise LatentKVError("give either rank= or budget=, not both (budget chooses the ranks)")
    if not (rank == "lossless" or (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1)):
        raise LatentKVError(f"rank must be 'lossless' or an int >= 1, got {rank!r}")
    resolve_objective(None, objective)  # validates before any work
    if energy is not None:
        default_energy(None, energy)
    qkv0 = layers[0].attention.query_key_value
    dtype = dtype or qkv0.weight.dtype
    cache_dtype = cache_dtype or dtype
    notes: list[str] = []
    if calibration is not None and rank == "lossless" and budget is None:
        notes.append("calibration ignored at rank='lossless' (every layer keeps its whole numerical rank)")
        _calibration_for(model, calibration, len(layers), shape, "inputs")  # bad input is still refused
        cal = None
    else:
        cal = _calibration_for(model, calibration, len(layers), shape, objective)
    objective = resolve_objective(cal, objective)
    energy = default_energy(objective, energy)
    splits, svds = [], []
    for i, layer in enumerate(layers):
        qkv = layer.attention.query_key_value
        split = split_qkv(qkv.weight.detach(), None if qkv.bias is None else qkv.bias.detach(), shape)
        svds.append(calibrated_svd(split, cal, i, objective, damping, qkv.weight.dtype))
        splits.append(split)
    if budget is not None:
        ranks = allocate_ranks([s.s for s in svds], [s.lossless_rank for s in svds], shape, budget, cache_dtype, energy)
        notes.append(f"budget {budget:g} of the MHA cache; ranks by {energy} kept energy per byte")
    elif rank == "lossless":
        ranks = [max(1, s.lossless_rank) for s in svds]
    else:
        ranks = []
        for i, s in enumerate(svds):
            cap = max(1, s.lossless_rank)
            if rank > cap:
                notes.append(f"layer {i}: rank {rank} > lossless rank {cap}: using {cap}")
            ranks.append(min(rank, cap))
    value_grams = [value_gram_for(cal, i, objective, refit_values) for i in range(len(layers))]
    if cal is not None:
        notes += calibration_notes(cal, objective, damping, value_grams[0] is not None)
    out = [truncate(sp, sv, r, shape, dtype, value_gram=vg, damping=damping)
           for sp, sv, r, vg in zip(splits, svds, ranks, value_grams)]
    return LatentFactorization(shape, out, cache_dtype, notes)
