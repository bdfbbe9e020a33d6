"""The source of a Triton / Gluon kernel and of the jit helpers it calls, for inspection.

``inspect.getsource`` does not take Triton's kernel objects (and under ``TRITON_INTERPRET=1`` a
kernel is an ``InterpretedFunction`` whose class source is Triton's interpreter); every kernel
object keeps the Python function it was made from as ``.fn``, and that is what is shown."""
from __future__ import annotations

import ast
import inspect
import textwrap


def _python_function(obj):
    fn = getattr(obj, "fn", None)
    return fn if inspect.isfunction(fn) else None


def is_kernel_object(obj) -> bool:
    """A ``triton.jit`` / ``gluon.jit`` function (compiled or interpreted)."""
    return _python_function(obj) is not None and hasattr(obj, "arg_names")


def _called_kernels(fn) -> list:
    """The jit functions of fxopt that ``fn``'s body names (globals and ``module.name``
    attributes; Triton's own library functions are not repeated)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    out, g = [], fn.__globals__
    for node in ast.walk(tree):
        obj = None
        if isinstance(node, ast.Name):
            obj = g.get(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            obj = getattr(g.get(node.value.id), node.attr, None)
        if obj is not None and is_kernel_object(obj) and obj not in out and \
                _python_function(obj).__module__.split(".")[0] == "fxopt":
            out.append(obj)
    return out


def kernel_source(kernel, header: str = "") -> str:
    """``kernel``'s source followed by the jit helpers it calls (transitively), each under a
    ``# <file>:<line>`` comment; ``header`` (comment lines) first."""
    seen: list = []
    todo = [kernel]
    while todo:
        k = todo.pop(0)
        if k in seen:
            continue
        seen.append(k)
        todo.extend(c for c in _called_kernels(_python_function(k)) if c not in seen)
    parts = [header.rstrip() + "\n"] if header else []
    parts.append("import triton\nimport triton.language as tl\n")
    for k in seen:
        fn = _python_function(k)
        lines, start = inspect.getsourcelines(fn)
        where = f"{inspect.getsourcefile(fn)}:{start}"
        parts.append(f"\n# {fn.__module__}.{fn.__qualname__} ({where})\n" + "".join(lines))
    return "\n".join(parts)
