"""Cache bytes and how a cache budget is spread over the layers.

Bytes per token per layer (``es`` = element size of the cache dtype):

* MHA: ``2 * H * hd * es`` (K and V);
* latent: ``(r + H * R) * es`` (the latent ``c`` plus every head's post-rotary ``k_rot``).

``budget=f`` allows ``floor(f * MHA bytes)`` over all layers. The ``k_rot`` part is fixed, so the
latent ranks share ``floor((f * MHA - L * H * R * es) / es)`` values, every layer at least 1 and at
most its lossless rank. The ranks maximise the total kept energy, each layer's energy measured
relative to the layer's own total (``energy="relative"``, scale-free: layers whose weights are
larger do not win by size) or in absolute units (``"absolute"``: the squared output error of
k_pass / v itself, comparable across layers only when their inputs are alike).

Every rank costs the same bytes and a layer's marginal gains ``s_i^2`` are non-increasing in
``i``, so the greedy rule "take the largest remaining marginal gain" is optimal (a separable
concave knapsack with unit weights): the chosen set is the top-K gains, and ties broken by
(layer, index) make it a prefix of every layer's spectrum. ``tests/test_latent_factor.py``
compares it with an exhaustive search.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .layout import AttentionShape, LatentKVError


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def mha_bytes_per_token(shape: AttentionShape, dtype: torch.dtype) -> int:
    """K and V of one layer for one token."""
    return 2 * shape.heads * shape.head_dim * element_size(dtype)


def latent_bytes_per_token(shape: AttentionShape, rank: int, dtype: torch.dtype) -> int:
    """The latent and the post-rotary k_rot of one layer for one token."""
    return (rank + shape.heads * shape.rotary_dim) * element_size(dtype)


def min_budget_fraction(shape: AttentionShape, n_layers: int, dtype: torch.dtype) -> float:
    """The smallest ``budget`` that fits rank 1 everywhere (k_rot is never compressed)."""
    return latent_bytes_per_token(shape, 1, dtype) / mha_bytes_per_token(shape, dtype)


def allocate_ranks(spectra: Sequence[Tensor], max_ranks: Sequence[int], shape: AttentionShape, budget: float,
                   dtype: torch.dtype, energy: str = "relative") -> list[int]:
    """Per-layer ranks for a cache of at most ``budget`` x the MHA cache (see the module docstring).

    ``spectra[l]`` are layer ``l``'s singular values (descending), ``max_ranks[l]`` its lossless rank."""
    n = len(spectra)
    if n == 0:
        return []
    if len(max_ranks) != n:
        raise LatentKVError(f"{n} spectra but {len(max_ranks)} max ranks")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (0 < budget <= 1) or math.isnan(budget):
        raise LatentKVError(f"budget must be a fraction of the MHA cache in (0, 1], got {budget!r}")
    if energy not in ("relative", "absolute"):
        raise LatentKVError(f"energy must be 'relative' or 'absolute', got {energy!r}")
    es = element_size(dtype)
    allowed_bytes = math.floor(budget * n * mha_bytes_per_token(shape, dtype))
    fixed_bytes = n * shape.heads * shape.rotary_dim * es
    values = (allowed_bytes - fixed_bytes) // es
    if values < n:
        need = min_budget_fraction(shape, n, dtype)
        raise LatentKVError(
            f"budget={budget:g} of the MHA cache is too small: the post-rotary k_rot alone takes "
            f"{fixed_bytes / (n * mha_bytes_per_token(shape, dtype)):.4f} and every layer needs rank >= 1; "
            f"use budget >= {need:.4f}")
    caps = [max(1, int(c)) for c in max_ranks]
    gains: list[tuple[float, int, int]] = []
    for layer, (s, cap) in enumerate(zip(spectra, caps)):
        e = s.to(torch.float64) ** 2
        total = float(e.sum())
        scale = (1.0 / total if total > 0 else 0.0) if energy == "relative" else 1.0
        for i in range(1, min(cap, e.numel())):
            gains.append((float(e[i]) * scale, layer, i))
    ranks = [1] * n
    extra = values - n
    # largest gain first; ties: lower layer, then lower index (keeps every layer's choice a prefix)
    gains.sort(key=lambda g: (-g[0], g[1], g[2]))
    for _, layer, i in gains[:extra]:
        ranks[layer] += 1
    return ranks


def kept_energy_total(spectra: Sequence[Tensor], ranks: Sequence[int], energy: str = "relative") -> float:
    """The objective :func:`allocate_ranks` maximises, for a given choice of ranks."""
    out = 0.0
    for s, r in zip(spectra, ranks):
        e = s.to(torch.float64) ** 2
        total = float(e.sum())
        kept = float(e[:r].sum())
        out += (kept / total if total > 0 else 0.0) if energy == "relative" else kept
    return out
