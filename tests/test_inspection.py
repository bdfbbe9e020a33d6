"""Inspection: listings, diff, HTML picture, folder output."""
from __future__ import annotations

import time
from html.parser import HTMLParser

import pytest
import torch
import torch.fx

from fxopt.graph_utils import PROVENANCE_KEY, mark_provenance, propagate_meta
from fxopt.inspection import (
    GraphDiff,
    format_graph,
    graph_diff,
    layer_of,
    module_path,
    render_html,
    write_inspection,
)

aten = torch.ops.aten


# --------------------------------------------------------------------------- helpers


def fused_add3(a, b, c):
    return (a + b) + c


def add3_rewrite(gm, rule="add3", pass_name="hand") -> int:
    """(x + y) + z with a single-use inner add -> fused_add3(x, y, z), provenance marked."""
    g = gm.graph if isinstance(gm, torch.fx.GraphModule) else gm
    count = 0
    for node in list(g.nodes):
        if node.op != "call_function" or node.target is not aten.add.Tensor or node.kwargs:
            continue
        inner = node.args[0]
        if not (isinstance(inner, torch.fx.Node) and inner.target is aten.add.Tensor and len(inner.users) == 1):
            continue
        if inner.kwargs or not all(isinstance(a, torch.fx.Node) for a in (*inner.args, node.args[1])):
            continue
        with g.inserting_before(node):
            new = g.call_function(fused_add3, (inner.args[0], inner.args[1], node.args[1]))
        new.meta["val"] = node.meta.get("val")
        mark_provenance([new], rule=rule, pass_name=pass_name, replaced=[inner, node], source="test_inspection.py:1")
        node.replace_all_uses_with(new)
        g.erase_node(node)
        g.erase_node(inner)
        count += 1
    if isinstance(gm, torch.fx.GraphModule):
        gm.recompile()
    return count


class WellFormed(HTMLParser):
    """Checks that every non-void element is closed in order; collects ids and classes."""

    VOID = {"meta", "br", "hr", "img", "input", "link", "col", "wbr", "source"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: list[str] = []
        self.classes: list[tuple[str, str]] = []  # (tag, class)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        d = dict(attrs)
        self.tags.append(tag)
        self.attrs.append((tag, d))
        if "id" in d:
            self.ids.append(d["id"])
        if "class" in d:
            self.classes.append((tag, d["class"]))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        d = dict(attrs)
        self.tags.append(tag)
        self.attrs.append((tag, d))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            if tag in self.stack:
                while self.stack and self.stack.pop() != tag:
                    pass
        else:
            self.stack.pop()


def parse_html(text: str) -> WellFormed:
    p = WellFormed()
    p.feed(text)
    p.close()
    assert not p.errors, p.errors[:5]
    assert not p.stack, f"unclosed: {p.stack[-5:]}"
    return p


def assert_self_contained(text: str, parsed: WellFormed) -> None:
    for tag, attrs in parsed.attrs:
        assert tag not in ("script", "link", "img", "iframe"), f"external-capable tag <{tag}>"
        for k in ("src", "href"):
            v = attrs.get(k)
            if v is not None:
                assert not v.startswith(("http:", "https:", "//")), f"network reference {v}"
    assert "@import" not in text and "url(" not in text


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def neox_pair():
    from fxopt.models.hf import tiny_gpt_neox

    model = tiny_gpt_neox(True)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))

    def export():
        return torch.export.export(model, (ids,), {"use_cache": False}, strict=False).module()

    before, after = export(), export()
    n = add3_rewrite(after)
    assert n == 2  # one parallel residual (mlp + attn) + hidden per layer
    return before, after


def synthetic_pair(layers: int, per_layer: int, rewrite_every: int = 0):
    """A chain of ``layers * per_layer`` adds, each layer under ``model.layers.<i>``; in the
    copy, every ``rewrite_every``-th pair of adds becomes one fused node."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(2, 8, device="meta")
    y = g.placeholder("y")
    y.meta["val"] = torch.empty(2, 8, device="meta")
    cur = x
    for li in range(layers):
        stack = {"m": (f"model.layers.{li}.block", "Block")}
        for _ in range(per_layer):
            cur = g.call_function(aten.add.Tensor, (cur, y))
            cur.meta["val"] = x.meta["val"]
            cur.meta["nn_module_stack"] = stack
    g.output(cur)
    after = torch.fx.Graph()
    out = after.graph_copy(g, {})
    after.output(out)
    if rewrite_every:
        adds = [n for n in after.nodes if n.op == "call_function"]
        for i in range(0, len(adds) - 1, rewrite_every):
            inner, node = adds[i], adds[i + 1]
            if inner.meta["nn_module_stack"] is not node.meta["nn_module_stack"]:
                continue
            with after.inserting_before(node):
                new = after.call_function(fused_add3, (inner.args[0], y, y))
            new.meta["val"] = node.meta["val"]
            mark_provenance([new], rule="pair", pass_name="synthetic", replaced=[inner, node])
            node.replace_all_uses_with(new)
            after.erase_node(node)
            after.erase_node(inner)
    return g, after


# --------------------------------------------------------------------------- module paths


def test_layer_of():
    assert layer_of("gpt_neox.layers.3.attention.dense") == "gpt_neox.layers.3"
    assert layer_of("backbone.layers.12.mixer") == "backbone.layers.12"
    assert layer_of("gpt_neox.embed_in") == "gpt_neox.embed_in"
    assert layer_of("lm_head") == "lm_head"
    assert layer_of("a.b.c.d") == "a.b"
    assert layer_of("") == ""


def test_module_path_styles(neox_pair):
    before, _ = neox_pair
    paths = {module_path(n) for n in before.graph.nodes}
    assert "gpt_neox.layers.0.attention" in paths
    assert "gpt_neox.layers.1.mlp.dense_h_to_4h" in paths
    # strict-export style stack entries are normalised too
    g = torch.fx.Graph()
    n = g.placeholder("x")
    n.meta["nn_module_stack"] = {"k": ("L['self'].layers[3].mixer", "M")}
    assert module_path(n) == "layers.3.mixer"
    n.meta["nn_module_stack"] = {"k": ("L['self'].layers['7'].mlp", "M")}
    assert module_path(n) == "layers.7.mlp"


# --------------------------------------------------------------------------- listing


def test_listing_has_shapes_modules_and_provenance(neox_pair):
    before, after = neox_pair
    text = format_graph(after)
    lines = text.splitlines()
    assert lines[0].startswith(f"# {len(after.graph.nodes)} nodes")
    # one line per node plus headers
    assert sum(1 for l in lines if not l.startswith("#")) == len(after.graph.nodes)
    emb = next(l for l in lines if l.strip().startswith("embedding ="))
    assert "aten.embedding.default(gpt_neox_embed_in_weight, input_ids)" in emb
    assert ":: f32[1, 8, 64]" in emb and "@ gpt_neox.embed_in" in emb
    new = [l for l in lines if l.startswith("+ ")]
    assert len(new) == 2
    assert "fused_add3(" in new[0] and "<- rule add3 (pass hand) from add_5, add_6" in new[0]
    assert "[test_inspection.py:1]" in new[0]
    assert "# -- layer gpt_neox.layers.0" in text and "# -- layer gpt_neox.layers.1" in text
    # before has no marked nodes
    assert not any(l.startswith("+ ") for l in format_graph(before).splitlines())


def test_listing_literals_and_tuples():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(4, 6, dtype=torch.float16, device="meta")
    s = g.call_function(aten.split.Tensor, (x, 2, -1))
    s.meta["val"] = tuple(torch.empty(4, 2, dtype=torch.float16, device="meta") for _ in range(3))
    c = g.call_function(aten.cat.default, ([x] * 12,), {"dim": 0})
    c.meta["val"] = torch.empty(48, 6, dtype=torch.float16, device="meta")
    t = g.call_function(aten._to_copy.default, (c,), {"dtype": torch.bfloat16})
    g.output((s, t))
    text = format_graph(g)
    assert f"{s.name} = aten.split.Tensor(x, 2, -1)  :: (f16[4, 2], f16[4, 2], f16[4, 2])" in text
    assert "... +4]" in text and "dim=0" in text  # long lists are cut
    assert "dtype=bfloat16" in text


# --------------------------------------------------------------------------- diff


def test_diff_counts_hand_rewrite(neox_pair):
    before, after = neox_pair
    d = graph_diff(before, after)
    assert isinstance(d, GraphDiff)
    assert d.before_nodes == len(before.graph.nodes) and d.after_nodes == len(after.graph.nodes)
    assert sorted(d.removed) == ["add_10", "add_5", "add_6", "add_9"]
    assert d.added == ["fused_add3", "fused_add3_1"]
    assert len(d.rewrites) == 2
    rw = d.rewrites[0]
    assert (rw.rule, rw.pass_name, rw.replaced, rw.added, rw.group) == (
        "add3", "hand", ["add_5", "add_6"], ["fused_add3"], "gpt_neox.layers.0"
    )
    assert d.rewrites[1].group == "gpt_neox.layers.1"
    r = d.rules["add3"]
    assert (r.rewrites, r.added, r.removed) == (2, 2, 4)
    assert r.groups == ["gpt_neox.layers.0", "gpt_neox.layers.1"]
    assert d.removed_by == {n: "add3" for n in ("add_5", "add_6", "add_9", "add_10")}
    assert d.unattributed_removed == []
    assert d.op_delta == {"aten.add.Tensor": (11, 7), "fused_add3": (0, 2)}
    # users of the rewritten sums changed inputs; nothing else did
    assert set(d.rewired) == {"layer_norm_2", "layer_norm_3", "layer_norm_4"}
    text = str(d)
    assert "add3  hand  2         2       4" in text
    assert "- add_5 = aten.add.Tensor(" in text and "[by add3]" in text
    assert "+ fused_add3 = fused_add3(dropout_2, dropout_1, dropout)" in text
    assert "from add_5, add_6" in text


def test_diff_identical_and_dead_code(neox_pair):
    before, _ = neox_pair
    d = graph_diff(before, before)
    assert (d.removed, d.added, d.rewired, d.rewrites) == ([], [], [], [])
    assert "no changes" in str(d)

    g, _ = synthetic_pair(1, 3)
    after = torch.fx.Graph()
    after.output(after.graph_copy(g, {}))
    # remove the last add by routing the output to its input (dead code, no rule)
    last = [n for n in after.nodes if n.op == "call_function"][-1]
    last.replace_all_uses_with(last.args[0])
    after.erase_node(last)
    d = graph_diff(g, after)
    assert d.removed == [last.name] and d.added == [] and d.unattributed_removed == [last.name]
    assert "(no rule: dead code)" in d.summary()
    assert "[dead code]" in str(d)


def test_diff_rewritten_in_place():
    g, _ = synthetic_pair(1, 3)
    after = torch.fx.Graph()
    after.output(after.graph_copy(g, {}))
    node = [n for n in after.nodes if n.op == "call_function"][1]
    node.meta = dict(node.meta)
    node.meta[PROVENANCE_KEY] = {"rule": "r", "pass": "p", "from": [node.name], "source": None}
    d = graph_diff(g, after)
    assert d.removed == [node.name] and d.added == [node.name]
    assert d.rules["r"].rewrites == 1 and d.removed_by == {node.name: "r"}


def test_diff_accepts_graph_modules_and_graphs(neox_pair):
    before, after = neox_pair
    assert graph_diff(before.graph, after.graph).added == graph_diff(before, after).added
    with pytest.raises(TypeError, match="GraphModule"):
        graph_diff(before, 3)


# --------------------------------------------------------------------------- HTML


def test_html_well_formed_highlighted_grouped(neox_pair):
    before, after = neox_pair
    text = render_html(before, after, report="my report table", title="neox <test>")
    p = parse_html(text)
    assert_self_contained(text, p)
    assert "<title>neox &lt;test&gt;</title>" in text
    assert "my report table" in text
    # new nodes highlighted, removed ones present and marked
    assert "n-fused_add3" in p.ids and "n-fused_add3_1" in p.ids
    rows = {(tag, cls) for tag, cls in p.classes if tag == "tr"}
    assert ("tr", "new") in rows and ("tr", "rm") in rows and ("tr", "rw") in rows
    for name in ("add_5", "add_6", "add_9", "add_10"):
        assert f"n-{name}-rm" in p.ids
    # grouped by layer, each a <details>
    assert p.tags.count("details") >= 10
    for layer in ("gpt_neox.layers.0", "gpt_neox.layers.1", "gpt_neox.embed_in", "lm_head"):
        assert f"<span class=g>{layer}</span>" in text
    # rewritten region drawings: one svg pair per rewrite (+ the overview map)
    assert p.tags.count("svg") == 1 + 2 * 2
    assert "add.Tensor" in text and "#f6c4c4" in text and "#bde9bd" in text
    # the changed layer groups are marked, the first one open
    details = [a for t, a in p.attrs if t == "details" and a.get("id")]
    chg = [a for a in details if a.get("class") == "chg"]
    assert len(chg) == 2 and "open" in chg[0] and "open" not in chg[1]
    # groups appear in model order
    i_emb = text.index("<span class=g>gpt_neox.embed_in</span>")
    i_l0 = text.index("<span class=g>gpt_neox.layers.0</span>")
    i_l1 = text.index("<span class=g>gpt_neox.layers.1</span>")
    i_head = text.index("<span class=g>lm_head</span>")
    assert i_emb < i_l0 < i_l1 < i_head


def test_html_report_object_and_kernels(neox_pair):
    before, after = neox_pair

    class Rep:
        matches = {"hand": 2}
        rule_hits = {"add3": 2}

        def __str__(self):
            return "pass  matches\nhand  2"

    text = render_html(before, after, Rep(), kernels={"fused_add_tree_0": "kernels/fused_add_tree_0.py"})
    parse_html(text)
    assert "<td>hand</td><td>2</td>" in text
    assert 'href="kernels/fused_add_tree_0.py"' in text


def test_html_large_graph_stays_small():
    before, after = synthetic_pair(20, 2000, rewrite_every=97)
    t0 = time.perf_counter()
    d = graph_diff(before, after)
    text = render_html(before, after, diff=d, title="big")
    elapsed = time.perf_counter() - t0
    p = parse_html(text)
    assert_self_contained(text, p)
    assert len(d.rewrites) > 20 * 10
    assert len(text) < 1_000_000, len(text)
    assert elapsed < 30, elapsed
    for li in (0, 7, 19):
        assert f"<span class=g>model.layers.{li}</span>" in text
    # big groups collapse to op histograms + changed nodes only
    assert text.count("<div class=hist>") == 20
    assert "over the listing limit; showing " in text
    # identical layers are recognised only when their structure is identical; a few drawings per layer
    assert p.tags.count("svg") <= 1 + 20 * 2 * 4


def test_html_huge_single_rewrite_region_is_summarised():
    before, after = synthetic_pair(1, 300)
    adds = [n for n in after.nodes if n.op == "call_function"]
    y = next(n for n in after.nodes if n.name == "y")
    with after.inserting_after(adds[-1]):
        new = after.call_function(fused_add3, (adds[0].args[0], y, y))
    new.meta["val"] = adds[-1].meta["val"]
    mark_provenance([new], rule="loop", pass_name="scan", replaced=adds)
    adds[-1].replace_all_uses_with(new)
    for n in reversed(adds):
        after.erase_node(n)
    d = graph_diff(before, after)
    assert len(d.removed) == 300 and d.rules["loop"].removed == 300
    text = render_html(before, after, diff=d)
    parse_html(text)
    assert "300 nodes: aten.add.Tensor ×300" in text


# --------------------------------------------------------------------------- folder


def test_write_inspection_pair(tmp_path, neox_pair):
    before, after = neox_pair
    paths = write_inspection((before, after, "REPORT"), tmp_path / "o")
    assert set(paths) == {"before", "after", "diff", "html", "report", "kernels"}
    for key, path in paths.items():
        assert path.exists(), key
    assert paths["kernels"].is_dir()
    assert "fused_add3" in paths["after"].read_text() and "fused_add3" not in paths["before"].read_text()
    assert "removed (4)" in paths["diff"].read_text()
    rep = paths["report"].read_text()
    assert rep.startswith("REPORT") and "per rule:" in rep
    parse_html(paths["html"].read_text())


def test_write_inspection_optimized_module_and_kernels(tmp_path, neox_pair, monkeypatch):
    before, after = neox_pair
    import fxopt.codegen as codegen

    monkeypatch.setattr(
        codegen,
        "kernel_sources",
        lambda gm: {"fused/add 0": "import triton\n@triton.jit\ndef k(): pass\n", "cuda_k": "__global__ void k(){}"},
        raising=False,
    )

    class FakeOptimized:
        graph_module = after
        original_graph_module = before

        def report(self):
            return "the report"

    paths = write_inspection(FakeOptimized(), tmp_path)
    files = sorted(p.name for p in paths["kernels"].iterdir())
    assert files == ["cuda_k.cu", "fused_add_0.py"]
    html_text = paths["html"].read_text()
    assert 'href="kernels/fused_add_0.py"' in html_text and "the report" in html_text
    with pytest.raises(TypeError, match="OptimizedModule"):
        write_inspection(42, tmp_path)


def test_write_inspection_real_optimize(tmp_path):
    """End to end through fxopt.optimize with a user pass that marks provenance."""
    import fxopt
    from fxopt import Pass, PassResult
    from fxopt.models.hf import tiny_gpt_neox

    class Add3(Pass):
        name = "test_add3"

        def call(self, gm):
            g = gm.graph
            n = 0
            for node in list(g.nodes):
                if node.op == "call_function" and node.target is aten.add.Tensor and not node.kwargs:
                    inner = node.args[0]
                    if (isinstance(inner, torch.fx.Node) and inner.target is aten.add.Tensor
                            and len(inner.users) == 1 and not inner.kwargs
                            and all(isinstance(a, torch.fx.Node) for a in (*inner.args, node.args[1]))):
                        with g.inserting_before(node):
                            new = g.call_function(fused_add3, (inner.args[0], inner.args[1], node.args[1]))
                        propagate_meta(gm, [new])
                        mark_provenance([new], rule="add3", pass_name=self.name, replaced=[inner, node])
                        node.replace_all_uses_with(new)
                        g.erase_node(node)
                        g.erase_node(inner)
                        n += 1
            gm.recompile()
            return PassResult(gm, n > 0, {"matches": n})

    model = tiny_gpt_neox(True)
    ids = torch.randint(0, 128, (1, 8))
    opt = fxopt.optimize(model, (ids,), passes=[Add3()])
    paths = write_inspection(opt, tmp_path)
    diff = paths["diff"].read_text()
    assert "rewrites (2)" in diff and "test_add3" in diff
    assert "test_add3" in paths["report"].read_text()
    html_text = paths["html"].read_text()
    parse_html(html_text)
    assert "GPTNeoXForCausalLM" in html_text
