"""Readable listings of a graph: one line per node (what ``before.txt`` / ``after.txt`` and the
FXOPT_DUMP_DIR dumps hold)."""
from __future__ import annotations

from collections import Counter

from ..graph_utils import PROVENANCE_KEY, is_input_guard, node_count
from .nodes import format_node, graph_of, group_of, no_gc


@no_gc
def format_graph(gm, *, layer_headers: bool = True) -> str:
    """A readable listing of ``gm``: one line per node in graph order.

    Nodes a pass created start with ``+`` and end with their provenance. When
    ``layer_headers`` is set, a ``# -- layer ...`` comment precedes each run of compute
    nodes of one layer (parameters and inputs do not start a new run)."""
    graph = graph_of(gm)
    nodes = list(graph.nodes)
    n_new = sum(1 for n in nodes if PROVENANCE_KEY in n.meta)
    ops = Counter(n.op for n in nodes if not is_input_guard(n))
    guard = " + export's input-shape guard (not counted)" if len(nodes) != node_count(graph) else ""
    lines = [
        f"# {node_count(graph)} nodes ({', '.join(f'{v} {k}' for k, v in sorted(ops.items()))}){guard}; "
        f"{n_new} created by fxopt passes (marked +)"
    ]
    current = None
    for node in nodes:
        if layer_headers and node.op in ("call_function", "call_method", "call_module"):
            grp = group_of(node)
            if grp != current:
                current = grp
                lines.append(f"# -- layer {grp}")
        mark = "+ " if PROVENANCE_KEY in node.meta else "  "
        lines.append(mark + format_node(node))
    return "\n".join(lines) + "\n"

