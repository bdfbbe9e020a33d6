"""Inspection: before/after graph listings, a diff with provenance, and an HTML picture.

Everything here reads graphs; nothing mutates them.

* :func:`format_graph` -- one line per node: name, op, arguments, ``dtype[shape]``, module
  path, and for nodes a pass created a ``+`` marker and their provenance (rule, pass,
  replaced nodes, rule source).
* :func:`graph_diff` -- what changed between two graphs of the same capture: nodes removed
  and added (by name: passes keep surviving nodes' names), surviving nodes whose inputs
  were rewired, each rewrite (rule + replaced nodes + new nodes) and a per-rule summary.
* :func:`render_html` -- one self-contained HTML file (inline CSS + SVG, no network, no
  Graphviz). Nodes are grouped by model layer (derived from ``nn_module_stack``, e.g.
  ``gpt_neox.layers.3``); each layer is a collapsible ``<details>`` block. New nodes are
  green, removed ones red and struck through, and every rewrite gets a small before/after
  data-flow drawing. Groups past a size threshold show an op histogram and only their
  changed nodes, so a 24-layer model with hundreds of thousands of nodes stays small.
* :func:`write_inspection` -- all of the above (plus the report and generated kernel
  source) into a folder.
"""
from __future__ import annotations

import html
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.fx
from torch.fx.node import Node

from .graph_utils import PROVENANCE_KEY, op_name

__all__ = [
    "GraphDiff",
    "Rewrite",
    "RuleSummary",
    "format_graph",
    "graph_diff",
    "layer_of",
    "module_path",
    "render_html",
    "write_inspection",
]

# --------------------------------------------------------------------------- node facts

_DTYPE_SHORT = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "bool",
    torch.complex64: "c64",
    torch.complex128: "c128",
}

_PATH_CACHE: dict[str, str] = {}
_LAYER_CACHE: dict[str, str] = {}

INPUTS_GROUP = "(inputs)"
OUTPUTS_GROUP = "(outputs)"
TOP_GROUP = "(top level)"


def _clean_path(path: str) -> str:
    """``L['self'].layers[0].mixer`` / ``L__self___layers_0`` styles -> ``layers.0.mixer``."""
    cached = _PATH_CACHE.get(path)
    if cached is not None:
        return cached
    p = path
    p = re.sub(r"^L\['self'\]\.?", "", p)
    p = re.sub(r"^L__self__\.?", "", p)
    p = re.sub(r"^self\.", "", p)
    p = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", p)  # [0] / ['name'] -> .0 / .name
    p = re.sub(r"getattr\(([^,]+),\s*'([^']+)'\)", r"\1.\2", p)
    p = p.replace("._modules.", ".").strip(".")
    _PATH_CACHE[path] = p
    return p


def module_path(node: Node) -> str:
    """The module a node belongs to: the innermost entry of ``meta['nn_module_stack']``
    (``gpt_neox.layers.0.attention``); for parameters (``get_attr``) the owning module."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        try:
            last = next(reversed(stack.values()))
        except (TypeError, StopIteration):  # pragma: no cover - unusual meta
            last = None
        if last is not None:
            path = last[0] if isinstance(last, (tuple, list)) else str(last)
            return _clean_path(str(path))
    if node.op == "get_attr":
        target = str(node.target)
        return target.rsplit(".", 1)[0] if "." in target else ""
    return ""


def layer_of(path: str) -> str:
    """Group key of a module path: everything up to the first numeric component
    (``gpt_neox.layers.3.attention.dense`` -> ``gpt_neox.layers.3``); paths without one are
    cut to two components (``gpt_neox.embed_in``, ``lm_head``)."""
    cached = _LAYER_CACHE.get(path)
    if cached is not None:
        return cached
    parts = [p for p in path.split(".") if p]
    out = ""
    for i, part in enumerate(parts):
        if part.isdigit():
            out = ".".join(parts[: i + 1])
            break
    else:
        out = ".".join(parts[:2])
    _LAYER_CACHE[path] = out
    return out


_OPNAME_CACHE: dict[Any, str] = {}


def _no_gc(fn):
    """Run ``fn`` with the cyclic GC paused: walking a 500k-node graph allocates millions
    of small objects, and repeated full collections would make it several times slower."""
    import functools
    import gc

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        was = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was:
                gc.enable()

    return wrapper


def _opn(node: Node) -> str:
    """:func:`fxopt.graph_utils.op_name`, memoised per call_function target (hot on big graphs)."""
    if node.op != "call_function":
        return op_name(node)
    t = node.target
    try:
        return _OPNAME_CACHE[t]
    except KeyError:
        name = _OPNAME_CACHE[t] = op_name(node)
        return name
    except TypeError:  # unhashable target
        return op_name(node)


def _group_of(node: Node) -> str:
    if node.op == "placeholder":
        return INPUTS_GROUP
    if node.op == "output":
        return OUTPUTS_GROUP
    return layer_of(module_path(node)) or TOP_GROUP


def format_value(val: Any, _depth: int = 0) -> str:
    """``f32[1, 8, 64]`` for tensors; tuples of those; literals as themselves."""
    if isinstance(val, torch.Tensor):
        dt = _DTYPE_SHORT.get(val.dtype, str(val.dtype).replace("torch.", ""))
        try:
            shape = ", ".join(str(s) for s in val.shape)
        except Exception:  # noqa: BLE001 - exotic tensor subclasses
            shape = "?"
        return f"{dt}[{shape}]"
    if val is None:
        return ""
    if isinstance(val, (list, tuple)):
        if _depth > 1:
            return "(...)"
        items = [format_value(v, _depth + 1) for v in val[:6]]
        more = f", ... +{len(val) - 6}" if len(val) > 6 else ""
        return "(" + ", ".join(items) + more + ")"
    if isinstance(val, (bool, int, float, torch.SymInt, torch.SymFloat, torch.SymBool)):
        return str(val)
    return type(val).__name__


def _fmt_arg(a: Any, depth: int = 0) -> str:
    if isinstance(a, Node):
        return a.name
    if isinstance(a, (list, tuple)):
        if depth > 2:
            return "[...]"
        items = [_fmt_arg(x, depth + 1) for x in a[:8]]
        if len(a) > 8:
            items.append(f"... +{len(a) - 8}")
        body = ", ".join(items)
        return f"[{body}]" if isinstance(a, list) else f"({body}{',' if len(a) == 1 else ''})"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k}: {_fmt_arg(v, depth + 1)}" for k, v in list(a.items())[:8]) + "}"
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "")
    if isinstance(a, torch.Tensor):
        return f"tensor({format_value(a)})"
    if isinstance(a, str):
        return repr(a if len(a) <= 48 else a[:45] + "...")
    r = repr(a)
    return r if len(r) <= 48 else r[:45] + "..."


def format_args(node: Node) -> str:
    parts = [_fmt_arg(a) for a in node.args]
    parts += [f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items()]
    return ", ".join(parts)


def _short_list(names: list[str], limit: int = 8) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", ... (+{len(names) - limit})"


def provenance(node: Node) -> dict | None:
    p = node.meta.get(PROVENANCE_KEY)
    return p if isinstance(p, dict) else None


def format_provenance(prov: Mapping[str, Any], limit: int = 8) -> str:
    rule = prov.get("rule") or "?"
    pname = prov.get("pass") or "?"
    frm = [str(x) for x in (prov.get("from") or [])]
    text = f"<- rule {rule} (pass {pname}) from {_short_list(frm, limit) or '(nothing)'}"
    if prov.get("source"):
        text += f" [{prov['source']}]"
    return text


def format_node(node: Node) -> str:
    """One listing line for ``node`` (without the leading marker)."""
    op = _opn(node)
    if node.op in ("placeholder", "get_attr"):
        head = f"{node.name} = {op}({node.target})" if node.op == "get_attr" else f"{node.name} = input"
    elif node.op == "output":
        head = f"output({format_args(node)})"
    else:
        head = f"{node.name} = {op}({format_args(node)})"
    parts = [head]
    val = format_value(node.meta.get("val"))
    if val:
        parts.append(f":: {val}")
    mod = module_path(node)
    if mod:
        parts.append(f"@ {mod}")
    prov = provenance(node)
    if prov is not None:
        parts.append(format_provenance(prov))
    return "  ".join(parts)


def _graph_of(g) -> torch.fx.Graph:
    if isinstance(g, torch.fx.Graph):
        return g
    if isinstance(g, torch.fx.GraphModule):
        return g.graph
    inner = getattr(g, "graph_module", None)
    if isinstance(inner, torch.fx.GraphModule):
        return inner.graph
    raise TypeError(f"expected a torch.fx.GraphModule or Graph, got {type(g).__name__}")


@_no_gc
def format_graph(gm, *, layer_headers: bool = True) -> str:
    """A readable listing of ``gm``: one line per node in graph order.

    Nodes a pass created start with ``+`` and end with their provenance. When
    ``layer_headers`` is set, a ``# -- layer ...`` comment precedes each run of compute
    nodes of one layer (parameters and inputs do not start a new run)."""
    graph = _graph_of(gm)
    nodes = list(graph.nodes)
    n_new = sum(1 for n in nodes if PROVENANCE_KEY in n.meta)
    ops = Counter(n.op for n in nodes)
    lines = [
        f"# {len(nodes)} nodes ({', '.join(f'{v} {k}' for k, v in sorted(ops.items()))}); "
        f"{n_new} created by fxopt passes (marked +)"
    ]
    current = None
    for node in nodes:
        if layer_headers and node.op in ("call_function", "call_method", "call_module"):
            grp = _group_of(node)
            if grp != current:
                current = grp
                lines.append(f"# -- layer {grp}")
        mark = "+ " if PROVENANCE_KEY in node.meta else "  "
        lines.append(mark + format_node(node))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- diff


@dataclass
class Rewrite:
    """One application of a rule: ``replaced`` (the names recorded by the pass) became ``added``."""

    rule: str
    pass_name: str
    source: str | None
    replaced: list[str]
    removed: list[str]  # those of ``replaced`` that exist in ``before`` and not in ``after``
    added: list[str]
    group: str

    def __str__(self) -> str:
        src = f"  [{self.source}]" if self.source else ""
        return (
            f"[{self.rule}] (pass {self.pass_name}) @ {self.group}: "
            f"{_short_list(self.replaced, 12) or '(nothing)'} -> {_short_list(self.added, 12)}{src}"
        )


@dataclass
class RuleSummary:
    rule: str
    pass_name: str
    source: str | None = None
    rewrites: int = 0
    added: int = 0
    removed: int = 0
    groups: list[str] = field(default_factory=list)


@dataclass
class GraphDiff:
    """The difference between two graphs of one capture (``before`` -> ``after``)."""

    before_nodes: int
    after_nodes: int
    removed: list[str]  # node names, in before's order
    added: list[str]  # node names, in after's order
    rewired: list[str]  # surviving nodes whose inputs changed
    rewrites: list[Rewrite]
    rules: dict[str, RuleSummary]
    removed_by: dict[str, str]  # removed node -> rule that consumed it (absent: dead code / unknown)
    op_counts_before: Counter
    op_counts_after: Counter
    _before: torch.fx.Graph | None = field(default=None, repr=False, compare=False)
    _after: torch.fx.Graph | None = field(default=None, repr=False, compare=False)

    @property
    def unattributed_removed(self) -> list[str]:
        return [n for n in self.removed if n not in self.removed_by]

    @property
    def op_delta(self) -> dict[str, tuple[int, int]]:
        keys = set(self.op_counts_before) | set(self.op_counts_after)
        out = {}
        for k in sorted(keys):
            b, a = self.op_counts_before.get(k, 0), self.op_counts_after.get(k, 0)
            if a != b:
                out[k] = (b, a)
        return out

    def summary(self) -> str:
        """Counts and the per-rule table (no per-node lists)."""
        lines = [
            f"graph diff: {self.before_nodes} -> {self.after_nodes} nodes "
            f"({len(self.removed)} removed, {len(self.added)} added, {len(self.rewired)} rewired, "
            f"{len(self.rewrites)} rewrites)"
        ]
        if self.rules or self.unattributed_removed:
            rows = [("rule", "pass", "rewrites", "+nodes", "-nodes", "groups")]
            for r in self.rules.values():
                groups = _short_list(r.groups, 4)
                rows.append((r.rule, r.pass_name, str(r.rewrites), str(r.added), str(r.removed), groups))
            un = self.unattributed_removed
            if un:
                rows.append(("(no rule: dead code)", "-", "-", "0", str(len(un)), ""))
            lines.append("")
            lines.append("per rule:")
            lines.extend("  " + l for l in _table(rows))
        elif not self.removed and not self.added:
            lines.append("no changes")
        delta = self.op_delta
        if delta:
            lines.append("")
            lines.append("op counts (before -> after):")
            rows = [(k, f"{b} -> {a}", f"({a - b:+d})") for k, (b, a) in delta.items()]
            lines.extend("  " + l for l in _table(rows))
        return "\n".join(lines)

    @_no_gc
    def __str__(self) -> str:
        lines = [self.summary()]
        if self.rewrites:
            lines += ["", f"rewrites ({len(self.rewrites)}):"]
            lines += ["  " + str(r) for r in self.rewrites]
        if self.removed:
            lines += ["", f"removed ({len(self.removed)}):"]
            for name in self.removed:
                node = _lookup(self._before, name)
                desc = format_node(node) if node is not None else name
                by = self.removed_by.get(name)
                lines.append(f"  - {desc}" + (f"  [by {by}]" if by else "  [dead code]"))
        if self.added:
            lines += ["", f"added ({len(self.added)}):"]
            for name in self.added:
                node = _lookup(self._after, name)
                lines.append(f"  + {format_node(node) if node is not None else name}")
        if self.rewired:
            lines += ["", f"rewired ({len(self.rewired)}): surviving nodes whose inputs changed"]
            for name in self.rewired:
                node = _lookup(self._after, name)
                lines.append(f"  ~ {format_node(node) if node is not None else name}")
        return "\n".join(lines) + "\n"


_LOOKUP_CACHE: dict[int, tuple[int, dict[str, Node]]] = {}


def _index(graph: torch.fx.Graph) -> dict[str, Node]:
    return {n.name: n for n in graph.nodes}


def _lookup(graph: torch.fx.Graph | None, name: str) -> Node | None:
    if graph is None:
        return None
    key = id(graph)
    cached = _LOOKUP_CACHE.get(key)
    size = len(graph.nodes)
    if cached is None or cached[0] != size:
        if len(_LOOKUP_CACHE) > 8:
            _LOOKUP_CACHE.clear()
        cached = (size, _index(graph))
        _LOOKUP_CACHE[key] = cached
    return cached[1].get(name)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


@_no_gc
def graph_diff(before, after) -> GraphDiff:
    """Compare two graphs of one capture. Nodes are matched by name (passes keep surviving
    nodes' names); a node present in both whose ``after`` version carries provenance the
    ``before`` one lacks counts as removed and re-added (rewritten in place)."""
    gb, ga = _graph_of(before), _graph_of(after)
    bidx, aidx = _index(gb), _index(ga)
    rewritten_in_place = {
        name
        for name, n in aidx.items()
        if PROVENANCE_KEY in n.meta and name in bidx and PROVENANCE_KEY not in bidx[name].meta
    }
    removed = [name for name in bidx if name not in aidx or name in rewritten_in_place]
    added = [name for name in aidx if name not in bidx or name in rewritten_in_place]
    removed_set = set(removed)

    rewired = []
    for name, an in aidx.items():
        bn = bidx.get(name)
        if bn is None or name in rewritten_in_place:
            continue
        if [i.name for i in an.all_input_nodes] != [i.name for i in bn.all_input_nodes]:
            rewired.append(name)

    # group new nodes into rewrites by their provenance record
    rewrites: dict[tuple, Rewrite] = {}
    for name in added:
        node = aidx[name]
        prov = provenance(node)
        if prov is None:
            key = ("(unknown)", "(unknown)", None, ())
        else:
            key = (
                str(prov.get("rule") or "?"),
                str(prov.get("pass") or "?"),
                prov.get("source"),
                tuple(str(x) for x in (prov.get("from") or ())),
            )
        rw = rewrites.get(key)
        if rw is None:
            replaced = list(key[3])
            rw = Rewrite(
                rule=key[0],
                pass_name=key[1],
                source=key[2],
                replaced=replaced,
                removed=[r for r in replaced if r in removed_set],
                added=[],
                group=_group_of(node),
            )
            rewrites[key] = rw
        rw.added.append(name)

    removed_by: dict[str, str] = {}
    rules: dict[str, RuleSummary] = {}
    for rw in rewrites.values():
        rs = rules.get(rw.rule)
        if rs is None:
            rs = rules[rw.rule] = RuleSummary(rule=rw.rule, pass_name=rw.pass_name, source=rw.source)
        rs.rewrites += 1
        rs.added += len(rw.added)
        for r in rw.removed:
            if r not in removed_by:
                removed_by[r] = rw.rule
                rs.removed += 1
        if rw.group not in rs.groups:
            rs.groups.append(rw.group)

    return GraphDiff(
        before_nodes=len(bidx),
        after_nodes=len(aidx),
        removed=removed,
        added=added,
        rewired=rewired,
        rewrites=list(rewrites.values()),
        rules=rules,
        removed_by=removed_by,
        op_counts_before=Counter(_opn(n) for n in gb.nodes),
        op_counts_after=Counter(_opn(n) for n in ga.nodes),
        _before=gb,
        _after=ga,
    )


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font:13px/1.4 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:16px 24px;color:#222}
h1{font-size:20px;margin:0 0 6px}h2{font-size:16px;margin:18px 0 6px;border-bottom:1px solid #ddd}
code,pre,.mono,td{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
table{border-collapse:collapse;margin:4px 0}td,th{padding:1px 8px;border-bottom:1px solid #eee;text-align:left;
vertical-align:top}th{background:#f4f4f4;font-weight:600}
.new{background:#d9f7d9}.rm{background:#fde0e0;color:#933}.rm td.n,.rm td.o{text-decoration:line-through}
.rw{background:#fff6cc}.muted{color:#888}.prov{color:#265}.badge{display:inline-block;padding:0 6px;margin:0 2px;
border-radius:8px;font-size:11px}.b-new{background:#bde9bd}.b-rm{background:#f6c4c4}.b-rw{background:#f3e39a}
.b-n{background:#e6e6e6}details{margin:3px 0;border:1px solid #ddd;border-radius:4px;padding:2px 8px}
details.chg{border-color:#7bc47b}summary{cursor:pointer;padding:2px 0}summary .g{font-weight:600}
.regions{display:flex;flex-wrap:wrap;gap:10px;margin:6px 0}.region{border:1px solid #ccc;border-radius:4px;
padding:4px 6px;background:#fcfcfc}.region .t{font-size:12px;margin-bottom:2px}.pair{display:flex;gap:8px;
align-items:flex-start}.pair .lbl{font-size:11px;color:#666}.hist td{border:none;padding:0 6px}
.legend span{margin-right:12px}pre{background:#f8f8f8;padding:6px;overflow:auto;white-space:pre-wrap}
.hist{display:flex;flex-wrap:wrap;gap:3px 6px;margin:4px 0}.hist .h{font-family:ui-monospace,Menlo,Consolas,monospace;
font-size:11px;background:#f3f3f3;border-radius:3px;padding:0 4px}
td.a{max-width:520px;overflow-wrap:anywhere}
"""

# How much to show before collapsing (tunable through render_html's keyword arguments).
MAX_ROWS_PER_GROUP = 250  # groups larger than this show histogram + changed nodes only
MAX_CHANGED_ROWS = 120  # changed rows listed per collapsed group
MAX_TOTAL_ROWS = 6000  # overall row budget; once spent, groups show histograms only
MAX_REGION_DRAWINGS = 4  # before/after drawings per group (per rule, deduplicated by shape)
MAX_REGION_NODES = 24  # a region side with more nodes shows a histogram instead


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


@dataclass
class _Row:
    kind: str  # "new", "rm", "rw", ""
    node: Node


@dataclass
class _Group:
    name: str
    rows: list[_Row] = field(default_factory=list)
    n_before: int = 0
    n_after: int = 0
    n_new: int = 0
    n_rm: int = 0
    n_rw: int = 0
    rewrites: list[Rewrite] = field(default_factory=list)
    ops_after: Counter = field(default_factory=Counter)
    ops_before: Counter = field(default_factory=Counter)
    first_index: int = 1 << 62  # position of the first compute row in the merged order


def _merged_groups(gb: torch.fx.Graph, ga: torch.fx.Graph, diff: GraphDiff) -> list[_Group]:
    """After's nodes in order, with each removed node inserted right after the last node
    that preceded it in ``before`` and survived; then split by layer group."""
    removed = set(diff.removed)
    added = set(diff.added)
    rewired = set(diff.rewired)
    anchored: dict[str | None, list[Node]] = {}
    last_survivor: str | None = None
    for n in gb.nodes:
        if n.name in removed:
            anchored.setdefault(last_survivor, []).append(n)
        else:
            last_survivor = n.name

    groups: dict[str, _Group] = {}

    def grp(name: str) -> _Group:
        g = groups.get(name)
        if g is None:
            g = groups[name] = _Group(name)
        return g

    # group of each before node, reused for surviving after nodes (same name, same meta)
    group_by_name: dict[str, str] = {}
    for n in gb.nodes:
        gname = _group_of(n)
        group_by_name[n.name] = gname
        g = grp(gname)
        g.n_before += 1
        g.ops_before[_opn(n)] += 1
    counter = 0

    def add_removed(anchor: str | None) -> None:
        nonlocal counter
        for rn in anchored.get(anchor, ()):
            g = grp(group_by_name[rn.name])
            g.rows.append(_Row("rm", rn))
            g.n_rm += 1
            counter += 1
            if rn.op not in ("get_attr", "placeholder"):
                g.first_index = min(g.first_index, counter)

    add_removed(None)
    for n in ga.nodes:
        name = n.name
        kind = "new" if name in added else ("rw" if name in rewired else "")
        gname = group_by_name.get(name) if kind != "new" else None
        g = grp(gname if gname is not None else _group_of(n))
        counter += 1
        if n.op not in ("get_attr", "placeholder"):
            g.first_index = min(g.first_index, counter)
        g.rows.append(_Row(kind, n))
        g.n_after += 1
        g.ops_after[_opn(n)] += 1
        if kind == "new":
            g.n_new += 1
        elif kind == "rw":
            g.n_rw += 1
        add_removed(name)  # only surviving names are anchors
    for rw in diff.rewrites:
        grp(rw.group).rewrites.append(rw)
    return sorted(groups.values(), key=_group_order_key)


def _group_order_key(g: _Group) -> tuple:
    """Inputs first, outputs last, the rest by their first compute node (parameters sit at
    the top of exported graphs and would otherwise decide the order)."""
    if g.name == INPUTS_GROUP:
        return (0, 0)
    if g.name == OUTPUTS_GROUP:
        return (3, 0)
    if g.first_index < (1 << 62):
        return (1, g.first_index)
    return (2, 0)


def _row_html(row: _Row, group: str) -> str:
    n = row.node
    mod = module_path(n)
    if group and mod.startswith(group):
        mod = "…" + mod[len(group) :] if len(mod) > len(group) else ""
    prov = provenance(n)
    prov_html = ""
    if prov is not None:
        frm = [str(x) for x in (prov.get("from") or [])]
        prov_html = (
            f"<b>{_e(prov.get('rule') or '?')}</b> <span class=muted>({_e(prov.get('pass') or '?')})</span>"
            " from " + ", ".join(f'<a href="#n-{_e(x)}-rm">{_e(x)}</a>' for x in frm[:6])
            + (f" … (+{len(frm) - 6})" if len(frm) > 6 else "")
        )
        if prov.get("source"):
            prov_html += f' <span class=muted title="{_e(prov["source"])}">[src]</span>'
    marker = {"new": "+", "rm": "−", "rw": "~"}.get(row.kind, "")
    cls = f' class="{row.kind}"' if row.kind else ""
    if n.op == "get_attr":
        args = str(n.target)
    elif n.op == "placeholder":
        args = ""
    else:
        args = format_args(n)
    return (
        f"<tr{cls} id=\"n-{_e(n.name)}{'-rm' if row.kind == 'rm' else ''}\"><td>{marker}</td><td class=n>{_e(n.name)}</td>"
        f"<td class=o>{_e(_opn(n))}</td><td class=a>{_e(args)}</td>"
        f"<td>{_e(format_value(n.meta.get('val')))}</td><td>{_e(mod)}</td><td class=prov>{prov_html}</td></tr>"
    )


_TABLE_HEAD = (
    "<table><tr><th></th><th>node</th><th>op</th><th>args</th><th>value</th><th>module</th><th>provenance</th></tr>"
)


def _hist_html(g: _Group, limit: int = 40) -> str:
    """The group's op histogram (after, with the change vs before) as a wrapped line of chips."""
    keys = sorted(set(g.ops_after) | set(g.ops_before), key=lambda k: (-max(g.ops_after[k], g.ops_before[k]), k))
    cells = []
    for k in keys[:limit]:
        a, b = g.ops_after.get(k, 0), g.ops_before.get(k, 0)
        d = a - b
        delta = f' <span class="badge {"b-new" if d > 0 else "b-rm"}">{d:+d}</span>' if d else ""
        cells.append(f"<span class=h>{_e(k)} <b>{a}</b>{delta}</span>")
    if len(keys) > limit:
        cells.append(f"<span class=muted>… {len(keys) - limit} more ops</span>")
    return f"<div class=hist>{''.join(cells)}</div>"


# --- small data-flow drawings -------------------------------------------------------

_BOX_W, _BOX_H, _GAP_X, _GAP_Y = 150, 30, 34, 8
_FILL = {"new": "#bde9bd", "rm": "#f6c4c4", "ctx": "#f1f1f1"}
_STROKE = {"new": "#2c8a2c", "rm": "#c0392b", "ctx": "#aaa"}


def _short_op(node: Node) -> str:
    s = op_name(node)
    for pre in ("aten.", "fxopt."):
        if s.startswith(pre):
            s = s[len(pre) :]
    return s if len(s) <= 22 else s[:21] + "…"


def _svg_dag(nodes: list[tuple[Node, str]], edges: list[tuple[str, str]]) -> str:
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
            f'<g><title>{_e(title)}</title><rect x="{x}" y="{y}" width="{_BOX_W}" height="{_BOX_H}" rx="4" '
            f'fill="{_FILL[kind]}" stroke="{_STROKE[kind]}"{dash}/>'
            f'<text x="{x + 5}" y="{y + 12}" font-weight="bold"{deco}>{_e(_short_op(n) if kind != "ctx" else name)}</text>'
            f'<text x="{x + 5}" y="{y + 25}" fill="#555">{_e(name if kind != "ctx" else (val[:24] or n.op))}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _region_side(graph_nodes: dict[str, Node], core_names: list[str], kind: str, max_nodes: int) -> str:
    core = [graph_nodes[c] for c in core_names if c in graph_nodes]
    if not core:
        return "<div class=muted>(none)</div>"
    if len(core) > max_nodes:
        hist = Counter(_opn(n) for n in core)
        items = ", ".join(f"{_e(k)} ×{v}" for k, v in hist.most_common(8))
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
    return _svg_dag(nodes, edges)


def _region_html(rw: Rewrite, bidx: dict[str, Node], aidx: dict[str, Node], max_nodes: int) -> str:
    src = f' <span class=muted>{_e(rw.source)}</span>' if rw.source else ""
    before = _region_side(bidx, rw.removed, "rm", max_nodes)
    after = _region_side(aidx, rw.added, "new", max_nodes)
    return (
        f'<div class=region><div class=t><b>{_e(rw.rule)}</b> <span class=muted>(pass {_e(rw.pass_name)})</span>'
        f" {len(rw.removed)} → {len(rw.added)} nodes{src}</div>"
        f'<div class=pair><div><div class=lbl>before</div>{before}</div>'
        f'<div><div class=lbl>after</div>{after}</div></div></div>'
    )


def _region_shape(rw: Rewrite, bidx: dict[str, Node], aidx: dict[str, Node]) -> tuple:
    return (
        rw.rule,
        tuple(_opn(bidx[n]) for n in rw.removed if n in bidx),
        tuple(_opn(aidx[n]) for n in rw.added if n in aidx),
    )


def _short_group(name: str) -> str:
    parts = name.split(".")
    s = ".".join(parts[-2:]) if len(parts) > 1 and parts[-1].isdigit() else parts[-1]
    return s if len(s) <= 16 else s[:15] + "…"


def _overview_svg(groups: list[_Group]) -> str:
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
            f"<title>{_e(tip)}</title></rect>"
            f'<text x="{cx}" y="{ly}" text-anchor="end" transform="rotate(-45 {cx} {ly})">{_e(_short_group(g.name))}</text></a>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _report_html(report: Any) -> str:
    if report is None:
        return ""
    parts = ["<h2>Report</h2>"]
    matches = getattr(report, "matches", None)
    if isinstance(matches, Mapping) and matches:
        rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in matches.items())
        parts.append(f"<table><tr><th>pass / rule</th><th>matches</th></tr>{rows}</table>")
    text = str(report)
    if text.strip():
        parts.append(f"<pre>{_e(text)}</pre>")
    return "".join(parts)


def _group_signature(g: _Group) -> tuple:
    return tuple((r.kind, _opn(r.node)) for r in g.rows if r.node.op not in ("get_attr", "placeholder"))


@_no_gc
def render_html(
    before,
    after,
    report: Any = None,
    title: str = "fxopt inspection",
    *,
    diff: GraphDiff | None = None,
    kernels: Mapping[str, str] | None = None,
    max_rows_per_group: int = MAX_ROWS_PER_GROUP,
    max_changed_rows: int = MAX_CHANGED_ROWS,
    max_total_rows: int = MAX_TOTAL_ROWS,
    max_region_drawings: int = MAX_REGION_DRAWINGS,
    max_region_nodes: int = MAX_REGION_NODES,
) -> str:
    """A self-contained HTML page (inline CSS and SVG; no scripts from anywhere) showing
    ``before`` -> ``after`` grouped by layer. ``report`` (``OptimizedModule.report()``) goes
    in the header; ``kernels`` maps kernel names to links (relative paths) to list."""
    gb, ga = _graph_of(before), _graph_of(after)
    if diff is None:
        diff = graph_diff(gb, ga)
    bidx, aidx = _index(gb), _index(ga)
    groups = _merged_groups(gb, ga, diff)

    out: list[str] = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<div>{diff.before_nodes} → {diff.after_nodes} nodes · "
        f'<span class="badge b-new">+{len(diff.added)} added</span>'
        f'<span class="badge b-rm">−{len(diff.removed)} removed</span>'
        f'<span class="badge b-rw">~{len(diff.rewired)} rewired</span> · '
        f"{len(diff.rewrites)} rewrites by {len(diff.rules)} rule(s) in "
        f"{sum(1 for g in groups if g.n_new or g.n_rm)} of {len(groups)} groups</div>",
        '<div class=legend><span class="badge b-new">new node</span><span class="badge b-rm">removed node</span>'
        '<span class="badge b-rw">surviving node with changed inputs</span>'
        '<span class="badge b-n">unchanged</span></div>',
    ]
    out.append(_report_html(report))
    if diff.rules:
        rows = []
        for r in diff.rules.values():
            hit = [(i, g.name) for i, g in enumerate(groups) if g.name in r.groups]
            if len(hit) > 6:  # 24 layers: first three, count, last one
                hit_links = [f'<a href="#g{i}">{_e(n)}</a>' for i, n in hit[:3] + hit[-1:]]
                links = ", ".join(hit_links[:3]) + f", … ({len(hit) - 4} more) …, " + hit_links[3]
            else:
                links = ", ".join(f'<a href="#g{i}">{_e(n)}</a>' for i, n in hit)
            rows.append(
                f"<tr><td><b>{_e(r.rule)}</b></td><td>{_e(r.pass_name)}</td><td>{r.rewrites}</td>"
                f"<td>+{r.added}</td><td>−{r.removed}</td><td>{links}</td>"
                f"<td class=muted>{_e(r.source or '')}</td></tr>"
            )
        un = diff.unattributed_removed
        if un:
            rows.append(f"<tr><td>(no rule: dead code)</td><td></td><td></td><td></td><td>−{len(un)}</td><td></td><td></td></tr>")
        out.append(
            "<h2>Rules</h2><table><tr><th>rule</th><th>pass</th><th>rewrites</th><th>added</th><th>removed</th>"
            f"<th>groups</th><th>source</th></tr>{''.join(rows)}</table>"
        )
    if kernels:
        items = "".join(f'<li><a href="{_e(path)}">{_e(name)}</a></li>' for name, path in kernels.items())
        out.append(f"<h2>Generated kernels</h2><ul>{items}</ul>")
    out.append(
        "<h2>Model map</h2><div class=muted>one bar per group (height: log node count; green: rewritten, "
        "yellow: rewired only); click a bar to jump</div>"
    )
    out.append(_overview_svg(groups))
    out.append(
        "<h2>Groups</h2><div class=muted>nodes grouped by module/layer (from nn_module_stack), in graph order; "
        f"groups of more than {max_rows_per_group} nodes list only their changed nodes</div>"
    )

    budget = max_total_rows
    signatures: dict[tuple, str] = {}
    first_changed_open = True
    for i, g in enumerate(groups):
        changed = bool(g.n_new or g.n_rm)
        sig = _group_signature(g) if len(g.rows) <= 5 * max_rows_per_group else None
        same_as = signatures.get(sig) if sig else None
        if sig and same_as is None:
            signatures[sig] = g.name
        is_open = changed and first_changed_open
        if is_open:
            first_changed_open = False
        badges = f'<span class="badge b-n">{g.n_before} → {g.n_after} nodes</span>'
        if g.n_new:
            badges += f'<span class="badge b-new">+{g.n_new}</span>'
        if g.n_rm:
            badges += f'<span class="badge b-rm">−{g.n_rm}</span>'
        if g.n_rw:
            badges += f'<span class="badge b-rw">~{g.n_rw}</span>'
        if g.rewrites:
            per_rule = Counter(rw.rule for rw in g.rewrites)
            badges += " " + ", ".join(f"{_e(k)}×{v}" for k, v in per_rule.items())
        if same_as:
            badges += f' <span class=muted>(same structure as {_e(same_as)})</span>'
        out.append(
            f'<details id="g{i}"{" class=chg" if changed else ""}{" open" if is_open else ""}>'
            f"<summary><span class=g>{_e(g.name)}</span> {badges}</summary>"
        )
        # rewrite drawings, deduplicated by shape, a few per group
        if g.rewrites:
            shown: set[tuple] = set()
            drawings = []
            for rw in g.rewrites:
                shape = _region_shape(rw, bidx, aidx)
                if shape in shown:
                    continue
                shown.add(shape)
                if len(drawings) >= max_region_drawings:
                    break
                drawings.append(_region_html(rw, bidx, aidx, max_region_nodes))
            out.append(f"<div class=regions>{''.join(drawings)}</div>")
            hidden = len(g.rewrites) - len(drawings)
            if hidden > 0:
                out.append(
                    f"<div class=muted>{hidden} more rewrite(s) in this group (same shapes as drawn, or over the "
                    "drawing limit): see the table below and diff.txt</div>"
                )
        n_rows = len(g.rows)
        if n_rows <= max_rows_per_group and n_rows <= budget:
            budget -= n_rows
            params = [r for r in g.rows if r.node.op == "get_attr" and not r.kind]
            out.append(_TABLE_HEAD)
            if params:  # unchanged parameters/buffers fold into one row: they are context, not compute
                out.append(
                    f"<tr><td></td><td colspan=6><details><summary class=muted>{len(params)} parameters / buffers"
                    f"</summary><table>{''.join(_row_html(r, g.name) for r in params)}</table></details></td></tr>"
                )
            out.extend(_row_html(r, g.name) for r in g.rows if not (r.node.op == "get_attr" and not r.kind))
            out.append("</table>")
        else:
            out.append(_hist_html(g))
            changed_rows = [r for r in g.rows if r.kind]
            take = min(len(changed_rows), max_changed_rows, max(budget, 0))
            budget -= take
            if changed_rows:
                out.append(
                    f"<div class=muted>{g.n_after} nodes (+{g.n_rm} removed) is over the listing limit; showing "
                    f"{take} of {len(changed_rows)} changed rows (all of them in diff.txt)</div>"
                )
                if take:
                    out.append(_TABLE_HEAD)
                    out.extend(_row_html(r, g.name) for r in changed_rows[:take])
                    out.append("</table>")
            else:
                out.append(f"<div class=muted>{g.n_after} nodes, none changed (full listing in after.txt)</div>")
        out.append("</details>")
    out.append("</body></html>\n")
    return "".join(out)


# --------------------------------------------------------------------------- folder


def _unpack(obj) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule, Any]:
    if hasattr(obj, "graph_module") and hasattr(obj, "original_graph_module"):
        rep = getattr(obj, "report", None)
        report = rep() if callable(rep) else rep
        return obj.original_graph_module, obj.graph_module, report
    if isinstance(obj, (tuple, list)) and len(obj) in (2, 3):
        return obj[0], obj[1], (obj[2] if len(obj) == 3 else None)
    raise TypeError(
        "write_inspection takes an fxopt.OptimizedModule or a (before, after[, report]) tuple of "
        f"GraphModules, got {type(obj).__name__}"
    )


def _kernel_sources(gm) -> dict[str, str]:
    try:
        from . import codegen
    except ImportError:
        return {}
    fn = getattr(codegen, "kernel_sources", None)
    if fn is None:
        return {}
    return dict(fn(gm) or {})


def _kernel_filename(name: str, source: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "kernel"
    if "@triton.jit" in source or "import triton" in source:
        ext = ".py"
    elif "__global__" in source or "#include" in source:
        ext = ".cu"
    else:
        ext = ".txt"
    if stem.endswith(ext):
        stem = stem[: -len(ext)]
    fname, k = stem + ext, 1
    while fname in used:
        k += 1
        fname = f"{stem}_{k}{ext}"
    used.add(fname)
    return fname


def write_inspection(obj, out_dir, *, title: str | None = None, progress=None) -> dict[str, Path]:
    """Write ``before.txt``, ``after.txt``, ``diff.txt``, ``graph.html``, ``report.txt`` and
    ``kernels/`` (generated kernel source, when the graph has fused kernels) into ``out_dir``.

    ``obj`` is an ``fxopt.OptimizedModule`` or a ``(before, after[, report])`` tuple.
    ``progress`` is an optional ``callable(str)`` told about each file. Returns the paths
    by key: before, after, diff, html, report, kernels."""
    before, after, report = _unpack(obj)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda msg: None)
    paths: dict[str, Path] = {}

    say("writing before.txt")
    paths["before"] = out / "before.txt"
    paths["before"].write_text(format_graph(before), encoding="utf-8")
    say("writing after.txt")
    paths["after"] = out / "after.txt"
    paths["after"].write_text(format_graph(after), encoding="utf-8")

    say("diffing")
    diff = graph_diff(before, after)
    paths["diff"] = out / "diff.txt"
    paths["diff"].write_text(str(diff), encoding="utf-8")

    kdir = out / "kernels"
    kdir.mkdir(exist_ok=True)
    links: dict[str, str] = {}
    used: set[str] = set()
    for name, src in _kernel_sources(after).items():
        fname = _kernel_filename(name, src, used)
        (kdir / fname).write_text(src, encoding="utf-8")
        links[name] = f"kernels/{fname}"
    paths["kernels"] = kdir

    paths["report"] = out / "report.txt"
    report_text = (str(report).rstrip() + "\n\n") if report is not None else ""
    paths["report"].write_text(report_text + diff.summary() + "\n", encoding="utf-8")

    say("writing graph.html")
    if title is None:
        model = getattr(before, "meta", {}).get("fxopt_model") if hasattr(before, "meta") else None
        title = f"fxopt inspection: {model}" if model else "fxopt inspection"
    paths["html"] = out / "graph.html"
    paths["html"].write_text(render_html(before, after, report, title=title, diff=diff, kernels=links), encoding="utf-8")
    return paths


def iter_groups(gm) -> Iterable[tuple[str, list[Node]]]:
    """(group name, nodes) in order of first appearance -- the grouping the picture uses."""
    groups: dict[str, list[Node]] = {}
    for n in _graph_of(gm).nodes:
        groups.setdefault(_group_of(n), []).append(n)
    return groups.items()
