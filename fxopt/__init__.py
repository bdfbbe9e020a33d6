"""fxopt: compiler-style graph rewriting for PyTorch models.

Capture a model to an ATen-level ``torch.fx.GraphModule``, rewrite it with passes
(library ones: ``scan``, ``addcmul``, ``residual_add``; or your own), and run the
result; inspect every step.
"""
from .capture import capture, capture_function
from .errors import CaptureError, CodegenError, FxoptError, PassError, PatternError, UnknownPassError
from .optimize import OptimizedModule, optimize
from .pass_base import Pass, PassResult
from .pass_manager import PassManager, Report
from .registry import available_passes, get_pass, register_pass
from .pattern import Match, Rule, RuleSet, RewritePass
from .explain import ExplainReport, explain
from . import inspection

__version__ = "0.1.0"

__all__ = [
    "capture", "capture_function", "optimize", "OptimizedModule",
    "Pass", "PassResult", "PassManager", "Report",
    "register_pass", "get_pass", "available_passes",
    "Rule", "RuleSet", "RewritePass", "Match", "explain", "ExplainReport", "inspection",
    "FxoptError", "CaptureError", "PassError", "PatternError", "CodegenError", "UnknownPassError",
]
