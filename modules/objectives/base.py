"""The objective contract: the maths of x_t, the regression target, time sampling and loss
weighting. It owns the time scale the network sees; the backbone only embeds what it gets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from modules.conditioning import Conditioning


@dataclass
class LossOutput:
    """loss: scalar mean over the batch; t: (B,) or per frame (B, T) the drawn times; per_sample:
    (B,) losses."""

    loss: Tensor
    t: Tensor
    per_sample: Tensor


@runtime_checkable
class Objective(Protocol):
    def loss(
        self, net, x0: Tensor, cond: Conditioning, per_frame: bool = False, t: Tensor | None = None
    ) -> LossOutput:
        """Draw t and noise, form x_t, regress the network output on the target. ``per_frame``: one
        t per frame, (B, T), for backbones that declare ``per_frame_time`` (diffusion forcing).
        ``t``: (B,) or (B, T) fixed times used instead of drawing (``per_frame`` then ignored); the
        noise is still drawn (from ``generator`` where the objective takes one), so a fixed generator
        state gives the same noise at every t (validation loss per time bucket,
        eval/timestep_loss.py)."""
        ...

    def velocity(self, net, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """dx_t/dt at (x_t, t), t (B,) or (B, T) in [0, 1] with t = 0 data and t = 1 noise."""
        ...
