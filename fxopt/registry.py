"""Pass registry: library and user passes by name, and what ``optimize(passes=...)`` accepts.

The library passes are a table of names here (imported on first use, so ``import fxopt`` stays
cheap and the pass modules never import the registry back); users add their own with
:func:`register_pass`. A registered entry is a factory, so every ``optimize`` call gets fresh
pass objects.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Union

from .errors import FxoptError, UnknownPassError
from .rewrite.driver import RewritePass
from .rewrite.pass_base import Pass
from .rewrite.rule import RuleBase, RuleSet

PassFactory = Callable[..., Pass]
PassSpec = Union[str, Pass, RuleBase, RuleSet]

# Library passes: name -> "module:factory". The module is imported when the name is first used.
_BUILTINS: dict[str, str] = {
    "scan": "fxopt.passes.scan:ScanPass",
    "addcmul": "fxopt.passes.addcmul:AddcmulPass",
    "residual_add": "fxopt.passes.residual_add:ResidualAddPass",
    "cleanup": "fxopt.passes.cleanup:CleanupPass",
    "fused_regions": "fxopt.passes.fused_regions:FusedRegionsPass",
    "causal_sdpa": "fxopt.passes.causal_attention:CausalSdpaPass",
    "latent_kv": "fxopt.passes.latent_kv:LatentKVPass",  # opt-in (not in DEFAULT_PASSES): it changes the model
}
# What optimize() runs when passes=None, in order. The scan pass goes first so it
# sees loops before anything else rewrites their bodies (it also accepts addcmul
# bodies, so the other order works too). cleanup runs last: the others may leave identity
# casts behind, and it only removes calls that compute nothing.
DEFAULT_PASSES: tuple[str, ...] = ("scan", "addcmul", "residual_add", "cleanup")
# The block-fusion set (issue 14), opt-in until the H200 shows it pays end to end and at decode
# sizes: causal_sdpa and fused_regions go before addcmul and residual_add, which would turn the
# rotary chains and residual adds into ops a region cannot hold (regions keep eager's rounding,
# addcmul's fma does not); those two take what is left.
BLOCK_PASSES: tuple[str, ...] = ("scan", "causal_sdpa", "fused_regions", "addcmul", "residual_add", "cleanup")

_REGISTRY: dict[str, PassFactory] = {}


def register_pass(name: str, factory: PassFactory | None = None, *, replace: bool = False):
    """Register ``factory`` (a Pass subclass or a callable returning a Pass) under ``name``.
    Usable as a decorator::

        @fxopt.register_pass("silu")
        class SiluPass(fxopt.Pass): ...
    """

    def _do(f: PassFactory) -> PassFactory:
        if not callable(f):
            raise FxoptError(f"register_pass({name!r}, ...) needs a Pass subclass or a callable returning a Pass, "
                             f"got {type(f).__name__}")
        known = _REGISTRY.get(name)
        if not replace and ((known is not None and known is not f) or (known is None and name in _BUILTINS)):
            raise FxoptError(f"a pass named {name!r} is already registered; pass replace=True to override it")
        _REGISTRY[name] = f
        return f

    return _do(factory) if factory is not None else _do


def _builtin_factory(name: str) -> PassFactory:
    module, _, attr = _BUILTINS[name].partition(":")
    factory = getattr(importlib.import_module(module), attr)
    _REGISTRY.setdefault(name, factory)
    return _REGISTRY[name]


def available_passes() -> list[str]:
    for name in _BUILTINS:  # so that pass_factory / _REGISTRY show their docstrings
        if name not in _REGISTRY:
            _builtin_factory(name)
    return sorted(_REGISTRY)


def pass_factory(name: str) -> PassFactory | None:
    """The factory registered under ``name`` (None if there is none)."""
    if name not in _REGISTRY and name in _BUILTINS:
        _builtin_factory(name)
    return _REGISTRY.get(name)


def get_pass(name: str, **options: Any) -> Pass:
    """A fresh pass object of the registered ``name``; ``options`` go to its factory."""
    factory = pass_factory(name)
    if factory is None:
        raise UnknownPassError(
            f"no pass named {name!r}; available: {', '.join(available_passes()) or '(none)'}. "
            "Register your own with fxopt.register_pass(name, factory)."
        )
    try:
        p = factory(**options)
    except TypeError as exc:
        if options:
            raise FxoptError(f"pass {name!r} does not take the options {sorted(options)}: {exc}") from exc
        raise
    if not isinstance(p, Pass):
        raise FxoptError(f"the factory registered as {name!r} returned {type(p).__name__}, not an fxopt.Pass")
    return p


def _accepted() -> str:
    return ("a registered pass name (str), an fxopt.Pass, an fxopt.Rule / NodeRule / RuleSet (run as a pass of "
            f"its own), or a list of those; registered names: {', '.join(available_passes())}")


def _one(spec) -> Pass:
    if isinstance(spec, str):
        return get_pass(spec)
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, RuleBase):
        return RewritePass(spec.name, [spec])
    if isinstance(spec, RuleSet):
        if not len(spec):
            raise FxoptError("passes= got an empty RuleSet")
        return RewritePass(spec.name or "+".join(r.name for r in spec), spec)
    if isinstance(spec, type) and issubclass(spec, Pass):
        raise FxoptError(f"passes= got the class {spec.__name__}, not a pass object: give {spec.__name__}() "
                         "or its registered name")
    raise FxoptError(f"passes= got {type(spec).__name__}: {spec!r:.80}; it takes {_accepted()}")


def resolve_passes(passes: Any) -> list[Pass]:
    """Turn ``optimize(passes=...)`` into pass objects: ``None`` (the defaults, in
    :data:`DEFAULT_PASSES` order), one name / Pass / Rule / RuleSet, or an iterable of those."""
    if passes is None:
        return [get_pass(n) for n in DEFAULT_PASSES]
    if isinstance(passes, (str, Pass, RuleBase, RuleSet, type)):
        return [_one(passes)]
    if isinstance(passes, (bytes, Mapping)) or not isinstance(passes, Iterable):
        raise FxoptError(f"passes= got {type(passes).__name__}: {passes!r:.80}; it takes {_accepted()}")
    out: list[Pass] = []
    for spec in passes:
        if not isinstance(spec, (str, Pass, RuleBase, RuleSet, type)):
            raise FxoptError(f"passes= got a {type(passes).__name__} holding {type(spec).__name__}: {spec!r:.80}; "
                             f"it takes {_accepted()}")
        out.append(_one(spec))
    return out
