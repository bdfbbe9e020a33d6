"""fxopt: compiler-style graph rewriting for PyTorch models.

Capture a model to an ATen-level ``torch.fx.GraphModule``, rewrite it with passes
(library ones: ``scan``, ``addcmul``, ``residual_add``, ``cleanup``; or your own, written with
the same rules and driver, :mod:`fxopt.rewrite`), and run the result; inspect every step.
"""
from .capture import capture, capture_function
from .errors import CaptureError, CodegenError, FxoptError, PassError, PatternError, UnknownPassError
from .optimize import OptimizedModule, optimize
from .rewrite import (
    ExplainReport,
    Match,
    NodeRule,
    Pass,
    PassManager,
    PassResult,
    Phase,
    Report,
    RewritePass,
    Rule,
    RuleSet,
    decline,
    emit,
    erase,
    explain,
    node_rule,
    replace,
    replace_call,
)
from .registry import available_passes, get_pass, register_pass
from . import inspection

__version__ = "0.1.0"

__all__ = [
    "capture", "capture_function", "optimize", "OptimizedModule",
    "Pass", "PassResult", "PassManager", "Report",
    "register_pass", "get_pass", "available_passes",
    "Rule", "NodeRule", "node_rule", "RuleSet", "RewritePass", "Phase", "Match",
    "replace", "replace_call", "erase", "emit", "decline",
    "explain", "ExplainReport", "inspection",
    "FxoptError", "CaptureError", "PassError", "PatternError", "CodegenError", "UnknownPassError",
]
