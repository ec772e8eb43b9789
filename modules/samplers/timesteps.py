"""Time grids for flow samplers and time intervals (expert routing, per-interval guidance).
Convention: t = 1 pure noise, t = 0 clean data."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Resolution / schedule shift of SD3 (Esser et al. 2024, §5.3.2) and Wan:
    t' = s·t / (1 + (s − 1)·t). Keeps 0 and 1 fixed; s > 1 spends more steps near noise."""
    return shift * t / (1 + (shift - 1) * t)


def flow_timesteps(steps: int, shift: float = 1.0) -> Tensor:
    """(steps + 1,) float64 grid from 1 (noise) to 0 (data): shift_time(linspace(1, 0), shift)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def interval_index(t: Tensor, boundaries: Sequence[float]) -> Tensor:
    """Index of the time interval each t falls in, for boundaries in descending order.

    t: any shape, any scale (the boundaries must be on the same scale). boundaries b_0 > b_1 > ...
    Returns a long tensor shaped like t: 0 for t ≥ b_0, k for b_k ≤ t < b_{k−1}, len(b) for
    t < b_last. A t equal to a boundary belongs to the higher-noise interval (Wan2.2: the
    high-noise expert serves t ≥ 0.875, i.e. timestep ≥ 875 of 1000).
    """
    if any(a <= b for a, b in zip(boundaries, boundaries[1:])):
        raise ValueError(f"boundaries must be strictly descending (highest noise first), got {list(boundaries)}")
    b = torch.as_tensor(list(boundaries), dtype=t.dtype, device=t.device)  # (K,)
    return (t.unsqueeze(-1) < b).sum(-1)  # (...,) number of boundaries above t
