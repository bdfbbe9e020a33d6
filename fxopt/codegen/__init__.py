"""Code generation: kernel emitters, the kernel cache, and source inspection.

* :func:`kernel_sources` - the generated source of every fused node of a graph, as
  ``{name: source}`` (what ``OptimizedModule`` and the inspection output show);
* :func:`register_source_provider` - how an op family (e.g. the scan ops) makes its
  kernel source visible there: ``fn(node) -> (name, source)`` (or ``None``);
* :func:`get_backend` - the configured backend (``FXOPT_BACKEND``: triton | cuda | torch).

Emitters live in :mod:`fxopt.codegen.elementwise`, the on-disk cache in
:mod:`fxopt.codegen.cache`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.fx

from .. import config

SourceProvider = Callable[[torch.fx.Node], Optional[tuple[str, str]]]
_PROVIDERS: dict[object, SourceProvider] = {}


def get_backend() -> str:
    return config.backend()


def register_source_provider(op_overload, fn: SourceProvider) -> None:
    """Make ``kernel_sources`` report ``fn(node)`` for every node calling ``op_overload``
    (an ``OpOverload`` or ``OpOverloadPacket``)."""
    _PROVIDERS[op_overload] = fn


def _provider_for(target) -> SourceProvider | None:
    fn = _PROVIDERS.get(target)
    if fn is None and isinstance(target, torch._ops.OpOverload):
        fn = _PROVIDERS.get(target.overloadpacket)
    return fn


def kernel_sources(graph_module: torch.fx.GraphModule) -> dict[str, str]:
    """``{kernel name: source}`` for every fused node of ``graph_module`` whose op has a
    registered source provider (fused add trees are built in). Identical kernels used by
    several nodes appear once."""
    _ensure_builtin_providers()
    out: dict[str, str] = {}
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        fn = _provider_for(node.target)
        if fn is None:
            continue
        res = fn(node)
        if res is None:
            continue
        name, src = res
        out.setdefault(name, src)
    return out


_builtins_done = False


def _ensure_builtin_providers() -> None:
    global _builtins_done
    if _builtins_done:
        return
    _builtins_done = True
    from ..ops import fused_add  # noqa: F401  (registers the op)

    register_source_provider(torch.ops.fxopt.fused_add_tree.default, _fused_add_source)
    register_source_provider(fused_add.fused_add_tree, _fused_add_source)


def _fused_add_source(node: torch.fx.Node) -> tuple[str, str] | None:
    """The source the configured backend generates for this node's call, specialised
    with the layout recorded in the graph's fake values."""
    from . import elementwise as ew
    from ..ops.fused_add import plan

    xs_nodes, tree_text = node.args[0], node.args[1]
    tree = ew.parse_tree(tree_text)
    backend = get_backend()
    if backend == "cuda":
        return ew.emit_cuda(tree)
    vals = [n.meta.get("val") if isinstance(n, torch.fx.Node) else None for n in xs_nodes]
    dtype = torch.float32
    in_linear = out_linear = None
    ndim = 1
    if all(isinstance(v, torch.Tensor) for v in vals) and vals:
        dtype = vals[0].dtype
        try:
            _, layout = plan(vals, tree)
        except Exception:  # symbolic shapes etc.: show the all-contiguous kernel
            layout = None
        if layout is not None:
            in_linear, out_linear, ndim = layout.in_linear, layout.out_linear, layout.ndim
    if backend == "torch":
        return f"{tree_text} (aten)", "# FXOPT_BACKEND=torch: evaluated with ATen ops\n# " + tree.expression() + "\n"
    return ew.emit_triton(tree, dtype, in_linear, out_linear, ndim)
