"""Heun's second-order method on the flow ODE dx/dt = v(x, t), t from 1 (noise) to 0 (data).

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models", EDM),
Algorithm 1 without stochastic churn, written in our time t instead of EDM's σ (the algorithm is the
explicit trapezoidal rule of any ODE, so only the variable changes):

    d_k  = v(x_k, t_k)
    x̃    = x_k + (t_{k+1} − t_k)·d_k                              (Euler predictor, Alg. 1 l. 5–6)
    x_{k+1} = x_k + (t_{k+1} − t_k)·(d_k + v(x̃, t_{k+1}))/2      (trapezoidal corrector, l. 7–8)

and, as in Alg. 1 l. 7 ("if σ_{i+1} ≠ 0"), the step that lands on t = 0 keeps the Euler predictor,
so no velocity is asked at the data end, where a trained network is least reliable (for a σ_min = 0
path at a discrete data set it is singular). That single Euler step has local error O(h²), so the
global error stays O(h²). Cost: 2·steps − 1 velocity evaluations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modules.objectives.paths import Path
from modules.samplers.base import VelocityFn, time_batch
from modules.samplers.timesteps import flow_timesteps


class HeunSampler:
    """EDM Heun (Karras et al. 2022, Alg. 1, S_churn = 0) on `flow_timesteps(steps, shift)`.
    Needs no path; global error O(1/steps²)."""

    def __init__(self, steps: int = 20, shift: float = 1.0) -> None:
        self.steps = steps
        self.shift = shift

    @property
    def nfe(self) -> int:
        return 2 * self.steps - 1

    @torch.no_grad()
    def sample(self, velocity_fn: VelocityFn, noise: Tensor, path: Path | None = None) -> Tensor:
        """velocity_fn(x (B, ...), t (B,)) -> v like x; noise (B, ...) at t = 1 -> x at t = 0.
        ``path`` is accepted for the common interface and not used."""
        ts = flow_timesteps(self.steps, self.shift).tolist()
        x = noise
        for t, t_next in zip(ts[:-1], ts[1:]):
            h = t_next - t
            d = velocity_fn(x, time_batch(x, t))
            x_euler = x + h * d
            if t_next == 0.0:
                x = x_euler
            else:
                x = x + 0.5 * h * (d + velocity_fn(x_euler, time_batch(x, t_next)))
        return x
