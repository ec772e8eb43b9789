"""Explicit Euler integration of the flow ODE dx/dt = v(x, t) from t = 1 (noise) to t = 0."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from modules.samplers.timesteps import flow_timesteps


class EulerSampler:
    """x_{k+1} = x_k + (t_{k+1} − t_k)·v(x_k, t_k) on the grid `flow_timesteps(steps, shift)`.

    Global error O(1/steps). Runs under torch.no_grad().
    """

    def __init__(self, steps: int = 20, shift: float = 1.0) -> None:
        self.steps = steps
        self.shift = shift

    @torch.no_grad()
    def sample(self, velocity_fn: Callable[[Tensor, Tensor], Tensor], noise: Tensor) -> Tensor:
        """velocity_fn(x (B, ...), t (B,)) -> v like x; noise (B, ...) at t = 1 -> x at t = 0."""
        ts = flow_timesteps(self.steps, self.shift).tolist()
        x = noise
        for t, t_next in zip(ts[:-1], ts[1:]):
            t_batch = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)  # (B,)
            x = x + (t_next - t) * velocity_fn(x, t_batch)
        return x
