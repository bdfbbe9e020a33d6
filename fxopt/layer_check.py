"""Is a layer template sound for every layer? Compare the full model's op stream.

A layer template (``layer_generic.py``) is fitted to proxies holding 1-3 of the stack's
layers (first, last, middle) and replicated to all ``n``. The layers' Python attributes are
compared up front, but code can still branch on a layer's *index* (``if self.layer_idx == 1``)
in a layer no proxy holds. So, once per template, the whole model is run at the call's shape
on fake tensors under the op-stream recorder of ``length_check.py`` (no export, no data: at
the probe lengths a 24-layer model records in a fraction of a second) and its stream is
checked against the one predicted from proxies holding the first 1, 2 and 3 layers (after
the peeled leading layers, when there are some): the stack is a "loop" over layers, every block the
same ops and literals up to terms affine in the layer index. A layer that computes anything
else (another op, another literal, another data flow) is a divergence, and the caller falls
back to a full capture.

What remains trusted: that a branch on the layer index which does not change the op stream
at this shape does not change it at another (a branch on layer index *and* length).
"""
from __future__ import annotations

import time

import torch

from . import length_check as lc
from .layer_generic import truncated_proxy
from .length_generic import TemplateMismatch


def check_all_layers(model: torch.nn.Module, path: str, n: int, peel: int, args: tuple, kwargs: dict) -> str:
    """What was verified (for the report), or :class:`TemplateMismatch` naming the divergence.

    The proxies hold the first ``peel + 2``, ``peel + 3`` and ``peel + 4`` layers. The fitted
    stream must have exactly one loop, over *all* layers but the first ``max(peel, 1)`` (a later
    layer whose ops differ would sit outside the loop: refused), whose literals lie on one line in the layer
    index from layer ``peel + 1`` on (only the first iteration may differ in literals: it reads
    the embeddings rather than the previous layer)."""
    t0 = time.perf_counter()
    if n <= peel + 2:
        return "every layer was captured"
    # a stack of only peel + 3 layers has no deeper proxies: fit on the ones it has
    depths = [peel + 2, peel + 3, peel + 4] if n >= peel + 4 else [peel + 1, peel + 2, peel + 3]
    runs = [(truncated_proxy(model, path, d), args, kwargs) for d in depths]
    try:
        predicted = lc.fit_runs(runs, depths, layer_path=path, max_lo=peel + 1, max_hi=0)
    except TemplateMismatch as exc:
        raise TemplateMismatch(f"the layers' op streams do not repeat one block: {exc}") from exc
    loops = [p for p in predicted.pieces if isinstance(p, lc._Loop)]
    counts = [loops[0].iterations(d) for d in depths] if len(loops) == 1 else []
    # Layer 0 may sit outside the loop (its ops differ: e.g. it reads the embeddings' dtype), and
    # so may every peeled layer: the graph template's probes all hold layers 0..peel-1 as
    # themselves, in place, and compare them node for node. Any other layer outside the loop
    # is refused.
    if not counts or any(c < d - max(peel, 1) for c, d in zip(counts, depths)):
        raise TemplateMismatch(
            f"the layers' op streams do not repeat one block over every layer ({len(loops)} loop(s), "
            f"iterations {counts} at depths {depths}): some layer computes something else")
    try:
        full = lc.verify(predicted, model, args, kwargs, n, layer_path=path)
    except TemplateMismatch as exc:
        raise TemplateMismatch(f"the {n}-layer model's op stream is not the layer template's: {exc}") from exc
    return f"op stream of all {n} layers verified ({len(full)} ops, {time.perf_counter() - t0:.2f} s)"
