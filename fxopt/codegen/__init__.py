"""Code generation: kernel emitters, the kernel cache, and source inspection.

* :func:`kernel_sources` - the generated source of every fused node of a graph, as
  ``{name: source}`` (what ``OptimizedModule`` and the inspection output show);
* :func:`register_source_provider` - how an op family (e.g. the scan ops) makes its
  kernel source visible there: ``fn(node) -> (name, source)`` (or ``None``);
* :func:`get_backend` - the configured backend (``FXOPT_BACKEND``: triton | cuda | torch).

Emitters live in :mod:`fxopt.codegen.elementwise` (fused-add launching in
:mod:`fxopt.codegen.add_tree_launch`), the scan kernels in :mod:`fxopt.codegen.scan_triton`
and :mod:`fxopt.codegen.scan_gluon` (host side :mod:`fxopt.codegen.scan_launch`), the
on-disk cache in :mod:`fxopt.codegen.cache`. Codegen never imports :mod:`fxopt.ops`.
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
    registered source provider (the ops register theirs when they are defined: an op in a
    graph was imported). Identical kernels used by several nodes appear once."""
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

