"""Factor one GPTNeoX layer's k_pass / v projection into a latent down-projection and per-head ups.

With ``M = [W_k_pass; W_v]`` (m x d, see :mod:`fxopt.latent.layout`) the layer computes
``[k_pass | v] = x M^T + b``. A rank-``r`` factorisation ``M ~ M_r = W_U W_D`` (``W_D``: r x d,
``W_U``: m x r) lets the cache hold ``c = x W_D^T`` (r values per token) instead of k_pass and v
(``H (P + hd)`` values), and recover ``[k_pass | v] = c W_U^T + b``.

**Which error is minimised.** For inputs ``X`` (n x d, rows = tokens) the output error is
``||X (M - M_r)^T||_F``. With ``G = X^T X / n`` (the inputs' second moment) and any ``L`` with
``L L^T = G``, ``||X E^T||_F^2 / n = ||E L||_F^2``, so the best rank-r ``M_r`` is the truncated
SVD of ``A = M L`` mapped back: ``M_r = U_r S_r V_r^T L^{-1}`` (Eckart-Young on ``A``; the
activation-aware SVD construction). Without calibration ``L = I`` (plain SVD, every input
direction weighted alike).

**Rank-deficient ``G``** (fewer calibration tokens than ``d``, or dead input directions; LayerNorm
inputs in particular always have a direction of almost no energy): ``L`` would not be invertible
and the factorisation would be free to put any error in directions the calibration never saw.
We factor with ``G_lam = G + lam I``, ``lam = damping * tr(G) / d`` (a ridge: ``damping`` times
the mean eigenvalue; default 1e-3). Then exactly, for the computed ``E = M - M_r``::

    ||X E^T||_F^2 / n  +  lam ||E||_F^2  =  sum of the discarded s_i^2 of M L_lam      (*)

so the calibrated output error is *bounded* by the discarded whitened energy (Eckart-Young's
equality becomes this identity), every direction keeps a floor weight ``lam`` (inputs outside
the calibration set are not left unprotected), and ``L_lam``'s condition number is at most
``sqrt(1 + d / damping)`` (fine in fp64). ``tests/test_latent_factor.py`` checks (*).

**The loss-aware metric** (``objective="loss"``; calibration with gradients, see
:mod:`fxopt.latent.calibration`). The output error above weighs every k_pass / v row alike, but a
row's error costs the model's loss in proportion to the loss's sensitivity to that output. With
``S`` the second moment of the loss gradient with respect to the rows' outputs (m x m), the
Kronecker-factored Fisher approximation (K-FAC) gives the loss increase of a weight error ``E`` as
about ``tr(S E G E^T) / 2`` per token. With ``R^T R = S_mu = S + mu I`` (``mu = damping * tr(S) / m``,
the same ridge) this is ``||R E L||_F^2``: two-sided whitening, and Eckart-Young on ``A = R M L``
gives the best rank-r ``M_r = R^{-1} U_r S_r V_r^T L^{-1}`` with, exactly,

    tr(S_mu E G_lam E^T)  =  sum of the discarded s_i^2 of R M L                           (**)

(``tests/test_latent_factor.py`` checks it). The discarded energies are then in loss units in every
layer, so a cache budget is spread over the layers by them directly (``energy="absolute"``).

**The value refit** (``value_gram=`` of :func:`truncate`). Head ``h``'s attention output is
``o_i = M_v,h xbar_i + b`` with ``xbar_i = sum_j p_ij x_j`` the attention-weighted average of the
layer inputs, so the v rows' error that reaches the output is ``E_v,h xbar_i``: its second moment
``Gbar_h`` (not ``G``) is the right input metric for v. Given the latent down-projection ``W_D``
(which k_pass and v share, chosen by the SVD), the v up-projection minimising
``tr(E_v,h Gbar_h E_v,h^T)`` is the least-squares solution
``U_v,h = M_v,h Gbar_h W_D^T (W_D Gbar_h W_D^T)^{-1}`` (``Gbar_h`` with the same ridge), independent
of any left weighting of the head's rows. With ``Gbar_h`` replaced by the ``G_lam`` the SVD used, it
returns the SVD's own v up-projection (the SVD's ups are least-squares optimal for its down in its
metric): the refit changes v only through the different statistic. After a refit the layer's
``kept_energy`` / ``discarded_energy`` still describe the SVD truncation, not the refit v.

**Lossless rank.** ``rank="lossless"`` keeps every singular value above
``tol = (eps / 2) ||M||_F`` (plain metric; ``eps`` of the weights' storage dtype): rounding the
stored weights to their dtype perturbs ``M`` by up to ``(eps/2)|M_ij|`` per element, i.e. by at
most ``(eps/2)||M||_F`` in spectral norm, and by Weyl's inequality singular values below that
are indistinguishable from that rounding. For a trained layer ``M`` (m >= d rows) this is
``r = d``: cache ``(d + H R) / (2 d)`` of MHA's.

All arithmetic is fp64 on the CPU; the factors are rounded to the requested dtype and put on the
weights' device at the end. The plain
down-projection has orthonormal rows (``c`` has ``x``'s scale); the whitened one maps the inputs
to whitened coordinates (``E[c c^T] ~ I``): both are well scaled for an fp16 cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from .layout import AttentionShape, LatentKVError, SplitQKV

DEFAULT_DAMPING = 1e-3


@dataclass(frozen=True)
class Whitening:
    """``G_lam = Q diag(e) Q^T`` with ``e = max(eig(G), 0) + lam``; ``L = Q diag(sqrt e)``."""

    gram: Tensor       # G (d, d) fp64, the second moment the calibration measured
    lam: float         # the ridge added
    eigvecs: Tensor    # Q
    eigvals: Tensor    # e (> 0)

    @property
    def L(self) -> Tensor:
        return self.eigvecs * self.eigvals.sqrt()

    @property
    def L_inv(self) -> Tensor:
        return self.eigvecs.T / self.eigvals.sqrt()[:, None]

    @property
    def damped_gram(self) -> Tensor:
        return (self.eigvecs * self.eigvals) @ self.eigvecs.T


def whitening(gram: Tensor, damping: float = DEFAULT_DAMPING) -> Whitening:
    """The whitening of a second-moment matrix ``gram`` (d x d, symmetric PSD) with the ridge
    ``lam = damping * tr(gram) / d`` (see the module docstring)."""
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise LatentKVError(f"calibration second moment must be a square (d, d) matrix, got {tuple(gram.shape)}")
    if not bool(torch.isfinite(gram).all()):
        raise LatentKVError("calibration second moment has non-finite entries (inf/nan activations?)")
    if not (damping > 0 and math.isfinite(damping)):
        raise LatentKVError(f"damping must be a positive number, got {damping!r}")
    g = gram.to(torch.float64)
    g = (g + g.T) / 2
    d = g.shape[0]
    trace = float(torch.diagonal(g).sum())
    if trace <= 0:
        raise LatentKVError("calibration second moment is zero: the calibration inputs carry no signal")
    lam = damping * trace / d
    e, q = torch.linalg.eigh(g)
    return Whitening(gram=g, lam=lam, eigvecs=q, eigvals=e.clamp(min=0) + lam)


@dataclass(frozen=True)
class LayerSVD:
    """The SVD one layer's truncations are read from: ``A = R M L = U diag(s) Vh``."""

    U: Tensor                      # (m, k) fp64
    s: Tensor                      # (k,) descending
    Vh: Tensor                     # (k, d)
    L_inv: Optional[Tensor]        # (d, d), None for the plain metric (L = I)
    lossless_rank: int
    tolerance: float
    metric: str                    # "plain" | "whitened" | "fisher"
    lam: float = 0.0
    R_inv: Optional[Tensor] = None  # (m, m), None unless the rows are weighted (R = I)
    mu: float = 0.0

    @property
    def energy(self) -> Tensor:
        return self.s * self.s

    def kept_energy(self, rank: int) -> float:
        """Fraction of ``||A||_F^2`` a rank-``rank`` truncation keeps (1.0 for a zero matrix)."""
        total = float(self.energy.sum())
        return 1.0 if total == 0 else float(self.energy[:rank].sum()) / total

    def discarded_energy(self, rank: int) -> float:
        """``sum_{i >= rank} s_i^2``: the squared error bound of the truncation (Eckart-Young)."""
        return float(self.energy[rank:].sum())

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """``(up (m, r), down (r, d))`` in fp64 with ``up @ down = M_r``."""
        up = self.U[:, :rank] * self.s[:rank]
        if self.R_inv is not None:
            up = self.R_inv @ up
        down = self.Vh[:rank]
        if self.L_inv is not None:
            down = down @ self.L_inv
        return up, down


def layer_svd(split: SplitQKV, *, whiten: Optional[Whitening] = None, weight_rows: Optional[Whitening] = None,
              storage_dtype: Optional[torch.dtype] = None) -> LayerSVD:
    """SVD of the layer's stacked k_pass / v weights, plain, whitened by ``whiten`` (the inputs'
    second moment) or, with ``weight_rows`` (the loss gradients' second moment over ``M``'s rows, m x m)
    too, two-sided (the loss-aware metric of the module docstring)."""
    # fp64 on the CPU whatever the weights' device (LAPACK; calibration statistics live there too)
    M = split.stacked().detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(M).all()):
        raise LatentKVError("the layer's k / v weights hold inf or nan: there is nothing to factorise")
    if weight_rows is not None and whiten is None:
        raise LatentKVError("row weights (loss gradients) need the inputs' whitening too: the metric is S (x) G")
    if weight_rows is not None and tuple(weight_rows.gram.shape) != (M.shape[0], M.shape[0]):
        raise LatentKVError(f"the gradient second moment is {tuple(weight_rows.gram.shape)}; this layer's k_pass / v "
                            f"rows need ({M.shape[0]}, {M.shape[0]})")
    storage_dtype = storage_dtype or split.v_weight.dtype
    eps = torch.finfo(storage_dtype).eps if storage_dtype.is_floating_point else torch.finfo(torch.float32).eps
    tol = 0.5 * eps * float(torch.linalg.matrix_norm(M))
    A = M if whiten is None else M @ whiten.L
    R_inv = None
    if weight_rows is not None:
        A = weight_rows.L.T @ A              # R = L_S^T: R^T R = S_mu
        R_inv = weight_rows.L_inv.T
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    if whiten is not None:
        tol *= float(whiten.eigvals.max().sqrt())  # the rounding of M, seen through L (||L||_2)
    if weight_rows is not None:
        tol *= float(weight_rows.eigvals.max().sqrt())  # ... and through R
    lossless = int((s > tol).sum())
    metric = "plain" if whiten is None else ("whitened" if weight_rows is None else "fisher")
    return LayerSVD(U=U, s=s, Vh=Vh, L_inv=None if whiten is None else whiten.L_inv, lossless_rank=lossless,
                    tolerance=tol, metric=metric, lam=0.0 if whiten is None else whiten.lam, R_inv=R_inv,
                    mu=0.0 if weight_rows is None else weight_rows.lam)


def refit_value_up(split: SplitQKV, down: Tensor, value_gram: Tensor, damping: float = DEFAULT_DAMPING) -> Tensor:
    """The v up-projections (H, hd, r) fp64 minimising each head's attention-output error for the
    latent ``down`` (r, d) given the head's attention-averaged input second moments ``value_gram``
    (H, d, d) with the ridge ``damping * tr / d`` (module docstring, "the value refit")."""
    H, hd, d = split.v_weight.shape
    if value_gram.dim() != 3 or tuple(value_gram.shape) != (H, d, d):
        raise LatentKVError(f"value second moments must be (heads, d, d) = ({H}, {d}, {d}), got {tuple(value_gram.shape)}")
    if not bool(torch.isfinite(value_gram).all()):
        raise LatentKVError("value second moments have non-finite entries (inf/nan activations?)")
    D = down.detach().to("cpu", torch.float64)
    Mv = split.v_weight.detach().to("cpu", torch.float64)
    out = torch.empty(H, hd, D.shape[0], dtype=torch.float64)
    for h in range(H):
        G = whitening(value_gram[h], damping).damped_gram
        DG = D @ G                                      # (r, d)
        # U^T = (D G D^T)^{-1} D G M^T: an r x r positive definite solve (D has full row rank)
        out[h] = torch.linalg.solve(DG @ D.T, DG @ Mv[h].T).T
    return out


@dataclass
class LatentLayer:
    """One layer's latent attention weights (all in ``dtype``; shapes in the layout glossary).

    * q: ``q = x q_weight^T + q_bias`` per head, exactly the original;
    * rotary part of k, exactly the original (cached post-rotary): ``k_rot = x k_rot_weight^T + k_rot_bias``;
    * latent ``c = x down^T`` (no bias: the biases stay in the up path, exact);
    * ``k_pass = c k_up^T + k_bias``, ``v = c v_up^T + v_bias`` per head."""

    shape: AttentionShape
    rank: int
    q_weight: Tensor                 # (H, hd, d)
    q_bias: Optional[Tensor]         # (H, hd)
    k_rot_weight: Tensor             # (H, R, d)
    k_rot_bias: Optional[Tensor]     # (H, R)
    down: Tensor                     # (r, d)
    k_up: Tensor                     # (H, P, r)
    k_bias: Optional[Tensor]         # (H, P)
    v_up: Tensor                     # (H, hd, r)
    v_bias: Optional[Tensor]         # (H, hd)
    lossless_rank: int = 0
    kept_energy: float = 1.0
    discarded_energy: float = 0.0    # sum of the discarded s_i^2 (in ``metric``)
    metric: str = "plain"
    lam: float = 0.0
    notes: list[str] = field(default_factory=list)

    def stacked_up(self) -> Tensor:
        """``W_U`` (m, r): the k_pass ups of every head, then the v ups (``M``'s row order)."""
        return torch.cat([self.k_up.reshape(-1, self.rank), self.v_up.reshape(-1, self.rank)], 0)

    def reconstructed(self) -> Tensor:
        """``M_r = W_U W_D`` (m, d) in fp64."""
        return self.stacked_up().to(torch.float64) @ self.down.to(torch.float64)

    def to(self, dtype: torch.dtype) -> "LatentLayer":
        def cv(t):
            return None if t is None else t.to(dtype)

        return LatentLayer(self.shape, self.rank, cv(self.q_weight), cv(self.q_bias), cv(self.k_rot_weight),
                           cv(self.k_rot_bias), cv(self.down), cv(self.k_up), cv(self.k_bias), cv(self.v_up),
                           cv(self.v_bias), self.lossless_rank, self.kept_energy, self.discarded_energy, self.metric,
                           self.lam, list(self.notes))

    @property
    def dtype(self) -> torch.dtype:
        return self.down.dtype

    def cache_values_per_token(self) -> int:
        """Values this layer caches per token: the latent plus every head's post-rotary k_rot."""
        return self.rank + self.shape.heads * self.shape.rotary_dim


def truncate(split: SplitQKV, svd: LayerSVD, rank: int, shape: AttentionShape,
             dtype: Optional[torch.dtype] = None, *, value_gram: Optional[Tensor] = None,
             damping: float = DEFAULT_DAMPING) -> LatentLayer:
    """The rank-``rank`` latent layer from a :class:`LayerSVD` (``rank`` is clamped to the SVD's
    size; biases copied unchanged). ``value_gram`` (H, d, d): refit the v up-projections to the
    heads' attention-averaged inputs (:func:`refit_value_up`)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LatentKVError(f"latent rank must be an int >= 1, got {rank!r}")
    notes = []
    k = svd.s.numel()
    if rank > k:
        notes.append(f"rank {rank} > {k} singular values: using {k}")
        rank = k
    dtype = dtype or split.v_weight.dtype
    device = split.v_weight.device
    up, down = svd.factors(rank)
    H, P, hd = shape.heads, shape.pass_dim, shape.head_dim
    k_up = up[: H * P].reshape(H, P, rank)
    v_up = up[H * P:].reshape(H, hd, rank)
    if value_gram is not None:
        v_up = refit_value_up(split, down, value_gram, damping)
    k_up, v_up, down = k_up.to(device), v_up.to(device), down.to(device)

    def cp(t):
        return None if t is None else t.detach().to(dtype).clone()

    return LatentLayer(
        shape=shape, rank=rank, q_weight=cp(split.q_weight), q_bias=cp(split.q_bias),
        k_rot_weight=cp(split.k_rot_weight), k_rot_bias=cp(split.k_rot_bias), down=down.to(dtype),
        k_up=k_up.to(dtype), k_bias=cp(split.k_pass_bias), v_up=v_up.to(dtype), v_bias=cp(split.v_bias),
        lossless_rank=svd.lossless_rank, kept_energy=svd.kept_energy(rank), discarded_energy=svd.discarded_energy(rank),
        metric=svd.metric, lam=svd.lam, notes=notes)
