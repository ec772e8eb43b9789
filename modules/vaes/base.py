"""The interface every video autoencoder implements (see DESIGN.md, Interfaces)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class VideoAutoencoder(Protocol):
    """Maps pixels ``(B, 3, T, H, W)`` in [-1, 1] to *normalised* latents ``(B, C, T', H', W')``.

    The autoencoder owns latent normalisation: ``encode`` returns latents ready for the objective,
    ``decode`` takes them back. Training code never applies scale factors of its own.
    """

    latent_channels: int
    compression: tuple[int, int, int]  # (time, height, width)

    def encode(self, video: Tensor) -> Tensor: ...

    def decode(self, z: Tensor) -> Tensor: ...

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, T', H', W')`` of the latents of a clip of that size."""
        ...
