"""The sampler contract and the few things every sampler shares.

A sampler integrates from noise (t = 1) to data (t = 0) knowing only

- ``velocity_fn(x (B, ...), t (B,)) -> v`` shaped like x: the probability-flow velocity
  v(x, t) = E[α'(t)·x0 + σ'(t)·ε | x_t = x] of the objective's path x_t = α(t)·x0 + σ(t)·ε
  (guidance, experts and the backbone are already folded in), and
- optionally the path itself (`modules.objectives.paths.Path`: α, σ and their derivatives), which
  samplers working on x0 / ε / λ = log(α/σ) need to turn v into predictions
  (`predictions_from_velocity`).

    sample(velocity_fn, noise, path=None) -> x0

Every sampler walks the grid t_0 = 1 > t_1 > … > t_N = 0 of `flow_timesteps(steps, shift)`
(SD3 / Wan time shift), runs under torch.no_grad(), and exposes ``nfe``, its number of velocity
evaluations for ``steps``. Stochastic samplers (DDIM with η > 0, DDPM) also take
``generator=``: one torch.Generator for the batch, or one per sample so that a sample's draws
depend on its own seed only (as its starting noise does in `GeneratorSystem.generate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import Tensor

from modules.objectives.paths import Path, predictions_from_velocity
from modules.samplers.timesteps import flow_timesteps

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # v(x (B, ...), t (B,)) -> like x
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


@runtime_checkable
class Sampler(Protocol):
    steps: int

    @property
    def nfe(self) -> int:
        """Velocity evaluations per `sample` call."""
        ...

    def sample(self, velocity_fn: VelocityFn, noise: Tensor, path: Path | None = None) -> Tensor:
        """noise (B, ...) at t = 1 -> x at t = 0, shaped like noise."""
        ...


def require_path(path: Path | None, sampler: object) -> Path:
    """The path, or a ValueError saying why this sampler needs one and how to pass it."""
    if path is None:
        raise ValueError(
            f"{type(sampler).__name__} works on x0 / ε predictions and needs the objective's noising path "
            "(α(t), σ(t)) to get them from the velocity: call sample(velocity_fn, noise, path=objective.path). "
            "EulerSampler and HeunSampler integrate the velocity directly and need no path."
        )
    return path


def time_batch(x: Tensor, t: float) -> Tensor:
    """The scalar time t as a (B,) tensor in x's dtype and device, for velocity_fn."""
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def predict(velocity_fn: VelocityFn, path: Path, x: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """(x0, ε) predictions at (x (B, ...), t) from one velocity evaluation."""
    t_batch = time_batch(x, t)
    return predictions_from_velocity(path, x, t_batch, velocity_fn(x, t_batch))


@dataclass(frozen=True)
class Schedule:
    """The grid t_0 = 1 > … > t_N = 0 with α, σ and λ = log(α/σ) at each point, as float64 Python
    numbers (the same for the whole batch). λ = −inf where α = 0 (t = 1 on the linear path) and
    +inf where σ = 0 (t = 0 without σ_min); samplers that use λ treat those ends explicitly."""

    t: list[float]
    alpha: list[float]
    sigma: list[float]
    lam: list[float]

    @classmethod
    def build(cls, steps: int, shift: float, path: Path) -> "Schedule":
        t = flow_timesteps(steps, shift)  # (N + 1,) float64, 1 -> 0
        alpha, sigma = path.alpha_sigma(t)
        lam = torch.log(alpha) - torch.log(sigma)  # ±inf at the ends, never nan for α, σ ≥ 0
        return cls(t.tolist(), alpha.tolist(), sigma.tolist(), lam.tolist())

    def __len__(self) -> int:
        return len(self.t) - 1  # number of steps

    def h(self, k: int) -> float:
        """λ(t_{k+1}) − λ(t_k) > 0; +inf when the step starts at α = 0 or ends at σ = 0."""
        return self.lam[k + 1] - self.lam[k]

    def exponential_step(self, k: int, x: Tensor, x0: Tensor) -> Tensor:
        """The first-order exponential-integrator step from t_k to t_{k+1} with the data prediction
        x0 held fixed (DPM-Solver++(1), Lu et al. 2022b; the same step as DDIM with η = 0):

            x_{k+1} = (σ_{k+1}/σ_k)·x − α_{k+1}·(e^{−h} − 1)·x0,     h = λ(t_{k+1}) − λ(t_k),

        finite at both ends of a flow path (e^{−∞} = 0): from α = 0 it is (σ_{k+1}/σ_k)·x + α_{k+1}·x0,
        onto σ = 0 it is α_{k+1}·x0."""
        return (self.sigma[k + 1] / self.sigma[k]) * x - self.alpha[k + 1] * math.expm1(-self.h(k)) * x0


def make_generator(generator: Generators, seed: int | None) -> Generators:
    """The generator to draw step noise with: ``generator`` when given, else a fresh one seeded with
    ``seed`` (so every `sample` call with the same seed draws the same noise), else None (global RNG)."""
    if generator is not None or seed is None:
        return generator
    return torch.Generator().manual_seed(int(seed))


def step_noise(like: Tensor, generator: Generators) -> Tensor:
    """ε ~ N(0, I) shaped like ``like`` (B, ...), on its device and dtype. A list of generators draws
    row b with generator b (on that generator's device), one generator draws the whole batch."""
    if generator is None:
        return torch.randn_like(like)
    if isinstance(generator, torch.Generator):
        z = torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype)
        return z.to(like.device)
    if len(generator) != like.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {like.shape[0]}")
    rows = [torch.randn(like.shape[1:], generator=g, device=g.device, dtype=like.dtype) for g in generator]
    return torch.stack(rows).to(like.device)  # (B, ...)
