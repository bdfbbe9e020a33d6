"""The device copy bandwidth benchmarks measure kernels against (one helper for every script).

Why a shared helper: ``benchmarks/latent_kv.py`` timed its copy as a CUDA-graph replay under
``do_bench`` and read 2.76 TB/s on an H200 where the eager probes of ``decode.py`` / ``prefill.py``
read ~4.2 TB/s. A device-to-device ``copy_`` captured into a graph becomes a memcpy *node*, which
the driver may serve with a copy engine instead of the SM copy kernel an eager ``cudaMemcpyAsync``
launches; either way the graph number is not the HBM rate a kernel can reach. So: eager copies,
warmed up, each timed with its own CUDA events, the median taken (``decode.py``'s probe averages ten
back-to-back copies; on a quiet device the two agree).
"""
from __future__ import annotations

import statistics
import time

import torch


def copy_bandwidth(device="cuda", nbytes: int = 1 << 30, reps: int = 20, warmup: int = 3) -> float:
    """Bytes per second of an eager device-to-device copy of ``nbytes`` (read + write counted).

    CUDA: the median over ``reps`` copies, each between its own pair of CUDA events (so a stray
    slow copy does not move the result); CPU: wall-clock median (for smoke runs)."""
    device = torch.device(device)
    n = max(1, int(nbytes) // 4)
    x = torch.empty(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    moved = 2 * n * 4
    if device.type != "cuda":
        times = []
        for _ in range(max(1, reps)):
            t = time.perf_counter()
            y.copy_(x)
            times.append(time.perf_counter() - t)
        return moved / statistics.median(times)
    for _ in range(max(0, warmup)):
        y.copy_(x)
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(max(1, reps))]
    for s, e in events:
        s.record()
        y.copy_(x)
        e.record()
    torch.cuda.synchronize(device)
    ms = statistics.median(s.elapsed_time(e) for s, e in events)
    return moved / (ms * 1e-3)


__all__ = ["copy_bandwidth"]
