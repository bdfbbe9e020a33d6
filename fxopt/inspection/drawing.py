"""Small inline SVG drawings: a rewrite's before/after data flow and the model map."""
from __future__ import annotations

import html
import math
from collections import Counter

from torch.fx.node import Node

from ..graph_utils import op_name
from .diff import Rewrite
from .groups import Group
from .nodes import format_value, opn


def esc(s) -> str:
    return html.escape(str(s), quote=True)



_BOX_W, _BOX_H, _GAP_X, _GAP_Y = 150, 30, 34, 8
_FILL = {"new": "#bde9bd", "rm": "#f6c4c4", "ctx": "#f1f1f1"}
_STROKE = {"new": "#2c8a2c", "rm": "#c0392b", "ctx": "#aaa"}


def short_op(node: Node) -> str:
    s = op_name(node)
    for pre in ("aten.", "fxopt."):
        if s.startswith(pre):
            s = s[len(pre) :]
    return s if len(s) <= 22 else s[:21] + "…"


def svg_dag(nodes: list[tuple[Node, str]], edges: list[tuple[str, str]]) -> str:
    """Left-to-right layered drawing. ``nodes``: (node, kind) in topological order."""
    col: dict[str, int] = {}
    preds: dict[str, list[str]] = {}
    for s, d in edges:
        preds.setdefault(d, []).append(s)
    for n, _ in nodes:
        ps = [col[p] for p in preds.get(n.name, []) if p in col]
        col[n.name] = (max(ps) + 1) if ps else 0
    rows_in_col: dict[int, int] = {}
    pos: dict[str, tuple[int, int]] = {}
    for n, _ in nodes:
        c = col[n.name]
        r = rows_in_col.get(c, 0)
        rows_in_col[c] = r + 1
        pos[n.name] = (c * (_BOX_W + _GAP_X) + 4, r * (_BOX_H + _GAP_Y) + 4)
    width = (max(col.values(), default=0) + 1) * (_BOX_W + _GAP_X) - _GAP_X + 8
    height = max(rows_in_col.values(), default=1) * (_BOX_H + _GAP_Y) - _GAP_Y + 8
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="10">'
    ]
    for s, d in edges:
        if s not in pos or d not in pos:
            continue
        x1, y1 = pos[s][0] + _BOX_W, pos[s][1] + _BOX_H // 2
        x2, y2 = pos[d][0], pos[d][1] + _BOX_H // 2
        mx = (x1 + x2) // 2
        parts.append(
            f'<path d="M{x1},{y1} C{mx},{y1} {mx},{y2} {x2 - 3},{y2}" fill="none" stroke="#888" stroke-width="1"/>'
            f'<circle cx="{x2 - 3}" cy="{y2}" r="2" fill="#888"/>'
        )
    for n, kind in nodes:
        x, y = pos[n.name]
        dash = ' stroke-dasharray="3,2"' if kind == "ctx" else ""
        name = n.name if len(n.name) <= 22 else n.name[:21] + "…"
        val = format_value(n.meta.get("val"))
        title = f"{n.name} = {op_name(n)}  {val}"
        deco = ' text-decoration="line-through"' if kind == "rm" else ""
        parts.append(
            f'<g><title>{esc(title)}</title><rect x="{x}" y="{y}" width="{_BOX_W}" height="{_BOX_H}" rx="4" '
            f'fill="{_FILL[kind]}" stroke="{_STROKE[kind]}"{dash}/>'
            f'<text x="{x + 5}" y="{y + 12}" font-weight="bold"{deco}>{esc(short_op(n) if kind != "ctx" else name)}</text>'
            f'<text x="{x + 5}" y="{y + 25}" fill="#555">{esc(name if kind != "ctx" else (val[:24] or n.op))}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _region_side(graph_nodes: dict[str, Node], core_names: list[str], kind: str, max_nodes: int) -> str:
    core = [graph_nodes[c] for c in core_names if c in graph_nodes]
    if not core:
        return "<div class=muted>(none)</div>"
    if len(core) > max_nodes:
        hist = Counter(opn(n) for n in core)
        items = ", ".join(f"{esc(k)} ×{v}" for k, v in hist.most_common(8))
        more = f", … {len(hist) - 8} more ops" if len(hist) > 8 else ""
        return f"<div class=mono>{len(core)} nodes: {items}{more}</div>"
    core_set = {n.name for n in core}
    inputs: list[Node] = []
    users: list[Node] = []
    seen: set[str] = set(core_set)
    for n in core:
        for i in n.all_input_nodes:
            if i.name not in seen and len(inputs) < 6:
                seen.add(i.name)
                inputs.append(i)
    for n in core:
        for u in n.users:
            if u.name not in seen and len(users) < 4:
                seen.add(u.name)
                users.append(u)
    drawn = {n.name for n in inputs} | core_set | {u.name for u in users}
    nodes = [(n, "ctx") for n in inputs] + [(n, kind) for n in core] + [(u, "ctx") for u in users]
    edges = []
    for n, _ in nodes:
        for i in n.all_input_nodes:
            if i.name in drawn and (n.name in core_set or i.name in core_set):
                edges.append((i.name, n.name))
    return svg_dag(nodes, edges)


def _loop_side(graph_nodes: dict[str, Node], rw: Rewrite) -> str:
    """A re-rolled loop's before side: one box, not a column of its adds."""
    core = [graph_nodes[c] for c in rw.removed if c in graph_nodes]
    hist = Counter(opn(n) for n in core)
    items = ", ".join(f"{esc(k)} ×{v}" for k, v in hist.most_common(5))
    steps = rw.info.get("steps")
    return (f'<div class=mono style="border:1px solid #c0392b;background:#f6c4c4;border-radius:4px;padding:4px 6px">'
            f"<b>{esc(steps)}-step unrolled loop</b><br>{len(core)} nodes: {items}</div>")


def region_html(rw: Rewrite, bidx: dict[str, Node], aidx: dict[str, Node], max_nodes: int) -> str:
    src = f' <span class=muted>{esc(rw.source)}</span>' if rw.source else ""
    loop = rw.summary != rw.rule  # a scan: "L-step unrolled loop -> selective_scan"
    before = _loop_side(bidx, rw) if loop else _region_side(bidx, rw.removed, "rm", max_nodes)
    after = _region_side(aidx, rw.added, "new", max_nodes)
    return (
        f'<div class=region><div class=t><b>{esc(rw.summary).replace(" -&gt; ", " → ")}</b> <span class=muted>(pass {esc(rw.pass_name)})</span>'
        f" {len(rw.removed)} → {len(rw.added)} nodes{src}</div>"
        f'<div class=pair><div><div class=lbl>before</div>{before}</div>'
        f'<div><div class=lbl>after</div>{after}</div></div></div>'
    )


def region_shape(rw: Rewrite, bidx: dict[str, Node], aidx: dict[str, Node]) -> tuple:
    return (
        rw.rule,
        tuple(opn(bidx[n]) for n in rw.removed if n in bidx),
        tuple(opn(aidx[n]) for n in rw.added if n in aidx),
    )


def _short_group(name: str) -> str:
    parts = name.split(".")
    s = ".".join(parts[-2:]) if len(parts) > 1 and parts[-1].isdigit() else parts[-1]
    return s if len(s) <= 16 else s[:15] + "…"


def overview_svg(groups: list[Group]) -> str:
    """One bar per group (height ~ log node count), green where rewrites happened; each
    bar links to its group's block."""
    import math

    if not groups:
        return ""
    bar_w, gap, h_max, label_h = 20, 4, 60, 80
    width = len(groups) * (bar_w + gap) + 90
    height = h_max + label_h
    top = max(max(g.n_after, g.n_before) for g in groups) or 1
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="monospace" font-size="10">'
    ]
    for i, g in enumerate(groups):
        n = max(g.n_after, g.n_before)
        h = max(3, int(h_max * math.log1p(n) / math.log1p(top)))
        x, y = 70 + i * (bar_w + gap), 4 + h_max - h
        changed = g.n_new or g.n_rm
        fill = "#5cb85c" if changed else ("#f0c040" if g.n_rw else "#c8c8c8")
        tip = f"{g.name}: {g.n_before} -> {g.n_after} nodes, +{g.n_new} -{g.n_rm}, {len(g.rewrites)} rewrites"
        cx, ly = x + bar_w // 2, h_max + 14
        parts.append(
            f'<a href="#g{i}"><rect x="{x}" y="{y}" width="{bar_w}" height="{h}" fill="{fill}">'
            f"<title>{esc(tip)}</title></rect>"
            f'<text x="{cx}" y="{ly}" text-anchor="end" transform="rotate(-45 {cx} {ly})">{esc(_short_group(g.name))}</text></a>'
        )
    parts.append("</svg>")
    return "".join(parts)


