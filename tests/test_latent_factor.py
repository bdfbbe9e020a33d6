"""fxopt.latent factorisation: GPTNeoX's qkv layout, the error bounds of plain, whitened and
two-sided (loss-gradient x input) SVD (Hypothesis over random layers), the v refit's least-squares
optimality, lossless reconstruction under fp64_relative(4), budgets, bytes, the objective choice."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxopt.errors import FxoptError
from fxopt.latent import (AttentionShape, Calibration, LatentKVError, allocate_ranks, factorize,
                          latent_bytes_per_token, layer_svd, mha_bytes_per_token, refit_value_up, split_qkv, truncate,
                          whitening)
from fxopt.latent.plan import default_energy, resolve_objective
from fxopt.latent.budget import kept_energy_total, min_budget_fraction
from fxopt.models.hf import tiny_gpt_neox
from fxopt.testing.contracts import fp64_relative

# Lossless latent k_pass / v (fp32 factors from an fp64 SVD, two products of depth d and r) vs the
# original fp32 projection (one product of depth d), both against fp64: the factors' own rounding
# plus the second accumulation about double the original's error (measured: <= 2.3x over 40
# random layers, full-rank and rank-deficient); 4 leaves room.
LOSSLESS = fp64_relative(4.0)


# ----------------------------------------------------------------------------- strategies
@st.composite
def layers(draw, max_heads=4, max_head_dim=12):
    """A random GPTNeoX layer: (shape, weight (3d, d) fp64, bias or None, (structure, rank of M))."""
    H = draw(st.integers(1, max_heads))
    hd = draw(st.sampled_from([1, 2, 3, 5, 8, max_head_dim]))
    R = draw(st.sampled_from(sorted({0, 2 * (hd // 4), 2 * (hd // 2), hd - hd % 2})))
    d = H * hd
    shape = AttentionShape(d, H, hd, R)
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(3 * d, d, generator=g, dtype=torch.float64)
    kind = draw(st.sampled_from(["full", "low_rank", "decaying", "zero_v"]))
    k = min(H * (2 * hd - R), d)
    Wv = W.view(H, 3, hd, d)
    m = H * (2 * hd - R)
    if kind == "low_rank":
        k = draw(st.integers(1, max(1, d - 1)))
        low = torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(k, d, generator=g, dtype=torch.float64)
    elif kind == "decaying":  # a trained-like spectrum spanning many orders of magnitude
        U, _ = torch.linalg.qr(torch.randn(m, min(m, d), generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(d, min(m, d), generator=g, dtype=torch.float64))
        s = torch.logspace(0, -draw(st.integers(1, 12)), min(m, d), dtype=torch.float64)
        low = (U * s) @ V.T
    elif kind == "zero_v":
        low = torch.zeros(m, d, dtype=torch.float64)
        k = 0
    else:
        low = None
    if low is not None:
        Wv[:, 1, R:] = low[: H * (hd - R)].view(H, hd - R, d)
        Wv[:, 2] = low[H * (hd - R):].view(H, hd, d)
    scale = draw(st.sampled_from([1.0, 1e-20, 1e20]))  # extremes of magnitude (fp64 arithmetic inside)
    W = W * scale
    bias = torch.randn(3 * d, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    return shape, W, bias, (kind, k)


def _activations(d, n, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -3, d, dtype=torch.float64)
    if rank is not None:  # inputs confined to a subspace: a rank-deficient second moment
        X = X[:, :rank] @ torch.randn(rank, d, generator=g, dtype=torch.float64)
    return X


# ----------------------------------------------------------------------------- layout
def test_split_matches_hf_attention_layout():
    """Our q / k_rot / k_pass / v blocks are exactly what GPTNeoXAttention.forward chunks out."""
    model = tiny_gpt_neox(hidden_size=48, num_attention_heads=3, rotary_pct=0.25, attention_bias=True)
    attn = model.gpt_neox.layers[0].attention
    shape = AttentionShape(48, 3, 16, 4)
    x = torch.randn(2, 5, 48)
    qkv = attn.query_key_value(x).view(2, 5, -1, 3 * 16).transpose(1, 2)
    q, k, v = qkv.chunk(3, dim=-1)
    sp = split_qkv(attn.query_key_value.weight, attn.query_key_value.bias, shape)

    def proj(w, b):
        return torch.einsum("bld,hed->bhle", x, w) + b[None, :, None, :]

    torch.testing.assert_close(proj(sp.q_weight, sp.q_bias), q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(proj(sp.k_rot_weight, sp.k_rot_bias), k[..., :4], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(proj(sp.k_pass_weight, sp.k_pass_bias), k[..., 4:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(proj(sp.v_weight, sp.v_bias), v, rtol=1e-5, atol=1e-6)
    # look-alike: the [Q; K; V] block layout of other models is NOT GPTNeoX's
    wq_blocked = attn.query_key_value.weight[:48].view(3, 16, 48)
    assert not torch.allclose(wq_blocked, sp.q_weight)


def test_shape_and_split_errors():
    with pytest.raises(LatentKVError, match="hidden = heads"):
        AttentionShape(10, 3, 3, 0)
    with pytest.raises(LatentKVError, match="rotary_dim"):
        AttentionShape(12, 3, 4, 6)
    with pytest.raises(LatentKVError, match="query_key_value.weight"):
        split_qkv(torch.zeros(5, 4), None, AttentionShape(4, 1, 4, 2))
    w = torch.zeros(12, 4)
    w[8, 0] = float("nan")  # a v row (head 0, block 2)
    with pytest.raises(LatentKVError, match="inf or nan"):
        layer_svd(split_qkv(w, None, AttentionShape(4, 1, 4, 2)))
    assert issubclass(LatentKVError, FxoptError)


# ----------------------------------------------------------------------------- bounds (Hypothesis)
@settings(max_examples=60, deadline=None)
@given(layer=layers(), frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_plain_svd_error_is_eckart_young(layer, frac, seed):
    """||M - M_r||_F equals sqrt(sum of the discarded s_i^2), and for any inputs X
    ||X (M - M_r)^T||_F <= ||X||_2 sqrt(discarded)."""
    shape, W, bias, _ = layer
    sp = split_qkv(W, bias, shape)
    svd = layer_svd(sp)
    k = svd.s.numel()
    r = max(1, min(k, round(frac * k)))
    lat = truncate(sp, svd, r, shape, torch.float64)
    M = sp.stacked()
    E = M - lat.reconstructed()
    bound = math.sqrt(svd.discarded_energy(r))
    scale = float(torch.linalg.matrix_norm(M))
    assert abs(float(torch.linalg.matrix_norm(E)) - bound) <= 1e-10 * scale + 1e-300
    X = _activations(shape.hidden, 9, seed)
    err_x = float(torch.linalg.matrix_norm(X @ E.T))
    assert err_x <= float(torch.linalg.matrix_norm(X, ord=2)) * bound * (1 + 1e-9) + 1e-12 * scale * float(X.abs().max())
    assert 0.0 <= lat.kept_energy <= 1.0 + 1e-12


@settings(max_examples=60, deadline=None)
@given(layer=layers(), frac=st.floats(0.0, 1.0), n=st.sampled_from([1, 3, 17, 200]),
       subspace=st.booleans(), damping=st.sampled_from([1e-6, 1e-3, 1e-1]), seed=st.integers(0, 2**16))
def test_whitened_error_identity(layer, frac, n, subspace, damping, seed):
    """With G = X^T X / n and the ridge lam: ||X E^T||^2 / n + lam ||E||^2 equals the discarded
    whitened energy exactly (so the calibrated output error is bounded by it), including
    rank-deficient G (n < d tokens, or inputs confined to a subspace); and the whitened truncation
    is never worse in that metric than the plain SVD's truncation of the same rank."""
    shape, W, bias, _ = layer
    d = shape.hidden
    X = _activations(d, n, seed, rank=max(1, d // 2) if subspace else None)
    cal = Calibration.from_activations([X])
    wh = whitening(cal.grams[0], damping)
    sp = split_qkv(W, bias, shape)
    svd = layer_svd(sp, whiten=wh)
    k = svd.s.numel()
    r = max(1, min(k, round(frac * k)))
    lat = truncate(sp, svd, r, shape, torch.float64)
    M = sp.stacked()

    def metric(E):
        return float((X @ E.T).pow(2).sum()) / n + wh.lam * float(E.pow(2).sum())

    E_w = M - lat.reconstructed()
    whole = metric(M)  # the scale of the quantities compared (sum of all whitened s_i^2)
    assert abs(metric(E_w) - svd.discarded_energy(r)) <= 1e-9 * whole + 1e-300
    assert float((X @ E_w.T).pow(2).sum()) / n <= svd.discarded_energy(r) + 1e-9 * whole + 1e-300
    plain = truncate(sp, layer_svd(sp), r, shape, torch.float64)
    assert metric(E_w) <= metric(M - plain.reconstructed()) + 1e-9 * whole + 1e-300


def test_whitening_beats_plain_on_anisotropic_inputs():
    """Not vacuous: on inputs with very unequal directions the calibrated truncation's output
    error is far below the plain one's at the same rank."""
    shape = AttentionShape(32, 2, 16, 4)
    g = torch.Generator().manual_seed(1)
    W = torch.randn(96, 32, generator=g, dtype=torch.float64)
    X = torch.randn(500, 32, generator=g, dtype=torch.float64) * torch.logspace(1, -3, 32, dtype=torch.float64)
    sp = split_qkv(W, None, shape)
    plain = truncate(sp, layer_svd(sp), 8, shape, torch.float64)
    white = truncate(sp, layer_svd(sp, whiten=whitening(Calibration.from_activations([X]).grams[0], 1e-6)), 8, shape,
                     torch.float64)
    M = sp.stacked()
    e_plain = float(torch.linalg.matrix_norm(X @ (M - plain.reconstructed()).T))
    e_white = float(torch.linalg.matrix_norm(X @ (M - white.reconstructed()).T))
    assert e_white < 0.25 * e_plain  # measured 0.12


def test_whitening_rejects_bad_calibration():
    with pytest.raises(LatentKVError, match="square"):
        whitening(torch.zeros(3, 4))
    with pytest.raises(LatentKVError, match="no signal"):
        whitening(torch.zeros(3, 3))
    with pytest.raises(LatentKVError, match="non-finite"):
        whitening(torch.full((2, 2), float("inf")))
    with pytest.raises(LatentKVError, match="damping"):
        whitening(torch.eye(2), 0.0)
    with pytest.raises(LatentKVError, match="no tokens"):
        Calibration.from_activations([torch.zeros(0, 4)])


def _gradients(m, n, seed, rank=None):
    """Loss gradients (n, m) with very unequal row sensitivities (some rows matter 1e3 x more)."""
    g = torch.Generator().manual_seed(seed + 7)
    Gr = torch.randn(n, m, generator=g, dtype=torch.float64) * torch.logspace(0, -3, m, dtype=torch.float64)[
        torch.randperm(m, generator=g)]
    if rank is not None:
        Gr = Gr[:, :rank] @ torch.randn(rank, m, generator=g, dtype=torch.float64)
    return Gr


@settings(max_examples=60, deadline=None)
@given(layer=layers(), frac=st.floats(0.0, 1.0), n=st.sampled_from([1, 3, 17, 200]),
       deficient=st.booleans(), damping=st.sampled_from([1e-6, 1e-3, 1e-1]), seed=st.integers(0, 2**16))
def test_fisher_error_identity(layer, frac, n, deficient, damping, seed):
    """Two-sided (loss gradients x inputs) truncation: with S = Gr^T Gr / n, G = X^T X / n and the
    ridges mu, lam, ``tr(S_mu E G_lam E^T)`` equals the discarded energy exactly (identity (**) of
    fxopt.latent.factor), so the K-FAC loss estimate ``tr(S E G E^T)`` is bounded by it, also for
    rank-deficient statistics; and no truncation of the same rank read off the input-only or the
    plain SVD does better in that metric (Eckart-Young)."""
    shape, W, bias, _ = layer
    d = shape.hidden
    sp = split_qkv(W, bias, shape)
    m = sp.stacked().shape[0]
    X = _activations(d, n, seed, rank=max(1, d // 2) if deficient else None)
    Gr = _gradients(m, n, seed, rank=max(1, m // 3) if deficient else None)
    wh = whitening(X.T @ X / n, damping)
    rows = whitening(Gr.T @ Gr / n, damping)
    svd = layer_svd(sp, whiten=wh, weight_rows=rows)
    assert svd.metric == "fisher"
    k = svd.s.numel()
    r = max(1, min(k, round(frac * k)))
    lat = truncate(sp, svd, r, shape, torch.float64)
    M = sp.stacked()

    def metric(E):
        return float(torch.trace(rows.damped_gram @ E @ wh.damped_gram @ E.T))

    def loss_estimate(E):  # the K-FAC form, undamped
        return float(torch.trace((Gr.T @ Gr / n) @ E @ (X.T @ X / n) @ E.T))

    E = M - lat.reconstructed()
    whole = metric(M)
    assert abs(metric(E) - svd.discarded_energy(r)) <= 1e-9 * whole + 1e-300
    assert loss_estimate(E) <= svd.discarded_energy(r) + 1e-9 * whole + 1e-300
    for other in (layer_svd(sp, whiten=wh), layer_svd(sp)):
        assert metric(E) <= metric(M - truncate(sp, other, r, shape, torch.float64).reconstructed()) + 1e-9 * whole + 1e-300


def test_fisher_weighting_beats_inputs_only_on_unequal_rows():
    """Not vacuous: when some output rows matter far more to the loss, the two-sided truncation's
    loss estimate is far below the input-only whitened truncation's at the same rank."""
    shape = AttentionShape(32, 2, 16, 4)
    g = torch.Generator().manual_seed(2)
    W = torch.randn(96, 32, generator=g, dtype=torch.float64)
    sp = split_qkv(W, None, shape)
    m = sp.stacked().shape[0]
    X = torch.randn(500, 32, generator=g, dtype=torch.float64) * torch.logspace(1, -1, 32, dtype=torch.float64)
    Gr = _gradients(m, 500, 3)
    G, S = X.T @ X / 500, Gr.T @ Gr / 500
    inputs = truncate(sp, layer_svd(sp, whiten=whitening(G, 1e-6)), 16, shape, torch.float64)
    fisher = truncate(sp, layer_svd(sp, whiten=whitening(G, 1e-6), weight_rows=whitening(S, 1e-6)), 16, shape,
                      torch.float64)
    M = sp.stacked()

    def loss_estimate(lat):
        E = M - lat.reconstructed()
        return float(torch.trace(S @ E @ G @ E.T))

    assert loss_estimate(fisher) < 0.25 * loss_estimate(inputs)  # measured 0.064 (rank 16 of 32)


def test_isotropic_gradients_change_nothing():
    """Look-alike: gradients of equal size in every row direction (S = c I) make the two-sided metric
    a multiple of the input-only one: the same truncation, the same relative spectrum."""
    shape = AttentionShape(24, 2, 12, 4)
    g = torch.Generator().manual_seed(4)
    W = torch.randn(72, 24, generator=g, dtype=torch.float64)
    sp = split_qkv(W, torch.randn(72, generator=g, dtype=torch.float64), shape)
    X = torch.randn(300, 24, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 24, dtype=torch.float64)
    wh = whitening(X.T @ X / 300, 1e-3)
    m = sp.stacked().shape[0]
    iso = layer_svd(sp, whiten=wh, weight_rows=whitening(3.0 * torch.eye(m, dtype=torch.float64), 1e-3))
    ref = layer_svd(sp, whiten=wh)
    for r in (1, 5, 17):
        a = truncate(sp, iso, r, shape, torch.float64).reconstructed()
        b = truncate(sp, ref, r, shape, torch.float64).reconstructed()
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9 * float(b.abs().max()))
        assert iso.kept_energy(r) == pytest.approx(ref.kept_energy(r), rel=1e-12)


def test_fisher_svd_rejects_bad_statistics():
    shape = AttentionShape(8, 2, 4, 2)
    sp = split_qkv(torch.randn(24, 8, dtype=torch.float64), None, shape)
    m = sp.stacked().shape[0]
    with pytest.raises(LatentKVError, match="need the inputs' whitening"):
        layer_svd(sp, weight_rows=whitening(torch.eye(m, dtype=torch.float64)))
    with pytest.raises(LatentKVError, match=rf"need \({m}, {m}\)"):
        layer_svd(sp, whiten=whitening(torch.eye(8, dtype=torch.float64)), weight_rows=whitening(torch.eye(m + 1)))


# ----------------------------------------------------------------------------- the v refit
def _value_objective(Mv, U, D, gram, damping):
    """sum over heads of tr(E_h Gbar_h,lam E_h^T), E_h = M_v,h - U_h D: the refit's objective."""
    total = 0.0
    for h in range(Mv.shape[0]):
        E = Mv[h] - U[h] @ D
        total += float(torch.trace(E @ whitening(gram[h], damping).damped_gram @ E.T))
    return total


@settings(max_examples=40, deadline=None)
@given(layer=layers(), frac=st.floats(0.0, 1.0), n=st.sampled_from([2, 9, 150]), deficient=st.booleans(),
       damping=st.sampled_from([1e-6, 1e-3, 1e-1]), seed=st.integers(0, 2**16))
def test_value_refit_is_least_squares(layer, frac, n, deficient, damping, seed):
    """For any latent down-projection, the refit v ups minimise each head's attention-output error
    ``tr(E_h Gbar_h E_h^T)`` (ridge included): no perturbation and not the SVD's own v ups do
    better; the other weights of the layer are untouched."""
    shape, W, bias, _ = layer
    d, H = shape.hidden, shape.heads
    sp = split_qkv(W, bias, shape)
    svd = layer_svd(sp)
    k = svd.s.numel()
    r = max(1, min(k, round(frac * k)))
    g = torch.Generator().manual_seed(seed)
    xs = [_activations(d, n, seed + h, rank=max(1, d // 3) if deficient else None) for h in range(H)]
    gram = torch.stack([x.T @ x / n for x in xs])
    plain = truncate(sp, svd, r, shape, torch.float64)
    refit = truncate(sp, svd, r, shape, torch.float64, value_gram=gram, damping=damping)
    D = plain.down
    assert torch.equal(refit.down, D) and torch.equal(refit.k_up, plain.k_up) and torch.equal(refit.q_weight, plain.q_weight)
    Mv = sp.v_weight.double()
    best = _value_objective(Mv, refit.v_up, D, gram, damping)
    scale = _value_objective(Mv, torch.zeros_like(refit.v_up), D, gram, damping)  # ||M||^2 in the metric
    assert best <= _value_objective(Mv, plain.v_up, D, gram, damping) + 1e-9 * scale + 1e-300
    for _ in range(3):
        delta = torch.randn(refit.v_up.shape, generator=g, dtype=torch.float64) * 1e-3 * (1 + float(refit.v_up.abs().max()))
        assert best <= _value_objective(Mv, refit.v_up + delta, D, gram, damping) + 1e-9 * scale + 1e-300


def test_value_refit_with_the_svds_own_metric_changes_nothing():
    """Look-alike: refit to the same input second moment (and ridge) the SVD was whitened with --
    also a two-sided SVD, whose row weights the least-squares ups do not depend on -- returns the
    SVD's v ups: the refit changes v only through the attention-averaged statistic."""
    shape = AttentionShape(24, 2, 12, 4)
    g = torch.Generator().manual_seed(5)
    sp = split_qkv(torch.randn(72, 24, generator=g, dtype=torch.float64), None, shape)
    X = torch.randn(300, 24, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 24, dtype=torch.float64)
    G = X.T @ X / 300
    Gr = _gradients(sp.stacked().shape[0], 300, 5)
    for rows in (None, whitening(Gr.T @ Gr / 300, 1e-3)):
        svd = layer_svd(sp, whiten=whitening(G, 1e-3), weight_rows=rows)
        plain = truncate(sp, svd, 7, shape, torch.float64)
        same = truncate(sp, svd, 7, shape, torch.float64, value_gram=torch.stack([G, G]), damping=1e-3)
        assert torch.allclose(same.v_up, plain.v_up, rtol=1e-7, atol=1e-9 * float(plain.v_up.abs().max()))
        # while a different statistic does change them
        other = truncate(sp, svd, 7, shape, torch.float64, value_gram=torch.stack([torch.eye(24), G]).double(),
                         damping=1e-3)
        assert not torch.allclose(other.v_up[0], plain.v_up[0], rtol=1e-3)


def test_value_refit_rejects_bad_statistics():
    shape = AttentionShape(8, 2, 4, 2)
    sp = split_qkv(torch.randn(24, 8, dtype=torch.float64), None, shape)
    down = torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises(LatentKVError, match=r"\(heads, d, d\) = \(2, 8, 8\)"):
        refit_value_up(sp, down, torch.eye(8))
    with pytest.raises(LatentKVError, match="non-finite"):
        refit_value_up(sp, down, torch.full((2, 8, 8), float("nan")))


# ----------------------------------------------------------------------------- lossless
@settings(max_examples=40, deadline=None)
@given(layer=layers(max_heads=3, max_head_dim=16), seed=st.integers(0, 2**16))
def test_lossless_reconstruction_within_fp32_rounding(layer, seed):
    """In fp32, the lossless latent path ``(x W_D^T) W_U^T + b`` computes k_pass and v within
    fp64_relative(4) of the original projection ``x M^T + b``; the lossless rank of an exactly
    rank-k layer (then rounded to fp32) is k."""
    shape, W, bias, (kind, k) = layer
    if kind == "decaying":  # tiny singular values are legitimately below fp32's resolution: see below
        return
    W32 = W.float()
    b32 = None if bias is None else bias.float()
    sp = split_qkv(W32, b32, shape)
    svd = layer_svd(sp)
    assert svd.lossless_rank == k  # fp32 rounding noise stays below the tolerance (Weyl)
    lat = truncate(sp, svd, max(1, svd.lossless_rank), shape)
    assert lat.down.dtype == torch.float32
    x = torch.randn(11, shape.hidden, generator=torch.Generator().manual_seed(seed))
    M = sp.stacked()
    bb = sp.stacked_bias()

    def original(x, M, bb):
        y = x @ M.T
        return y if bb is None else y + bb

    up = lat.stacked_up()
    lat_b = None if lat.k_bias is None else torch.cat([lat.k_bias.reshape(-1), lat.v_bias.reshape(-1)])
    cand = original(x @ lat.down.T, up, lat_b)
    LOSSLESS.check(original(x, M, bb), cand, fp64_ref=original(x.double(), M.double(), None if bb is None else bb.double()))


def test_lossless_rank_drops_rounding_noise_only():
    """A decaying spectrum: the lossless rank keeps every singular value above (eps/2)||M||_F of
    the weights' dtype and no fewer: fp32 storage keeps more than fp16 storage would."""
    shape = AttentionShape(64, 4, 16, 4)
    g = torch.Generator().manual_seed(3)
    m = 4 * (32 - 4)
    U, _ = torch.linalg.qr(torch.randn(m, 64, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -12, 64, dtype=torch.float64)
    W = torch.randn(192, 64, generator=g, dtype=torch.float64)
    low = (U * s) @ V.T
    Wv = W.view(4, 3, 16, 64)
    Wv[:, 1, 4:] = low[:48].view(4, 12, 64)
    Wv[:, 2] = low[48:].view(4, 16, 64)
    sp = split_qkv(W, None, shape)
    r32 = layer_svd(sp, storage_dtype=torch.float32).lossless_rank
    r16 = layer_svd(sp, storage_dtype=torch.float16).lossless_rank
    tol32 = 0.5 * torch.finfo(torch.float32).eps * float(torch.linalg.matrix_norm(sp.stacked().double()))
    assert r32 == int((s > tol32).sum()) and r16 < r32 < 64


# ----------------------------------------------------------------------------- bytes and budgets
def test_cache_bytes_accounting():
    shape = AttentionShape(2560, 32, 80, 20)  # Pythia-2.8B
    assert mha_bytes_per_token(shape, torch.float16) == 2 * 2560 * 2
    assert latent_bytes_per_token(shape, 2560, torch.float16) == (2560 + 640) * 2
    assert latent_bytes_per_token(shape, 2560, torch.float16) / mha_bytes_per_token(shape, torch.float16) == 0.625
    sizes = [latent_bytes_per_token(shape, r, torch.float16) for r in (1, 64, 512, 1024, 2560)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert min_budget_fraction(shape, 32, torch.float16) == (1 + 640) / 5120


def _spectra(draw_seed, n_layers, k):
    g = torch.Generator().manual_seed(draw_seed)
    return [torch.sort(torch.rand(k, generator=g, dtype=torch.float64) ** 3, descending=True).values
            for _ in range(n_layers)]


@settings(max_examples=50, deadline=None)
@given(n_layers=st.integers(1, 3), k=st.integers(1, 5), budget=st.floats(0.05, 1.0), seed=st.integers(0, 999),
       energy=st.sampled_from(["relative", "absolute"]))
def test_greedy_allocation_is_optimal(n_layers, k, budget, seed, energy):
    """The greedy ranks fit the budget (exact bytes incl. k_rot) and maximise the kept energy: an
    exhaustive search over all rank vectors finds nothing better."""
    shape = AttentionShape(8, 2, 4, 2)  # MHA 16 values/token/layer, k_rot 4
    spectra = _spectra(seed, n_layers, k)
    caps = [k] * n_layers
    limit = math.floor(budget * n_layers * mha_bytes_per_token(shape, torch.float16))
    try:
        ranks = allocate_ranks(spectra, caps, shape, budget, torch.float16, energy)
    except LatentKVError:
        assert n_layers * latent_bytes_per_token(shape, 1, torch.float16) > limit
        return
    assert all(1 <= r <= k for r in ranks)
    assert sum(latent_bytes_per_token(shape, r, torch.float16) for r in ranks) <= limit
    best = max(kept_energy_total(spectra, rs, energy)
               for rs in itertools.product(range(1, k + 1), repeat=n_layers)
               if sum(latent_bytes_per_token(shape, r, torch.float16) for r in rs) <= limit)
    assert kept_energy_total(spectra, ranks, energy) >= best - 1e-12


def test_budget_errors_name_the_minimum():
    shape = AttentionShape(2560, 32, 80, 20)
    with pytest.raises(LatentKVError, match=r"budget >= 0\.125"):
        allocate_ranks([torch.ones(4)], [4], shape, 0.1, torch.float16)
    for bad in (0, -0.5, 1.5, float("nan"), True, "half"):
        with pytest.raises(LatentKVError, match="budget must be"):
            allocate_ranks([torch.ones(4)], [4], shape, bad, torch.float16)


# ----------------------------------------------------------------------------- factorize on a model
def test_factorize_model_report_and_bytes_shrink_with_rank():
    model = tiny_gpt_neox(hidden_size=64, num_attention_heads=4, num_hidden_layers=3, rotary_pct=0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lossless = factorize(model)
    assert lossless.ranks == [64, 64, 64]  # a random layer is full rank: r = d
    assert lossless.cache_bytes_per_token() / lossless.mha_cache_bytes_per_token() == (64 + 4 * 4) / 128
    rep = lossless.report()
    assert [r.rank for r in rep.rows] == [64] * 3 and all(abs(r.kept_energy - 1) < 1e-12 for r in rep.rows)
    text = str(rep)
    assert "kept energy" in text and "of MHA" in text and str(2 * 64 * 4) in text
    by_rank = [factorize(model, rank=r).cache_bytes_per_token() for r in (1, 8, 32, 64)]
    assert by_rank == sorted(by_rank) and len(set(by_rank)) == 4
    kept = [factorize(model, rank=r).report().rows[0].kept_energy for r in (1, 8, 32, 64)]
    assert kept == sorted(kept) and kept[0] < kept[-1]
    clamped = factorize(model, rank=1000)
    assert clamped.ranks == [64] * 3 and any("lossless rank" in n for n in clamped.report().notes)
    assert lossless.cache_layout() == [("latent", (3, 1, "b", "t", 64), torch.float32),
                                       ("k_rot", (3, 1, "b", "t", 4, 4), torch.float32)]
    assert lossless.cache_bytes(2, 10) == 2 * 10 * lossless.cache_bytes_per_token()
    half = factorize(model, budget=0.5)
    assert half.cache_bytes_per_token() <= 0.5 * half.mha_cache_bytes_per_token()
    assert half.cache_bytes_per_token() > 0.5 * half.mha_cache_bytes_per_token() - 3 * 4  # the budget is used
    layout = half.cache_layout()
    assert len(set(half.ranks)) > 1  # the budget spreads ranks unevenly (seeded model): one latent per layer
    assert [name for name, _, _ in layout] == ["latent_0", "latent_1", "latent_2", "k_rot"]
    assert half.cache_bytes(3, 7) == 3 * 7 * half.cache_bytes_per_token()
    for k, v in model.state_dict().items():  # the model was only read
        assert torch.equal(v, before[k])


def test_factorize_with_calibration_tokens():
    """Token ids give the loss objective (two-sided SVD, v refit, absolute energies); objective="inputs"
    the input-only whitened SVD; refit_values=False the SVD's own v ups; hooks are all removed."""
    model = tiny_gpt_neox(hidden_size=32, num_attention_heads=2, num_hidden_layers=2)
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))

    def hooks():
        return [(dict(l.attention._forward_pre_hooks), dict(l.attention.query_key_value._forward_hooks),
                 dict(l.attention.query_key_value._forward_pre_hooks)) for l in model.gpt_neox.layers]

    before = hooks()
    f = factorize(model, rank=8, calibration=ids)
    assert [l.metric for l in f.layers] == ["fisher"] * 2
    notes = " | ".join(f.report().notes)
    assert "calibrated on 60 tokens" in notes and "K-FAC" in notes and "refit" in notes
    assert hooks() == before
    inputs = factorize(model, rank=8, calibration=ids, objective="inputs")
    assert [l.metric for l in inputs.layers] == ["whitened"] * 2 and "refit" not in " ".join(inputs.report().notes)
    no_refit = factorize(model, rank=8, calibration=ids, refit_values=False)
    assert "refit" not in " ".join(no_refit.report().notes)
    assert torch.equal(no_refit.layers[0].down, f.layers[0].down) and torch.equal(no_refit.layers[0].k_up, f.layers[0].k_up)
    assert not torch.allclose(no_refit.layers[0].v_up, f.layers[0].v_up)
    budget = factorize(model, budget=0.4, calibration=ids)
    assert "ranks by absolute" in " ".join(budget.report().notes)
    assert "ranks by relative" in " ".join(factorize(model, budget=0.4, calibration=ids, objective="inputs").report().notes)
    # lossless ignores calibration (full rank either way) and says so
    assert any("ignored" in n for n in factorize(model, calibration=ids).report().notes)


def test_objective_resolution():
    full = Calibration((torch.eye(2),), 5, (torch.eye(3),), None)
    inputs_only = full.inputs_only()
    assert resolve_objective(None, None) is None and resolve_objective(full, None) == "loss"
    assert resolve_objective(inputs_only, None) == "inputs" and resolve_objective(full, "inputs") == "inputs"
    with pytest.raises(LatentKVError, match="needs the loss gradients"):
        resolve_objective(inputs_only, "loss")
    with pytest.raises(LatentKVError, match="objective must be"):
        resolve_objective(full, "perplexity")
    assert default_energy("loss", None) == "absolute" and default_energy("inputs", None) == "relative"
    assert default_energy(None, None) == "relative" and default_energy("loss", "relative") == "relative"


def test_factorize_rejects_bad_arguments():
    model = tiny_gpt_neox()
    for kwargs, msg in [(dict(rank=0), "rank must be"), (dict(rank="half"), "rank must be"),
                        (dict(rank=True), "rank must be"), (dict(rank=4, budget=0.5), "either rank"),
                        (dict(calibration="text"), "calibration must be"),
                        (dict(calibration=[torch.randn(4, 64)]), "needs 2 of"),
                        (dict(rank=4, objective="ppl"), "objective must be"), (dict(rank=4, energy="x"), "energy must be"),
                        (dict(rank=4, calibration=[torch.randn(4, 64)] * 2, objective="loss"), "needs the loss"),
                        (dict(rank=4, calibration=Calibration((torch.eye(64),) * 2, 4, (torch.eye(5),) * 2)),
                         "gradient statistics do not fit")]:
        with pytest.raises(LatentKVError, match=msg):
            factorize(model, **kwargs)
    with pytest.raises(LatentKVError, match="HF GPTNeoX"):
        factorize(torch.nn.Linear(2, 2))
