"""What a rule's look at one node comes back with: a :class:`Replacement` (rewrite this) or a
:class:`Divergence` (decline, and why).

Both kinds of rule answer in these terms, so the driver applies them the same way and
:func:`fxopt.explain` reports them the same way:

* a traced pattern rule (:class:`fxopt.Rule`) turns a structural match into a Replacement that
  copies the traced replacement graph in; its near misses are Divergences with the pattern node
  and the graph node where the match stopped;
* a callable rule (:class:`fxopt.NodeRule`) returns ``replace(...)``, ``replace_call(...)``,
  ``erase(...)``, ``emit(...)`` or ``decline("why")`` (``None`` declines without a reason).

A Replacement is a plan, not a mutation: the driver inserts what ``build`` makes, checks every
new value has the dtype and shape of the one it replaces, names the rule and the replaced nodes
in each new node's provenance, points users at the new values and erases what is left unused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from torch.fx.node import Node

from ..graph_utils import op_name

__all__ = [
    "Divergence",
    "Attempt",
    "Replacement",
    "Declined",
    "decline",
    "replace",
    "replace_call",
    "erase",
    "emit",
]


@dataclass
class Divergence:
    """Where and why a candidate did not become a rewrite.

    ``kind`` is a short category (pattern rules: op, literal, users, binding, overlap, dtype,
    shape, rank, extra_check, replacement, cycle, structure; callable rules choose their own,
    ``declined`` by default); ``message`` says it in words.
    """

    kind: str
    message: str
    pattern_node: str | None = None
    pattern_op: str | None = None
    graph_node: str | None = None
    graph_op: str | None = None
    argument: str | None = None

    def __str__(self) -> str:
        where = ""
        if self.pattern_node is not None:
            where = f"pattern {self.pattern_node} ({self.pattern_op})"
            if self.graph_node is not None:
                where += f" vs graph {self.graph_node} ({self.graph_op})"
            if self.argument:
                where += f", argument {self.argument}"
            where += ": "
        elif self.graph_node is not None:
            where = f"at {self.graph_node} ({self.graph_op}): "
        return f"[{self.kind}] {where}{self.message}"


@dataclass
class Replacement:
    """A rewrite a rule proposes (see the module docstring).

    outputs: nodes whose users move to the values ``build`` returns (same order, same count).
    build: ``build(builder) -> values`` (inserts nodes through ``builder.call``/``builder.op``), or
        the values themselves when they already exist in the graph.
    matched: the nodes the rewrite consumes; those left without users afterwards are erased
        (with export's metadata checks on them). Users inside ``matched`` are not re-pointed.
    sources: the nodes named in the new nodes' provenance (default: ``matched``).
    before: insert new nodes right before this node (default: the first output, else the anchor).
    after: insert them right after this node instead, then restore topological order (used by
        multi-output patterns whose inputs come late).
    only_users: ``{output: users}`` -- for these outputs, only the given users move (the scan
        rule moves the final state's users outside the loop, not the loop's own readouts).
    erase_unused_inputs: also erase pure nodes that only fed the erased ones (a re-rolled loop
        leaves its per-step slices and prologue behind).
    label: the variant that fired, for stats (``rule:<label>``) and provenance (default: the
        rule's name; the scan rule reports ``selective_scan`` or ``linear_scan``).
    counts: extra counters added to the pass's stats.
    info: free-form details returned in ``PassResult.rewrites``.
    """

    outputs: Sequence[Node]
    build: Callable[[Any], Sequence[Any]] | Sequence[Any]
    matched: Sequence[Node]
    sources: Sequence[Node] | None = None
    before: Node | None = None
    after: Node | None = None
    only_users: dict | None = None
    erase_unused_inputs: bool = False
    label: str | None = None
    counts: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


@dataclass
class Attempt:
    """One look of one rule at one candidate anchor."""

    anchor: Node
    matched: bool
    progress: int = 0  # how far the rule got (pattern rules: pattern nodes matched)
    total: int | None = None  # out of how many (None: the rule has no fixed size)
    divergence: Divergence | None = None
    match: Any = None  # pattern rules: the fxopt.rewrite.matcher.Match
    replacement: Replacement | None = None


class Declined(Exception):
    """Raised inside a rule's ``build`` to decline after all (the driver undoes what was built)."""

    def __init__(self, divergence: Divergence, progress: int = 0):
        super().__init__(str(divergence))
        self.divergence = divergence
        self.progress = progress


@dataclass
class _Decline:
    divergence: Divergence
    progress: int = 0
    total: int | None = None


def decline(reason: str, *, kind: str = "declined", progress: int = 0, total: int | None = None,
            at: Node | None = None) -> _Decline:
    """A callable rule's "no": ``reason`` is shown by ``fxopt.explain`` and logged at DEBUG.
    ``progress`` ranks near misses (the further a candidate got, the more interesting it is);
    ``at`` names the graph node where the candidate failed, if it is not the anchor."""
    div = Divergence(kind, reason, graph_node=at.name if at is not None else None,
                     graph_op=op_name(at) if at is not None else None)
    return _Decline(div, progress, total)


def replace(node: Node, value: Any, *, matched: Sequence[Node] | None = None) -> Replacement:
    """Point ``node``'s users at ``value`` (an existing node) and erase ``node``."""
    return Replacement([node], [value], list(matched) if matched is not None else [node])


def replace_call(node: Node, target, args: tuple, kwargs: dict | None = None, *,
                 matched: Sequence[Node] | None = None, val: Any = None) -> Replacement:
    """Replace ``node`` by one new call ``target(*args, **kwargs)``. ``val`` gives its fake value
    (default: propagated from the inputs' fake values)."""
    kwargs = dict(kwargs or {})

    def build(b):
        return [b.op(target, tuple(args), kwargs, val=val) if val is not None else b.op(target, tuple(args), kwargs)]

    return Replacement([node], build, list(matched) if matched is not None else [node], before=node)


def erase(node: Node) -> Replacement:
    """Erase ``node``, which nothing uses (a check that cannot fail, a dead view)."""
    return Replacement([], [], [node])


def emit(outputs: Sequence[Node], build, *, matched: Sequence[Node], **options) -> Replacement:
    """The general form: see :class:`Replacement` for the fields."""
    return Replacement(list(outputs), build, list(matched), **options)
