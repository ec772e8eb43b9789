"""Noising paths x_t = α(t)·x0 + σ(t)·ε, the one thing samplers need to know about an objective.

Convention: t ∈ [0, 1], t = 0 data, t = 1 noise. Every objective (flow or diffusion) trains on one
path and exposes the probability-flow velocity of that path,

    v(x_t, t) = E[α'(t)·x0 + σ'(t)·ε | x_t]      (the time derivative of the path, in expectation),

whose ODE dx/dt = v carries the noise distribution at t = 1 to the data distribution at t = 0
(Lipman et al. 2022 §2; Albergo & Vanden-Eijnden 2023 "stochastic interpolants"; the same field is
the DDPM probability-flow ODE of Song et al. 2021 written in t). Because x_t and v are both affine in
(x0, ε), a sampler holding the path can turn a velocity back into the predictions it wants:

    x0 = (σ'·x_t − σ·v) / (α·σ' − σ·α'),      ε = (α·v − α'·x_t) / (α·σ' − σ·α')

(`predictions_from_velocity`). Euler and Heun integrate v directly; DDIM, DDPM, DPM-Solver++ and
UniPC work on x0 / ε / λ = log(α/σ) through the path.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Path(Protocol):
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(α(t), σ(t)) shaped like t; t any shape, in [0, 1]."""
        ...

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(α'(t), σ'(t)) = d/dt of `alpha_sigma`, shaped like t."""
        ...


class LinearPath:
    """Rectified flow (Liu et al. 2022) and OT flow matching with σ_min (Lipman et al. 2022 eq. 20,
    Movie Gen §2.1 eq. 1), translated to t = 0 data:

        x_t = (1 − t)·x0 + (σ_min + (1 − σ_min)·t)·ε,     α = 1 − t,  σ = σ_min + (1 − σ_min)·t.

    σ_min = 0 is rectified flow; at t = 0 the path then is the data exactly.
    """

    def __init__(self, sigma_min: float = 0.0) -> None:
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
        self.sigma_min = sigma_min

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return 1 - t, self.sigma_min + (1 - self.sigma_min) * t

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.full_like(t, -1.0), torch.full_like(t, 1.0 - self.sigma_min)


class VPPath:
    """The variance-preserving path of discrete-time diffusion (DDPM, Ho et al. 2020) at any t ∈ [0, 1].

    alphas_cumprod: (N,) ᾱ_i = Π_{j≤i} (1 − β_j) for DDPM steps i = 1..N (Ho et al.'s ᾱ_t, t = i; the
    layout of diffusers' ``alphas_cumprod[k]``, k = i − 1). Step i sits at t = i / N and step 0, the
    data, at t = 0 with ᾱ_0 = 1. On that grid

        α(i/N) = sqrt(ᾱ_i),     σ(i/N) = sqrt(1 − ᾱ_i)       (exactly, in float64).

    Between grid points α is the not-a-knot cubic spline through (i/N, sqrt(ᾱ_i)), i = 0..N (de Boor,
    "A Practical Guide to Splines", ch. IV), and σ = sqrt(1 − α²), so α² + σ² = 1 holds for every t.
    Why α and not log-SNR λ = log(α²/σ²): λ is +∞ at t = 0 and, with zero terminal SNR, −∞ at t = 1,
    so no polynomial goes through the end points; α is finite on [0, 1] (and is what Lin et al. 2024
    rescale linearly). The spline is C², so α' is continuous and piecewise quadratic, v(x, t) is C¹
    in t and x(t) has a bounded third derivative: Heun / DPM-Solver-2 keep order 2 across grid
    points (tests/test_objectives.py measures it). For the cosine schedule, whose ᾱ has a closed form,
    the spline matches that closed form between grid points to O(N⁻⁴).

    Derivatives, analytic: α' from the spline, σ' = −α·α'/σ. Near t = 0, σ² ≈ 2|α'(0)|·t, so σ grows
    like sqrt(t) and σ'(0) = +∞ (every table with β_1 > 0 does this). The probability-flow velocity
    stays finite as t → 0 for data with a density (σ'·E[ε | x_t] = −½·(σ²)'·∇log p_t), but its (x0, ε)
    form is ∞·0 at t = 0 exactly: evaluate velocities at t > 0 (a sampler's last step to t = 0 uses
    predictions made at t > 0).

    α is checked to decrease strictly on [0, 1] (so σ and the SNR are monotone and t ↦ λ(t) is
    invertible). Values are computed in float64 and returned in t's dtype.
    """

    def __init__(self, alphas_cumprod: Tensor) -> None:
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().cpu()
        if abar.numel() < 3:
            raise ValueError(f"VPPath needs at least 3 steps, got {abar.numel()}")
        if not (abar[0] < 1 and abar[-1] >= 0 and (abar[1:] < abar[:-1]).all()):
            raise ValueError("alphas_cumprod must decrease strictly from below 1 to at least 0")
        self.num_steps = abar.numel()
        self._knots = torch.cat([torch.ones(1, dtype=torch.float64), abar.sqrt()])  # (N + 1,) α at i/N
        self._second = _not_a_knot_second_derivatives(self._knots, 1.0 / self.num_steps)  # (N + 1,) α''
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}
        if _max_spline_slope(self._knots, self._second, 1.0 / self.num_steps) >= 0:
            raise ValueError(
                "the C² spline of α = sqrt(ᾱ) through this table is not strictly decreasing (a linear-β "
                "table with few steps extrapolates to β < 0 near t = 0): use about 250 steps or more"
            )

    def _alpha(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(α, α') in float64 at t (any shape): the spline on the interval [j/N, (j + 1)/N] holding t."""
        if t.device not in self._on:
            self._on[t.device] = (self._knots.to(t.device), self._second.to(t.device))
        y, m = self._on[t.device]
        n, h = self.num_steps, 1.0 / self.num_steps
        x = t.to(torch.float64) * n
        j = x.floor().clamp(0, n - 1).long()
        u = x - j  # position inside the interval, in [0, 1]
        w = 1 - u
        y0, y1, m0, m1 = y[j], y[j + 1], m[j], m[j + 1]
        alpha = w * y0 + u * y1 + h * h / 6 * ((w**3 - w) * m0 + (u**3 - u) * m1)
        d_alpha = (y1 - y0) / h + h / 6 * ((1 - 3 * w**2) * m0 + (3 * u**2 - 1) * m1)
        return alpha, d_alpha

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha, _ = self._alpha(t)
        sigma = ((1 - alpha) * (1 + alpha)).clamp_min(0).sqrt()
        dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
        return alpha.to(dtype), sigma.to(dtype)

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha, d_alpha = self._alpha(t)
        sigma = ((1 - alpha) * (1 + alpha)).clamp_min(0).sqrt()
        d_sigma = -alpha * d_alpha / sigma  # +inf at t = 0, where σ = 0
        dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
        return d_alpha.to(dtype), d_sigma.to(dtype)


def _not_a_knot_second_derivatives(y: Tensor, h: float) -> Tensor:
    """Second derivatives M_i of the not-a-knot cubic spline through y_i on a uniform grid of step h.

    Interior rows M_{i−1} + 4·M_i + M_{i+1} = r_i = 6·(y_{i−1} − 2·y_i + y_{i+1}) / h² (continuity of
    the first derivative); not-a-knot (continuous third derivative at the first and last interior
    knots) reads M_0 = 2·M_1 − M_2, which turns row 1 into 6·M_1 = r_1 (row N − 1 likewise). The rest
    is tridiagonal, solved by the Thomas algorithm in float64.
    """
    n = y.numel() - 1
    r = (6 * (y[:-2] - 2 * y[1:-1] + y[2:]) / h**2).tolist()  # r_1 .. r_{n−1}
    m = [0.0] * (n + 1)
    m[1], m[n - 1] = r[0] / 6, r[-1] / 6
    rhs = r[1:-1]  # rows 2 .. n−2, unknowns M_2 .. M_{n−2}
    if rhs:
        rhs[0] -= m[1]
        rhs[-1] -= m[n - 1]
        c, d = [0.0] * len(rhs), [0.0] * len(rhs)
        for k, value in enumerate(rhs):  # forward sweep of [1, 4, 1]
            denom = 4.0 - (c[k - 1] if k else 0.0)
            c[k], d[k] = 1.0 / denom, (value - (d[k - 1] if k else 0.0)) / denom
        for k in range(len(rhs) - 1, -1, -1):  # back substitution
            m[k + 2] = d[k] - (c[k] * m[k + 3] if k + 1 < len(rhs) else 0.0)
    m[0], m[n] = 2 * m[1] - m[2], 2 * m[n - 1] - m[n - 2]
    return torch.tensor(m, dtype=torch.float64)


def _max_spline_slope(y: Tensor, m: Tensor, h: float) -> float:
    """The largest α'(t) of the spline over [0, 1]: α' is quadratic in u on each interval, so its
    maximum is at an end or at the vertex u* = m0 / (m0 − m1) when that lies inside."""
    y0, y1, m0, m1 = y[:-1], y[1:], m[:-1], m[1:]

    def slope(u: Tensor) -> Tensor:
        w = 1 - u
        return (y1 - y0) / h + h / 6 * ((1 - 3 * w**2) * m0 + (3 * u**2 - 1) * m1)

    denom = torch.where(m0 == m1, torch.ones_like(m0), m0 - m1)
    vertex = torch.where(m0 == m1, torch.zeros_like(m0), m0 / denom).clamp(0, 1)
    return max(slope(torch.zeros_like(m0)).max().item(), slope(torch.ones_like(m0)).max().item(),
               slope(vertex).max().item())


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """t (B,) or (B, T) -> broadcastable against x (B, C, T, H, W) (per sample or per frame)."""
    if t.dim() == 2 and x.dim() == 5:
        return t[:, None, :, None, None]  # (B, T) -> (B, 1, T, 1, 1)
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))  # (B,) -> (B, 1, ..., 1)


_like = expand_like  # the name this module used first


def interpolate(path: Path, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = α(t)·x0 + σ(t)·ε; x0, eps (B, ...); t (B,) or per frame (B, T)."""
    alpha, sigma = (expand_like(a, x0).to(x0.dtype) for a in path.alpha_sigma(t))
    return alpha * x0 + sigma * eps


def predictions_from_velocity(path: Path, x_t: Tensor, t: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(x0, ε) from the velocity v at (x_t, t) by inverting the 2×2 system of the module docstring.
    t (B,) or (B, T); x_t and v (B, ...). Computed in at least float32."""
    alpha, sigma = (expand_like(a, x_t) for a in path.alpha_sigma(t))
    d_alpha, d_sigma = (expand_like(a, x_t) for a in path.derivatives(t))
    det = alpha * d_sigma - sigma * d_alpha
    return (d_sigma * x_t - sigma * v) / det, (alpha * v - d_alpha * x_t) / det


def velocity_from_predictions(path: Path, t: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
    """v = α'(t)·x0 + σ'(t)·ε."""
    d_alpha, d_sigma = (expand_like(a, x0) for a in path.derivatives(t))
    return d_alpha * x0 + d_sigma * eps
