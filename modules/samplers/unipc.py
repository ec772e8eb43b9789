"""UniPC-2 with B(h) = "bh2" (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for
Fast Sampling of Diffusion Models"), data-prediction form, on any path x_t = α(t)·x0 + σ(t)·ε,
t = 1 noise, t = 0 data.

Notation: λ = log(α/σ), step from s = t_{i−1} to t = t_i, h = λ_t − λ_s, hh = −h (data prediction),
m_j = x̂0 at grid point j, φ(h) := e^{hh} − 1 = e^{−h} − 1, and for bh2 B(h) = e^{hh} − 1 (UniPC §3.3).
Both parts start from the first-order exponential-integrator step x̃_t = (σ_t/σ_s)·x_s − α_t·φ(h)·m_s
(`Schedule.exponential_step`, = DDIM with η = 0).

UniP (predictor, order p, UniPC eq. 7 / Alg. 2): with the previous point s₁ = t_{i−2},
r₁ = (λ_{s₁} − λ_s)/h and D₁ = (m_{s₁} − m_s)/r₁,

    p = 1:  x_t = x̃_t,        p = 2:  x_t = x̃_t − α_t·B(h)·½·D₁.

UniC (corrector, UniPC eq. 8 / Alg. 2): once m_t = x̂0(x_t, t) is evaluated for the next step, the
point x_t is refined with it at no extra cost (the network output m_t is kept from the uncorrected
x_t, UniPC §3.2), with the order p of the predictor that produced x_t:

    p = 1:  x_t^c = x̃_t − α_t·B(h)·½·(m_t − m_s),
    p = 2:  x_t^c = x̃_t − α_t·B(h)·(ρ₁·D₁ + ρ₂·(m_t − m_s)),   [[1, 1], [r₁, 1]]·(ρ₁, ρ₂) = (b₁, b₂),
            b_k = k!·g_k/B(h),  g_1 = φ(h)/hh − 1,  g_2 = g_1/hh − ½          (UniPC eq. 8, Thm 3.1).

The ½ coefficients of the order-2 predictor and the order-1 corrector are the simplified values of
the official code, kept so that this file matches diffusers' UniPCMultistepScheduler (solver_order=2,
bh2, predict_x0, lower_order_final) step for step. Order 2 from the second step on (the first is
a warm-up at order 1); the last step is a first-order predictor with no corrector after it
(``lower_order_final``), which at σ_0 = 0 returns α_0·x̂0. One velocity evaluation per step.

Accuracy on the uniform-in-t grid: order 2 when σ ∝ t near the data (flow paths, cosine VP); see
`modules.samplers.dpm_solver` for discrete-table VP paths (σ ∝ √t), where the end steps cost O(1/N).

Flow-path ends: at t = 1, λ = −∞; the order-1 formulas take the limits h = ∞ (φ = B = −1) and an
order-2 term that would reach back to λ = −∞ is dropped (its D₁ → 0): the step is taken at order 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from modules.objectives.paths import Path
from modules.samplers.base import Schedule, VelocityFn, predict, require_path


def _corrector_weights(h: float, r1: float) -> tuple[float, float]:
    """(ρ₁, ρ₂) solving [[1, 1], [r₁, 1]]·ρ = (b₁, b₂) for bh2 (finite h)."""
    hh = -h
    B = math.expm1(hh)
    g1 = B / hh - 1
    g2 = g1 / hh - 0.5
    b1, b2 = g1 / B, 2 * g2 / B
    rho1 = (b2 - b1) / (r1 - 1)
    return rho1, b1 - rho1


class UniPCSampler:
    """UniPC-2 bh2 (Zhao et al. 2023) on `flow_timesteps(steps, shift)`; needs the path. Deterministic.

    corrector: False runs the UniP predictor alone (UniPC's ``disable_corrector`` on every step).
    """

    def __init__(self, steps: int = 20, shift: float = 1.0, corrector: bool = True) -> None:
        self.steps = steps
        self.shift = shift
        self.corrector = corrector

    @property
    def nfe(self) -> int:
        return self.steps

    @torch.no_grad()
    def sample(self, velocity_fn: VelocityFn, noise: Tensor, path: Path | None = None) -> Tensor:
        """velocity_fn(x (B, ...), t (B,)) -> v like x; noise (B, ...) at t = 1 -> x at t = 0."""
        path = require_path(path, self)
        g = Schedule.build(self.steps, self.shift, path)
        N = len(g)
        x = noise
        m_prev2: Tensor | None = None  # x̂0 at t_{k−2}
        m_prev: Tensor | None = None  # x̂0 at t_{k−1}
        x_last = noise  # x at t_{k−1}, where the last predictor step started
        order = 1  # order of the last predictor step
        for k in range(N):
            m = predict(velocity_fn, path, x, g.t[k])[0]  # x̂0 at t_k
            if k > 0 and self.corrector:  # UniC: refine x at t_k with m, from s = t_{k−1}
                x_tilde, B = g.exponential_step(k - 1, x_last, m_prev), math.expm1(-g.h(k - 1))
                if order == 1:
                    x = x_tilde - g.alpha[k] * B * 0.5 * (m - m_prev)
                else:
                    r1 = -g.h(k - 2) / g.h(k - 1)
                    rho1, rho2 = _corrector_weights(g.h(k - 1), r1)
                    D1 = (m_prev2 - m_prev) / r1
                    x = x_tilde - g.alpha[k] * B * (rho1 * D1 + rho2 * (m - m_prev))
            # UniP from t_k to t_{k+1}: order 2 unless warming up, on the last step, or reaching λ = −inf
            order = 2 if (0 < k < N - 1 and math.isfinite(g.lam[k - 1])) else 1
            x_last = x
            x = g.exponential_step(k, x, m)
            if order == 2:
                r1 = -g.h(k - 1) / g.h(k)
                x = x - g.alpha[k + 1] * math.expm1(-g.h(k)) * 0.5 * (m_prev - m) / r1
            m_prev2, m_prev = m_prev, m
        return x
