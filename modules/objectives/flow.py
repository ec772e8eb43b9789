"""Flow matching on the linear path: rectified flow (Liu et al. 2022; SD3, Esser et al. 2024) and
OT flow matching with σ_min (Lipman et al. 2022 eq. 20-23; Movie Gen §2.1 eq. 1).
Convention: t = 0 clean data, t = 1 pure noise, so

    x_t = α(t)·x0 + σ(t)·ε,   α = 1 − t,   σ = σ_min + (1 − σ_min)·t          (paths.LinearPath),
    u   = dx_t/dt = α'·x0 + σ'·ε = (1 − σ_min)·ε − x0,
    loss = E_t E ‖net(x_t, t·time_scale, cond) − u‖²   (mean over elements per sample).

σ_min = 0 is rectified flow (x_t = (1 − t)·x0 + t·ε, u = ε − x0). Movie Gen writes the same path with
t running the other way (t = 1 data, x0 noise): x_t = t·x1 + (1 − (1 − σ_min)·t)·x0, target
x1 − (1 − σ_min)·x0; its t is our 1 − t, its x1 our x0, its x0 our ε, its velocity minus ours.

Training times (all in our convention, t = 0 data; SD3 uses the same direction):
- "uniform": t ~ U(0, 1);
- "logit_normal": t = sigmoid(m + s·n), n ~ N(0, 1) (SD3 §3.1; Movie Gen);
- "mode": t = f_mode(u; s) = 1 − u − s·(cos²(π/2·u) − 1 + u), u ~ U(0, 1) (SD3 eq. 20, mode
  sampling with heavy tails; s ∈ [−1, 2/(π − 2)] keeps f_mode monotone, s = 0 is uniform);
then shifted, t' = shift_time(t, s_eff) = s_eff·t / (1 + (s_eff − 1)·t) (SD3 §5.3.2; Wan). The
shift maps the odds t/(1 − t) to s·t/(1 − t), so shifts compose by multiplication, and
s_eff = shift · sqrt(m / n) with m = the latent positions T·H·W of the batch and n =
``shift_reference_tokens`` (SD3 §5.3.2: "α = sqrt(m/n)" for m and n the token counts of the target
and the reference resolution; the ratio is the same in patch tokens for a fixed patch size). Without
``shift_reference_tokens`` s_eff = shift. The sampler's own shift (samplers/) is a separate setting.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from modules.conditioning import Conditioning
from modules.objectives.base import LossOutput
from modules.objectives.paths import LinearPath, interpolate, velocity_from_predictions
from modules.samplers.timesteps import shift_time

TIME_SAMPLINGS = ("uniform", "logit_normal", "mode")
MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)  # f_mode is monotone for −1 ≤ s ≤ 2/(π − 2) (SD3 §3.1)


def mode_time(u: Tensor, scale: float) -> Tensor:
    """SD3 eq. 20: f_mode(u; s) = 1 − u − s·(cos²(π/2·u) − 1 + u), u in [0, 1], shaped like u."""
    return 1 - u - scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)


def latent_positions(x0: Tensor) -> int:
    """m of the resolution shift: the positions per channel of x0 (B, C, T, H, W) -> T·H·W."""
    return math.prod(x0.shape[2:])


class RectifiedFlow:
    """Linear-path flow matching objective, no parameters.

    time_sampling: "uniform", "logit_normal" (logit_mean m, logit_std s) or "mode" (mode_scale s),
    see the module docstring; shift: training time shift (1 = none); shift_reference_tokens: when
    set, the shift grows as sqrt(latent positions / shift_reference_tokens) (SD3 §5.3.2);
    sigma_min: 0 for rectified flow, e.g. 1e-5 for OT flow matching (Movie Gen); time_scale: the
    network sees t·time_scale. ``path`` is the `LinearPath(sigma_min)`; the network predicts its
    velocity (``prediction = "velocity"``).
    """

    prediction = "velocity"

    def __init__(
        self,
        time_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift: float = 1.0,
        shift_reference_tokens: int | None = None,
        sigma_min: float = 0.0,
        time_scale: float = 1000.0,
    ) -> None:
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {time_sampling!r}; valid: {', '.join(TIME_SAMPLINGS)}")
        if not -1.0 <= mode_scale <= MODE_SCALE_MAX:
            raise ValueError(f"mode_scale must be in [-1, {MODE_SCALE_MAX:.4f}] (f_mode monotone), got {mode_scale}")
        if shift <= 0 or (shift_reference_tokens is not None and shift_reference_tokens <= 0):
            raise ValueError(
                f"shift and shift_reference_tokens must be positive, got {shift}, {shift_reference_tokens}"
            )
        self.time_sampling = time_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.mode_scale = mode_scale
        self.shift = shift
        self.shift_reference_tokens = shift_reference_tokens
        self.time_scale = time_scale
        self.path = LinearPath(sigma_min)
        self._draw: Callable[[tuple[int, ...], torch.device, torch.Generator | None], Tensor] = {
            "uniform": self._uniform, "logit_normal": self._logit_normal, "mode": self._mode,
        }[time_sampling]

    # -- training times ----------------------------------------------------------------------------

    def _uniform(self, shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> Tensor:
        return torch.rand(shape, generator=generator, device=device)

    def _logit_normal(self, shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> Tensor:
        eps = torch.randn(shape, generator=generator, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * eps)

    def _mode(self, shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> Tensor:
        return mode_time(torch.rand(shape, generator=generator, device=device), self.mode_scale)

    def training_shift(self, tokens: int | None = None) -> float:
        """s_eff = shift·sqrt(tokens / shift_reference_tokens), or shift when either is None."""
        if self.shift_reference_tokens is None or tokens is None:
            return self.shift
        return self.shift * math.sqrt(tokens / self.shift_reference_tokens)

    def sample_t(
        self,
        batch: int,
        device: torch.device,
        generator: torch.Generator | None = None,
        frames: int | None = None,
        tokens: int | None = None,
    ) -> Tensor:
        """Draw training times in [0, 1], float32: (batch,), or (batch, frames) independent per frame,
        from ``time_sampling`` then shifted by `training_shift(tokens)`."""
        t = self._draw((batch,) if frames is None else (batch, frames), device, generator)
        shift = self.training_shift(tokens)
        return t if shift == 1.0 else shift_time(t, shift)

    # -- path ----------------------------------------------------------------------------------------

    def interpolate(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = α(t)·x0 + σ(t)·noise. x0, noise (B, ...); t (B,) (or (B, T) per frame)."""
        return interpolate(self.path, x0, noise, t)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor | None = None) -> Tensor:
        """Velocity target u = α'·x0 + σ'·noise = (1 − σ_min)·noise − x0, shaped like x0. The linear
        path's derivatives do not depend on t, so t may be left out."""
        t = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device) if t is None else t
        return velocity_from_predictions(self.path, t.to(x0.dtype), x0, noise)

    def velocity(self, net, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """Predicted dx_t/dt = net(x_t, t·time_scale, cond); t (B,) or per frame (B, T), in [0, 1]."""
        return net(x_t, t * self.time_scale, cond)

    def loss(
        self,
        net,
        x0: Tensor,
        cond: Conditioning,
        generator: torch.Generator | None = None,
        per_frame: bool = False,
        t: Tensor | None = None,
    ) -> LossOutput:
        """Draw t, then noise ~ N(0, I) (in that order from ``generator``), return the MSE between the
        predicted velocity and the target.

        t is (B,), or with ``per_frame`` (B, T) for x0 (B, C, T, H, W): each frame its own noise
        level (diffusion forcing, Chen et al. 2024). A given ``t`` ((B,) or (B, T), in [0, 1]) is used
        instead of drawing one (``per_frame`` is then ignored) and only the noise is drawn, so one
        generator state gives the same noise at every t (eval/timestep_loss.py). per_sample: (B,) mean
        of squared error over all non-batch elements; loss: its mean.
        """
        B = x0.shape[0]
        if t is None:
            frames = x0.shape[2] if per_frame else None
            t = self.sample_t(B, x0.device, generator, frames, latent_positions(x0))  # (B,) or (B, T)
        elif t.shape not in ((B,), (B, *x0.shape[2:3])):  # (B, T) per frame for x0 (B, C, T, H, W)
            raise ValueError(f"t must be (B,) or (B, T) for x0 {tuple(x0.shape)}, got {tuple(t.shape)}")
        t = t.to(device=x0.device, dtype=x0.dtype)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.interpolate(x0, noise, t)
        v = self.velocity(net, x_t, t, cond)
        dtype = torch.promote_types(x0.dtype, torch.float32)
        per_sample = (v.to(dtype) - self.target(x0, noise, t).to(dtype)).pow(2).reshape(B, -1).mean(1)  # (B,)
        return LossOutput(loss=per_sample.mean(), t=t, per_sample=per_sample)
