"""Graph bookkeeping the rewrite driver needs: export's no-op checks, node order that stays
valid while nodes are inserted, erasing dead nodes in bulk, and topological repair."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import torch
import torch.fx
from torch.fx.node import Node

from ..errors import PatternError

aten = torch.ops.aten

# Nodes export inserts that compute nothing: shape/dtype assertions on a value. They do not
# count as users of the value, are stripped from traced patterns, and are erased together with
# the node they assert on.
ASSERT_TARGETS = {
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
    aten.sym_constrain_range.default,
}
for _name in ("_assert_async",):
    _pkt = getattr(aten, _name, None)
    if _pkt is not None:
        ASSERT_TARGETS.update(getattr(_pkt, o) for o in _pkt.overloads())


def is_assert(node: Node) -> bool:
    return (node.op == "call_function" and node.target in ASSERT_TARGETS) or (
        node.op == "call_module" and str(node.target).startswith("_guards_fn")
    )


def real_users(node: Node) -> list[Node]:
    """Users of ``node`` other than export's metadata checks."""
    return [u for u in node.users if not is_assert(u)]


def is_live(node: Node) -> bool:
    return not getattr(node, "_erased", False)


def index_by_target(graph: torch.fx.Graph) -> dict[Any, list[Node]]:
    idx: dict[Any, list[Node]] = defaultdict(list)
    for n in graph.nodes:
        if n.op == "call_function":
            idx[n.target].append(n)
    return idx


class Positions:
    """Order keys of graph nodes (sparse integers) that stay valid while nodes are inserted.

    Numbered once; a node inserted later gets a key between its numbered neighbours when it is
    first asked for (the whole graph is renumbered only when a gap runs out), so a rewrite that
    inserts thirty nodes before one anchor costs thirty keys, not a renumbering."""

    SPACING = 1 << 20

    def __init__(self, graph: torch.fx.Graph):
        self.graph = graph
        self.renumber()

    def renumber(self) -> None:
        self.pos = {n: i * self.SPACING for i, n in enumerate(self.graph.nodes)}

    def __getitem__(self, node: Node) -> int:
        p = self.pos.get(node)
        if p is not None:
            return p
        run = [node]
        lo = node.prev
        while lo.op != "root" and lo not in self.pos:
            run.insert(0, lo)
            lo = lo.prev
        hi = node.next
        while hi.op != "root" and hi not in self.pos:
            run.append(hi)
            hi = hi.next
        lo_key = self.pos[lo] if lo.op != "root" else -self.SPACING
        hi_key = self.pos[hi] if hi.op != "root" else lo_key + (len(run) + 1) * self.SPACING
        step = (hi_key - lo_key) // (len(run) + 1)
        if step < 1:
            self.renumber()
            return self.pos[node]
        for i, n in enumerate(run, 1):
            self.pos[n] = lo_key + i * step
        return self.pos[node]


def stable_toposort(graph: torch.fx.Graph) -> None:
    """Reorder ``graph`` topologically, keeping the current order where it is valid."""
    import heapq

    order = {n: i for i, n in enumerate(graph.nodes)}
    indeg = {n: len(set(n.all_input_nodes)) for n in graph.nodes}
    heap = [(order[n], n.name, n) for n in graph.nodes if indeg[n] == 0]
    heapq.heapify(heap)
    out = []
    while heap:
        _, _, n = heapq.heappop(heap)
        out.append(n)
        for u in n.users:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(heap, (order[u], u.name, u))
    if len(out) != len(order):
        raise PatternError("graph has a cycle")
    cursor = None
    for n in out:  # placeholders stay first and the output last (they are)
        if cursor is not None:
            cursor.append(n)
        cursor = n


def check_acyclic(graph_module: torch.fx.GraphModule) -> None:
    """Raise PatternError if the data-flow graph has a cycle or is not in topological order
    (networkx for the cycle search, fx lint for the order)."""
    import networkx as nx

    from ..graph_utils import to_networkx

    g = to_networkx(graph_module)
    if not nx.is_directed_acyclic_graph(g):
        raise PatternError(f"graph has a cycle: {nx.find_cycle(g)}")
    graph_module.graph.lint()


# ----------------------------------------------------------------------------------- erasing

_BULK_FROM = 64  # dead sets at least this large go through _bulk_remove


def erase_dead(graph_module: torch.fx.GraphModule, candidates: Iterable[Node], *, upstream: bool) -> list[Node]:
    """Erase the ``candidates`` nothing uses any more (export's checks on them go too); with
    ``upstream``, also the pure nodes that only fed erased ones, transitively. Returns what was
    erased.

    Large dead sets (a re-rolled 2048-step loop) are unlinked in bulk: ``Graph.erase_node``
    costs ~15 us a node, seconds on a 500k-node unrolled graph."""
    dead: dict[Node, None] = {}
    live_count: dict[Node, int] = {}

    def live(m: Node) -> int:
        c = live_count.get(m)
        if c is None:
            c = sum(1 for u in m.users if u not in dead and not is_assert(u))
            live_count[m] = c
        return c

    work = list(dict.fromkeys(candidates))
    cand_set = set(work)
    i = 0
    while i < len(work):
        n = work[i]
        i += 1
        if n in dead or not is_live(n) or n.op != "call_function" or live(n) > 0:
            continue
        if n not in cand_set and n.is_impure():
            continue
        dead[n] = None
        for u in n.users:
            if u not in dead:
                dead[u] = None  # metadata checks go with the value
        for m in n.all_input_nodes:
            follow = upstream or m in cand_set
            if m in live_count:
                live_count[m] -= 1
                if follow and live_count[m] == 0:
                    work.append(m)
            elif follow and live(m) == 0:
                work.append(m)
    if not dead:
        return []
    graph = graph_module.graph
    if len(dead) < _BULK_FROM or not _bulk_remove(graph, dead):
        left = list(dead)
        while left:  # users first; the dead set is closed under users, so every round erases some
            keep = []
            for n in left:
                if n.users:
                    keep.append(n)
                else:
                    graph.erase_node(n)
            left = keep
    return list(dead)


def _bulk_remove(g: torch.fx.Graph, dead: dict) -> bool:
    """Unlink ``dead`` (closed under users) from the graph without erase_node's per-node
    bookkeeping. Returns False, changing nothing, where fx's private structures differ."""
    owning = g.owning_module
    if owning is not None and getattr(owning, "_erase_node_hooks", None):
        return False
    table = getattr(g, "_find_nodes_lookup_table", None)
    if table is None or not hasattr(table, "table") or not hasattr(g, "_len"):
        return False
    for n in dead:
        for u in n.users:
            if u not in dead:
                return False
    groups: dict = {}
    for n in dead:
        groups.setdefault((n.op, id(n.target)), []).append(n)
    for ns in groups.values():
        if table.table.get(table._key(ns[0])) is None:
            return False
    for ns in groups.values():
        tbl = table.table[table._key(ns[0])]
        for n in ns:
            tbl.pop(n, None)
    # object.__setattr__: Node.__setattr__ re-indexes live nodes in the lookup table on every
    # attribute write, which is most of erase_node's cost and not needed for list links
    sa = object.__setattr__
    for n in dead:
        p, nx = n._prev, n._next
        sa(p, "_next", nx)
        sa(nx, "_prev", p)
        sa(n, "_erased", True)
        for inp in n._input_nodes:
            if inp not in dead:
                inp.users.pop(n, None)
    g._len -= len(dead)
    for n in dead:
        sa(n, "_args", ())
        sa(n, "_kwargs", {})
        sa(n, "_input_nodes", {})
        n.users.clear()
    return True
