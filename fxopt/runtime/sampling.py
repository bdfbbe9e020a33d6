"""Choosing the next token on the device, with HF ``generate``'s semantics.

Parameters resolve as HF resolves them: the caller's argument, else (argument not given:
:data:`UNSET`) the model's ``generation_config``, else HF's global default (``temperature=1.0``,
``top_k=50``, ``top_p=1.0``). As in HF, an explicit ``None`` switches a setting off
(``eos_token_id=None``: no eos even if the config has one; ``top_k=None``: no top-k). Sampling applies HF's warpers in HF's order (temperature, top-k, top-p with
``min_tokens_to_keep=1``) and draws with ``torch.multinomial`` from the caller's
``torch.Generator``, so a seeded generator reproduces the tokens. Nothing here reads a value
back to the host.

Settings of the model's generation config that would change HF's tokens and that this runtime
does not implement (repetition penalties, n-gram blocking, forced or suppressed tokens, beams,
min-p / typical / epsilon / eta sampling, ...) are refused with :class:`GenerationConfigError`
instead of being silently ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import FxoptError

# HF's GenerationConfig._get_default_generation_params, for the fields used here
HF_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}

# generation_config fields whose non-default values change HF's output; value = the neutral value
_UNSUPPORTED = {
    "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None, "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None, "force_words_ids": None, "min_length": 0, "min_new_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "sequence_bias": None, "exponential_decay_length_penalty": None,
    "renormalize_logits": False, "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "top_h": None, "stop_strings": None, "max_time": None, "guidance_scale": None, "watermarking_config": None,
    "remove_invalid_values": False, "num_return_sequences": 1, "dola_layers": None,
}


class _Unset:
    """The default of generate's optional settings: "not given, take the generation config's"."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __reduce__(self):
        return (_Unset, ())


UNSET = _Unset()


class GenerationConfigError(FxoptError):
    """A generation setting fxopt's ``generate`` does not implement (or an invalid value)."""


@dataclass(frozen=True)
class GenerationParams:
    do_sample: bool
    temperature: float
    top_k: Optional[int]
    top_p: float
    eos_token_ids: tuple[int, ...]      # empty: no eos
    pad_token_id: Optional[int]


def _config_value(cfg, name):
    return getattr(cfg, name, None) if cfg is not None else None


def _token_list(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, int):
        return (int(value),)
    if isinstance(value, Sequence) and all(isinstance(v, int) for v in value):
        return tuple(int(v) for v in value)
    raise GenerationConfigError(f"eos_token_id must be an int or a list of ints, got {value!r}")


def resolve(model, *, do_sample: bool, temperature, top_k, top_p, eos_token_id, pad_token_id) -> GenerationParams:
    cfg = getattr(model, "generation_config", None)
    for name, neutral in _UNSUPPORTED.items():
        value = _config_value(cfg, name)
        if value is not None and value != neutral:
            raise GenerationConfigError(
                f"the model's generation_config sets {name}={value!r}, which fxopt's generate does not implement "
                "(it does greedy and temperature / top-k / top-p sampling): HF's tokens would differ. Reset it "
                f"(model.generation_config.{name} = {neutral!r}) or call model.generate for this model.")

    def pick(user, name):
        if user is not UNSET:
            return user
        value = _config_value(cfg, name)
        return HF_DEFAULTS.get(name) if value is None else value

    temperature = pick(temperature, "temperature")
    temperature = 1.0 if temperature is None else float(temperature)
    top_k = pick(top_k, "top_k")
    top_p = pick(top_p, "top_p")
    top_p = 1.0 if top_p is None else float(top_p)
    if do_sample:
        if not temperature > 0.0:
            raise GenerationConfigError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
            raise GenerationConfigError(f"top_k must be a non-negative int, got {top_k!r}")
        if not 0.0 <= top_p <= 1.0:
            raise GenerationConfigError(f"top_p must be in [0, 1], got {top_p}")
    eos = _token_list(pick(eos_token_id, "eos_token_id"))
    pad = pick(pad_token_id, "pad_token_id")
    if pad is None and eos:
        pad = eos[0]  # HF: "Setting pad_token_id to eos_token_id"
    if pad is not None and (not isinstance(pad, int) or pad < 0):
        raise GenerationConfigError(f"pad_token_id must be a non-negative int, got {pad!r}")
    return GenerationParams(bool(do_sample), temperature, top_k if top_k else None, top_p, eos,
                            None if pad is None else int(pad))


def warp(scores: torch.Tensor, p: GenerationParams) -> torch.Tensor:
    """HF's TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper (min_tokens_to_keep=1)."""
    if p.temperature != 1.0:
        scores = scores / p.temperature
    if p.top_k is not None:
        k = min(p.top_k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if p.top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - p.top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), -float("inf"))
    return scores


def next_tokens(logits: torch.Tensor, p: GenerationParams, generator: Optional[torch.Generator]) -> torch.Tensor:
    """(b, V) fp32 logits -> (b,) int64 tokens, on the logits' device."""
    if not p.do_sample:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(warp(logits, p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
