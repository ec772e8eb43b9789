"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models") on any path
x_t = α(t)·x0 + σ(t)·ε, t = 1 noise, t = 0 data.

One step from t to s < t with the predictions (x̂0, ε̂) at (x_t, t) (Song et al. 2021 eq. 12, their
√ᾱ written α and √(1 − ᾱ) written σ, which also covers paths with α² + σ² ≠ 1):

    x_s = α_s·x̂0 + √(σ_s² − c²)·ε̂ + c·z,      z ~ N(0, I),
    c   = η·σ_s·√(1 − e^{2(λ_t − λ_s)}),      e^{λ_t − λ_s} = (α_t·σ_s)/(α_s·σ_t),   λ = log(α/σ)

(eq. 16: c² = η²·σ_s²/σ_t²·(1 − ᾱ_t/ᾱ_{t−1}) on a variance-preserving path; the general form is
η² times the variance of the posterior q(x_s | x_t, x0), Kingma et al. 2021 "Variational Diffusion
Models" App. A). η = 0 is the deterministic DDIM ODE step (the first-order DPM-Solver++ step of Lu
et al. 2022b, global error O(1/steps)); η = 1 has the DDPM posterior variance, and then the step is
the ancestral DDPM step (`modules.samplers.ddpm`) in distribution.

At t = 1 with α = 0 the ratio e^{λ_t − λ_s} is 0 (no division by α_t); α_s > 0 for s < 1 and
σ_t > 0 for t > 0, so every step is finite. At s = 0 with σ = 0 the step returns α_0·x̂0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from modules.objectives.paths import Path
from modules.samplers.base import Generators, Schedule, VelocityFn, make_generator, predict, require_path, step_noise


class DDIMSampler:
    """DDIM with stochasticity η ∈ [0, 1] on `flow_timesteps(steps, shift)`; needs the path.

    seed: seeds the step noise when `sample` gets no generator (each call then draws the same
    noise); unused when η = 0.
    """

    def __init__(self, steps: int = 50, shift: float = 1.0, eta: float = 0.0, seed: int | None = None) -> None:
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.steps = steps
        self.shift = shift
        self.eta = eta
        self.seed = seed

    @property
    def nfe(self) -> int:
        return self.steps

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    @torch.no_grad()
    def sample(
        self, velocity_fn: VelocityFn, noise: Tensor, path: Path | None = None, generator: Generators = None
    ) -> Tensor:
        """velocity_fn(x (B, ...), t (B,)) -> v like x; noise (B, ...) at t = 1 -> x at t = 0.
        generator: one torch.Generator, or one per sample, for the step noise (η > 0)."""
        path = require_path(path, self)
        grid = Schedule.build(self.steps, self.shift, path)
        generator = make_generator(generator, self.seed) if self.stochastic else None
        x = noise
        for k in range(len(grid)):
            x0, eps = predict(velocity_fn, path, x, grid.t[k])
            a_t, s_t, a_s, s_s = grid.alpha[k], grid.sigma[k], grid.alpha[k + 1], grid.sigma[k + 1]
            snr_ratio = (a_t * s_s / (a_s * s_t)) ** 2  # e^{2(λ_t − λ_s)} ∈ [0, 1]
            c = self.eta * s_s * math.sqrt(max(1.0 - snr_ratio, 0.0))
            x = a_s * x0 + math.sqrt(max(s_s**2 - c**2, 0.0)) * eps
            if c > 0:
                x = x + c * step_noise(x, generator)
        return x
