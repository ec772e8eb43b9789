"""Explicit Euler integration of the flow ODE dx/dt = v(x, t) from t = 1 (noise) to t = 0."""

from __future__ import annotations

import torch
from torch import Tensor

from modules.objectives.paths import Path
from modules.samplers.base import VelocityFn, time_batch
from modules.samplers.timesteps import flow_timesteps


class EulerSampler:
    """x_{k+1} = x_k + (t_{k+1} − t_k)·v(x_k, t_k) on the grid `flow_timesteps(steps, shift)`.

    Global error O(1/steps); ``steps`` velocity evaluations. Needs no path. On any path whose α and
    σ are affine in t (rectified flow, σ_min flow matching) this is DDIM with η = 0 step for step.
    """

    def __init__(self, steps: int = 20, shift: float = 1.0) -> None:
        self.steps = steps
        self.shift = shift

    @property
    def nfe(self) -> int:
        return self.steps

    @torch.no_grad()
    def sample(self, velocity_fn: VelocityFn, noise: Tensor, path: Path | None = None) -> Tensor:
        """velocity_fn(x (B, ...), t (B,)) -> v like x; noise (B, ...) at t = 1 -> x at t = 0.
        ``path`` is accepted for the common interface and not used."""
        ts = flow_timesteps(self.steps, self.shift).tolist()
        x = noise
        for t, t_next in zip(ts[:-1], ts[1:]):
            x = x + (t_next - t) * velocity_fn(x, time_batch(x, t))
        return x
