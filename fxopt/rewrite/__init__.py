"""The rewrite engine: rules as data, one driver, passes, the pass manager, explain.

* :mod:`.rule` -- the two rule kinds: :class:`Rule` (a traced pattern/replacement pair) and
  :class:`NodeRule` (a callable that looks at a node and returns a Replacement or declines),
  combined in :class:`RuleSet` s;
* :mod:`.outcome` -- what a rule answers: :func:`replace`, :func:`replace_call`, :func:`erase`,
  :func:`emit` (a :class:`Replacement`) or :func:`decline`;
* :mod:`.matcher` -- the structural matcher of traced patterns;
* :mod:`.driver` -- :class:`RewritePass` / :class:`Phase`: matching order, applying, provenance,
  per-run statistics;
* :mod:`.pass_base`, :mod:`.manager`, :mod:`.verify` -- the :class:`Pass` contract, the
  :class:`PassManager` and the checks every pass run gets (lint, truthful ``modified``, fake
  values that fit), with one recompile per pass that changed the graph;
* :mod:`.explain` -- :func:`explain`: the rewrite run on a copy, with every decline's reason.

Nothing here imports the pass registry or the library passes (``fxopt.passes`` import this).
"""
from .driver import Builder, Phase, RewriteContext, RewritePass, apply_rules, find_matches
from .explain import ExplainReport, NearMiss, RuleExplanation, explain
from .graph_ops import check_acyclic
from .manager import PassManager, PassRecord, Report
from .matcher import Match
from .outcome import Declined, Divergence, Replacement, decline, emit, erase, replace, replace_call
from .pass_base import Pass, PassResult, run_pass
from .rule import NodeRule, Rule, RuleBase, RuleSet, node_rule, trace_function

__all__ = [
    "Rule", "NodeRule", "node_rule", "RuleBase", "RuleSet", "Match", "trace_function",
    "Replacement", "Divergence", "Declined", "decline", "replace", "replace_call", "erase", "emit",
    "RewritePass", "Phase", "RewriteContext", "Builder", "apply_rules", "find_matches", "check_acyclic",
    "Pass", "PassResult", "run_pass", "PassManager", "Report", "PassRecord",
    "explain", "ExplainReport", "RuleExplanation", "NearMiss",
]
