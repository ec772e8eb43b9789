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


def _like(t: Tensor, x: Tensor) -> Tensor:
    """t (B,) or (B, T) -> broadcastable against x (B, C, T, H, W) (per sample or per frame)."""
    if t.dim() == 2 and x.dim() == 5:
        return t[:, None, :, None, None]
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def predictions_from_velocity(path: Path, x_t: Tensor, t: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(x0, ε) from the velocity v at (x_t, t) by inverting the 2×2 system of the module docstring.
    t (B,) or (B, T); x_t and v (B, ...). Computed in at least float32."""
    alpha, sigma = (_like(a, x_t) for a in path.alpha_sigma(t))
    d_alpha, d_sigma = (_like(a, x_t) for a in path.derivatives(t))
    det = alpha * d_sigma - sigma * d_alpha
    return (d_sigma * x_t - sigma * v) / det, (alpha * v - d_alpha * x_t) / det


def velocity_from_predictions(path: Path, t: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
    """v = α'(t)·x0 + σ'(t)·ε."""
    d_alpha, d_sigma = (_like(a, x0) for a in path.derivatives(t))
    return d_alpha * x0 + d_sigma * eps
