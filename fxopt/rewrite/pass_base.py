"""The pass contract: ``requires -> call -> ensures``, returning a :class:`PassResult`.

Modelled on ``torch.fx.passes.infra.pass_base``; our own small class because fxopt passes also
report statistics (match counts) that the pass manager aggregates into
``OptimizedModule.report()``.

Every run of a pass -- ``p(gm)`` or inside a :class:`~fxopt.rewrite.manager.PassManager` -- goes
through :func:`run_pass`, which owns what no pass should do itself: checking the result
(:mod:`fxopt.rewrite.verify`: a truthful ``modified``, a well-formed graph, fake values that fit)
and recompiling the module, once, when the graph changed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx

from ..config import get_config
from ..errors import PassError
from .verify import GraphSnapshot, check_meta, lint

__all__ = ["Pass", "PassResult", "run_pass"]


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool
    # Counters of this run. ``stats["matches"]`` is the number of rewrites the pass made; the
    # pass manager sums it into the report. Per-rule hit counts go in ``stats["rule:<name>"]``.
    stats: dict[str, int] = field(default_factory=dict)
    # Rule-table passes: what fired where (fxopt.rewrite.driver.RewriteRecord) and, for rules
    # that keep them, what declined and why (DeclineRecord). Not part of the report.
    rewrites: list = field(default_factory=list, repr=False)
    declines: list = field(default_factory=list, repr=False)
    # Nodes whose fake values the pass's own machinery already derived from their inputs (the
    # rewrite engine's Builder; users moved to a value of the same dtype and shape): run_pass
    # does not re-run them. Everything else the pass added or re-wired is re-checked.
    verified: set = field(default_factory=set, repr=False)

    @property
    def matches(self) -> int:
        return int(self.stats.get("matches", 0))


class Pass:
    """Base class of every fxopt pass.

    Subclasses set ``name`` and implement :meth:`call` (rule tables: use
    :class:`fxopt.RewritePass`). ``requires`` checks the input graph (raise :class:`PassError`
    if the pass cannot run on it); ``ensures`` checks the output graph. Passes mutate the given
    GraphModule in place and return it, say truthfully whether they changed it, give every node
    they create a fake ``meta["val"]``, and never mutate tensors of the user's model. They do
    not lint or recompile: :func:`run_pass` does, once.
    """

    name: str = "unnamed"
    # When True the pass manager may re-run this pass until it stops modifying the graph.
    fixpoint: bool = True

    def requires(self, graph_module: torch.fx.GraphModule) -> None:  # noqa: B027 - optional hook
        pass

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        raise NotImplementedError(f"pass {self.name!r} does not implement call()")

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:  # noqa: B027 - optional hook
        pass

    def __call__(self, graph_module: torch.fx.GraphModule) -> PassResult:
        return run_pass(self, graph_module)

    def __repr__(self) -> str:
        return f"<fxopt pass {self.name!r}>"


def run_pass(p: Pass, graph_module: torch.fx.GraphModule) -> PassResult:
    """``requires -> call -> ensures``, then the checks every pass gets, then one recompile if
    the graph changed. Raises :class:`PassError` naming the pass when it lies about
    ``modified``, leaves an invalid graph, or leaves a node whose ``meta["val"]`` does not fit
    its inputs."""
    snapshot = GraphSnapshot(graph_module)
    p.requires(graph_module)
    result = p.call(graph_module)
    if not isinstance(result, PassResult):
        raise PassError(f"pass {p.name!r} returned {type(result).__name__}, expected PassResult", pass_name=p.name)
    p.ensures(result.graph_module)
    gm = result.graph_module
    changes = snapshot.changes(gm)
    if changes and not result.modified:
        raise PassError(
            f"pass {p.name!r} returned modified=False but changed the graph ({changes.summary()}); return "
            "PassResult(gm, True, ...) whenever it changes anything, so the graph is checked and recompiled",
            pass_name=p.name,
        )
    if not result.modified:
        return result
    try:
        lint(gm)
    except Exception as exc:  # noqa: BLE001 - one error naming the pass
        raise PassError(f"graph is invalid after pass {p.name!r}: {exc}", pass_name=p.name) from exc
    try:
        check_meta(gm, [n for n in changes.touched if n not in result.verified])
    except Exception as exc:  # noqa: BLE001
        raise PassError(f"pass {p.name!r} left a node whose fake value does not fit: {exc}", pass_name=p.name) from exc
    if get_config().debug >= 2:  # whole-graph networkx cycle search on top of fx's lint
        from .graph_ops import check_acyclic

        check_acyclic(gm)
    gm.recompile()
    return result
