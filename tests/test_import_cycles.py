"""fxopt's package import graph has no cycles, and codegen never imports ops (issue 11).

A plain ``ast`` walk over ``fxopt/``: every ``import`` / ``from ... import`` statement, at module
level and inside functions (a function-level import closes a loop at call time just as well),
relative and absolute, becomes an edge to the module it names (``from pkg import name`` names
``pkg.name`` where that is a module, else ``pkg``); so does ``importlib.import_module(name)``
where ``name`` is a string literal or a loop variable over a module-level tuple of them (the pass
registry loads the library passes that way). A package's ``__init__`` is the package's
node; importing ``pkg.mod`` is not counted as importing ``pkg`` (Python runs ``pkg/__init__.py``
first, but that is an order, not a dependency of ``pkg.mod`` on what ``pkg`` defines).

Every simple cycle is reported with its path and the ``file:line`` of each import on it.
:data:`KNOWN_CYCLES` lists the cycles that exist today in parts of the tree being rebuilt by
others, each with the part that owns it; an entry is removed when its part lands (a test fails
while an entry names a cycle that is gone). Any other cycle fails the test.
"""
from __future__ import annotations

import ast
import pathlib

import networkx as nx

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fxopt"

# cycle (as found: the path from its smallest module name, back to it) -> the part of the tree that owns it
KNOWN_CYCLES: dict[tuple[str, ...], str] = {}  # none left; the list only shrinks


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _dynamic_imports(tree: ast.Module, importer: str, is_package: bool) -> dict[ast.AST, list[str]]:
    """``importlib.import_module(...)`` calls whose module names can be read off the source."""
    tuples = {}  # module-level NAME = ("a.b", "c.d")
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List)):
            strs = [e.value for e in node.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            for t in node.targets:
                if isinstance(t, ast.Name) and len(strs) == len(node.value.elts):
                    tuples[t.id] = strs
    loops = {}  # for v in NAME: v -> NAME's strings
    for node in ast.walk(tree):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and isinstance(node.iter, ast.Name):
            if node.iter.id in tuples:
                loops[node.target.id] = tuples[node.iter.id]
    package = importer if is_package else importer.rpartition(".")[0]
    out = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        f = node.func
        if not ((isinstance(f, ast.Attribute) and f.attr == "import_module") or (isinstance(f, ast.Name) and f.id == "import_module")):
            continue
        arg = node.args[0]
        names = [arg.value] if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else \
            loops.get(arg.id, tuples.get(arg.id, [])) if isinstance(arg, ast.Name) else []
        out[node] = [package + n if n.startswith(".") else n for n in names]
    return out


def import_graph() -> nx.DiGraph:
    """Edges importer -> imported between fxopt's modules, each with the import's ``file:line``."""
    mods = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)

    def known(name: str) -> str | None:
        while name and name not in mods:  # `import fxopt.ops.scan.x` where x is no module
            name = name.rpartition(".")[0]
        return name or None

    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        dynamic = _dynamic_imports(tree, name, is_package)
        for node in ast.walk(tree):
            targets = []
            if node in dynamic:
                targets = [known(t) for t in dynamic[node]]
            elif isinstance(node, ast.Import):
                targets = [known(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in mods else known(base))
            for t in targets:
                if t and t != name and t.startswith("fxopt"):
                    where = f"{path.relative_to(ROOT.parent)}:{node.lineno}"
                    g.add_edge(name, t)
                    sites = g.edges[name, t].setdefault("where", [])
                    if where not in sites:
                        sites.append(where)
    return g


def _canonical(cycle: list[str]) -> tuple[str, ...]:
    i = cycle.index(min(cycle))
    return tuple(cycle[i:] + cycle[:i])


def find_cycles(g: nx.DiGraph) -> dict[tuple[str, ...], str]:
    """Every simple cycle, as {canonical path: 'a -> b -> a' with the import sites}."""
    out = {}
    for cycle in nx.simple_cycles(g):
        c = _canonical(cycle)
        hops = [f"{a} -> {b} ({', '.join(g.edges[a, b].get('where', []))})" for a, b in zip(c, c[1:] + c[:1])]
        out[c] = " -> ".join(c + c[:1]) + "\n      " + "\n      ".join(hops)
    return out


def test_walk_sees_the_imports_it_must():
    """The walk finds module- and function-level, relative and absolute imports (else it proves nothing)."""
    g = import_graph()
    assert g.has_edge("fxopt.ops.scan", "fxopt.codegen.scan_ref")       # module level, relative
    assert g.has_edge("fxopt.ops.scan", "fxopt.codegen.scan_launch")    # function level
    assert g.has_edge("fxopt.ops.fused_add", "fxopt.codegen.add_tree_launch")
    assert g.has_edge("fxopt.codegen.scan_launch", "fxopt.codegen.scan_triton")  # function level
    assert g.has_edge("fxopt.ops.scan", "fxopt.codegen")                # `from ..codegen import name`
    assert g.has_edge("fxopt.testing", "fxopt.testing.strategies")      # importlib, relative
    cyc = nx.DiGraph([("a", "b"), ("b", "c"), ("c", "a"), ("c", "b")])
    assert set(find_cycles(cyc)) == {("a", "b", "c"), ("b", "c")}


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    unknown = [text for c, text in cycles.items() if c not in KNOWN_CYCLES]
    assert not unknown, "import cycles in fxopt:\n  " + "\n  ".join(unknown)


def test_known_cycles_still_exist():
    """An allow-list entry whose cycle is gone must be removed (the list only shrinks)."""
    cycles = find_cycles(import_graph())
    gone = [f"{' -> '.join(c)} ({owner})" for c, owner in KNOWN_CYCLES.items() if c not in cycles]
    assert not gone, "remove from KNOWN_CYCLES (no longer a cycle): " + "; ".join(gone)


def test_codegen_never_imports_ops():
    """The layer rule: ops build on codegen (kernels, launch plans, references), never the reverse."""
    g = import_graph()
    bad = [f"{a} -> {b} ({', '.join(g.edges[a, b]['where'])})" for a, b in g.edges
           if (a == "fxopt.codegen" or a.startswith("fxopt.codegen.")) and (b == "fxopt.ops" or b.startswith("fxopt.ops."))]
    assert not bad, "codegen imports ops:\n  " + "\n  ".join(bad)
