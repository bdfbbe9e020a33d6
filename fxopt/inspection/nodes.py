"""Facts about one node, as the listings, the diff and the page show them: its module path and
layer group, ``dtype[shape]``, arguments, and provenance (which rule made it, from what)."""
from __future__ import annotations

import functools
import gc
import re
from typing import Any, Mapping

import torch
import torch.fx
from torch.fx.node import Node

from ..graph_utils import PROVENANCE_KEY, op_name

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


def no_gc(fn):
    """Run ``fn`` with the cyclic GC paused: walking a 500k-node graph allocates millions
    of small objects, and repeated full collections would make it several times slower."""

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


def opn(node: Node) -> str:
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


def group_of(node: Node) -> str:
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


def short_list(names: list[str], limit: int = 8) -> str:
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
    text = f"<- rule {rule} (pass {pname}) from {short_list(frm, limit) or '(nothing)'}"
    if prov.get("source"):
        text += f" [{prov['source']}]"
    return text


def format_node(node: Node) -> str:
    """One listing line for ``node`` (without the leading marker)."""
    op = opn(node)
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


def graph_of(g) -> torch.fx.Graph:
    if isinstance(g, torch.fx.Graph):
        return g
    if isinstance(g, torch.fx.GraphModule):
        return g.graph
    inner = getattr(g, "graph_module", None)
    if isinstance(inner, torch.fx.GraphModule):
        return inner.graph
    raise TypeError(f"expected a torch.fx.GraphModule or Graph, got {type(g).__name__}")

