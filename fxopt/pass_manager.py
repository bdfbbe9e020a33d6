"""Moved to :mod:`fxopt.rewrite.manager`; this name stays for existing imports."""
from .rewrite.manager import PassManager, PassRecord, Report, lint  # noqa: F401
