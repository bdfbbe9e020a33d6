"""Inspection: listings, diff, HTML picture, folder output."""
from __future__ import annotations

import time
from html.parser import HTMLParser

import pytest
import torch
import torch.fx

from fxopt.graph_utils import PROVENANCE_KEY, mark_provenance, node_count, propagate_meta
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
        assert tag not in ("link", "img", "iframe"), f"external-capable tag <{tag}>"
        assert tag != "script" or "src" not in attrs, "a script from elsewhere"
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
    assert lines[0].startswith(f"# {node_count(after)} nodes")  # export's input guard is not counted
    assert "input-shape guard (not counted)" in lines[0]
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
    assert d.before_nodes == node_count(before) == len(before.graph.nodes) - 1  # the _guards_fn guard
    assert d.after_nodes == node_count(after)
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
    # a hand edit outside the rewrite engine kept no record: said so, not lumped into a rule
    assert "(no record: removed outside the rewrite engine)" in d.summary()
    assert "[no record]" in str(d)


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
    rows = {c for tag, cls in p.classes if tag == "tr" for c in cls.split()}
    assert {"new", "rm", "rw", "row"} <= rows
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
    chg = [a for a in details if "chg" in a.get("class", "").split()]
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


# --------------------------------------------------------------------------- truthful inspection (issue 11)


def _mamba_opt(layers: int, length: int):
    import fxopt
    from fxopt.models.hf import tiny_hf_mamba

    model = tiny_hf_mamba(num_hidden_layers=layers).eval()
    ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return fxopt.optimize(model, (ids,))


@pytest.fixture(scope="module")
def mamba_direct():
    return _mamba_opt(2, 16)  # a direct capture (2 layers, L < 33)


@pytest.fixture(scope="module")
def mamba_templates():
    return _mamba_opt(4, 40)  # layer-generic (4 layers) inside length-generic (L = 40) templates


def _assert_counts_agree(opt):
    rep, d = opt.report(), graph_diff(opt.original_graph_module, opt.graph_module)
    assert (rep.nodes_captured, rep.nodes_final) == (d.before_nodes, d.after_nodes)
    assert rep.records[0].nodes_before == d.before_nodes and rep.records[-1].nodes_after == d.after_nodes
    # every match of the report is one rewrite of the diff, per rule too
    assert sum(rep.matches.values()) == len(d.rewrites)
    hits = {k: v for k, v in rep.rule_hits.items() if v}
    assert hits == {r.rule: r.rewrites for r in d.rules.values()}
    return d


def test_counts_agree_and_every_removal_is_attributed(mamba_direct):
    d = _assert_counts_agree(mamba_direct)
    assert d.unattributed_removed == [] and len(d.removed_by) == len(d.removed) > 300
    assert d.inputs_note() is None
    # cleanup's rewrites add nothing: they are attributed through the engine's erasure record
    cleanup = {r.rule: r for r in d.rules.values() if r.pass_name == "cleanup"}
    assert cleanup and all(r.added == 0 and r.removed == r.rewrites for r in cleanup.values())
    scan = d.rules["selective_scan"]
    assert scan.rewrites == 2 and scan.added == 10
    # the re-rolled loop's per-step slices are erased as dead inputs: the scan rule's, not "dead code"
    selects = [n for n in d.removed if n.startswith("select")]
    assert selects and {d.removed_by[n] for n in selects} == {"selective_scan"}
    text = str(d)
    assert "[no record]" not in text and "16-step unrolled loop -> selective_scan" in text


def test_counts_agree_on_templates_and_the_probe_is_named(mamba_templates):
    opt = mamba_templates
    d = _assert_counts_agree(opt)
    assert d.unattributed_removed == []  # layer copies (<name>_L<i>) found under their probe names
    assert any(n.endswith("_L3") for n in d.removed)
    note = d.inputs_note()
    assert note and "i64[1, 5]" in note and "i64[1, 40]" in note  # before: the L=5 probe; after: L=40
    assert "note: before is the capture for inputs i64[1, 5]" in d.summary()
    html_text = render_html(opt.original_graph_module, opt.graph_module, opt.report(), diff=d)
    assert "Sizes differ:" in html_text and "i64[1, 40]" in html_text
    assert f"{d.before_nodes} → {d.after_nodes} nodes" in html_text


def test_orphaned_dead_code_goes_to_the_rewrite_that_orphaned_it():
    """A pass outside the engine rewrites y = relu(neg(x)) + x's add and then sweeps dead code:
    neg and relu, which only fed the replaced add, belong to that rewrite ("left dead"); a dead node
    it erased that fed nothing it rewrote stays unattributed."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(4, device="meta")
    neg = g.call_function(aten.neg.default, (x,))
    relu = g.call_function(aten.relu.default, (neg,))
    add = g.call_function(aten.add.Tensor, (relu, x))
    stray = g.call_function(aten.sin.default, (x,))  # dead from the start
    g.output(add)
    for n in (neg, relu, add, stray):
        n.meta["val"] = x.meta["val"]
    after = torch.fx.Graph()
    env: dict = {}
    out = after.graph_copy(g, env)
    after.output(out)
    names = {n.target: n.name for n in g.nodes if n.op == "call_function"}
    a_add = next(n for n in after.nodes if n.target is aten.add.Tensor)
    with after.inserting_before(a_add):
        new = after.call_function(aten.mul.Tensor, (a_add.args[1], 2.0))
    new.meta["val"] = a_add.meta["val"]
    mark_provenance([new], rule="fold", pass_name="hand", replaced=[a_add])
    a_add.replace_all_uses_with(new)
    after.erase_node(a_add)
    after.eliminate_dead_code()
    d = graph_diff(g, after)
    add_, neg_, relu_, sin_ = (names[t] for t in (aten.add.Tensor, aten.neg.default, aten.relu.default, aten.sin.default))
    assert sorted(d.removed) == sorted([add_, neg_, relu_, sin_])
    assert d.removed_by == {add_: "fold", relu_: "fold", neg_: "fold"}
    assert d.unattributed_removed == [sin_]
    rw = d.rewrites[0]
    assert rw.removed == [neg_, relu_, add_] and rw.orphaned == [relu_, neg_]
    assert d.rules["fold"].removed == 3
    text = str(d)
    assert "[by fold, left dead]" in text and "(+2 left dead)" in text


def test_kernel_dump_is_the_kernel_that_runs_under_the_interpreter(mamba_direct, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    paths = write_inspection(mamba_direct, tmp_path / "interp")
    files = sorted(p.name for p in paths["kernels"].iterdir())
    assert files == ["fxopt_selective_scan_triton.py"]
    src = (paths["kernels"] / files[0]).read_text()
    assert src.startswith("# fxopt::selective_scan for (float32[1, ")
    assert "on cpu (Triton's interpreter)" in src and "runs fxopt.codegen.scan_triton.selective_scan_kernel" in src
    assert "def selective_scan_kernel(" in src and "def exp2_fma(" in src  # the kernel and the helpers it calls
    # not Triton's interpreter, not whole modules (the linear scan, the Gluon kernel, host code)
    assert "InterpretedFunction" not in src and "_linear_scan_kernel" not in src and "gluon" not in src
    assert "def specialise" not in src and len(src.splitlines()) < 400
    compile(src, files[0], "exec")  # the dump is valid Python
    # without the interpreter, CPU tensors run the op's PyTorch reference: that is what is dumped
    monkeypatch.delenv("TRITON_INTERPRET")
    paths = write_inspection(mamba_direct, tmp_path / "ref")
    (ref,) = paths["kernels"].iterdir()
    assert ref.name == "selective_scan_reference.txt"
    assert "def selective_scan_ref(" in ref.read_text() and "no kernel runs" in ref.read_text()


def test_graph_html_controls_and_scan_regions(mamba_direct, tmp_path):
    paths = write_inspection(mamba_direct, tmp_path)
    text = paths["html"].read_text()
    p = parse_html(text)
    assert_self_contained(text, p)
    for ident in ("fx-q", "fx-chg", "fx-expand", "fx-collapse"):
        assert ident in p.ids
    inputs = {a.get("id"): a for t, a in p.attrs if t == "input"}
    assert inputs["fx-q"]["type"] == "search" and inputs["fx-chg"]["type"] == "checkbox"
    assert p.tags.count("script") == 1 and "addEventListener('input'" in text and "scrollIntoView" in text
    # opens at the first rewritten group: it is the first open group and the controls link to it
    groups = [a for t, a in p.attrs if t == "details" and "grp" in a.get("class", "").split()]
    first = next(a for a in groups if "chg" in a["class"].split())
    assert "open" in first and [a for a in groups if "open" in a] == [first]
    assert f'<a href="#{first["id"]}">first rewritten group</a>' in text
    # a scan region reads as a loop -> selective_scan: one drawing box, one folded row
    assert text.count("<b>16-step unrolled loop → selective_scan</b>") >= 2  # drawing title + folded row
    assert "<b>16-step unrolled loop</b><br>" in text
    # every removed row says which rule removed it
    assert "removed by <b>to_same_dtype</b>" in text and "removed by <b>selective_scan</b>" in text
    assert "no record" not in text
