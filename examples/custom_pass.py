"""User-written passes, written the way the library writes its own: two rules, one of each kind.

Run it:  python examples/custom_pass.py

* A traced rule (``fxopt.Rule``): ``x * sigmoid(x)`` -> ``silu(x)``. The pattern and the
  replacement are two plain PyTorch functions plus example inputs; fxopt traces both the way it
  captures models, so they are at the same ATen level as the model's graph.
* A callable rule (``fxopt.NodeRule`` via ``@fxopt.node_rule``): ``pow(x, 2)`` -> ``x * x``. A
  function looks at one ``aten.pow.Tensor_Scalar`` node and returns a replacement
  (``fxopt.replace_call``) or declines with a reason (``fxopt.decline``): another exponent, or a
  dtype the bit-equality was not measured for (``check_square_contract``).

1. Each rule is wrapped in a ``RewritePass`` and registered ("silu", "square"); the seed-style
   Mamba, whose gate is spelled ``z * torch.sigmoid(z)`` and whose RMSNorm squares with
   ``x.pow(2)``, gets one silu match per layer and one square per norm with
   ``fxopt.optimize(model, (ids,), passes=["silu", "square"])``.
2. The outputs are checked against the eager model under a stated contract.
3. Where a rule does not apply, ``fxopt.explain`` says why: on GPTNeoX (gelu, no
   ``x * sigmoid(x)``) which candidate ``mul`` nodes got furthest and where they diverged; on
   a look-alike norm with ``x.pow(3)``, the callable rule's own reason.

The numerical contract (measured on CPU, see ``check_gate_contract``): ``silu(x)`` rounds
once where ``x * sigmoid(x)`` rounds twice, so it is not bit-equal. Per element it is
within 1 ulp of ``x * sigmoid(x)`` in float32, and its error against a float64
evaluation is no larger (max and RMS norm, ``fp64_relative(1.0)``) in float32, float16
and bfloat16 (in float16 the two spellings differ by up to ~9 ulp, because eager rounds
``sigmoid(x)`` to float16 before multiplying: silu is the more accurate one).
End to end on the model's logits we check ``fp64_relative(2.0)`` against a float64 run
of the same captured graph. ``x * x`` is bit-equal to ``pow(x, 2)`` (``bitwise``: NaN payloads
aside, which no PyTorch op can observe) in float16, bfloat16, float32 and float64 on CPU, measured
over 1M values, the specials and a strided view; the rule declines other dtypes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fxopt
from fxopt import Rule, RewritePass
from fxopt.graph_utils import op_name
from fxopt.testing import bitwise, ulp

aten = torch.ops.aten

# ---------------------------------------------------------------------------- the rule
# The pattern and the replacement are ordinary functions; the example input only fixes
# what gets traced (any shape and floating dtype matches). sigmoid(x) * x is matched too:
# aten.mul.Tensor is commutative bit for bit, and rules try both operand orders.
SILU_RULE = Rule(
    "mul_sigmoid_to_silu",
    pattern=lambda x: x * torch.sigmoid(x),
    replacement=lambda x: F.silu(x),
    example_inputs=(torch.randn(8),),
    # side condition: floating tensors only (silu has no integer kernel)
    extra_check=lambda m: m.dtype("x") is not None and m.dtype("x").is_floating_point,
    contract=ulp(1),
)

# ---------------------------------------------------------------------------- a callable rule
# Tried at every aten.pow.Tensor_Scalar node; returns a replacement or says why not. The engine
# does the rest, as for the traced rule: the new node's fake value, the check that dtype and
# shape stay, provenance, erasing the pow, per-run hit counts, and what fxopt.explain reports.
_BITWISE_SQUARE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # check_square_contract


@fxopt.node_rule("pow2_to_mul", anchors=[aten.pow.Tensor_Scalar], contract=bitwise)
def SQUARE_RULE(node):
    """pow(x, 2) -> x * x, where the two are bit-equal."""
    x, exponent = node.args[0], node.args[1]
    if type(exponent) not in (int, float) or exponent != 2:
        return fxopt.decline(f"exponent {exponent!r}, not 2")
    dtype = x.meta["val"].dtype
    if dtype not in _BITWISE_SQUARE:
        return fxopt.decline(f"{str(dtype).replace('torch.', '')}: bit-equality measured for float dtypes only",
                             kind="dtype")
    return fxopt.replace_call(node, aten.mul.Tensor, (x, x))


def make_silu_pass() -> RewritePass:
    return RewritePass("silu", [SILU_RULE])


def make_square_pass() -> RewritePass:
    return RewritePass("square", [SQUARE_RULE])


fxopt.register_pass("silu", make_silu_pass, replace=True)
fxopt.register_pass("square", make_square_pass, replace=True)


# ---------------------------------------------------------------------------- checks
def check_gate_contract(n: int = 200_000, seed: int = 0) -> dict[str, dict]:
    """Measure silu(x) against x*sigmoid(x) on random inputs of every float dtype and check
    the contract stated in the module docstring. Returns the measurements."""
    from fxopt.testing import fp64_relative, ulp_distance

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = (torch.randn(n, generator=gen) * 6).to(dtype)
        x = torch.cat([x, torch.linspace(-30, 30, 4001).to(dtype), torch.tensor([0.0, -0.0, float("inf"), -float("inf"),
                                                                                  float("nan")], dtype=dtype)])
        orig, new = x * torch.sigmoid(x), F.silu(x)
        x64 = x.double()
        stats = fp64_relative(1.0, rtol=0.0).check(orig, new, fp64_ref=x64 * torch.sigmoid(x64))
        stats["max_ulp"] = float(ulp_distance(orig, new).max())
        if dtype == torch.float32:
            assert stats["max_ulp"] <= 1, stats
        out[str(dtype).replace("torch.", "")] = stats
    return out


def check_square_contract(n: int = 1_000_000, seed: int = 0) -> dict[str, bool]:
    """Is x * x bit-equal (``bitwise``) to pow(x, 2)? Per float dtype, on random values, specials and a
    non-contiguous view. The rule rewrites only where this says True."""
    gen = torch.Generator().manual_seed(seed)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-30, 6e4, 3e38, 1e-300],
                            dtype=torch.float64)
    out = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.cat([(torch.randn(n, generator=gen, dtype=torch.float64) * 100).to(dtype), specials.to(dtype)])
        same = True
        for v in (x, x[::3]):
            try:
                bitwise.check(v.pow(2), v * v)
            except AssertionError:
                same = False
        out[str(dtype).replace("torch.", "")] = same
    return out


def run_seed_mamba(seq_len: int = 16) -> dict:
    from fxopt.models.seed_mamba import seed_mamba
    from fxopt.testing import fp64_relative

    model = seed_mamba(n_layer=2)
    ids = torch.randint(0, model.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    opt = fxopt.optimize(model, (ids,), passes=["silu", "square"])
    report = opt.report()
    print(report)
    print(f"rule hits: {report.rule_hits}  (rules defined at {SILU_RULE.source}, {SQUARE_RULE.source})")
    n_layers = model.config.n_layer
    assert report.rule_hits.get(SILU_RULE.name) == n_layers, (report.rule_hits, n_layers)
    assert report.rule_hits.get(SQUARE_RULE.name) == n_layers + 1, report.rule_hits  # a norm per layer + final

    # where did the rewrites land? provenance on every new node
    for node in opt.graph_module.graph.nodes:
        prov = node.meta.get("fxopt_provenance")
        if prov:
            stack = node.meta.get("nn_module_stack") or {}
            where = list(stack.values())[-1][0] if stack else "?"
            print(f"  {node.name}: {op_name(node)} from {prov['from']} in {where}")

    with torch.no_grad():
        ref = model(ids)
        got = opt(ids)
        # fp64 reference: the captured (un-rewritten) graph run on a float64 copy of the model
        model64 = seed_mamba(n_layer=2).double()
        ref64 = model64(ids)
    stats = fp64_relative(2.0).check(ref, got, fp64_ref=ref64)
    print(f"logits, contract {fp64_relative(2.0).name} vs a float64 run: max error {stats['max_err']:.3g} "
          f"(eager {stats['max_err_ref']:.3g}), rms {stats['rms_err']:.3g} (eager {stats['rms_err_ref']:.3g})")
    return {"report": report, "stats": stats, "optimized": opt}


class CubeNorm(torch.nn.Module):
    """A look-alike of the seed Mamba's RMSNorm: one pow(x, 2), and one pow(|x|, 3) in the denominator."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + x.abs().pow(3).mean(-1, keepdim=True))


def run_lookalike_explain():
    """The callable rule fires at pow(x, 2) and declines pow(x, 3): explain gives its reason."""
    gm = fxopt.capture(CubeNorm(), (torch.randn(2, 5, 64),))
    report = fxopt.explain(gm, "square")
    print(report)
    return report


def run_gpt_neox_explain(seq_len: int = 8):
    """The rule does not fire on GPTNeoX (its MLP uses gelu): show why."""
    from fxopt.models.hf import tiny_gpt_neox

    model = tiny_gpt_neox()
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(2))
    opt = fxopt.optimize(model, (ids,), passes=["silu"])
    assert opt.report().matches.get("silu", 0) == 0
    report = fxopt.explain(opt.graph_module, SILU_RULE, top=3)
    print(report)
    acts = sorted({op_name(n) for n in opt.graph_module.graph.nodes
                   if op_name(n) in ("aten.gelu.default", "aten.silu.default", "aten.sigmoid.default")})
    print(f"(activation ops in this graph: {', '.join(acts) or 'none'}: the MLP uses gelu, not x * sigmoid(x))")
    return report


def main() -> dict:
    print("== contract: silu(x) vs x * sigmoid(x) (CPU, measured)")
    for dtype, s in check_gate_contract().items():
        print(f"  {dtype}: max ulp {s['max_ulp']:g}; max err vs fp64 {s['max_err']:.3g} (original "
              f"{s['max_err_ref']:.3g}); rms {s['rms_err']:.3g} (original {s['rms_err_ref']:.3g})")
    print("== contract: x * x vs pow(x, 2), bit-equal? (CPU, measured)")
    print("  " + ", ".join(f"{k}: {v}" for k, v in check_square_contract().items()))
    print("\n== seed Mamba: optimize(model, (ids,), passes=['silu', 'square'])")
    mamba = run_seed_mamba()
    print("\n== GPTNeoX: the traced rule does not apply; fxopt.explain says why")
    explanation = run_gpt_neox_explain()
    print("\n== a look-alike norm: the callable rule declines pow(x, 3); fxopt.explain gives its reason")
    lookalike = run_lookalike_explain()
    return {"mamba": mamba, "explain": explanation, "explain_callable": lookalike}


if __name__ == "__main__":
    main()
