"""``generate`` and ``cache_bytes`` for an :class:`~fxopt.OptimizedModule`.

Per optimized module one :class:`Runtime` (kept in a weak map, so nothing is added to the module
or to the user's model) builds, on first use per shape:

* a **prefill graph** per (batch, prompt length, cache length, padded?) and a **decode-step
  graph** per (batch, cache length), each the family's wrapper (:mod:`.neox`, :mod:`.mamba`)
  optimized by ``fxopt.optimize`` with the module's own pass list (after :class:`RecordCacheSpec`
  and the family's lowering passes), so length and layer templates and every pass apply. Graphs
  are built from fake example inputs: nothing is allocated or run to build them;
* the **cache** for (batch, cache length), allocated from the rewritten decode graph's
  :class:`~fxopt.runtime.cache_spec.CacheSpec` (a pass may change it) and reused across calls;
* on CUDA, the decode step replayed from a CUDA graph per (batch, cache length) through
  :class:`~fxopt.runtime.cuda_graphs.GraphReplay` (the cache is a static argument; the step's
  logits are consumed before the next replay, so it runs with aliased outputs).

Buckets: the batch is used as given; the cache length is :func:`cache_length` of the prompt
length + ``max_new_tokens``: a power of two up to :data:`FINE_BUCKETS_FROM`, then the next of
eight steps per octave, so prompts of similar length share decode graphs and caches. At most
:data:`MAX_CACHES` caches stay allocated.

Generation follows HF's ``generate`` token for token (greedy), with its eos / pad semantics: a
row that produced an eos token gets ``pad_token_id`` from then on, and generation stops when every
row has finished or after ``max_new_tokens``; without an ``attention_mask``, prompt positions
holding the pad token are masked when the pad token is not an eos token, as HF infers its mask
(:func:`inferred_attention_mask`). Nothing is read back to the host per token except
the eos check, which is batched (every :data:`EOS_CHECK_EVERY` tokens; the output is trimmed to
where HF would have stopped). With a ``streamer`` (HF's ``BaseStreamer``: ``put`` then ``end``)
every token is read back as it is produced, as HF does.

Soundness: before each call the runtime's :class:`~fxopt.runtime.guards.ModelGuard` checks that
the model's parameters and buffers (identity, dtype, device, storage), its modules and their
train/eval flags are those the graphs were built for; otherwise every graph and cache is dropped
and rebuilt (noted in :func:`report`). A model with forward hooks is refused (the graphs would
not run them).

What the runtime relies on from the OptimizedModule: ``.model`` (the user's model) and its pass
list, read from ``pass_specs`` if it has one, else from the private ``_pass_specs`` (None: the
library defaults).
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..errors import FxoptError
from . import sampling
from .cache_spec import CacheSpec, CacheSpecError, RecordCacheSpec, cache_spec_of
from .cuda_graphs import GraphReplay
from .family import Family, family_of
from .guards import ModelGuard, hooks_of
from .sampling import UNSET

log = logging.getLogger("fxopt")

MIN_CACHE_LENGTH = 64
MAX_CACHES = 2
EOS_CHECK_EVERY = 8

# Graph building captures with torch.export, whose tracing state is process-global: two runtimes
# building at once (two threads, two optimized modules) must not interleave.
_BUILD_LOCK = threading.Lock()


class GenerateError(FxoptError):
    """Bad arguments to ``generate`` / ``cache_bytes``."""


# The decode step attends over the whole cache every token (SDPA with a mask over its length), so
# at long contexts the bucket sets the attention's bytes: power-of-two buckets read twice the K/V
# at a context just past a power of two (H200, GPTNeoX 2.8B fp16, b64 context 2049: 23.5 ms per
# token against 14.2 for HF's exactly sized static cache). From here on the buckets are eight per
# octave (at most 12.5 % past the need), trading a few more decode graphs for the bytes.
FINE_BUCKETS_FROM = 1024


def cache_length(total: int) -> int:
    """The cache-length bucket for ``total`` = prompt + new tokens (module docstring)."""
    t = MIN_CACHE_LENGTH
    while t < total:
        t *= 2
    if t <= FINE_BUCKETS_FROM:
        return t
    step = t // 16  # t / 2 is the octave's start: eight steps of t / 16 across it
    return -(-total // step) * step


@dataclass
class _Decode:
    gm: torch.fx.GraphModule
    spec: CacheSpec
    report: Any


@dataclass
class _Cache:
    tensors: tuple
    spec: CacheSpec


@dataclass
class RuntimeStats:
    built: list = field(default_factory=list)   # (kind, key, seconds)
    notes: list = field(default_factory=list)


def _pass_specs(opt) -> Optional[list]:
    specs = getattr(opt, "pass_specs", None)
    if specs is None:
        specs = getattr(opt, "_pass_specs", None)
    return specs  # as given: resolve_passes reads a name, a pass, a rule or a list


class Runtime:
    """Generation graphs, caches and CUDA-graph replay for one OptimizedModule."""

    def __init__(self, opt):
        model = getattr(opt, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise GenerateError(f"generate needs an fxopt.OptimizedModule, got {type(opt).__name__}")
        self.model = model
        # The generation graphs are optimized like the user's module, by its own class (no import
        # of fxopt.optimize here: that module's OptimizedModule.generate calls into this one).
        self._optimize = type(opt)
        self.family: Family = family_of(model)
        self.passes = _pass_specs(opt)
        self.stats = RuntimeStats()
        self.lock = threading.RLock()
        self.cuda_graphs = True  # replay the decode step from CUDA graphs (on CUDA); False: call it directly
        self._reset()

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        self.guard = ModelGuard(self.model)
        self.family = family_of(self.model)  # fresh wrappers: the model's modules may have been replaced
        self._prefill: "OrderedDict[tuple, torch.fx.GraphModule]" = OrderedDict()
        self._decode: dict[tuple, _Decode] = {}
        self._caches: "OrderedDict[tuple, _Cache]" = OrderedDict()
        # No per-replay check: the guard runs once per generate call (_revalidate), and a model
        # that changed gets a fresh Runtime state, this GraphReplay included.
        self._replay = GraphReplay(self._decode_call, static_args=(1,), alias_outputs=True,
                                   name="decode step", max_graphs=4 * MAX_CACHES)

    def _revalidate(self) -> None:
        hooks = hooks_of(self.model)
        if hooks:
            raise GenerateError(
                f"the model has forward hooks ({', '.join(hooks[:3])}): fxopt's generation graphs would not run them. "
                "Remove the hooks or call model.generate.")
        why = self.guard.check()
        if why is not None:
            self.stats.notes.append(f"graphs and caches rebuilt: {why}")
            self._reset()

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ graphs
    def _user_passes(self) -> list:
        from ..registry import resolve_passes

        return resolve_passes(self.passes)

    def _build(self, kind: str, key: tuple, wrapper: torch.nn.Module, args: tuple, lowering: list):
        t0 = time.perf_counter()
        passes = [RecordCacheSpec(self.family.declared), *lowering, *self._user_passes()]
        with _BUILD_LOCK, torch.no_grad():
            opt = self._optimize(wrapper, args, passes=passes, cuda_graphs=False)  # it replays its own decode step
        gm = opt.graph_module
        cache_spec_of(gm)  # a pass that dropped the meta is named now, not at the first call
        self.stats.built.append((kind, key, time.perf_counter() - t0))
        for note in opt.report().notes:
            self.stats.notes.append(f"{kind} {key}: {note}")
        return gm, opt.report()

    def _fake_mode(self):
        from torch._subclasses.fake_tensor import FakeTensorMode

        return FakeTensorMode(allow_non_fake_inputs=True)

    def _length_key(self, t: int) -> int:
        return t if self.family.length_dependent else 1

    def decode_graph(self, b: int, t: int) -> _Decode:
        t = self._length_key(t)
        key = (b, t)
        if key not in self._decode:
            mode = self._fake_mode()
            args = (*self.family.decode_example(b, t, self.device, mode),
                    self.family.declared.fake(b, t, self.device, mode))
            gm, report = self._build("decode", key, self.family.decode, args, self.family.decode_passes())
            self._decode[key] = _Decode(gm, cache_spec_of(gm), report)
        return self._decode[key]

    def prefill_graph(self, b: int, length: int, t: int, masked: bool) -> torch.fx.GraphModule:
        t = self._length_key(t)
        key = (b, length, t, masked)
        if key not in self._prefill:
            mode = self._fake_mode()
            args = (*self.family.prefill_example(b, length, masked, self.device, mode),
                    self.family.declared.fake(b, t, self.device, mode))
            self._prefill[key], _ = self._build("prefill", key, self.family.prefill, args, [])
            while len(self._prefill) > 16:
                self._prefill.popitem(last=False)
        self._prefill.move_to_end(key)
        return self._prefill[key]

    def cache(self, b: int, t: int, spec: CacheSpec) -> tuple:
        t = self._length_key(t)
        key = (b, t)
        entry = self._caches.get(key)
        if entry is None or entry.spec != spec:
            while len(self._caches) >= MAX_CACHES:
                self._caches.popitem(last=False)
                self._replay.invalidate()  # graphs captured on an evicted cache's addresses
            entry = self._caches[key] = _Cache(spec.allocate(b, t, self.device), spec)
        else:
            for x in entry.tensors:
                x.zero_()  # a masked slot must not hold a stale inf/nan (0 * nan is nan)
        self._caches.move_to_end(key)
        return entry.tensors

    def _decode_call(self, key, cache, *inputs):
        logits, _ = self._decode[key].gm(*inputs, cache)
        return logits

    # ------------------------------------------------------------------ API
    def cache_bytes(self, batch_size: int, max_length: int) -> int:
        b, total = _positive("batch_size", batch_size), _positive("max_length", max_length)
        with self.lock, torch.no_grad():
            self._revalidate()
            t = cache_length(total)
            return self.decode_graph(b, t).spec.nbytes(b, t)

    def generate(self, input_ids, attention_mask=None, max_new_tokens=20, do_sample=False, temperature=UNSET,
                 top_k=UNSET, top_p=UNSET, eos_token_id=UNSET, pad_token_id=UNSET, streamer=None, generator=None):
        ids, mask = self._check_inputs(input_ids, attention_mask)
        steps = _positive("max_new_tokens", max_new_tokens)
        if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != ids.device.type):
            raise GenerateError(f"generator must be a torch.Generator on the model's device ({ids.device}), got "
                                f"{getattr(generator, 'device', type(generator).__name__)}")
        params = sampling.resolve(self.model, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                  eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        if attention_mask is None:
            mask = inferred_attention_mask(ids, params)
        with self.lock, torch.no_grad():
            self._revalidate()
            return self._generate(ids, mask, steps, params, streamer, generator)

    def _check_inputs(self, input_ids, attention_mask):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
            raise GenerateError(f"input_ids must be a 2-D integer tensor (batch, length), got "
                                f"{type(input_ids).__name__} {tuple(getattr(input_ids, 'shape', ()))}")
        if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise GenerateError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
        ids = input_ids.to(self.device, torch.long)
        mask = None
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise GenerateError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}")
            mask = attention_mask.to(self.device)
            if bool(mask.all()):
                mask = None  # HF drops an all-ones mask too (and then attends causally)
            elif bool((mask[:, -1] == 0).any()):
                raise GenerateError("attention_mask has padding on the right; decoder-only generation needs left padding")
            else:
                mask = mask.long()
        return ids, mask

    def _generate(self, ids, mask, steps, params: sampling.GenerationParams, streamer, generator):
        fam = self.family
        b, length = ids.shape
        t = cache_length(length + steps)
        dec = self.decode_graph(b, t)
        pre = self.prefill_graph(b, length, t, mask is not None)
        pre_spec = cache_spec_of(pre)
        if pre_spec != dec.spec:
            raise CacheSpecError(
                f"the passes left the prefill and decode graphs with different caches ({pre_spec.describe()} vs "
                f"{dec.spec.describe()}): a pass that changes the cache must change it in both graphs")
        cache = self.cache(b, t, dec.spec)
        logits, _ = pre(ids, mask, cache)
        state = fam.start(ids, mask, t)

        eos = torch.tensor(params.eos_token_ids, dtype=torch.long, device=ids.device) if params.eos_token_ids else None
        pad = params.pad_token_id
        out = torch.empty(b, steps, dtype=torch.long, device=ids.device)
        unfinished = torch.ones(b, dtype=torch.bool, device=ids.device)
        ran = torch.zeros((), dtype=torch.long, device=ids.device)  # steps HF would have run
        if streamer is not None:
            streamer.put(ids.cpu())
        done = 0
        for step in range(steps):
            tokens = sampling.next_tokens(logits, params, generator)
            if eos is not None:
                ran += unfinished.any()
                tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
                unfinished &= ~torch.isin(tokens, eos)
            out[:, step] = tokens
            done = step + 1
            if streamer is not None:
                streamer.put(tokens.cpu())
            if eos is not None and (streamer is not None or done % EOS_CHECK_EVERY == 0) and not bool(unfinished.any()):
                break
            if done == steps:
                break
            step_fn = self._replay if self.cuda_graphs else self._decode_call
            logits = step_fn((b, self._length_key(t)), cache, *state.inputs(tokens))
            state.advance()
        n = int(ran.item()) if eos is not None else done
        if streamer is not None:
            streamer.end()
        return torch.cat([ids, out[:, :n]], dim=1)


def inferred_attention_mask(ids: torch.Tensor, params: sampling.GenerationParams) -> Optional[torch.Tensor]:
    """The mask HF's ``generate`` makes up when it is given none
    (``GenerationMixin._prepare_attention_mask_for_generation``): ``ids != pad_token_id`` when the
    (resolved) pad token occurs in ``ids`` and is not an eos token; None (attend to everything)
    otherwise. Without it, a prompt holding the pad token (a byte-level model whose pad id is
    also its document separator) gets other tokens than HF's: HF masks those positions and
    counts positions without them.

    Raises :class:`GenerateError` when that mask would hide the last prompt token of a row (HF
    then generates after a masked position, with a right-padding warning; the runtime supports
    left padding and holes only): pass ``attention_mask`` explicitly."""
    pad = params.pad_token_id
    if pad is None or pad in params.eos_token_ids:
        return None  # HF: nothing to infer from (pad unset, or pad and eos alike)
    keep = ids.ne(pad)
    if bool(keep.all()):
        return None
    if bool((~keep[:, -1]).any()):
        raise GenerateError(
            f"no attention_mask was given and the prompt ends with the pad token {pad}: HF's generate would mask "
            f"every pad token (attention_mask = input_ids != {pad}) and so the last prompt position, which fxopt's "
            "runtime does not support (left padding only). Pass attention_mask explicitly (torch.ones_like(input_ids) "
            f"if {pad} is a real token here), or another pad_token_id")
    log.info("generate: no attention_mask given and the pad token %d occurs in input_ids: those positions are masked, "
             "as HF's generate does (pass attention_mask=torch.ones_like(input_ids) if %d is a real token)", pad, pad)
    return keep.long()


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GenerateError(f"{name} must be a positive int, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------- module API

_RUNTIMES: "weakref.WeakKeyDictionary[Any, Runtime]" = weakref.WeakKeyDictionary()
_RUNTIMES_LOCK = threading.Lock()


def runtime_for(opt) -> Runtime:
    with _RUNTIMES_LOCK:
        rt = _RUNTIMES.get(opt)
        if rt is None or rt.model is not getattr(opt, "model", None):
            rt = _RUNTIMES[opt] = Runtime(opt)
        return rt


def generate(opt, input_ids, attention_mask=None, max_new_tokens: int = 20, do_sample: bool = False,
             temperature=UNSET, top_k=UNSET, top_p=UNSET, eos_token_id=UNSET, pad_token_id=UNSET, streamer=None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` (b, L) with the optimized
    module ``opt``; returns ``(b, L + n)`` prompt + new tokens, as HF's ``generate`` does.

    ``attention_mask``: 1 for real tokens, 0 for (left) padding. ``do_sample=False``: greedy
    (HF's tokens, token for token); ``True``: samples with ``temperature``, ``top_k``, ``top_p``
    from ``generator``. ``eos_token_id`` (int or list), ``pad_token_id``. Settings not given
    (:data:`~fxopt.runtime.sampling.UNSET`) come from the model's ``generation_config``, else
    HF's defaults (1.0 / 50 / 1.0); an explicit None switches a setting off, as in HF (pad falls
    back to the first eos). ``streamer``: HF's ``BaseStreamer``.
    Raises :class:`~fxopt.runtime.family.UnsupportedModelError` for a model family the runtime
    has no graphs for."""
    return runtime_for(opt).generate(input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                                     eos_token_id, pad_token_id, streamer, generator)


def cache_bytes(opt, batch_size: int, max_length: int) -> int:
    """Bytes of every cache tensor ``generate`` allocates for ``batch_size`` rows of at most
    ``max_length`` = prompt + new tokens (the cache is allocated at :func:`cache_length` of it,
    as the rewritten decode graph's CacheSpec describes it)."""
    return runtime_for(opt).cache_bytes(batch_size, max_length)


def report(opt) -> str:
    """What the runtime built for ``opt`` (graphs and their build times, notes, cache specs)."""
    rt = runtime_for(opt)
    lines = [f"fxopt runtime for {type(rt.model).__name__} ({rt.family.name})"]
    for kind, key, seconds in rt.stats.built:
        lines.append(f"  built {kind} graph {key} in {seconds:.2f} s")
    for (b, t), d in rt._decode.items():
        lines.append(f"  cache (b={b}, t={t}): {d.spec.describe(b, t)}" + "".join(f" [{n}]" for n in d.spec.notes))
    lines += [f"  note: {n}" for n in rt.stats.notes + rt._replay.notes]
    return "\n".join(lines)
