"""Moved to :mod:`fxopt.rewrite.pass_base`; this name stays for existing imports."""
from .rewrite.pass_base import Pass, PassResult, run_pass  # noqa: F401
