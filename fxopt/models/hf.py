"""Small random-weight HF models and the full-size configs the benchmarks use.

transformers is an optional dependency; importing this module without it raises a
clear error."""
from __future__ import annotations

import torch

from ..errors import FxoptError

try:
    import transformers
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise FxoptError("fxopt.models.hf needs transformers: pip install 'fxopt[hf]'") from exc


def _seeded(build, seed: int):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().eval()


def gpt_neox_config(parallel_residual: bool = True, **overrides) -> "transformers.GPTNeoXConfig":
    cfg = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=512,
        rotary_pct=0.25,
        use_parallel_residual=parallel_residual,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return transformers.GPTNeoXConfig(**cfg)


def tiny_gpt_neox(parallel_residual: bool = True, seed: int = 0, **overrides):
    cfg = gpt_neox_config(parallel_residual, **overrides)
    return _seeded(lambda: transformers.GPTNeoXForCausalLM(cfg), seed)


def gpt_neox_2_8b_config(**overrides):
    """Pythia-2.8B's shape (32 layers, hidden 2560, 32 heads, parallel residual)."""
    shape = dict(vocab_size=50304, hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                 intermediate_size=10240, max_position_embeddings=2048)
    return gpt_neox_config(True, **{**shape, **overrides})


def hf_mamba_config(**overrides) -> "transformers.MambaConfig":
    cfg = dict(vocab_size=128, hidden_size=64, state_size=16, num_hidden_layers=2, expand=2, conv_kernel=4)
    cfg.update(overrides)
    return transformers.MambaConfig(**cfg)


def tiny_hf_mamba(seed: int = 0, **overrides):
    cfg = hf_mamba_config(**overrides)
    return _seeded(lambda: transformers.MambaForCausalLM(cfg), seed)


def mamba_130m_config(**overrides):
    """mamba-130m's shape: 24 layers, d_model 768, d_state 16, expand 2."""
    return hf_mamba_config(**{"vocab_size": 50280, "hidden_size": 768, "num_hidden_layers": 24, **overrides})
