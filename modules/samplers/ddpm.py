"""Ancestral DDPM sampling (Ho, Jain & Abbeel 2020) on any path x_t = α(t)·x0 + σ(t)·ε, t = 1
noise, t = 0 data.

For s < t the forward process restricted to (s, t) is x_t = α_{t|s}·x_s + σ_{t|s}·ε' with

    α_{t|s} = α_t / α_s,       σ²_{t|s} = σ_t² − α²_{t|s}·σ_s²,

and the posterior given the clean sample is Gaussian (Ho et al. 2020 eqs. 6–7 with ᾱ = α²,
1 − ᾱ = σ²; Kingma et al. 2021 "Variational Diffusion Models" App. A for general α, σ):

    q(x_s | x_t, x0) = N( α_{t|s}·σ_s²/σ_t² · x_t + α_s·σ²_{t|s}/σ_t² · x0,   σ²_{t|s}·σ_s²/σ_t² · I ).

Each step plugs in x̂0 = E[x0 | x_t] from the velocity and draws from this posterior. Global (weak)
error O(1/steps). σ_t > 0 for t > 0 and α_s > 0 for s < 1 keep every coefficient finite, α_t = 0 at
t = 1 included; the step to σ_0 = 0 is deterministic and returns α_0·x̂0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from modules.objectives.paths import Path
from modules.samplers.base import Generators, Schedule, VelocityFn, make_generator, predict, require_path, step_noise


class DDPMSampler:
    """Ancestral sampling through q(x_s | x_t, x̂0) on `flow_timesteps(steps, shift)`; needs the path.

    seed: seeds the step noise when `sample` gets no generator (each call then draws the same noise).
    """

    stochastic = True

    def __init__(self, steps: int = 100, shift: float = 1.0, seed: int | None = None) -> None:
        self.steps = steps
        self.shift = shift
        self.seed = seed

    @property
    def nfe(self) -> int:
        return self.steps

    @torch.no_grad()
    def sample(
        self, velocity_fn: VelocityFn, noise: Tensor, path: Path | None = None, generator: Generators = None
    ) -> Tensor:
        """velocity_fn(x (B, ...), t (B,)) -> v like x; noise (B, ...) at t = 1 -> x at t = 0.
        generator: one torch.Generator, or one per sample, for the step noise."""
        path = require_path(path, self)
        grid = Schedule.build(self.steps, self.shift, path)
        generator = make_generator(generator, self.seed)
        x = noise
        for k in range(len(grid)):
            x0, _ = predict(velocity_fn, path, x, grid.t[k])
            a_t, s_t, a_s, s_s = grid.alpha[k], grid.sigma[k], grid.alpha[k + 1], grid.sigma[k + 1]
            a_ts = a_t / a_s
            var_ts = max(s_t**2 - a_ts**2 * s_s**2, 0.0)  # σ²_{t|s}
            mean = (a_ts * s_s**2 / s_t**2) * x + (a_s * var_ts / s_t**2) * x0
            std = math.sqrt(var_ts) * s_s / s_t
            x = mean + std * step_noise(x, generator) if std > 0 else mean
        return x
