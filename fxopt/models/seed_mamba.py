"""A small Mamba written the way research "seed" code writes it: the selective scan is a
plain Python loop. Capture unrolls that loop; the ``scan`` pass must find it again.

Shapes (letter glossary):
    b batch, l sequence length, d inner channels (expand * d_model), n state size,
    r dt_rank, v vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SeedMambaConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layer: int = 2
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int | None = None  # default ceil(d_model / 16), as in the Mamba paper

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def selective_scan(u, delta, A, B, C, D):
    """u, delta: (b l d); A: (d n); B, C: (b l n); D: (d) -> (b l d).

    The recurrence ``x_t = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t`` and readout
    ``y_t = <x_t, C_t>``, written as the loop seed code uses."""
    b, l, d = u.shape
    n = A.shape[1]
    deltaA = torch.exp(torch.einsum("bld,dn->bldn", delta, A))
    deltaB_u = torch.einsum("bld,bln,bld->bldn", delta, B, u)
    x = torch.zeros(b, d, n, device=u.device, dtype=deltaA.dtype)
    ys = []
    for i in range(l):
        x = deltaA[:, i] * x + deltaB_u[:, i]
        y = torch.einsum("bdn,bn->bd", x, C[:, i, :])
        ys.append(y)
    y = torch.stack(ys, dim=1)
    return y + u * D


class MambaBlock(nn.Module):
    def __init__(self, cfg: SeedMambaConfig):
        super().__init__()
        d_in, n, r = cfg.d_inner, cfg.d_state, cfg.rank
        self.in_proj = nn.Linear(cfg.d_model, 2 * d_in, bias=False)
        self.conv1d = nn.Conv1d(d_in, d_in, kernel_size=cfg.d_conv, groups=d_in, padding=cfg.d_conv - 1)
        self.x_proj = nn.Linear(d_in, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, d_in, bias=True)
        A = torch.arange(1, n + 1, dtype=torch.float32).repeat(d_in, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_in))
        self.out_proj = nn.Linear(d_in, cfg.d_model, bias=False)
        self.rank, self.n = r, n

    def forward(self, hidden):  # (b l d_model)
        l = hidden.shape[1]
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        x = self.conv1d(x.transpose(1, 2))[..., :l].transpose(1, 2)
        x = F.silu(x)
        y = self.ssm(x)
        y = y * (z * torch.sigmoid(z))  # gate spelled out, as seed code often does
        return self.out_proj(y)

    def ssm(self, x):
        A = -torch.exp(self.A_log.float())
        delta, B, C = self.x_proj(x).split([self.rank, self.n, self.n], dim=-1)
        delta = F.softplus(self.dt_proj(delta))
        return selective_scan(x, delta, A, B, C, self.D.float())


class ResidualBlock(nn.Module):
    def __init__(self, cfg: SeedMambaConfig):
        super().__init__()
        self.mixer = MambaBlock(cfg)
        self.norm = RMSNorm(cfg.d_model)

    def forward(self, x):
        return self.mixer(self.norm(x)) + x


class SeedMamba(nn.Module):
    def __init__(self, cfg: SeedMambaConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or SeedMambaConfig()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([ResidualBlock(cfg) for _ in range(cfg.n_layer)])
        self.norm_f = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embedding.weight  # tied, as in Mamba

    def forward(self, input_ids):  # (b l) -> (b l v)
        x = self.embedding(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm_f(x))


def seed_mamba(seed: int = 0, **overrides) -> SeedMamba:
    """A seeded small SeedMamba in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return SeedMamba(SeedMambaConfig(**overrides)).eval()
