"""DPM-Solver++(2M) (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", Algorithm 2): second-order multistep exponential integrator in the data
prediction x̂0, on any path x_t = α(t)·x0 + σ(t)·ε, t = 1 noise, t = 0 data.

With λ = log(α/σ), the probability-flow ODE has the exact solution (Lu et al. 2022b §4)

    x_t = (σ_t/σ_s)·x_s + σ_t·∫_{λ_s}^{λ_t} e^{λ}·x̂0(x_λ, λ) dλ,

and freezing x̂0 at a linear extrapolation in λ gives, for step i from t_{i−1} to t_i with
h_i = λ_{t_i} − λ_{t_{i−1}} and r_i = h_{i−1}/h_i,

    D_i   = (1 + 1/(2r_i))·x̂0_{i−1} − 1/(2r_i)·x̂0_{i−2}          (x̂0_j at (x_{t_j}, t_j))
    x_{t_i} = (σ_{t_i}/σ_{t_{i−1}})·x_{t_{i−1}} − α_{t_i}·(e^{−h_i} − 1)·D_i.

The first step has no x̂0_{i−2} and uses D = x̂0_{i−1} (first order, = DDIM with η = 0), and so
does the last one (``lower_order_final``): at t = 0 without σ_min, σ = 0 and λ = +∞, and the step
returns α_0·x̂0, the data prediction, as diffusers' DPMSolverMultistepScheduler does with
``final_sigmas_type="zero"``; with σ_min > 0 the last λ-step is long (log(1/σ_min)) and r small, and
a second-order extrapolation there is unstable for few steps (diffusers drops to first order below
15 steps for the same reason). One velocity evaluation per step.

At t = 1, α = 0 and λ = −∞, so h_1 = ∞ and e^{−h_1} = 0 (the first step is
x = (σ_{t_1}/σ_{t_0})·x + α_{t_1}·x̂0, finite) and r_2 = ∞, whose 1/(2r) → 0 makes the second step
first order too: the limit, taken explicitly.

Accuracy on the uniform-in-t grid of `flow_timesteps`: the first-order end steps cost O(h²) locally
(x̂0 moves by O(α) near t = 1 and by O(σ²) near t = 0), but near t = 0 the λ-steps do not shrink
(h = log((i+1)/i) for t = i/N, σ ≈ t), so the second-order steps there cost O(1/(N²·i)) each and
the global error is O(log N / N²): the measured log-log slope tends to 2 from below (≈ 1.8 at
N = 256–1024 on Gaussian data, `benchmarks/samplers.py`; σ_min = 1e-3 changes nothing at those N).
UniPC's corrector removes the log (local order 3 there). On a discrete-table VP path
(`paths.VPPath`), σ grows like √t near t = 0, x̂0 moves by O(σ²) = O(t) there, and the last steps
cost O(1/N): the error levels off near 1e-4 (Gaussian data, 128+ steps) and the order tends to 1,
for UniPC as well; Euler and Heun, which step in t, keep orders 1 and 2 on that path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from modules.objectives.paths import Path
from modules.samplers.base import Schedule, VelocityFn, predict, require_path


class DPMSolverPlusPlus2MSampler:
    """DPM-Solver++(2M) on `flow_timesteps(steps, shift)`; needs the path. Deterministic."""

    def __init__(self, steps: int = 20, shift: float = 1.0) -> None:
        self.steps = steps
        self.shift = shift

    @property
    def nfe(self) -> int:
        return self.steps

    @torch.no_grad()
    def sample(self, velocity_fn: VelocityFn, noise: Tensor, path: Path | None = None) -> Tensor:
        """velocity_fn(x (B, ...), t (B,)) -> v like x; noise (B, ...) at t = 1 -> x at t = 0."""
        path = require_path(path, self)
        g = Schedule.build(self.steps, self.shift, path)
        x = noise
        x0_prev: Tensor | None = None  # x̂0 at t_{i−2}, when usable for the second-order term
        for k in range(len(g)):  # from t_k to t_{k+1}
            x0, _ = predict(velocity_fn, path, x, g.t[k])
            D = x0
            if x0_prev is not None and k < len(g) - 1:  # second order, except on the last step
                r = g.h(k - 1) / g.h(k)
                D = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
            x = g.exponential_step(k, x, D)
            x0_prev = x0 if math.isfinite(g.lam[k]) else None  # λ = −inf: r = inf, the term vanishes
        return x
