"""Adaptive LayerNorm modulation (DiT, Peebles & Xie 2023).

AdaLN-Zero: a conditioning vector c (B, D_c) is mapped by SiLU → Linear to per-channel
shift, scale and gate; the Linear starts at zero, so every gate is 0 and every residual
branch x + gate·f(x) starts as the identity.
"""

from __future__ import annotations

from torch import Tensor, nn


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x (B, N, D), shift and scale (B, D) -> x·(1 + scale) + shift, broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLNZero(nn.Module):
    """c (B, D_c) -> `chunks` tensors of shape (B, dim) from SiLU → Linear, zero-initialised."""

    def __init__(self, cond_dim: int, dim: int, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(cond_dim, chunks * dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c: Tensor) -> tuple[Tensor, ...]:
        return self.linear(nn.functional.silu(c)).chunk(self.chunks, dim=-1)  # chunks × (B, dim)
