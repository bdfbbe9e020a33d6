"""Model families the runtime knows, behind one small interface.

A :class:`Family` says which wrappers capture its prefill and decode graphs
(:mod:`fxopt.runtime.neox`, :mod:`fxopt.runtime.mamba`), what cache they declare, what the
wrappers take besides the cache (example inputs for capture, real inputs per call), and
which runtime lowering passes run before the user's passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import FxoptError
from ..pass_base import Pass
from . import mamba, neox
from .cache_spec import CacheSpec


class UnsupportedModelError(FxoptError):
    """``generate`` was asked to run a model family it has no generation graphs for."""


class DecodeState:
    """The decode step's inputs besides the new tokens and the cache, advanced on the device."""

    def inputs(self, tokens: torch.Tensor) -> tuple:
        raise NotImplementedError

    def advance(self) -> None:
        pass


class _NeoXState(DecodeState):
    def __init__(self, ids: torch.Tensor, mask: Optional[torch.Tensor], length: int):
        b, prompt = ids.shape
        dev = ids.device
        if mask is None:
            self.position = torch.full((b, 1), prompt, dtype=torch.long, device=dev)
            prompt_mask = torch.ones(b, prompt, dtype=torch.bool, device=dev)
        else:
            # HF: the next position is the last prompt position + 1 (pads do not count)
            self.position = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -1:] + 1
            prompt_mask = mask.bool()
        self.slot = torch.tensor([prompt], dtype=torch.long, device=dev)
        self.key_mask = torch.cat([prompt_mask, torch.ones(b, length - prompt, dtype=torch.bool, device=dev)], 1)

    def inputs(self, tokens):
        return (tokens[:, None], self.position, self.slot, self.key_mask)

    def advance(self):
        self.position += 1
        self.slot += 1


class _MambaState(DecodeState):
    def inputs(self, tokens):
        return (tokens[:, None],)


@dataclass
class Family:
    name: str
    prefill: nn.Module
    decode: nn.Module
    declared: CacheSpec
    decode_passes: Callable[[], list[Pass]]        # runtime lowering, before the user's passes
    _start: Callable[[torch.Tensor, Optional[torch.Tensor], int], DecodeState]
    _decode_example: Callable[[int, int, torch.device, object], tuple]
    # whether the graphs depend on the cache length (a K/V cache does; Mamba's states do not, so
    # its graphs and caches are shared by every length bucket)
    length_dependent: bool = True

    def prefill_example(self, b: int, length: int, masked: bool, device, mode) -> tuple:
        with mode:
            ids = torch.zeros(b, length, dtype=torch.long, device=device)
            mask = torch.ones(b, length, dtype=torch.long, device=device) if masked else None
        return ids, mask

    def decode_example(self, b: int, length: int, device, mode) -> tuple:
        return self._decode_example(b, length, device, mode)

    def start(self, ids: torch.Tensor, mask: Optional[torch.Tensor], length: int) -> DecodeState:
        return self._start(ids, mask, length)


def _neox_decode_example(b, length, device, mode):
    with mode:
        return (torch.zeros(b, 1, dtype=torch.long, device=device), torch.zeros(b, 1, dtype=torch.long, device=device),
                torch.zeros(1, dtype=torch.long, device=device), torch.ones(b, length, dtype=torch.bool, device=device))


def _mamba_decode_example(b, length, device, mode):
    with mode:
        return (torch.zeros(b, 1, dtype=torch.long, device=device),)


def _mamba_decode_passes() -> list[Pass]:
    from ..passes.ssm_update import SSMUpdatePass

    return [SSMUpdatePass()]


def family_of(model: nn.Module) -> Family:
    if neox.is_gpt_neox(model):
        return Family("gpt_neox", neox.NeoXPrefill(model), neox.NeoXDecode(model), neox.declared_spec(model),
                      lambda: [], _NeoXState, _neox_decode_example)
    if mamba.is_mamba(model):
        return Family("mamba", mamba.MambaPrefill(model), mamba.MambaDecode(model), mamba.declared_spec(model),
                      _mamba_decode_passes, lambda ids, mask, length: _MambaState(), _mamba_decode_example,
                      length_dependent=False)
    raise UnsupportedModelError(
        f"fxopt's generate has generation graphs for HF GPTNeoXForCausalLM and MambaForCausalLM, not for "
        f"{type(model).__module__}.{type(model).__qualname__}. Call the model's own generate (or opt(...) for "
        "single forwards), or ask for the family to be added to fxopt.runtime.")
