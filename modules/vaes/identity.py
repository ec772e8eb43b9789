"""Pixel space as an autoencoder: for tests and pixel-space ablations.

With ``patch = p > 1`` every p×p pixel block becomes ``3·p²`` channels (pixel-unshuffle), so a
pixel-space model can run at a coarser token grid without a learned autoencoder.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class IdentityVAE(nn.Module):
    """``encode``: (B, C, T, H, W) → (B, C·p², T, H/p, W/p), scaled by ``(x − shift) / scale``."""

    def __init__(self, channels: int = 3, patch: int = 1, shift: float = 0.0, scale: float = 1.0):
        super().__init__()
        if patch < 1:
            raise ValueError(f"IdentityVAE: patch must be >= 1, got {patch}")
        self.channels, self.patch, self.shift, self.scale = channels, patch, shift, scale
        self.latent_channels = channels * patch * patch
        self.compression = (1, patch, patch)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        p = self.patch
        if height % p or width % p:
            raise ValueError(f"IdentityVAE: frame size {height}x{width} is not divisible by patch {p}")
        return (self.latent_channels, num_frames, height // p, width // p)

    def encode(self, video: Tensor) -> Tensor:
        b, c, t, h, w = video.shape
        p = self.patch
        self.latent_shape(t, h, w)
        x = video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # (B·T, C, H, W)
        x = torch.nn.functional.pixel_unshuffle(x, p)  # (B·T, C·p², H/p, W/p)
        x = x.reshape(b, t, c * p * p, h // p, w // p).permute(0, 2, 1, 3, 4)  # (B, C·p², T, H/p, W/p)
        return (x - self.shift) / self.scale

    def decode(self, z: Tensor) -> Tensor:
        b, c, t, h, w = z.shape
        p = self.patch
        x = z * self.scale + self.shift
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # (B·T, C·p², H', W')
        x = torch.nn.functional.pixel_shuffle(x, p)  # (B·T, C, H'·p, W'·p)
        return x.reshape(b, t, c // (p * p), h * p, w * p).permute(0, 2, 1, 3, 4)
