"""The backbone contract: a denoiser maps a noisy latent, its time and the conditioning to a
tensor shaped like the latent. It never knows which objective (diffusion, flow) trains it: the
objective scales `t` and interprets the output (velocity, noise, x0)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from modules.conditioning import Conditioning


@runtime_checkable
class Denoiser(Protocol):
    blocks: nn.ModuleList  # units for FSDP2 sharding and activation checkpointing

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """x (B, C, T, H, W); t (B,) or (B, T) for per-frame noise levels, already scaled by
        the objective; returns a tensor shaped like x."""
        ...
