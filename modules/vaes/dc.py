"""Deep-compression video autoencoder: DC-AE (Chen et al. 2024, "Deep Compression Autoencoder for
Efficient High-Resolution Diffusion Models", arXiv 2410.10733) with the chunk-causal temporal
design of DC-AE-V (Chen et al. 2025, "DC-VideoGen", arXiv 2509.25182).

Residual autoencoding (DC-AE §3.2): every resolution change has a non-parametric shortcut next to
its learned path, so the network only learns a residual on top of a lossless reshuffle:

- down: space-to-channel (pixel-unshuffle, here also over time) then the mean of each group of
  consecutive channels down to the output width (`DownBlock.shortcut`);
- up:   duplicate each channel (repeat-interleave) up to the needed width, then channel-to-space
  (`UpBlock.shortcut`); the down shortcut is a left inverse of the up shortcut, and an exact
  inverse of it when the down block does no averaging (C_out = C_in·s²·t);
- the encoder output averages channel groups down to the latent width, the decoder input
  duplicates latent channels up to the first width; both added to the learned convs.

Chunk-causal temporal modelling (DC-AE-V): frames are cut into chunks of r_t frames (one chunk ->
one latent frame); inside a chunk information mixes both ways, across chunks only forwards (chunk
c sees chunks ≤ c). Here every spatial layer works per frame (convs, GroupNorm per frame, spatial
attention), resampling only regroups frames of one chunk, and the only layer that mixes frames is
`TemporalAttention(chunk=...)` with the chunk-causal mask. So latent c depends on frames of chunks
≤ c, and decoded chunk c on latents ≤ c (tested).

Length rule: a clip of k·r_t frames gives k latent frames (``causal = False`` in the base class's
sense: there is no lone first frame; the chunking itself is causal). H and W must be divisible by
the spatial compression (32 or 64). Simplifications against the papers: softmax attention in the
deep stages instead of EfficientViT's ReLU linear attention + MBConv; single-head attention.

``variational=False`` (DC-AE is a plain autoencoder): the posterior has logvar −30 (std ≈ 3e-7),
so ``sample`` ≈ ``mode``; give its KL a weight of 0 (it is ½‖z‖² plus a constant there).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.vaes.base import DiagonalGaussian, LatentAutoencoder
from modules.vaes.tae import SpatialAttention, TemporalAttention, group_norm, per_frame


def space_to_channel(x: Tensor, s: int, t: int) -> Tensor:
    """(B, C, T, H, W) -> (B, C·t·s·s, T/t, H/s, W/s); the channel of (c, dt, dh, dw) is
    ((c·t + dt)·s + dh)·s + dw (pixel_unshuffle's order, with time outside space)."""
    b, c, n, h, w = x.shape
    x = x.reshape(b, c, n // t, t, h // s, s, w // s, s)  # (B, C, T/t, t, H/s, s, W/s, s)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # (B, C, t, s, s, T/t, H/s, W/s)
    return x.reshape(b, c * t * s * s, n // t, h // s, w // s)


def channel_to_space(x: Tensor, s: int, t: int) -> Tensor:
    """Inverse of `space_to_channel`: (B, C·t·s·s, T, H, W) -> (B, C, T·t, H·s, W·s)."""
    b, c, n, h, w = x.shape
    x = x.reshape(b, c // (t * s * s), t, s, s, n, h, w)  # (B, C, t, s, s, T, H, W)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, C, T, t, H, s, W, s)
    return x.reshape(b, c // (t * s * s), n * t, h * s, w * s)


class DownBlock(nn.Module):
    """Residual-autoencoding downsample: (B, C_in, T, H, W) -> (B, C_out, T/t, H/2, W/2), t = 2 if temporal.

    learned: 3×3 conv per frame to C_out/(4t) channels, then space_to_channel (DC-AE's
    ConvPixelUnshuffle); shortcut: space_to_channel, then the mean of each group of C_in·4t/C_out
    consecutive channels. Both only regroup frames inside pairs, so they never cross a chunk.
    """

    def __init__(self, in_channels: int, out_channels: int, temporal: bool = False):
        super().__init__()
        self.t = 2 if temporal else 1
        f = 4 * self.t
        if out_channels % f or (in_channels * f) % out_channels:
            raise ValueError(
                f"DownBlock: {in_channels} -> {out_channels} channels with factor {f} (2x2 space x {self.t} time) needs "
                f"{out_channels} divisible by {f} and {in_channels}·{f} divisible by {out_channels}"
            )
        self.group = in_channels * f // out_channels
        self.conv = nn.Conv2d(in_channels, out_channels // f, 3, padding=1)

    def shortcut(self, x: Tensor) -> Tensor:
        y = space_to_channel(x, 2, self.t)  # (B, C_in·4t, T/t, H/2, W/2)
        return y.unflatten(1, (-1, self.group)).mean(2)  # (B, C_out, T/t, H/2, W/2)

    def forward(self, x: Tensor) -> Tensor:
        return space_to_channel(per_frame(self.conv, x), 2, self.t) + self.shortcut(x)


class UpBlock(nn.Module):
    """Residual-autoencoding upsample: (B, C_in, T, H, W) -> (B, C_out, T·t, 2H, 2W), t = 2 if temporal.

    learned: 3×3 conv per frame to C_out·4t channels, then channel_to_space (ConvPixelShuffle);
    shortcut: each channel repeated C_out·4t/C_in times (repeat_interleave), then channel_to_space.
    """

    def __init__(self, in_channels: int, out_channels: int, temporal: bool = False):
        super().__init__()
        self.t = 2 if temporal else 1
        f = 4 * self.t
        if (out_channels * f) % in_channels:
            raise ValueError(f"UpBlock: {in_channels} -> {out_channels} channels needs {out_channels}·{f} divisible by {in_channels}")
        self.repeats = out_channels * f // in_channels
        self.conv = nn.Conv2d(in_channels, out_channels * f, 3, padding=1)

    def shortcut(self, x: Tensor) -> Tensor:
        return channel_to_space(x.repeat_interleave(self.repeats, dim=1), 2, self.t)  # (B, C_out, T·t, 2H, 2W)

    def forward(self, x: Tensor) -> Tensor:
        return channel_to_space(per_frame(self.conv, x), 2, self.t) + self.shortcut(x)


class ResBlock2d(nn.Module):
    """Per-frame residual block: x + conv(SiLU(GN(conv(SiLU(GN(x)))))), on (B·T, C, H, W)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(
            group_norm(channels, groups), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            group_norm(channels, groups), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class DCBlock(nn.Module):
    """ResBlock2d per frame -> [spatial attention per frame] -> chunk-causal temporal attention.

    ``chunk``: frames per chunk at this stage's frame rate (r_t before any temporal downsampling,
    1 after all of it, where chunk-causal is plain causal). (B, C, T, H, W) -> same shape.
    """

    def __init__(self, channels: int, chunk: int, spatial_attention: bool, groups: int):
        super().__init__()
        self.res = ResBlock2d(channels, groups)
        self.spatial = SpatialAttention(channels, groups) if spatial_attention else nn.Identity()
        self.temporal = TemporalAttention(channels, groups, chunk=chunk)

    def forward(self, x: Tensor) -> Tensor:
        return self.temporal(self.spatial(per_frame(self.res, x)))


class DCAE(LatentAutoencoder):
    """Deep-compression video autoencoder; video (B, 3, k·r_t, H, W) <-> latents (B, C, k, H/r_s, W/r_s).

    ``widths[i]`` / ``depths[i]``: width and number of `DCBlock`s of stage i (stage 0 at full
    resolution); between stages i and i+1 a `DownBlock` (encoder) / `UpBlock` (decoder) halves /
    doubles H and W, and T where ``temporal_downsample[i]``. So r_s = 2^(len(widths)−1) (32 for six
    stages, 64 for seven) and r_t = 2^Σ temporal_downsample. Stages from ``attention_from`` on also
    have spatial self-attention. The decoder mirrors the encoder.
    """

    causal = False

    def __init__(
        self,
        latent_channels: int = 32,
        widths: Sequence[int] = (32, 64, 128, 128, 256, 256),
        depths: Sequence[int] = (0, 1, 1, 1, 2, 2),
        temporal_downsample: Sequence[bool] = (False, False, False, True, True),
        attention_from: int = 3,
        variational: bool = False,
        norm_groups: int = 32,
    ):
        widths, depths, temporal = [int(w) for w in widths], [int(d) for d in depths], [bool(v) for v in temporal_downsample]
        if len(depths) != len(widths) or len(temporal) != len(widths) - 1:
            raise ValueError(
                f"DCAE: {len(widths)} widths need {len(widths)} depths and {len(widths) - 1} temporal_downsample entries, "
                f"got {len(depths)} and {len(temporal)}"
            )
        if widths[-1] % latent_channels:
            raise ValueError(f"DCAE: the last width {widths[-1]} must be a multiple of latent_channels {latent_channels} (shortcuts)")
        n = len(widths) - 1
        super().__init__(latent_channels, (2 ** sum(temporal), 2**n, 2**n))
        self.variational = variational
        g, rt = norm_groups, 2 ** sum(temporal)
        # frames per chunk at each stage's frame rate
        chunks = [rt // 2 ** sum(temporal[:i]) for i in range(n + 1)]

        def stage(i: int) -> nn.Sequential:
            return nn.Sequential(*[DCBlock(widths[i], chunks[i], i >= attention_from, g) for _ in range(depths[i])])

        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        self.enc_stages = nn.ModuleList(stage(i) for i in range(n + 1))
        self.downs = nn.ModuleList(DownBlock(widths[i], widths[i + 1], temporal[i]) for i in range(n))
        self.enc_norm = group_norm(widths[-1], g)
        self.enc_out = nn.Conv2d(widths[-1], latent_channels * (2 if variational else 1), 3, padding=1)

        self.dec_in = nn.Conv2d(latent_channels, widths[-1], 3, padding=1)
        self.dec_stages = nn.ModuleList(stage(i) for i in range(n + 1))  # dec_stages[i] runs at stage i's size
        self.ups = nn.ModuleList(UpBlock(widths[i + 1], widths[i], temporal[i]) for i in range(n))  # ups[i]: stage i+1 -> i
        self.dec_norm = group_norm(widths[0], g)
        self.dec_out = nn.Conv2d(widths[0], 3, 3, padding=1)

    def last_layer(self) -> Tensor:
        """The decoder's output conv weight (for the adaptive GAN weight)."""
        return self.dec_out.weight

    def posterior(self, video: Tensor) -> DiagonalGaussian:
        """video (B, 3, k·r_t, H, W) -> q(z | video) over (B, C, k, H/r_s, W/r_s)."""
        self.latent_shape(*video.shape[2:])  # raises ValueError naming a bad length or frame size
        h = per_frame(self.conv_in, video)  # (B, W_0, T, H, W)
        for i, blocks in enumerate(self.enc_stages):
            h = blocks(h)
            if i < len(self.downs):
                h = self.downs[i](h)  # (B, W_{i+1}, T', H/2^{i+1}, W/2^{i+1})
        c = self.latent_channels
        out = per_frame(self.enc_out, F.silu(per_frame(self.enc_norm, h)))  # (B, C or 2C, k, H', W')
        shortcut = h.unflatten(1, (c, -1)).mean(2)  # (B, C, k, H', W'): mean of groups of W_last/C channels
        mean = out[:, :c] + shortcut
        logvar = out[:, c:] if self.variational else torch.full_like(mean, -30.0)
        return DiagonalGaussian(mean, logvar)

    def decode_raw(self, z: Tensor) -> Tensor:
        """Raw latents (B, C, k, H', W') -> video (B, 3, k·r_t, H'·r_s, W'·r_s), unclamped."""
        width = self.dec_in.out_channels
        h = per_frame(self.dec_in, z) + z.repeat_interleave(width // self.latent_channels, dim=1)  # (B, W_last, k, H', W')
        for i in reversed(range(len(self.dec_stages))):
            h = self.dec_stages[i](h)
            if i > 0:
                h = self.ups[i - 1](h)  # (B, W_{i-1}, T·t, 2H, 2W)
        return per_frame(self.dec_out, F.silu(per_frame(self.dec_norm, h)))  # (B, 3, k·r_t, H, W)
