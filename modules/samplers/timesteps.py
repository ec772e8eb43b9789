"""Time grids for flow samplers. Convention: t = 1 pure noise, t = 0 clean data."""

from __future__ import annotations

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
