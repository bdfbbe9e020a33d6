"""Pass registry: library and user passes by name.

``optimize(passes=["scan", "addcmul"])`` resolves names here; users add their own
with :func:`register_pass`. A registered entry is a factory so every ``optimize``
call gets fresh pass objects (passes may keep per-run statistics).
"""
from __future__ import annotations

import importlib
from typing import Callable, Iterable, Union

from .errors import FxoptError, UnknownPassError
from .pass_base import Pass

PassFactory = Callable[[], Pass]
PassSpec = Union[str, Pass]

_REGISTRY: dict[str, PassFactory] = {}

# Library pass families, imported on first use so that ``import fxopt`` stays cheap.
_BUILTIN_MODULES = ("fxopt.passes.scan", "fxopt.passes.addcmul", "fxopt.passes.residual_add", "fxopt.passes.cleanup")
# What optimize() runs when passes=None, in order. The scan pass goes first so it
# sees loops before anything else rewrites their bodies (it also accepts addcmul
# bodies, so the other order works too). cleanup runs last: the others may leave identity
# casts behind, and it only removes calls that compute nothing.
DEFAULT_PASSES: tuple[str, ...] = ("scan", "addcmul", "residual_add", "cleanup")
_builtins_loaded = False


def register_pass(name: str, factory: PassFactory | None = None, *, replace: bool = False):
    """Register ``factory`` (a Pass subclass or a zero-argument callable returning a Pass)
    under ``name``. Usable as a decorator::

        @fxopt.register_pass("silu")
        class SiluPass(fxopt.Pass): ...
    """

    def _do(f: PassFactory) -> PassFactory:
        if not replace and name in _REGISTRY and _REGISTRY[name] is not f:
            raise FxoptError(f"a pass named {name!r} is already registered; pass replace=True to override it")
        _REGISTRY[name] = f
        return f

    return _do(factory) if factory is not None else _do


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:  # a family not shipped in this build
            if exc.name != mod:
                raise


def available_passes() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_pass(name: str) -> Pass:
    _load_builtins()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise UnknownPassError(
            f"no pass named {name!r}; available: {', '.join(available_passes()) or '(none)'}. "
            "Register your own with fxopt.register_pass(name, factory)."
        ) from None
    p = factory()
    if not isinstance(p, Pass):
        raise FxoptError(f"the factory registered as {name!r} returned {type(p).__name__}, not an fxopt.Pass")
    return p


def resolve_passes(passes: Iterable[PassSpec] | None) -> list[Pass]:
    """Turn ``optimize(passes=...)`` into pass objects. ``None`` means the defaults
    (those of :data:`DEFAULT_PASSES` that are registered)."""
    if passes is None:
        _load_builtins()
        return [get_pass(n) for n in DEFAULT_PASSES if n in _REGISTRY]
    if isinstance(passes, (str, Pass)):
        passes = [passes]
    out: list[Pass] = []
    for spec in passes:
        if isinstance(spec, Pass):
            out.append(spec)
        elif isinstance(spec, str):
            out.append(get_pass(spec))
        else:
            raise FxoptError(
                f"passes= takes fxopt.Pass objects or registered names, got {type(spec).__name__}: {spec!r}"
            )
    return out
