"""The interface every video autoencoder implements (see DESIGN.md, Interfaces), the diagonal
Gaussian posterior of the VAE families, and `LatentAutoencoder`, the base class of the learned
autoencoders that owns latent normalisation.

Latent normalisation: the network works in *raw* latent space; `encode` returns
``(z_raw − mean) / std`` per channel and `decode` inverts it, so the objective sees latents of
roughly unit scale without any constant in training code. The statistics are buffers (saved in
checkpoints), measured on data after training (`modules.system.AutoencoderSystem`) or copied from
a pretrained model's config (diffusers adapters).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


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


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))) over raw latents, each ``(B, C, T', H', W')``.

    ``logvar`` is clamped to [−30, 20] as in LDM / diffusers' ``DiagonalGaussianDistribution``.
    """

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + std·ε, ε ~ N(0, I) (reparameterised: gradients flow to mean and logvar)."""
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q ‖ N(0, I)) per sample, (B,): ½·Σ (mean² + σ² − 1 − log σ²) over C, T', H', W'."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class LatentAutoencoder(nn.Module):
    """Base class of the learned autoencoders (causal 3D, 2.5D TAE, deep compression).

    Subclasses implement ``posterior(video) -> DiagonalGaussian`` and ``decode_raw(z) -> video`` in
    raw latent space and set ``causal``: a causal autoencoder takes ``1 + k·r_t`` frames (the first
    frame alone, then groups of ``r_t``) and gives ``1 + k`` latent frames; a non-causal one takes
    ``k·r_t`` frames and gives ``k``. This class adds the per-channel normalisation (buffers
    ``latent_mean`` and ``latent_std``, shape (C,)), ``encode`` / ``decode`` and ``latent_shape``.
    """

    causal: bool = False

    def __init__(self, latent_channels: int, compression: tuple[int, int, int]) -> None:
        super().__init__()
        self.latent_channels = int(latent_channels)
        self.compression = tuple(int(c) for c in compression)
        self.register_buffer("latent_mean", torch.zeros(self.latent_channels))
        self.register_buffer("latent_std", torch.ones(self.latent_channels))

    # -- what a family implements ----------------------------------------------------------------

    def posterior(self, video: Tensor) -> DiagonalGaussian:
        """video (B, 3, T, H, W) in [-1, 1] -> q(z | video) over raw latents (B, C, T', H', W')."""
        raise NotImplementedError

    def decode_raw(self, z: Tensor) -> Tensor:
        """Raw latents (B, C, T', H', W') -> video (B, 3, T, H, W), unclamped."""
        raise NotImplementedError

    def last_layer(self) -> Tensor:
        """The weight of the decoder's output layer: the adaptive GAN weight (VQGAN, Esser et al.
        2021 eq. 7) balances the gradient norms of the losses there. Default: the last Conv / Linear
        registered under ``self.decoder`` (else under the whole module); a family may override."""
        root = getattr(self, "decoder", self)
        layers = [m for m in root.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
        if not layers:
            raise NotImplementedError(f"{type(self).__name__}: no Conv/Linear layer found for last_layer()")
        return layers[-1].weight

    # -- normalisation and the VideoAutoencoder interface ------------------------------------------

    def _stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, -1) + (1,) * (z.dim() - 2)  # broadcast over batch and positions
        return self.latent_mean.to(z.dtype).view(shape), self.latent_std.to(z.dtype).view(shape)

    def normalize(self, z_raw: Tensor) -> Tensor:
        mean, std = self._stats(z_raw)
        return (z_raw - mean) / std

    def denormalize(self, z: Tensor) -> Tensor:
        mean, std = self._stats(z)
        return z * std + mean

    @torch.no_grad()
    def set_latent_stats(self, mean: Tensor, std: Tensor) -> None:
        """Store per-channel statistics (C,) of raw latents; ``encode`` then returns (z − mean) / std."""
        if mean.shape != (self.latent_channels,) or std.shape != (self.latent_channels,):
            raise ValueError(f"latent stats must have shape ({self.latent_channels},), got {tuple(mean.shape)} and {tuple(std.shape)}")
        if not bool((std > 0).all()):
            raise ValueError(f"latent std must be positive, got {std.tolist()}")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)

    def encode(self, video: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """video (B, 3, T, H, W) -> normalised latents (B, C, T', H', W'): the posterior mean (or a
        sample with ``sample=True``), then (z − mean) / std."""
        q = self.posterior(video)
        return self.normalize(q.sample(generator) if sample else q.mode())

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents (B, C, T', H', W') -> video (B, 3, T, H, W)."""
        return self.decode_raw(self.denormalize(z))

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        rt, rh, rw = self.compression
        name = type(self).__name__
        if height % rh or width % rw:
            raise ValueError(f"{name}: frame size {height}x{width} is not divisible by the spatial compression {rh}x{rw}")
        if self.causal:
            if num_frames < 1 or (num_frames - 1) % rt:
                raise ValueError(f"{name}: a causal autoencoder takes 1 + k·{rt} frames, got {num_frames}")
            frames = 1 + (num_frames - 1) // rt
        else:
            if num_frames < rt or num_frames % rt:
                raise ValueError(f"{name}: takes a multiple of {rt} frames, got {num_frames}")
            frames = num_frames // rt
        return (self.latent_channels, frames, height // rh, width // rw)
