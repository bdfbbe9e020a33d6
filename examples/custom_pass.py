"""A user-written pass with the fxopt pattern language: ``x * sigmoid(x)`` -> ``silu(x)``.

Run it:  python examples/custom_pass.py

1. The rule is two plain PyTorch functions plus example inputs. fxopt traces both the
   way it captures models, so they are at the same ATen level as the model's graph.
2. A ``RewritePass`` holding the rule is registered under the name "silu" and applied
   with ``fxopt.optimize(model, (ids,), passes=["silu"])`` to the seed-style Mamba,
   whose gate is spelled ``z * torch.sigmoid(z)``: one match per layer.
3. The outputs are checked against the eager model under a stated contract.
4. On a model where the rule does not apply (GPTNeoX, which uses gelu), ``fxopt.explain``
   says why: which candidate ``mul`` nodes got furthest and where they diverged.

The numerical contract (measured on CPU, see ``check_gate_contract``): ``silu(x)`` rounds
once where ``x * sigmoid(x)`` rounds twice, so it is not bit-equal. Per element it is
within 1 ulp of ``x * sigmoid(x)`` in float32, and its error against a float64
evaluation is no larger (max and RMS norm, ``fp64_relative(1.0)``) in float32, float16
and bfloat16 (in float16 the two spellings differ by up to ~9 ulp, because eager rounds
``sigmoid(x)`` to float16 before multiplying: silu is the more accurate one).
End to end on the model's logits we check ``fp64_relative(2.0)`` against a float64 run
of the same captured graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fxopt
from fxopt import Rule, RewritePass
from fxopt.graph_utils import op_name

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
)


def make_silu_pass() -> RewritePass:
    return RewritePass("silu", [SILU_RULE])


fxopt.register_pass("silu", make_silu_pass, replace=True)


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


def run_seed_mamba(seq_len: int = 16) -> dict:
    from fxopt.models.seed_mamba import seed_mamba
    from fxopt.testing import fp64_relative

    model = seed_mamba(n_layer=2)
    ids = torch.randint(0, model.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    opt = fxopt.optimize(model, (ids,), passes=["silu"])
    report = opt.report()
    print(report)
    print(f"rule hits: {report.rule_hits}  (rule defined at {SILU_RULE.source})")
    n_layers = model.config.n_layer
    assert report.rule_hits.get(SILU_RULE.name) == n_layers, (report.rule_hits, n_layers)

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
    print("\n== seed Mamba: optimize(model, (ids,), passes=['silu'])")
    mamba = run_seed_mamba()
    print("\n== GPTNeoX: the rule does not apply; fxopt.explain says why")
    explanation = run_gpt_neox_explain()
    return {"mamba": mamba, "explain": explanation}


if __name__ == "__main__":
    main()
