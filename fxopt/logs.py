"""fxopt's logging: every module logs on ``logging.getLogger("fxopt.<module>")``.

A library should not configure logging, so by default fxopt only logs (warnings reach the user
through Python's last-resort handler). ``FXOPT_DEBUG`` is the user asking to see more, so
:func:`configure` (called by the entry points: capture, the pass manager, the CLI) maps it to a
level of the ``fxopt`` logger -- 1 INFO (pass summaries, capture times), 2 and 3 DEBUG (every
rule rejection, cycle checks; 3 also dumps graphs, see :mod:`fxopt.rewrite.dump`) -- and, when
nothing in the logger hierarchy has a handler yet, adds one that writes ``[fxopt] ...`` lines to
stderr. An application that configured logging itself keeps its handlers and formats.
"""
from __future__ import annotations

import logging
import sys

from typing import Any

__all__ = ["LOGGER", "configure", "level_for", "progress_logger"]

LOGGER = logging.getLogger("fxopt")
_FORMAT = "[fxopt] %(name)s: %(message)s"

_state = {"handler": None, "level": None, "progress_handler": None}


def level_for(debug: int) -> int | None:
    """The logging level FXOPT_DEBUG=``debug`` asks for (None: leave the logger as it is)."""
    if debug <= 0:
        return None
    return logging.INFO if debug == 1 else logging.DEBUG


class _StderrHandler(logging.StreamHandler):
    """Writes to the *current* ``sys.stderr`` (pytest and notebooks swap it)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter(_FORMAT))

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it
        pass


def configure(cfg: Any) -> None:
    """Apply FXOPT_DEBUG (``cfg.debug`` of a :class:`fxopt.config.Config`) to the ``fxopt``
    logger (idempotent; cheap enough per pass run). This module reads no configuration itself:
    :mod:`fxopt.config` imports it."""
    level = level_for(cfg.debug)
    if level is None:
        if _state["level"] is not None:  # undo only what FXOPT_DEBUG did, never the user's settings
            LOGGER.setLevel(logging.NOTSET)
            _state["level"] = None
        if _state["handler"] is not None:
            LOGGER.removeHandler(_state["handler"])
            _state["handler"] = None
        return
    if LOGGER.level != level:
        LOGGER.setLevel(level)
    _state["level"] = level
    if _state["handler"] is None and not LOGGER.hasHandlers():
        _state["handler"] = _StderrHandler()
        LOGGER.addHandler(_state["handler"])


def progress_logger(cfg: Any) -> logging.Logger:
    """``fxopt.progress``: heartbeats of long captures at INFO. With FXOPT_PROGRESS on
    (``cfg.progress``; default: when stderr is a terminal) and no handler configured anywhere,
    they go to stderr."""
    log = logging.getLogger("fxopt.progress")
    if cfg.progress and _state["progress_handler"] is None and not log.hasHandlers():
        h = _state["progress_handler"] = _StderrHandler()
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False  # our handler is the one that shows it
    return log
