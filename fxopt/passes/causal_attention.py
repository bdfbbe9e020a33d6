"""The ``"causal_sdpa"`` pass: a purely positional causal mask feeding SDPA -> ``is_causal=True``.

Under capture transformers (5.x) materialises the causal mask - ``arange`` positions, ``le`` /
``index`` / packed-sequence ``diff``/``cumsum`` checks, ``and``s, an ``expand`` - and hands it to
``aten.scaled_dot_product_attention`` as ``attn_mask``. SDPA then takes its masked path (a slower
kernel on the GPU, and different numbers from eager, which passes ``is_causal=True``). This rule
gives SDPA ``attn_mask=None, is_causal=True`` back and leaves the mask computation to dead-code
removal (the driver erases it once its last SDPA is rewritten).

Proof obligation: the mask must be *purely positional* and *exactly* SDPA's causal mask.

1. Every ancestor of the mask is a call of an op on constants (``arange``, ``full``, literals)
   and on each other: no graph input (an ``attention_mask`` / ``position_ids`` /
   ``cache_position`` the caller passes - e.g. a padded batch - makes the mask depend on run-time
   values: declined, naming the input), no module parameter or buffer (the user may change it),
   no symbolic shape, no op with side effects or randomness.
2. Then the mask is a constant of the graph; it is evaluated (on the device the graph builds it
   on, at most :data:`MAX_MASK_ELEMENTS` elements) and compared with SDPA's own causal mask for
   these q/k lengths, ``ones(L, S).tril()`` broadcast over batch and heads: a boolean mask must
   equal it; a float mask must be 0 where it is True and ``-inf`` where it is False (anything
   else - ``finfo.min``, an ALiBi bias, a sliding window - is a different computation: declined
   with the first differing position).

Contract: the rewritten call *is* eager's ``scaled_dot_product_attention(q, k, v,
is_causal=True, scale=..., enable_gqa=...)`` - bitwise equal to it by construction (checked in
``tests/test_causal_attention.py``); against the masked call it replaces, the two SDPA paths are
the same mathematical function (masked scores are excluded, exp(-inf) = 0) but may use different
kernels, so logits agree within a few fp32 ulps (checked on tiny GPTNeoX, GPT-2, Llama, GPT-J
and Phi).
"""
from __future__ import annotations

import math

import torch
from torch.fx.node import Node

from ..rewrite import NodeRule, RewritePass, decline, emit
from ..testing.contracts import bitwise

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
MAX_MASK_ELEMENTS = 1 << 26
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def _static(v) -> bool:
    return isinstance(v, torch.Tensor) and all(type(s) is int for s in v.shape)


def _bound(node: Node) -> dict:
    b = dict(zip(_SDPA_ARGS, node.args))
    b.update(node.kwargs)
    return b


def _ancestors(mask: Node):
    """The mask's ancestors in graph order, or ``(None, node, why)`` for the first that is not a
    pure call on constants."""
    seen: dict[Node, None] = {}
    stack = [mask]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        if n.op == "placeholder":
            return None, n, f"the mask reads the graph input {n.name} (e.g. an attention_mask of a padded batch): " \
                            "its values are only known at run time"
        if n.op == "get_attr":
            return None, n, f"the mask reads the module attribute {n.target}, which may change"
        if n.op != "call_function":
            return None, n, f"the mask depends on {n.name} ({n.op})"
        if n.is_impure() or "rand" in str(n.target) or "bernoulli" in str(n.target):
            return None, n, f"the mask depends on {n.name}, an op with side effects or randomness"
        v = _val(n)
        vals = v if isinstance(v, (tuple, list)) else [v]
        if any(isinstance(x, torch.Tensor) and not _static(x) for x in vals) or any(
                isinstance(x, torch.SymInt) for x in vals):
            return None, n, f"the mask depends on {n.name}, which has a symbolic shape"
        seen[n] = None
        stack.extend(n.all_input_nodes)
    return sorted(seen), None, ""


def _evaluate(nodes: list[Node], mask: Node) -> torch.Tensor:
    env: dict[Node, object] = {}

    def load(a):
        return torch.fx.node.map_arg(a, lambda n: env[n])

    for n in nodes:
        env[n] = n.target(*load(n.args), **load(n.kwargs))
    return env[mask]


def _causal_problem(mask: torch.Tensor, L: int, S: int) -> str | None:
    """Why ``mask`` is not SDPA's ``is_causal`` mask for an ``L x S`` score matrix (None: it is)."""
    if mask.dim() < 2 or tuple(mask.shape[-2:]) != (L, S):
        if mask.dim() < 2 or any(a not in (1, b) for a, b in zip(mask.shape[-2:], (L, S))):
            return f"the mask's last two dims {tuple(mask.shape[-2:])} are not the scores' ({L}, {S})"
    want = torch.ones(L, S, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        zero, ninf = mask == 0, mask == -math.inf
        if not bool((zero | ninf).all()):
            bad = (~(zero | ninf)).nonzero()[0].tolist()
            return f"a float mask with values other than 0 and -inf (at {bad}: {mask[tuple(bad)].item()!r}): " \
                   "an additive bias, not a causal mask"
        allowed = zero
    else:
        return f"a {mask.dtype} mask"
    allowed = allowed.expand(*allowed.shape[:-2], L, S)
    diff = allowed != want
    if bool(diff.any()):
        at = diff.nonzero()[0].tolist()
        return f"the mask differs from the causal mask tril(ones({L}, {S})) at {at} " \
               f"({'allowed' if allowed[tuple(at)] else 'masked'} there): not purely causal (padding, window, prefix)"
    return None


def _causal_sdpa(node: Node, ctx):
    """sdpa(q, k, v, causal_mask) -> sdpa(q, k, v, is_causal=True)   when the mask is built from
    positions only and equals tril(ones(L, S))"""
    b = _bound(node)
    mask = b.get("attn_mask")
    if mask is None:
        return None
    if not isinstance(mask, Node):
        return decline("the mask is not a graph value", kind="mask")
    if b.get("is_causal", False):
        return decline("is_causal=True and a mask at once", kind="arguments")
    if b.get("dropout_p", 0.0) != 0.0:
        return decline(f"dropout_p={b.get('dropout_p')}: training-mode attention", kind="arguments")
    q, k = _val(b["query"]), _val(b["key"])
    if not (_static(q) and _static(k)):
        return decline("q or k has a symbolic shape", kind="shape")
    cache = ctx.cache("causal_sdpa.masks")
    L, S = int(q.shape[-2]), int(k.shape[-2])
    key = (mask, L, S)
    if key not in cache:
        nodes, bad, why = _ancestors(mask)
        if nodes is None:
            cache[key] = (why, bad)
        else:
            mv = _val(mask)
            if not _static(mv) or mv.numel() > MAX_MASK_ELEMENTS:
                cache[key] = (f"the mask has {mv.numel() if _static(mv) else 'a symbolic number of'} elements "
                              f"(limit {MAX_MASK_ELEMENTS})", None)
            else:
                try:
                    with torch.no_grad():
                        value = _evaluate(nodes, mask)
                    cache[key] = (_causal_problem(value, L, S), None)
                except Exception as exc:  # noqa: BLE001 - an op that cannot run here: keep the mask
                    cache[key] = (f"evaluating the mask failed: {type(exc).__name__}: {exc}", None)
    why, at = cache[key]
    if why is not None:
        return decline(why, kind="mask", at=at, progress=1 if at is None else 0)
    kwargs = {"dropout_p": 0.0, "is_causal": True}
    for name in ("scale", "enable_gqa"):
        if name in b:
            kwargs[name] = b[name]

    def build(bld):
        return [bld.op(SDPA, (b["query"], b["key"], b["value"]), kwargs, val=node.meta.get("val"))]

    return emit([node], build, matched=[node], before=node, erase_unused_inputs=True)


CAUSAL_SDPA = NodeRule("causal_sdpa", _causal_sdpa, anchors=[SDPA], contract=bitwise, reach=0,
                       source=f"{__file__}:{_causal_sdpa.__code__.co_firstlineno}",
                       description="sdpa(q, k, v, positional causal mask) -> sdpa(q, k, v, is_causal=True); bitwise vs "
                                   "eager sdpa(is_causal=True), within fp32 ulps of the masked call")


class CausalSdpaPass(RewritePass):
    """Give SDPA ``is_causal=True`` back where its mask is transformers' positional causal mask."""

    def __init__(self):
        super().__init__("causal_sdpa", [CAUSAL_SDPA], max_iterations=1)
