"""Length-generic specialisation: optimize a model at L = 2048 without tracing 2048 loop steps.

Capture unrolls Python loops, so capturing a Mamba at L = 2048 traces ~500k ATen ops,
which takes minutes. But once the passes have re-rolled every loop, the rewritten
graph usually has the *same structure at every length*; only integer literals
(view sizes, slice ends, mask shapes) change, and they change affinely with L.

So we capture and optimize the model at three short probe lengths, check that the
three rewritten graphs are identical node for node except for integer literals,
fit ``v = a*L + b`` (integer a, b) to each literal from two probes and demand that
the third probe lands exactly on the line. The template is then instantiated for
any L in milliseconds-per-node, and its fake-tensor metadata re-propagated (which
re-checks every shape). Anything that does not fit (a loop no pass rolled, a float
that depends on L, a shape like L*L) raises :class:`TemplateMismatch` and the caller
falls back to a plain capture at the real length.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.fx
from torch.fx.node import Node
from torch.utils import _pytree as pytree

from .errors import TemplateMismatch
from .graph_utils import copy_graph_module, finalize, propagate_meta

# Probe lengths: small (cheap to capture) yet long enough that every pass sees real
# loops, pairwise distinct and unlikely to coincide with model dimensions.
DEFAULT_PROBES: tuple[int, int, int] = (5, 7, 11)
# Below this length a direct capture is cheap and exact, so templates are not used.
MIN_TEMPLATE_LENGTH = 33


def sequence_length(args: tuple, kwargs: dict, seq_dim: int) -> int | None:
    """L of the call: the size at ``seq_dim`` of the first tensor argument."""
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor):
            return int(leaf.shape[seq_dim]) if leaf.dim() > seq_dim else None
    return None


def narrow_inputs(args: tuple, kwargs: dict, seq_dim: int, length: int, new_length: int):
    """The same call at ``new_length``: every tensor whose ``seq_dim`` has the call's
    length is cut to its first ``new_length`` positions (a contiguous copy)."""

    def cut(x):
        if isinstance(x, torch.Tensor) and x.dim() > seq_dim and x.shape[seq_dim] == length:
            return x.narrow(seq_dim, 0, new_length).contiguous()
        return x

    return pytree.tree_map(cut, (args, kwargs))


# ----------------------------------------------------------------- graph skeletons

def _walk(arg, index: dict[Node, int], shape: list, ints: list[int]) -> None:
    """Append ``arg``'s skeleton to ``shape`` and its integer literals to ``ints``."""
    if isinstance(arg, Node):
        shape.append(("N", index[arg]))
    elif isinstance(arg, bool) or arg is None:
        shape.append(("C", arg))
    elif isinstance(arg, int):
        shape.append(("I",))
        ints.append(arg)
    elif isinstance(arg, (list, tuple)):
        shape.append((type(arg).__name__, len(arg)))
        for a in arg:
            _walk(a, index, shape, ints)
    elif isinstance(arg, dict):
        shape.append(("dict", tuple(arg)))
        for k in arg:
            _walk(arg[k], index, shape, ints)
    elif isinstance(arg, slice):
        shape.append(("slice",))
        for a in (arg.start, arg.stop, arg.step):
            _walk(a, index, shape, ints)
    else:  # floats, dtypes, devices, strings, memory formats: must match exactly
        shape.append(("C", type(arg).__name__, repr(arg)))


def _rebuild(arg, ints: Iterator):
    if isinstance(arg, Node) or isinstance(arg, bool) or arg is None:
        return arg
    if isinstance(arg, int):
        return next(ints)
    if isinstance(arg, list):
        return [_rebuild(a, ints) for a in arg]
    if isinstance(arg, tuple):
        return tuple(_rebuild(a, ints) for a in arg)
    if isinstance(arg, dict):
        return {k: _rebuild(v, ints) for k, v in arg.items()}
    if isinstance(arg, slice):
        return slice(*(_rebuild(a, ints) for a in (arg.start, arg.stop, arg.step)))
    return arg



@dataclass
class Skeleton:
    nodes: list[tuple]
    ints: list[int]


def skeleton(gm: torch.fx.GraphModule) -> Skeleton:
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes, ints = [], []
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target == "_guards_fn":
            continue  # export's input-shape guard: dropped from instantiated graphs
        shape: list = []
        _walk(n.args, index, shape, ints)
        _walk(n.kwargs, index, shape, ints)
        target = n.target if isinstance(n.target, str) else id(n.target)
        nodes.append((n.op, target, tuple(shape)))
    return Skeleton(nodes, ints)


def _first_difference(a: Skeleton, b: Skeleton, gm: torch.fx.GraphModule) -> str:
    names = [n for n in gm.graph.nodes if not (n.op == "call_module" and n.target == "_guards_fn")]
    for i, (x, y) in enumerate(zip(a.nodes, b.nodes)):
        if x != y:
            return f"node {i} ({names[i].format_node() if i < len(names) else '?'}) differs between probe lengths"
    return f"{len(a.nodes)} vs {len(b.nodes)} nodes (a loop that no pass re-rolled grows with L)"


# ----------------------------------------------------------------- the template

def repropagate(gm: torch.fx.GraphModule, args: tuple, kwargs: dict, what: str) -> None:
    """Recompute every node's ``meta["val"]`` of an instantiated template for the real
    inputs, re-checking every shape; :class:`TemplateMismatch` if an op rejects them.

    Uses a fresh static-shape FakeTensorMode: export's own mode carries a symbolic
    ShapeEnv whose guard machinery makes every op ~100x slower, and all shapes here are
    concrete."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    leaves = pytree.tree_leaves((args, kwargs))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(leaves):
        raise TemplateMismatch(f"{what} has {len(placeholders)} inputs, the call has {len(leaves)}")
    for ph, leaf in zip(placeholders, leaves):
        ph.meta["val"] = mode.from_tensor(leaf) if isinstance(leaf, torch.Tensor) else leaf
    try:
        propagate_meta(gm, [n for n in gm.graph.nodes if n.op in ("get_attr", "call_function")], mode)
    except Exception as exc:  # noqa: BLE001
        raise TemplateMismatch(f"instantiating {what} failed shape propagation: {exc}") from exc


@dataclass
class LengthTemplate:
    """A rewritten graph whose integer literals are ``a*L + b``."""

    base: torch.fx.GraphModule          # the rewritten graph at probe length ``lengths[0]``
    coeffs: list[tuple[int, int]]       # (a, b) per integer literal, in skeleton order
    lengths: tuple[int, ...]
    probe_seconds: float = 0.0
    varying: int = 0                    # how many literals depend on L
    notes: list[str] = field(default_factory=list)

    def instantiate(self, length: int, args: tuple, kwargs: dict, *, lazy: bool = False) -> torch.fx.GraphModule:
        """The graph at ``length``. ``lazy``: its code is generated on first use (see
        :func:`fxopt.graph_utils.make_graph_module`); else once, here."""
        gm = copy_graph_module(self.base, lazy=True)  # edited below: generating code now would be wasted
        for n in list(gm.graph.nodes):
            if n.op == "call_module" and n.target == "_guards_fn":
                gm.graph.erase_node(n)
        values = iter([a * length + b for a, b in self.coeffs])
        for n in gm.graph.nodes:
            n.args = _rebuild(n.args, values)
            n.kwargs = _rebuild(n.kwargs, values)
        # Fresh metadata for the new length: this re-runs every op's shape logic on
        # fake tensors, so a template that does not really fit fails here, loudly.
        repropagate(gm, args, kwargs, f"the template at L={length}")
        gm.recompile()
        return gm if lazy else finalize(gm)


def build_template(
    optimize_at: Callable[[tuple, dict], torch.fx.GraphModule],
    args: tuple,
    kwargs: dict,
    seq_dim: int,
    probes: Sequence[int] = DEFAULT_PROBES,
) -> LengthTemplate:
    """Optimize at each probe length (``optimize_at(args, kwargs)`` returns the
    rewritten graph) and fit the affine template; :class:`TemplateMismatch` if the
    probes disagree."""
    length = sequence_length(args, kwargs, seq_dim)
    if length is None:
        raise TemplateMismatch(f"no tensor input has a dimension {seq_dim}")
    t0 = time.perf_counter()
    graphs = []
    for p in probes:
        a, k = narrow_inputs(args, kwargs, seq_dim, length, p)
        graphs.append(optimize_at(a, k))
    skels = [skeleton(g) for g in graphs]
    for s, g in zip(skels[1:], graphs[1:]):
        if s.nodes != skels[0].nodes or len(s.ints) != len(skels[0].ints):
            raise TemplateMismatch(_first_difference(skels[0], s, g))
    (l0, l1, l2), (v0, v1, v2) = probes[:3], (skels[0].ints, skels[1].ints, skels[2].ints)
    coeffs, varying = [], 0
    for i, (x0, x1, x2) in enumerate(zip(v0, v1, v2)):
        slope, rem = divmod(x1 - x0, l1 - l0)
        if rem:
            raise TemplateMismatch(f"integer literal #{i} goes {x0}, {x1} at L={l0}, {l1}: not affine in L")
        intercept = x0 - slope * l0
        if slope * l2 + intercept != x2:
            raise TemplateMismatch(
                f"integer literal #{i} is {x0}, {x1}, {x2} at L={l0}, {l1}, {l2}: not affine in L")
        varying += slope != 0
        coeffs.append((slope, intercept))
    return LengthTemplate(graphs[0], coeffs, tuple(probes), time.perf_counter() - t0, varying)
