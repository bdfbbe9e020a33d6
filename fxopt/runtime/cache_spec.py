"""What a generation graph's cache is: :class:`CacheSpec`, carried in the graph module's meta.

The runtime (:mod:`fxopt.runtime.engine`) never decides what the cache holds. A family's
step wrapper (:mod:`fxopt.runtime.neox`, :mod:`fxopt.runtime.mamba`) *declares* it, the
:class:`RecordCacheSpec` pass, which runs first on every captured prefill and decode graph,
writes that declaration into ``graph_module.meta[CACHE_SPEC_KEY]``, and later passes may
rewrite both the graph and the spec (issue 13's ``latent_kv`` replaces K/V by a low-rank
latent plus the rotary part of K). The runtime then allocates exactly what the *rewritten*
graph's spec lists, and ``cache_bytes`` counts those bytes.

The calling convention every generation graph keeps (and a pass that changes the cache must
keep): the cache is the graph's **last positional argument, a tuple of tensors in spec
order**; the graph reads and writes those tensors in place (the cache is an explicit input
whose storage is the output: in-place writes survive ``torch.export`` as ``index_copy_`` /
``copy_`` nodes, so no copy of the whole cache is made per step). :func:`replace_cache_inputs`
does the graph surgery for a pass that changes the number, shapes or dtypes of the entries.

Shapes are symbolic in two sizes the runtime chooses per call: ``"b"`` (batch) and ``"t"``
(the cache length, a bucket >= prompt + new tokens); every other size is an int.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
import torch.fx
from torch.utils import _pytree as pytree

from ..errors import FxoptError
from ..pass_base import Pass, PassResult

CACHE_SPEC_KEY = "fxopt_cache_spec"
SYMBOLS = ("b", "t")

Dim = Union[int, str]


class CacheSpecError(FxoptError):
    """A cache description is malformed or disagrees with the graph it describes."""


@dataclass(frozen=True)
class CacheEntry:
    """One cache tensor: ``name`` (what it holds, for reports), ``shape`` (ints and the symbols
    ``"b"`` / ``"t"``), ``dtype``, and ``per_token_bytes``-style bookkeeping derived from those.
    Entries are allocated zero-filled (a masked attention slot must hold a finite value)."""

    name: str
    shape: tuple[Dim, ...]
    dtype: torch.dtype

    def __post_init__(self):
        for d in self.shape:
            if isinstance(d, bool) or not (isinstance(d, int) and d >= 0 or d in SYMBOLS):
                raise CacheSpecError(f"cache entry {self.name!r}: dimension {d!r} is neither an int >= 0 nor one of {SYMBOLS}")
        if not isinstance(self.dtype, torch.dtype):
            raise CacheSpecError(f"cache entry {self.name!r}: dtype {self.dtype!r} is not a torch.dtype")

    def concrete_shape(self, batch_size: int, length: int) -> tuple[int, ...]:
        env = {"b": int(batch_size), "t": int(length)}
        return tuple(env[d] if isinstance(d, str) else d for d in self.shape)

    def numel(self, batch_size: int, length: int) -> int:
        n = 1
        for d in self.concrete_shape(batch_size, length):
            n *= d
        return n

    def nbytes(self, batch_size: int, length: int) -> int:
        return self.numel(batch_size, length) * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class CacheSpec:
    """The cache a generation graph reads and writes: its entries, in argument order."""

    entries: tuple[CacheEntry, ...]
    notes: tuple[str, ...] = field(default=(), compare=False)  # who changed it and why (reports)

    def __post_init__(self):
        names = [e.name for e in self.entries]
        if len(set(names)) != len(names):
            raise CacheSpecError(f"cache entry names must be unique, got {names}")

    def shapes(self, batch_size: int, length: int) -> list[tuple[int, ...]]:
        return [e.concrete_shape(batch_size, length) for e in self.entries]

    def nbytes(self, batch_size: int, length: int) -> int:
        return sum(e.nbytes(batch_size, length) for e in self.entries)

    def allocate(self, batch_size: int, length: int, device) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros(e.concrete_shape(batch_size, length), dtype=e.dtype, device=device)
                     for e in self.entries)

    def fake(self, batch_size: int, length: int, device, mode) -> tuple[torch.Tensor, ...]:
        """Fake tensors of the right shapes (for capture: nothing is allocated)."""
        with mode:
            return tuple(torch.empty(e.concrete_shape(batch_size, length), dtype=e.dtype, device=device)
                         for e in self.entries)

    def check(self, cache: Sequence[torch.Tensor], batch_size: int, length: int) -> None:
        if len(cache) != len(self.entries):
            raise CacheSpecError(f"the cache has {len(cache)} tensors, the spec lists {len(self.entries)}")
        for t, e in zip(cache, self.entries):
            want = e.concrete_shape(batch_size, length)
            if tuple(t.shape) != want or t.dtype != e.dtype:
                raise CacheSpecError(f"cache entry {e.name!r} is {tuple(t.shape)} {t.dtype}, the spec says {want} {e.dtype}")

    def with_note(self, note: str) -> "CacheSpec":
        return CacheSpec(self.entries, self.notes + (note,))

    def describe(self, batch_size: int | None = None, length: int | None = None) -> str:
        parts = []
        for e in self.entries:
            dims = "x".join(str(d) for d in e.shape)
            size = f" = {e.nbytes(batch_size, length):,} B" if batch_size is not None and length is not None else ""
            parts.append(f"{e.name}: ({dims}) {str(e.dtype).replace('torch.', '')}{size}")
        return "; ".join(parts)


def cache_spec_of(gm: torch.fx.GraphModule) -> CacheSpec:
    spec = gm.meta.get(CACHE_SPEC_KEY)
    if not isinstance(spec, CacheSpec):
        raise CacheSpecError(
            f"the generation graph has no {CACHE_SPEC_KEY!r} in its meta (a pass dropped the graph module's meta, "
            "or replaced the module without carrying it over): passes must keep gm.meta")
    return spec


def set_cache_spec(gm: torch.fx.GraphModule, spec: CacheSpec) -> None:
    gm.meta[CACHE_SPEC_KEY] = spec


class RecordCacheSpec(Pass):
    """Writes the step wrapper's declared :class:`CacheSpec` into the captured graph's meta.

    The runtime puts it first in the pass list of every generation graph, so every later pass
    sees (and may change) the spec. It never overwrites a spec already present: the pass
    manager may run passes again, and a later pass's change must stand. It changes no node."""

    name = "cache_spec"
    fixpoint = False

    def __init__(self, spec: CacheSpec):
        self.spec = spec

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph_module.meta.setdefault(CACHE_SPEC_KEY, self.spec)
        return PassResult(graph_module, False)


# ----------------------------------------------------------------------------- graph surgery

def cache_placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The placeholders of the cache tensors: the leaves of the last positional argument."""
    spec = cache_spec_of(gm)
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    n = len(spec.entries)
    if len(phs) < n:
        raise CacheSpecError(f"the graph has {len(phs)} inputs, fewer than the {n} cache entries its spec lists")
    return phs[len(phs) - n:]


def replace_cache_inputs(gm: torch.fx.GraphModule, new_spec: CacheSpec) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
    """For a pass that changes what the cache holds: new placeholders for ``new_spec``'s entries
    (after the other inputs; the pytree input spec is rebuilt so the graph is called with a tuple
    of ``len(new_spec.entries)`` cache tensors), export's input-shape guard removed (it checks the
    old shapes), and the spec recorded. Returns ``(old_placeholders, new_placeholders)``: the pass
    rewires the users of the old ones and then erases them (``gm.graph.erase_node``).

    The new placeholders' ``meta["val"]`` are fake tensors of the concrete shapes the graph was
    specialised on (the old entries' ``b`` and ``t`` are read off the old placeholders)."""
    old_spec = cache_spec_of(gm)
    old = cache_placeholders(gm)
    b, t = _bound_sizes(old_spec, old)
    graph = gm.graph
    for n in list(graph.nodes):
        if n.op == "call_module" and str(n.target).startswith("_guards_fn"):
            graph.erase_node(n)
    mode = _fake_mode(old)
    new: list[torch.fx.Node] = []
    anchor = old[-1]
    for i, e in enumerate(new_spec.entries):
        with graph.inserting_after(anchor):
            ph = graph.placeholder(f"cache_{e.name}_{i}")
        with mode:
            ph.meta["val"] = torch.empty(e.concrete_shape(b, t), dtype=e.dtype, device=old[0].meta["val"].device)
        new.append(ph)
        anchor = ph
    info = getattr(graph._codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        n_old = info.in_spec.num_leaves
        args, kwargs = pytree.tree_unflatten(list(range(n_old)), info.in_spec)
        if not args or not isinstance(args[-1], tuple) or len(args[-1]) != len(old):
            raise CacheSpecError("the graph's last positional argument is not the tuple of its cache tensors")
        args = tuple(args[:-1]) + (tuple(range(len(new))),)
        graph._codegen.pytree_info = info._replace(in_spec=pytree.tree_structure((args, kwargs)))
    set_cache_spec(gm, new_spec)
    return old, new


def _bound_sizes(spec: CacheSpec, phs: list[torch.fx.Node]) -> tuple[int, int]:
    """The concrete ``b`` and ``t`` the graph's cache placeholders were specialised on."""
    env: dict[str, int] = {}
    for e, ph in zip(spec.entries, phs):
        val = ph.meta.get("val")
        if val is None or len(val.shape) != len(e.shape):
            raise CacheSpecError(f"cache input {ph.name} does not match its entry {e.name!r} {e.shape}")
        for d, s in zip(e.shape, val.shape):
            if isinstance(d, str):
                if env.setdefault(d, int(s)) != int(s):
                    raise CacheSpecError(f"cache entries disagree on {d!r}: {env[d]} vs {int(s)}")
            elif d != int(s):
                raise CacheSpecError(f"cache input {ph.name} has size {int(s)} where its entry {e.name!r} says {d}")
    return env.get("b", 1), env.get("t", 1)


def _fake_mode(phs: list[torch.fx.Node]):
    from torch._subclasses.fake_tensor import FakeTensorMode

    for ph in phs:
        mode = getattr(ph.meta.get("val"), "fake_mode", None)
        if mode is not None:
            return mode
    return FakeTensorMode()
