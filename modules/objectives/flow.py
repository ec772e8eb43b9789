"""Rectified flow / flow matching with the linear path (Liu et al. 2022; Lipman et al. 2022;
SD3, Esser et al. 2024). Convention: t = 0 clean data, t = 1 pure noise.

    x_t = (1 − t)·x0 + t·noise,      v = dx_t/dt = noise − x0,
    loss = E_t E ‖net(x_t, t·time_scale, cond) − v‖²   (mean over elements per sample).
"""

from __future__ import annotations

import torch
from torch import Tensor

from modules.conditioning import Conditioning
from modules.objectives.base import LossOutput

TIME_SAMPLINGS = ("uniform", "logit_normal")


def _per_sample(t: Tensor, x: Tensor) -> Tensor:
    """t (B,) or (B, T) -> broadcastable against x (B, ...) or (B, C, T, H, W) per frame."""
    if t.dim() == 1:
        return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))  # (B, 1, ..., 1)
    return t[:, None, :, None, None]  # (B, T) -> (B, 1, T, 1, 1)


class RectifiedFlow:
    """Linear-path flow matching objective, no parameters.

    time_sampling: "uniform" t ~ U(0, 1), or "logit_normal" t = sigmoid(m + s·ε), ε ~ N(0, 1)
    (SD3 §3.1, Esser et al. 2024). time_scale: the network sees t·time_scale.
    """

    def __init__(
        self,
        time_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        time_scale: float = 1000.0,
    ) -> None:
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {time_sampling!r}; valid: {', '.join(TIME_SAMPLINGS)}")
        self.time_sampling = time_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.time_scale = time_scale

    def sample_t(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None, frames: int | None = None
    ) -> Tensor:
        """Draw training times in [0, 1], float32: (batch,), or (batch, frames) independent per frame."""
        shape = (batch,) if frames is None else (batch, frames)
        if self.time_sampling == "uniform":
            return torch.rand(shape, generator=generator, device=device)
        eps = torch.randn(shape, generator=generator, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * eps)

    def interpolate(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = (1 − t)·x0 + t·noise. x0, noise (B, ...); t (B,) (or (B, T) per frame)."""
        t = _per_sample(t, x0).to(x0.dtype)
        return (1 - t) * x0 + t * noise

    def target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """Velocity target v = dx_t/dt = noise − x0, shaped like x0."""
        return noise - x0

    def velocity(self, net, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """Predicted dx_t/dt = net(x_t, t·time_scale, cond); t (B,) or per frame (B, T), in [0, 1]."""
        return net(x_t, t * self.time_scale, cond)

    def loss(
        self, net, x0: Tensor, cond: Conditioning, generator: torch.Generator | None = None, per_frame: bool = False
    ) -> LossOutput:
        """Draw t and noise ~ N(0, I), return the MSE between velocity and target.

        t is (B,), or with ``per_frame`` (B, T) for x0 (B, C, T, H, W): each frame its own noise
        level (diffusion forcing, Chen et al. 2024). per_sample: (B,) mean of squared error over
        all non-batch elements; loss: its mean.
        """
        B = x0.shape[0]
        frames = x0.shape[2] if per_frame else None
        t = self.sample_t(B, x0.device, generator, frames).to(x0.dtype)  # (B,) or (B, T)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.interpolate(x0, noise, t)
        v = self.velocity(net, x_t, t, cond)
        per_sample = (v.float() - self.target(x0, noise).float()).pow(2).reshape(B, -1).mean(1)  # (B,)
        return LossOutput(loss=per_sample.mean(), t=t, per_sample=per_sample)
