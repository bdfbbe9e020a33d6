"""Latent K/V for GPTNeoX attention (issue 13): factorisation, budgets, calibration, reference math.

* :mod:`.layout` -- where q, k_rot, k_pass, v sit in ``query_key_value`` (heads interleaved);
* :mod:`.factor` -- SVD of ``M = [W_k_pass; W_v]`` (plain, whitened by the inputs, or two-sided by
  the loss gradients and inputs), lossless rank, truncation to a :class:`LatentLayer`, the v refit;
* :mod:`.budget` -- cache bytes per token and the allocation of a cache budget over layers;
* :mod:`.calibration` -- per-layer second moments: inputs, loss gradients, attention-averaged inputs;
* :mod:`.plan` -- :func:`factorize` for a whole HF GPTNeoX model, with its report;
* :mod:`.attention` -- latent attention in plain PyTorch (reconstruct / absorb, per phase);
* :mod:`.model` -- a whole GPTNeoX forward and greedy generation over a latent cache (reference).

The fused decode kernel is :mod:`fxopt.codegen.latent_decode`, its op
``fxopt::latent_decode_attention`` (:mod:`fxopt.ops.latent_attention`).
"""
from .budget import allocate_ranks, latent_bytes_per_token, mha_bytes_per_token
from .calibration import Calibration, attention_weights_of, collect_calibration, stacked_rows
from .factor import (DEFAULT_DAMPING, LatentLayer, LayerSVD, Whitening, layer_svd, refit_value_up, truncate,
                     whitening)
from .layout import AttentionShape, LatentKVError, SplitQKV, attention_shape_of, rotary_dim_for, split_qkv
from .plan import OBJECTIVES, LatentFactorization, LatentReport, factorize

__all__ = [
    "AttentionShape", "Calibration", "DEFAULT_DAMPING", "LatentFactorization", "LatentKVError", "LatentLayer",
    "LatentReport", "LayerSVD", "OBJECTIVES", "SplitQKV", "Whitening", "allocate_ranks", "attention_shape_of",
    "attention_weights_of", "collect_calibration", "factorize", "latent_bytes_per_token", "layer_svd",
    "mha_bytes_per_token", "refit_value_up", "rotary_dim_for", "split_qkv", "stacked_rows", "truncate", "whitening",
]
