"""``fxopt::fused_add_tree(Tensor[] xs, str tree) -> Tensor[]``: a tree of rounded adds.

``tree`` is the only description of the computation (grammar in
:mod:`fxopt.codegen.elementwise`); outputs are the tree's ``->`` list in order (the
root first, then intermediates that also had users outside the tree).

* fake/meta impl: evaluates the tree on the fake inputs, so output shapes, dtypes and
  strides are exactly eager's (TensorIterator's layout rules) and rewritten graphs still
  export / compile;
* CPU impl: evaluates the tree with ``torch.add``/``torch.sub`` in statement order - the
  unfused computation itself, bit-equal by construction;
* CUDA impl: the generated kernel (Triton by default, CUDA C with ``FXOPT_BACKEND=cuda``;
  ``FXOPT_BACKEND=torch`` evaluates with ATen), through the launcher cached per
  specialisation in :mod:`fxopt.codegen.add_tree_launch` (planning, the cache and the
  launches live there);
* autograd: the backward of the tree, statement by statement in reverse (``add`` passes
  its gradient to both operands, ``sub`` negates it for the second), each contribution
  summed to its operand's shape and cast to its dtype as eager's autograd engine does
  for broadcast and mixed-dtype adds. The backward is made of ATen ops, so it is itself
  differentiable;
* :func:`fused_add_tree` (what rewritten graphs call): when no gradient can flow and
  nothing traces the call (:func:`fxopt.ops.ad_support.direct_call_ok`) it skips the
  dispatcher (CUDA: straight to the cached launcher; CPU: ATen); otherwise it calls the
  op (so exported / compiled graphs contain ``fxopt::fused_add_tree`` and autograd
  records it).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch

from ..codegen import add_tree_launch, register_source_provider
from ..codegen import elementwise as ew
from ..codegen.add_tree_launch import evaluate
from .ad_support import direct_call_ok, refuse_forward_ad

OP_NAME = "fxopt::fused_add_tree"

_lib = torch.library.Library("fxopt", "FRAGMENT")
_lib.define("fused_add_tree(Tensor[] xs, str tree) -> Tensor[]")


def _cpu_impl(xs, tree):
    refuse_forward_ad(OP_NAME)
    return evaluate(xs, tree)


def _cuda_impl(xs, tree):
    refuse_forward_ad(OP_NAME)
    return add_tree_launch.launcher_for(xs, tree)(xs)


@torch.library.register_fake(OP_NAME)
def _fake_impl(xs, tree):
    return evaluate(xs, tree)


_lib.impl("fused_add_tree", _cpu_impl, "CPU")
_lib.impl("fused_add_tree", _cuda_impl, "CUDA")


# ----------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    xs, tree = inputs
    ctx.tree = tree
    ctx.leaves = tuple((tuple(x.shape), x.dtype) for x in xs)  # no tensor is kept alive
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None


@lru_cache(maxsize=1024)
def _temp_metas(tree_text: str, leaves: tuple) -> tuple:
    """(shape, dtype) of every temp of the tree, by ATen's own broadcast and promotion rules
    (0-dim operands promote differently: evaluate on meta tensors, not by hand)."""
    tree = ew.parse_tree(tree_text)
    env = {f"x{i}": torch.empty(shape, dtype=dtype, device="meta") for i, (shape, dtype) in enumerate(leaves)}
    metas = []
    for k, st in enumerate(tree.stmts):
        t = env[f"t{k}"] = (torch.add if st.op == "add" else torch.sub)(env[st.a], env[st.b])
        metas.append((tuple(t.shape), t.dtype))
    return tuple(metas)


def tree_vjp(tree_text: str, leaves: Sequence[tuple], grads: Sequence[torch.Tensor | None],
             needed: Sequence[bool] | None = None) -> list:
    """Gradients of the tree's inputs (None where none flows or ``needed`` says no) from
    those of its outputs; ``leaves``: each input's (shape, dtype).

    Like eager autograd on the unfused adds: statements in reverse order, each operand's
    contribution reduced to the operand's shape (``sum_to_size``) and then cast to its
    dtype, contributions to one value added in the order the engine would deliver them
    (later statements first), so for the same operations the result is the same bits."""
    tree = ew.parse_tree(tree_text)
    leaves = tuple(leaves)
    metas = dict(zip((f"t{k}" for k in range(len(tree.stmts))), _temp_metas(tree_text, leaves)))
    metas.update((f"x{i}", m) for i, m in enumerate(leaves))
    acc: dict[str, torch.Tensor] = {}
    for name, g in zip(tree.outputs, grads):
        if g is not None:
            acc[name] = g

    def give(name: str, g: torch.Tensor) -> None:
        if needed is not None and name[0] == "x" and not needed[int(name[1:])]:
            return
        shape, dtype = metas[name]
        if tuple(g.shape) != shape:
            g = g.sum_to_size(shape)
        if g.dtype != dtype:
            g = g.to(dtype)
        acc[name] = g if name not in acc else acc[name] + g

    for k in range(len(tree.stmts) - 1, -1, -1):
        g = acc.pop(f"t{k}", None)
        if g is None:
            continue
        st = tree.stmts[k]
        give(st.a, g)
        give(st.b, g if st.op == "add" else torch.neg(g))
    return [acc.get(f"x{i}") for i in range(len(leaves))]


def _backward(ctx, grads):
    needed = ctx.needs_input_grad[0]  # one bool per tensor of xs
    return tree_vjp(ctx.tree, ctx.leaves, grads, needed), None


torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)

fused_add_tree_op = torch.ops.fxopt.fused_add_tree.default

# Tests set this to drive the launcher path with CPU tensors under TRITON_INTERPRET=1 (no GPU
# in CI). On CUDA tensors ``x0.is_cuda`` short-circuits and it is never read.
FAST_PATH_ON_CPU = False


def fused_add_tree(xs, tree):
    """What rewritten graphs call. Semantically ``fxopt::fused_add_tree(xs, tree)``.

    When no gradient can flow through the call and nothing traces it
    (:func:`fxopt.ops.ad_support.direct_call_ok`), it skips the dispatcher: CUDA tensors go
    straight to the cached launcher (at decode sizes the launch cost *is* the cost), others
    are evaluated with ATen as the op's CPU impl would. Otherwise it calls the custom op:
    under tracing (FakeTensors, torch.export, torch.compile, dispatch modes), so a rewritten
    graph exports/compiles to the op; and whenever autograd would record the call (grad mode
    on and an input requiring grad, a torch.func transform, or a forward-AD dual level), so
    the outputs carry history (or forward mode gets its clear error). The checks are a few
    C calls (benchmarks/fast_path_gate.py, benchmarks/host_cost.py)."""
    if direct_call_ok(xs):
        if xs[0].is_cuda or FAST_PATH_ON_CPU:
            return add_tree_launch.launcher_for(xs, tree)(xs)
        # CPU (or another device): what the op's CPU impl would do, minus the dispatcher and
        # its Python autograd kernel
        return evaluate(xs, tree)
    return fused_add_tree_op(xs, tree)


# kernel sources for fxopt.codegen.kernel_sources (inspection, OptimizedModule.kernel_sources)
register_source_provider(fused_add_tree_op, add_tree_launch.kernel_source_for_node)
register_source_provider(fused_add_tree, add_tree_launch.kernel_source_for_node)
