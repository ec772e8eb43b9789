"""Embeddings of scalars and positions: sinusoidal timestep embedding (+ MLP) and a fixed 3D
sin-cos position embedding for a (T', H', W') token grid.

Timestep embedding: "Attention Is All You Need" (Vaswani et al. 2017) frequencies, as in DiT
(Peebles & Xie 2023, `TimestepEmbedder`). 3D position embedding: the MAE / DiT 2D sin-cos
embedding extended to three axes, with the channel split of Wan's 3D RoPE (t gets
d − 4·(d // 6) channels, h and w get 2·(d // 6) each).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from modules.layers.rope import axis_bands


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of a scalar per sample.

    t: (B,) float, any scale (the objective decides, e.g. t·1000).
    Returns (B, dim): [cos(t·ω_i), sin(t·ω_i)], ω_i = max_period^(−i / (dim/2)), i < dim/2;
    an odd `dim` is zero-padded by one channel.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2·half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, dim)
    return emb


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, dim): sinusoidal features of size `freq_dim`, then Linear-SiLU-Linear."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        freq = timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype)  # (B, freq_dim)
        return self.mlp(freq)  # (B, dim)


def sincos_1d(pos: Tensor, dim: int) -> Tensor:
    """Fixed 1D sin-cos embedding (MAE `get_1d_sincos_pos_embed_from_grid`).

    pos: (N,) float positions. Returns (N, dim) = [sin(pos·ω_i), cos(pos·ω_i)],
    ω_i = 10000^(−i / (dim/2)). `dim` must be even.
    """
    if dim % 2:
        raise ValueError(f"sin-cos band size must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    args = pos.double()[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1).float()  # (N, dim)


def sincos_3d(grid: tuple[int, int, int], dim: int, device: torch.device | None = None) -> Tensor:
    """Fixed 3D sin-cos position embedding for a (T', H', W') token grid, computed for any size.

    Separate bands, split as `modules.layers.rope.axis_bands` splits a head for 3D RoPE (Wan). Each band is `sincos_1d` of that axis' integer index.
    Returns (T'·H'·W', dim), tokens in row-major (t, h, w) order, the order of `patchify`.
    """
    d_t, d_hw, _ = axis_bands(dim)  # raises on an odd dim
    nt, nh, nw = grid
    tt, hh, ww = torch.meshgrid(
        torch.arange(nt, device=device),
        torch.arange(nh, device=device),
        torch.arange(nw, device=device),
        indexing="ij",
    )  # each (T', H', W')
    return torch.cat(
        [
            sincos_1d(tt.flatten(), d_t),  # (N, d_t)
            sincos_1d(hh.flatten(), d_hw),  # (N, d_hw)
            sincos_1d(ww.flatten(), d_hw),  # (N, d_hw)
        ],
        dim=-1,
    )  # (N, dim)
