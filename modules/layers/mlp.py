"""Two-layer GELU MLP (ViT / DiT feed-forward, tanh-approximated GELU as in DiT)."""

from __future__ import annotations

from torch import Tensor, nn


class Mlp(nn.Module):
    """x (..., in_dim) -> Linear(in_dim, hidden) → GELU(tanh) → Linear(hidden, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, out_dim if out_dim is not None else in_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))
