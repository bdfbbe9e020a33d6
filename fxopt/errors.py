"""Every exception fxopt raises on purpose derives from :class:`FxoptError`.

Messages name the construct that failed and what the user can do about it, so a
user never has to read a traceback from deep inside torch to understand it.
"""
from __future__ import annotations


class FxoptError(Exception):
    """Base class of all fxopt errors."""


class CaptureError(FxoptError):
    """The model could not be turned into a graph (data-dependent control flow,
    an unsupported output such as a cache object, a non-module input, ...)."""


class PassError(FxoptError):
    """A pass failed or left the graph in an invalid state.

    ``pass_name`` is the failing pass, ``predecessors`` the passes that ran before it
    in the same pipeline (the usual suspects when a lint fails)."""

    def __init__(self, message: str, pass_name: str | None = None, predecessors: tuple[str, ...] = ()):
        super().__init__(message)
        self.pass_name = pass_name
        self.predecessors = tuple(predecessors)


class PatternError(FxoptError):
    """A rewrite rule is malformed (pattern cannot be traced, replacement signature differs, ...)."""


class CodegenError(FxoptError):
    """Kernel source could not be generated, compiled or loaded."""


class TemplateMismatch(FxoptError):
    """A length or layer template does not fit (the probes disagree, or the op stream at
    the real length is not the one they predict); the caller captures directly instead.
    Importable from ``fxopt.length_generic`` too."""


class UnknownPassError(FxoptError, KeyError):
    """A pass name given to ``optimize(passes=...)`` is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""
