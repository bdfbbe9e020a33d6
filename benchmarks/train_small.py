"""Train the small byte-level models fxopt measures quality on (issue 13: there is no model hub here).

Data: the ``*.py`` files of this Python's standard library (``fxopt.models.trained``: a fixed
train / held-out split by a stable hash of each file's relative path). Models: an HF
``GPTNeoXForCausalLM`` (6 layers, d 256, 4 heads, rotary_pct 0.25, context 512, vocab 256) and an HF
``MambaForCausalLM`` of similar size (10 layers, d 256, state 16). Each run writes
``<family>_stdlib.safetensors`` (fp16 weights, the config in the metadata; both files together
<= 20 MB) and ``<family>_stdlib.json`` (held-out bits per byte, measured with the HF model's own
forward on the file as saved and reloaded).

One H200, <= 6 minutes each, both at once as two processes::

    python benchmarks/train_small.py --model gpt_neox &
    python benchmarks/train_small.py --model mamba &
    wait     # then commit fxopt/models/assets/*.safetensors (and the JSON numbers into BENCHMARKS.md)

``--smoke`` (CPU, < 1 minute, both models): a tiny configuration for a few steps (tested).

Training: bf16 autocast on CUDA, fused AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), warm-up
then cosine decay to 10 % over ``progress = max(step / steps, elapsed / time_budget)``, so a run
that reaches ``--time-budget`` first still ends annealed; it then stops cleanly and saves. Seeded:
model init, data order (windows drawn from a CPU generator) depend only on ``--seed``.

The Mamba is trained through a parallel scan, not HF's per-time-step loop (launch-bound: a
training step would cost ~0.3 s): the mixer forward below mirrors HF's ``MambaMixer`` (no cache,
no padding) with the recurrence ``h_t = exp(dt A) h_{t-1} + dt B u`` computed by fxopt's own
``fxopt::linear_scan`` op (Triton on CUDA), wrapped in an autograd function whose backward is
the reverse scan ``g_t = dL/dh_t + a_{t+1} g_{t+1}``. Before training and after, the training
forward's loss is checked against the HF model's own forward (``--scan loop`` falls back to a
plain PyTorch time loop).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fxopt.models import trained  # noqa: E402

CONTEXT = 512
CONFIGS = {
    "gpt_neox": dict(vocab_size=256, hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                     intermediate_size=1024, max_position_embeddings=CONTEXT, rotary_pct=0.25,
                     use_parallel_residual=True, attention_bias=True, tie_word_embeddings=False,
                     hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "mamba": dict(vocab_size=256, hidden_size=256, state_size=16, num_hidden_layers=10, expand=2, conv_kernel=4,
                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0),
}
SMOKE = {
    "gpt_neox": dict(CONFIGS["gpt_neox"], hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64),
    "mamba": dict(CONFIGS["mamba"], hidden_size=32, num_hidden_layers=2, state_size=4),
}
DEFAULTS = {  # steps x batch tokens; the time budget may end a run first (schedule then annealed by time)
    "gpt_neox": dict(steps=8000, batch_size=64, lr=2e-3, warmup=200),
    "mamba": dict(steps=4000, batch_size=32, lr=2e-3, warmup=200),
}
MAX_FILE_BYTES = 10 * 1000 * 1000  # each of the two files (issue: <= 20 MB together)


# ----------------------------------------------------------------------------- Mamba training forward
class _LinearScanFn(torch.autograd.Function):
    """``h_t = a_t h_{t-1} + b_t`` over axis 0 (h_{-1} = 0), all states returned (in ``a``'s dtype)."""

    @staticmethod
    def forward(ctx, a, b):
        import fxopt.ops.scan  # noqa: F401  (registers fxopt::linear_scan)

        hs, _ = torch.ops.fxopt.linear_scan(a, b, None, None, a.dtype, a.dtype)
        ctx.save_for_backward(a, hs)
        return hs

    @staticmethod
    def backward(ctx, g):
        a, hs = ctx.saved_tensors
        a_next = torch.cat([a[1:], torch.zeros_like(a[:1])], 0)
        G, _ = torch.ops.fxopt.linear_scan(a_next.flip(0).contiguous(), g.flip(0).contiguous(), None, None,
                                           a.dtype, a.dtype)
        G = G.flip(0)
        h_prev = torch.cat([torch.zeros_like(hs[:1]), hs[:-1]], 0)
        return G * h_prev, G


def _scan_loop(a, b):
    h = torch.zeros_like(b[0])
    out = []
    for t in range(a.shape[0]):
        h = a[t] * h + b[t]
        out.append(h)
    return torch.stack(out, 0)


def mixer_forward(mixer, hidden, scan: str = "op"):
    """HF ``MambaMixer.forward`` without cache or padding mask, the scan in parallel form."""
    L = hidden.shape[1]
    projected = mixer.in_proj(hidden).transpose(1, 2)                     # (b, 2E, L)
    x, gate = projected.chunk(2, dim=1)
    x = mixer.act(mixer.conv1d(x)[..., :L])                               # causal depthwise conv
    params = mixer.x_proj(x.transpose(1, 2))                              # (b, L, R + 2N)
    dt, B, C = torch.split(params, [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1)
    dt = mixer.dt_proj.weight @ dt.transpose(1, 2)                        # (b, E, L)
    dt = F.softplus(dt.float() + mixer.dt_proj.bias.float()[:, None])
    A = -torch.exp(mixer.A_log.float())                                   # (E, N)
    dt_t = dt.permute(2, 0, 1)                                            # (L, b, E)
    a = torch.exp(dt_t[..., None] * A)                                    # (L, b, E, N)
    u = x.float().permute(2, 0, 1)                                        # (L, b, E)
    bu = (dt_t * u)[..., None] * B.float().transpose(0, 1)[:, :, None, :]  # (L, b, E, N)
    hs = _LinearScanFn.apply(a.contiguous(), bu.contiguous()) if scan == "op" else _scan_loop(a, bu)
    y = (hs * C.float().transpose(0, 1)[:, :, None, :]).sum(-1)           # (L, b, E)
    y = y.permute(1, 2, 0) + x.float() * mixer.D.float()[None, :, None]
    y = y * F.silu(gate.float())
    return mixer.out_proj(y.transpose(1, 2).to(hidden.dtype))


def mamba_train_logits(model, ids, scan: str = "op"):
    base = model.backbone
    h = base.embeddings(ids)
    for block in base.layers:
        h = h + mixer_forward(block.mixer, block.norm(h.to(block.norm.weight.dtype)), scan)
    return model.lm_head(base.norm_f(h.to(base.norm_f.weight.dtype)))


def train_logits(family, model, ids, scan):
    if family == "mamba":
        return mamba_train_logits(model, ids, scan)
    return model(input_ids=ids, use_cache=False).logits


def loss_of(logits, targets):
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ----------------------------------------------------------------------------- training
def _optimizer(model, lr, device):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    kwargs = dict(lr=lr, betas=(0.9, 0.95), eps=1e-8)
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], **kwargs)


def _lr_at(progress, step, peak, warmup):
    warm = min(1.0, (step + 1) / max(1, warmup))
    return peak * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def consistency(family, model, batch, scan):
    """The training forward's loss vs the HF model's own forward (fp32, no autocast)."""
    with torch.no_grad():
        ids, tgt = batch[:, :-1], batch[:, 1:]
        ours = float(loss_of(train_logits(family, model, ids, scan), tgt))
        hf = float(loss_of(model(input_ids=ids, use_cache=False).logits, tgt))
    return {"train_forward_loss": ours, "hf_forward_loss": hf, "abs_diff": abs(ours - hf)}


def run(family, args, out_dir: Path, log=print) -> dict:
    import transformers

    smoke = args.smoke
    cfg = dict(SMOKE[family] if smoke else CONFIGS[family])
    context = cfg.get("max_position_embeddings", CONTEXT) if family == "gpt_neox" else (64 if smoke else CONTEXT)
    d = DEFAULTS[family]
    steps = args.steps or (3 if smoke else d["steps"])
    batch_size = args.batch_size or (2 if smoke else d["batch_size"])
    lr = args.lr or d["lr"]
    warmup = 1 if smoke else d["warmup"]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    model = trained.build(family, cfg).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    if 2 * n_params > MAX_FILE_BYTES:
        raise SystemExit(f"{family}: {n_params:,} parameters would not fit {MAX_FILE_BYTES:,} bytes in fp16")
    max_bytes = 200_000 if smoke else None
    train_stream = trained.byte_stream("train", max_bytes=max_bytes).to(device)
    held = trained.windows(trained.byte_stream("heldout", max_bytes=(8 * (context + 1) if smoke else None)), context,
                           args.eval_windows if args.eval_windows else (4 if smoke else None))
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = trained.iter_batches(train_stream, context, batch_size, gen)
    opt = _optimizer(model, lr, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    probe = next(trained.iter_batches(train_stream, context, min(batch_size, 8), torch.Generator().manual_seed(7)))
    model.eval()
    check_before = consistency(family, model, probe, args.scan)
    model.train()
    log(f"[{family}] {n_params:,} params, {train_stream.numel():,} train bytes, {held.shape[0]} held-out windows, "
        f"device {device}, consistency {check_before['abs_diff']:.2e}")
    if family == "mamba" and check_before["abs_diff"] > 1e-3 * max(1.0, check_before["hf_forward_loss"]):
        raise SystemExit(f"mamba training forward disagrees with HF's forward: {check_before}")
    t0 = time.perf_counter()
    stopped_by, step, last_loss, losses = "steps", 0, float("nan"), []
    for step in range(steps):
        elapsed = time.perf_counter() - t0
        progress = max(step / steps, elapsed / args.time_budget)
        if progress >= 1.0:
            stopped_by = "time_budget"
            break
        for group in opt.param_groups:
            group["lr"] = _lr_at(progress, step, lr, warmup)
        batch = next(batches)
        with autocast:
            loss = loss_of(train_logits(family, model, batch[:, :-1], args.scan), batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == steps - 1:
            last_loss = float(loss.detach())
            losses.append((step, round(time.perf_counter() - t0, 2), last_loss))
            log(f"[{family}] step {step} loss {last_loss:.4f} ({last_loss / math.log(2):.3f} bits/byte) "
                f"lr {opt.param_groups[0]['lr']:.2e} {time.perf_counter() - t0:.0f}s")
    else:
        step = steps
    train_seconds = time.perf_counter() - t0
    model.eval()
    check_after = consistency(family, model, probe, args.scan)
    path = out_dir / trained.ASSET_FILES[family]
    info = dict(family=family, steps=step, stopped_by=stopped_by, train_seconds=round(train_seconds, 1),
                tokens=step * batch_size * context, batch_size=batch_size, context=context, lr=lr, seed=args.seed,
                params=n_params, smoke=smoke, python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, device=str(torch.cuda.get_device_name(device)
                                                                  if device.type == "cuda" else "cpu"),
                heldout_split=f"sha256(relpath) % {trained.HELDOUT_MODULUS} == 0",
                consistency_before=check_before, consistency_after=check_after, loss_log=losses)
    trained.save_trained(model, family, cfg, path, info)
    reloaded = trained.load_trained(family, path=path, device=device)  # what users get: fp16 weights, fp32 compute
    bpb = trained.model_bits_per_byte(reloaded, held, batch_size=16 if device.type == "cuda" else 2)
    info.update(heldout_bpb=bpb, heldout_bytes=int(held[:, 1:].numel()), heldout_windows=int(held.shape[0]))
    size = trained.save_trained(model, family, cfg, path, info)
    info["file_bytes"] = size
    if size > MAX_FILE_BYTES:
        raise SystemExit(f"{path} is {size:,} bytes, over {MAX_FILE_BYTES:,}")
    (out_dir / (path.stem + ".json")).write_text(json.dumps(info, indent=2) + "\n")
    log(f"[{family}] held-out {bpb:.4f} bits/byte over {info['heldout_bytes']:,} bytes; {path} ({size:,} bytes); "
        f"{stopped_by} after {step} steps, {train_seconds:.0f}s")
    return info


def _positive(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["gpt_neox", "mamba", "both"], default="both",
                   help="which model (run two processes to train both at once on one GPU)")
    p.add_argument("--out-dir", type=Path, default=trained.ASSET_DIR)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--time-budget", type=_positive, default=330.0, help="seconds of training before a clean stop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--scan", choices=["op", "loop"], default="op", help="Mamba training scan")
    p.add_argument("--eval-windows", type=int, default=None, help="cap on held-out windows (default: all)")
    p.add_argument("--log-every", type=int, default=200)
    p.add_argument("--smoke", action="store_true", help="tiny models, a few steps, CPU-friendly")
    args = p.parse_args(argv)
    if args.smoke and args.device is None:
        args.device = "cpu"
    families = ["gpt_neox", "mamba"] if args.model == "both" else [args.model]
    out = {f: run(f, args, args.out_dir) for f in families}
    print(json.dumps({f: {k: v[k] for k in ("heldout_bpb", "steps", "stopped_by", "train_seconds", "file_bytes")}
                      for f, v in out.items()}))
    return out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
