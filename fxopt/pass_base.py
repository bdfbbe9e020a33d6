"""The pass contract: ``requires -> call -> ensures``, returning a :class:`PassResult`.

Modelled on ``torch.fx.passes.infra.pass_base``; kept as our own small class because
fxopt passes also report statistics (match counts) that the pass manager aggregates
into ``OptimizedModule.report()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx

from .errors import PassError


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool
    # Free-form counters. ``stats["matches"]`` is the number of rewrites the pass made;
    # the pass manager sums it into the report. Per-rule hit counts go in
    # ``stats["rule:<name>"]``.
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def matches(self) -> int:
        return int(self.stats.get("matches", 0))


class Pass:
    """Base class of every fxopt pass.

    Subclasses set ``name`` and implement :meth:`call`. ``requires`` checks the input
    graph (raise :class:`PassError` if the pass cannot run on it); ``ensures`` checks the
    output graph. Passes mutate the given GraphModule in place and return it; they
    must never mutate tensors of the user's model.
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
        self.requires(graph_module)
        result = self.call(graph_module)
        if not isinstance(result, PassResult):
            raise PassError(
                f"pass {self.name!r} returned {type(result).__name__}, expected PassResult",
                pass_name=self.name,
            )
        self.ensures(result.graph_module)
        return result

    def __repr__(self) -> str:
        return f"<fxopt pass {self.name!r}>"
