"""graph.html: one self-contained page (inline CSS, SVG and a little JavaScript; nothing
fetched from anywhere).

Controls at the top: a search box (node names, ops, arguments, modules, rules: matching rows
stay, groups without a match hide, groups with one open), "changed only" (hides unchanged rows
and groups), expand all / collapse all. The page opens at the first rewritten group (open, and
scrolled to). A scan rewrite shows as "L-step unrolled loop -> selective_scan": one drawing box
for the loop and one folded row for its removed nodes instead of a column of adds."""
from __future__ import annotations

from collections import Counter
from typing import Any, Mapping

from torch.fx.node import Node

from .diff import GraphDiff, Rewrite, graph_diff, index_nodes
from .drawing import esc, overview_svg, region_html, region_shape
from .groups import Group, Row, group_signature, merged_groups
from .attribution import UNATTRIBUTED
from .nodes import format_args, format_value, graph_of, module_path, no_gc, opn, provenance

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
.controls{position:sticky;top:0;background:#fff;padding:4px 0;border-bottom:1px solid #ddd;z-index:1}
.note{background:#fff3cd;border:1px solid #e0c36a;border-radius:4px;padding:4px 8px;margin:6px 0}
"""

# The controls' script: plain DOM, no framework; works on the file opened from disk.
_JS = """
(function(){
  var q=document.getElementById('fx-q'), chg=document.getElementById('fx-chg'), hits=document.getElementById('fx-hits');
  var groups=[].slice.call(document.querySelectorAll('details.grp'));
  function apply(){
    var term=q.value.trim().toLowerCase(), only=chg.checked, total=0;
    groups.forEach(function(g){
      var rows=[].slice.call(g.querySelectorAll('tr.row')), shown=0;
      rows.forEach(function(r){
        var changed=r.classList.contains('new')||r.classList.contains('rm')||r.classList.contains('rw');
        var ok=(!only||changed)&&(!term||r.textContent.toLowerCase().indexOf(term)>=0);
        r.style.display=ok?'':'none'; if(ok){shown++;}
      });
      var head=g.querySelector('summary').textContent.toLowerCase();
      var groupOk=(!only||g.classList.contains('chg'))&&(!term||shown>0||head.indexOf(term)>=0);
      g.style.display=groupOk?'':'none';
      if(term&&shown>0){g.open=true;}
      if(groupOk&&term){total+=shown;}
    });
    hits.textContent=term?(total+' matching rows'):'';
  }
  q.addEventListener('input',apply); chg.addEventListener('change',apply);
  function all(open){[].slice.call(document.querySelectorAll('details')).forEach(function(d){d.open=open;});}
  document.getElementById('fx-expand').addEventListener('click',function(){all(true);});
  document.getElementById('fx-collapse').addEventListener('click',function(){all(false);});
  if(!location.hash){var first=document.querySelector('details.chg');if(first){first.open=true;first.scrollIntoView();}}
})();
"""

_CONTROLS = (
    '<div id=fx-controls class=controls><input id=fx-q type=search placeholder="search nodes, ops, modules, rules" '
    'size=36> <label><input id=fx-chg type=checkbox> changed only</label> '
    '<button id=fx-expand type=button>expand all</button> <button id=fx-collapse type=button>collapse all</button> '
    '<span id=fx-hits class=muted></span>{first}</div>'
)

# How much to show before collapsing (tunable through render_html's keyword arguments).
MAX_ROWS_PER_GROUP = 250  # groups larger than this show histogram + changed nodes only
MAX_CHANGED_ROWS = 120  # changed rows listed per collapsed group
MAX_TOTAL_ROWS = 6000  # overall row budget; once spent, groups show histograms only
MAX_REGION_DRAWINGS = 4  # before/after drawings per group (per rule, deduplicated by shape)
MAX_REGION_NODES = 24  # a region side with more nodes shows a histogram instead

def _row_html(row: Row, group: str, by: Rewrite | None = None) -> str:
    n = row.node
    mod = module_path(n)
    if group and mod.startswith(group):
        mod = "…" + mod[len(group) :] if len(mod) > len(group) else ""
    prov = provenance(n)
    prov_html = ""
    if prov is not None:
        frm = [str(x) for x in (prov.get("from") or [])]
        prov_html = (
            f"<b>{esc(prov.get('rule') or '?')}</b> <span class=muted>({esc(prov.get('pass') or '?')})</span>"
            " from " + ", ".join(f'<a href="#n-{esc(x)}-rm">{esc(x)}</a>' for x in frm[:6])
            + (f" … (+{len(frm) - 6})" if len(frm) > 6 else "")
        )
        if prov.get("source"):
            prov_html += f' <span class=muted title="{esc(prov["source"])}">[src]</span>'
    if by is not None and row.kind == "rm":
        dead = ", left dead" if n.name in by.orphaned else ""
        prov_html = f"removed by <b>{esc(by.rule)}</b> <span class=muted>({esc(by.pass_name)}{dead})</span>"
    marker = {"new": "+", "rm": "−", "rw": "~"}.get(row.kind, "")
    cls = f' class="{row.kind} row"' if row.kind else ' class="row"'
    if n.op == "get_attr":
        args = str(n.target)
    elif n.op == "placeholder":
        args = ""
    else:
        args = format_args(n)
    return (
        f"<tr{cls} id=\"n-{esc(n.name)}{'-rm' if row.kind == 'rm' else ''}\"><td>{marker}</td><td class=n>{esc(n.name)}</td>"
        f"<td class=o>{esc(opn(n))}</td><td class=a>{esc(args)}</td>"
        f"<td>{esc(format_value(n.meta.get('val')))}</td><td>{esc(mod)}</td><td class=prov>{prov_html}</td></tr>"
    )


_TABLE_HEAD = (
    "<table><tr><th></th><th>node</th><th>op</th><th>args</th><th>value</th><th>module</th><th>provenance</th></tr>"
)


def _rows_html(rows: list[Row], group: str, owner: dict[str, Rewrite]) -> list[str]:
    """Table rows; the removed nodes of a scan rewrite fold into one row reading "L-step
    unrolled loop -> selective_scan" (its nodes listed inside, collapsed)."""
    out: list[str] = []
    folded: dict[int, list[Row]] = {}
    at: dict[int, int] = {}
    for r in rows:
        rw = owner.get(r.node.name) if r.kind == "rm" else None
        if rw is not None and rw.summary != rw.rule:
            key = id(rw)
            if key not in folded:
                folded[key] = []
                at[key] = len(out)
                out.append("")  # filled below, where the loop's first node stood
            folded[key].append(r)
            continue
        out.append(_row_html(r, group, owner.get(r.node.name) if r.kind == "rm" else None))
    by_id = {id(rw): rw for rw in owner.values()}
    for key, members in folded.items():
        rw = by_id[key]
        ops = Counter(opn(r.node) for r in members)
        hist = ", ".join(f"{esc(k)} ×{v}" for k, v in ops.most_common(6))
        inner = "".join(_row_html(r, group, rw) for r in members)
        out[at[key]] = (
            f'<tr class="rm row"><td>−</td><td colspan=6><details><summary><b>{esc(rw.summary).replace(" -&gt; ", " → ")}</b> '
            f'<span class=muted>({len(members)} nodes removed: {hist})</span></summary>'
            f"<table>{inner}</table></details></td></tr>"
        )
    return out


def _hist_html(g: Group, limit: int = 40) -> str:
    """The group's op histogram (after, with the change vs before) as a wrapped line of chips."""
    keys = sorted(set(g.ops_after) | set(g.ops_before), key=lambda k: (-max(g.ops_after[k], g.ops_before[k]), k))
    cells = []
    for k in keys[:limit]:
        a, b = g.ops_after.get(k, 0), g.ops_before.get(k, 0)
        d = a - b
        delta = f' <span class="badge {"b-new" if d > 0 else "b-rm"}">{d:+d}</span>' if d else ""
        cells.append(f"<span class=h>{esc(k)} <b>{a}</b>{delta}</span>")
    if len(keys) > limit:
        cells.append(f"<span class=muted>… {len(keys) - limit} more ops</span>")
    return f"<div class=hist>{''.join(cells)}</div>"



def _report_html(report: Any) -> str:
    if report is None:
        return ""
    parts = ["<h2>Report</h2>"]
    matches = getattr(report, "matches", None)
    if isinstance(matches, Mapping) and matches:
        rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in matches.items())
        parts.append(f"<table><tr><th>pass / rule</th><th>matches</th></tr>{rows}</table>")
    text = str(report)
    if text.strip():
        parts.append(f"<pre>{esc(text)}</pre>")
    return "".join(parts)


@no_gc
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
    gb, ga = graph_of(before), graph_of(after)
    if diff is None:
        diff = graph_diff(gb, ga)
    bidx, aidx = index_nodes(gb), index_nodes(ga)
    groups = merged_groups(gb, ga, diff)
    first_changed = next((i for i, g in enumerate(groups) if g.n_new or g.n_rm), None)
    owner = {name: rw for rw in diff.rewrites for name in rw.removed}

    out: list[str] = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<div>{diff.before_nodes} → {diff.after_nodes} nodes · "
        f'<span class="badge b-new">+{len(diff.added)} added</span>'
        f'<span class="badge b-rm">−{len(diff.removed)} removed</span>'
        f'<span class="badge b-rw">~{len(diff.rewired)} rewired</span> · '
        f"{len(diff.rewrites)} rewrites by {len(diff.rules)} rule(s) in "
        f"{sum(1 for g in groups if g.n_new or g.n_rm)} of {len(groups)} groups</div>",
        _CONTROLS.format(first=f' · <a href="#g{first_changed}">first rewritten group</a>' if first_changed is not None else ""),
        '<div class=legend><span class="badge b-new">new node</span><span class="badge b-rm">removed node</span>'
        '<span class="badge b-rw">surviving node with changed inputs</span>'
        '<span class="badge b-n">unchanged</span></div>',
    ]
    note = diff.inputs_note()
    if note:
        out.append(f"<div class=note><b>Sizes differ:</b> {esc(note)}. Node counts on this page are those of the "
                   "two graphs shown.</div>")
    out.append(_report_html(report))
    if diff.rules:
        rows = []
        for r in diff.rules.values():
            hit = [(i, g.name) for i, g in enumerate(groups) if g.name in r.groups]
            if len(hit) > 6:  # 24 layers: first three, count, last one
                hit_links = [f'<a href="#g{i}">{esc(n)}</a>' for i, n in hit[:3] + hit[-1:]]
                links = ", ".join(hit_links[:3]) + f", … ({len(hit) - 4} more) …, " + hit_links[3]
            else:
                links = ", ".join(f'<a href="#g{i}">{esc(n)}</a>' for i, n in hit)
            rows.append(
                f"<tr><td><b>{esc(r.rule)}</b></td><td>{esc(r.pass_name)}</td><td>{r.rewrites}</td>"
                f"<td>+{r.added}</td><td>−{r.removed}</td><td>{links}</td>"
                f"<td class=muted>{esc(r.source or '')}</td></tr>"
            )
        un = diff.unattributed_removed
        if un:
            rows.append(f"<tr><td>{esc(UNATTRIBUTED)}</td><td></td><td></td><td></td><td>−{len(un)}</td><td></td><td></td></tr>")
        out.append(
            "<h2>Rules</h2><table><tr><th>rule</th><th>pass</th><th>rewrites</th><th>added</th><th>removed</th>"
            f"<th>groups</th><th>source</th></tr>{''.join(rows)}</table>"
        )
    if kernels:
        items = "".join(f'<li><a href="{esc(path)}">{esc(name)}</a></li>' for name, path in kernels.items())
        out.append(f"<h2>Generated kernels</h2><ul>{items}</ul>")
    out.append(
        "<h2>Model map</h2><div class=muted>one bar per group (height: log node count; green: rewritten, "
        "yellow: rewired only); click a bar to jump</div>"
    )
    out.append(overview_svg(groups))
    out.append(
        "<h2>Groups</h2><div class=muted>nodes grouped by module/layer (from nn_module_stack), in graph order; "
        f"groups of more than {max_rows_per_group} nodes list only their changed nodes</div>"
    )

    budget = max_total_rows
    signatures: dict[tuple, str] = {}
    first_changed_open = True
    for i, g in enumerate(groups):
        changed = bool(g.n_new or g.n_rm)
        sig = group_signature(g) if len(g.rows) <= 5 * max_rows_per_group else None
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
            badges += " " + ", ".join(f"{esc(k)}×{v}" for k, v in per_rule.items())
        if same_as:
            badges += f' <span class=muted>(same structure as {esc(same_as)})</span>'
        out.append(
            f'<details id="g{i}" class="grp{" chg" if changed else ""}"{" open" if is_open else ""}>'
            f"<summary><span class=g>{esc(g.name)}</span> {badges}</summary>"
        )
        # rewrite drawings, deduplicated by shape, a few per group
        if g.rewrites:
            shown: set[tuple] = set()
            drawings = []
            for rw in g.rewrites:
                shape = region_shape(rw, bidx, aidx)
                if shape in shown:
                    continue
                shown.add(shape)
                if len(drawings) >= max_region_drawings:
                    break
                drawings.append(region_html(rw, bidx, aidx, max_region_nodes))
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
            out.extend(_rows_html([r for r in g.rows if not (r.node.op == "get_attr" and not r.kind)], g.name, owner))
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
                    out.extend(_rows_html(changed_rows[:take], g.name, owner))
                    out.append("</table>")
            else:
                out.append(f"<div class=muted>{g.n_after} nodes, none changed (full listing in after.txt)</div>")
        out.append("</details>")
    out.append(f"<script>{_JS}</script></body></html>\n")
    return "".join(out)

