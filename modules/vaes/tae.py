"""The 2.5D temporal autoencoder (TAE) of Movie Gen (Polyak et al. 2024, arXiv 2410.13720, §3.1.1).

Movie Gen "inflates" an SD-style image VAE (LDM, Rombach et al. 2022; SD3, Esser et al. 2024):

- every 2D spatial convolution (applied to each frame) is followed by a 1D temporal convolution
  (applied to each pixel), with symmetric replicate padding in time: `Conv25d`;
- every spatial self-attention is followed by a temporal self-attention;
- temporal downsampling is a stride-2 temporal convolution, upsampling nearest-neighbour
  interpolation followed by a convolution; spatial resampling is as in the image VAE
  (asymmetric pad + stride-2 conv, nearest ×2 + conv);
- 8× compression in time, height and width, 16 latent channels, diagonal Gaussian posterior.

The temporal layers start as identities (temporal convs Dirac, temporal attention output zero), so
an untrained TAE is an image VAE applied per frame with frame subsampling, as after inflation.

Variable length: ``encode`` takes any T ≥ 1, pads the clip in time to a multiple of ``r_t`` by
repeating its last frame (replicate; reflect would need T > padding) and returns ``ceil(T / r_t)``
latent frames; ``decode(z, num_frames)`` crops the ``r_t·T'`` decoded frames back to ``num_frames``.

Outlier penalty loss (OPL, Movie Gen §3.1.1), against the high-norm "spots" in latents:
`outlier_penalty`. Normalisation (GroupNorm) is per frame, as in the image VAE it inflates.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.vaes.base import DiagonalGaussian, LatentAutoencoder


def per_frame(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Apply a 2D layer to every frame: (B, C, T, H, W) -> fn on (B·T, C, H, W) -> (B, C', T, H', W')."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))  # (B·T, C', H', W')
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)  # (B, C', T, H', W')


def per_pixel(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Apply a 1D layer to every pixel's sequence: (B, C, T, H, W) -> fn on (B·H·W, C, T) -> (B, C', T', H, W)."""
    b, c, t, h, w = x.shape
    y = fn(x.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, t))  # (B·H·W, C', T')
    return y.reshape(b, h, w, *y.shape[1:]).permute(0, 3, 4, 1, 2)  # (B, C', T', H, W)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with gcd(groups, channels) groups (so narrow test models still divide evenly)."""
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


def outlier_penalty(z: Tensor, r: float = 3.0) -> Tensor:
    """Movie Gen's outlier penalty loss (OPL), a scalar.

    For one latent X ∈ R^{C×H×W} (one sample, one latent frame), with X_ij ∈ R^C the channel
    vector at position (i, j) and Mean(X), Std(X) ∈ R^C taken over the H·W positions,

        L_OPL(X, r) = 1/(H·W) · Σ_{i,j} max(‖X_ij − Mean(X)‖₂ − r·‖Std(X)‖₂, 0),

    averaged here over the batch and the latent frames. Std is the population std (1/(H·W)), so
    ‖Std(X)‖₂ = sqrt(1/(H·W) · Σ_ij ‖X_ij − Mean(X)‖²) is the RMS distance to the mean; positions
    more than r times farther than that are penalised. z: raw latents (B, C, T', H', W').
    """
    b, c, t, h, w = z.shape
    centred = z - z.mean(dim=(3, 4), keepdim=True)  # (B, C, T', H', W'): X_ij − Mean(X)
    dist = torch.linalg.vector_norm(centred, dim=1)  # (B, T', H', W'): ‖X_ij − Mean(X)‖
    std_norm = torch.linalg.vector_norm(centred, dim=(1, 3, 4)) / math.sqrt(h * w)  # (B, T'): ‖Std(X)‖
    return (dist - r * std_norm[:, :, None, None]).clamp_min(0).mean()


class Conv25d(nn.Module):
    """2D conv per frame, then 1D conv per pixel ("inflated" 2.5D conv, Movie Gen §3.1.1).

    (B, C_in, T, H, W) -> (B, C_out, T / temporal_stride, H / stride, W / stride). Spatial padding:
    zeros, k // 2 each side for stride 1, SD's asymmetric (0, 1) for stride 2; temporal padding:
    replicate, k // 2 each side (T must be even for temporal_stride 2).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, temporal_stride: int = 1):
        super().__init__()
        self.stride, self.kernel = stride, kernel
        self.spatial = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2 if stride == 1 else 0)
        self.temporal = nn.Conv1d(out_channels, out_channels, kernel, stride=temporal_stride)
        nn.init.dirac_(self.temporal.weight)  # identity in time at initialisation (inflation)
        nn.init.zeros_(self.temporal.bias)

    def _spatial(self, x: Tensor) -> Tensor:  # (B·T, C, H, W)
        if self.stride > 1:
            x = F.pad(x, (0, 1, 0, 1))  # SD VAE's asymmetric padding before the stride-2 conv
        return self.spatial(x)

    def _temporal(self, x: Tensor) -> Tensor:  # (B·H·W, C, T)
        p = self.kernel // 2
        return self.temporal(F.pad(x, (p, p), mode="replicate"))

    def forward(self, x: Tensor) -> Tensor:
        return per_pixel(self._temporal, per_frame(self._spatial, x))


class ResBlock(nn.Module):
    """LDM's ResnetBlock with 2.5D convs: x + conv(SiLU(GN(conv(SiLU(GN(x)))))), 1×1×1 skip when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_channels, groups), Conv25d(in_channels, out_channels)
        self.norm2, self.conv2 = group_norm(out_channels, groups), Conv25d(out_channels, out_channels)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(per_frame(self.norm1, x)))
        h = self.conv2(F.silu(per_frame(self.norm2, h)))
        return self.skip(x) + h


class SpatialAttention(nn.Module):
    """Single-head self-attention among the H·W positions of each frame (LDM VAE mid-block), residual."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv, self.out = nn.Linear(channels, 3 * channels), nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        s = per_frame(self.norm, x).permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)  # (B·T, H·W, C)
        q, k, v = self.qkv(s).chunk(3, dim=-1)
        o = self.out(F.scaled_dot_product_attention(q, k, v))  # (B·T, H·W, C)
        return x + o.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)  # (B, C, T, H, W)


class TemporalAttention(nn.Module):
    """Single-head self-attention among the T frames at each pixel, residual.

    ``chunk=None``: every frame sees every frame (TAE). ``chunk=k``: chunk-causal (DC-AE-V): frame
    i sees frame j iff j // k ≤ i // k (all frames of its own chunk and of earlier chunks).
    ``zero_init``: output projection zero, so the block starts as the identity (inflation).
    """

    def __init__(self, channels: int, groups: int = 32, chunk: int | None = None, zero_init: bool = False):
        super().__init__()
        self.chunk = chunk
        self.norm = group_norm(channels, groups)
        self.qkv, self.out = nn.Linear(channels, 3 * channels), nn.Linear(channels, channels)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        s = per_frame(self.norm, x).permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)  # (B·H·W, T, C)
        q, k, v = self.qkv(s).chunk(3, dim=-1)
        mask = None
        if self.chunk is not None:
            idx = torch.arange(t, device=x.device) // self.chunk  # chunk of each frame
            mask = idx[None, :] <= idx[:, None]  # (T, T): query i may see key j
        o = self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))  # (B·H·W, T, C)
        return x + o.reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2)  # (B, C, T, H, W)


def _mid(channels: int, groups: int, attention: bool) -> nn.Sequential:
    """Res, [spatial attention, temporal attention], Res at the lowest resolution."""
    attn = [SpatialAttention(channels, groups), TemporalAttention(channels, groups, zero_init=True)] if attention else []
    return nn.Sequential(ResBlock(channels, channels, groups), *attn, ResBlock(channels, channels, groups))


class Upsample(nn.Module):
    """Nearest ×2 in H, W (and T when ``temporal``), then a 2.5D conv (Movie Gen §3.1.1)."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.scale = (2 if temporal else 1, 2, 2)
        self.conv = Conv25d(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))  # (B, C, T·s_t, 2H, 2W)


class TAE(LatentAutoencoder):
    """Movie Gen's 2.5D temporal autoencoder; video (B, 3, T, H, W) <-> latents (B, C, ⌈T/r_t⌉, H/8, W/8).

    ``channels·channel_mult[i]`` is the width at level i; each level but the last halves H and W
    (and T where ``temporal_downsample[i]``, default everywhere), so the main preset
    (4 levels) compresses 8×8×8. ``num_res_blocks`` per level in the encoder, one more in the
    decoder (LDM). ``attention``: spatial + temporal self-attention in the mid blocks.
    """

    causal = False
    any_length = True  # any T >= 1 encodes (padded in time): no frame count is off the grid

    def __init__(
        self,
        latent_channels: int = 16,
        channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        temporal_downsample: Sequence[bool] | None = None,
        attention: bool = True,
        norm_groups: int = 32,
    ):
        levels = len(channel_mult)
        temporal = [True] * (levels - 1) if temporal_downsample is None else [bool(v) for v in temporal_downsample]
        if len(temporal) != levels - 1:
            raise ValueError(f"TAE: temporal_downsample needs {levels - 1} entries (one per downsample), got {len(temporal)}")
        super().__init__(latent_channels, (2 ** sum(temporal), 2 ** (levels - 1), 2 ** (levels - 1)))
        widths = [channels * m for m in channel_mult]
        g = norm_groups

        enc: list[nn.Module] = [Conv25d(3, widths[0])]
        cin = widths[0]
        for i, w in enumerate(widths):
            for _ in range(num_res_blocks):
                enc.append(ResBlock(cin, w, g))
                cin = w
            if i < levels - 1:
                enc.append(Conv25d(cin, cin, stride=2, temporal_stride=2 if temporal[i] else 1))
        enc += [_mid(cin, g, attention), group_norm(cin, g), nn.SiLU(), Conv25d(cin, 2 * latent_channels)]
        self.encoder = nn.ModuleList(enc)

        dec: list[nn.Module] = [Conv25d(latent_channels, cin), _mid(cin, g, attention)]
        for i in reversed(range(levels)):
            for _ in range(num_res_blocks + 1):
                dec.append(ResBlock(cin, widths[i], g))
                cin = widths[i]
            if i > 0:
                dec.append(Upsample(cin, temporal[i - 1]))
        dec += [group_norm(cin, g), nn.SiLU(), Conv25d(cin, 3)]
        self.decoder = nn.ModuleList(dec)

    @staticmethod
    def _run(layers: nn.ModuleList, x: Tensor) -> Tensor:
        for layer in layers:
            x = per_frame(layer, x) if isinstance(layer, nn.GroupNorm) else layer(x)
        return x

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, ⌈T / r_t⌉, H / r_h, W / r_w)``: any T ≥ 1 (padded in time), H and W divisible."""
        rt, rh, rw = self.compression
        if height % rh or width % rw:
            raise ValueError(f"TAE: frame size {height}x{width} is not divisible by the spatial compression {rh}x{rw}")
        if num_frames < 1:
            raise ValueError(f"TAE: needs at least 1 frame, got {num_frames}")
        return (self.latent_channels, -(-num_frames // rt), height // rh, width // rw)

    def posterior(self, video: Tensor) -> DiagonalGaussian:
        """video (B, 3, T, H, W), any T ≥ 1 -> q(z | video) over (B, C, ⌈T/r_t⌉, H/r_h, W/r_w)."""
        t = video.shape[2]
        self.latent_shape(t, video.shape[3], video.shape[4])  # raises on a bad size
        pad = -t % self.compression[0]
        if pad:
            video = F.pad(video, (0, 0, 0, 0, 0, pad), mode="replicate")  # (B, 3, T + pad, H, W): last frame repeated
        mean, logvar = self._run(self.encoder, video).chunk(2, dim=1)  # 2 × (B, C, T', H', W')
        return DiagonalGaussian(mean, logvar)

    def decode_raw(self, z: Tensor, num_frames: int | None = None) -> Tensor:
        """Raw latents (B, C, T', H', W') -> video (B, 3, num_frames or r_t·T', H, W), unclamped.

        ``num_frames`` must be a length that encodes to T' latent frames: r_t·(T'−1) < num_frames ≤ r_t·T'.
        """
        rt, t_lat = self.compression[0], z.shape[2]
        if num_frames is not None and not rt * (t_lat - 1) < num_frames <= rt * t_lat:
            raise ValueError(f"TAE: {t_lat} latent frames decode to {rt * (t_lat - 1) + 1}..{rt * t_lat} frames, not {num_frames}")
        video = self._run(self.decoder, z)  # (B, 3, r_t·T', H, W)
        return video if num_frames is None else video[:, :, :num_frames]

    def decode(self, z: Tensor, num_frames: int | None = None) -> Tensor:
        """Normalised latents (B, C, T', H', W') -> video (B, 3, num_frames or r_t·T', H, W)."""
        return self.decode_raw(self.denormalize(z), num_frames)

    def outlier_penalty(self, z: Tensor, r: float = 3.0) -> Tensor:
        """`outlier_penalty` (Movie Gen OPL) of raw latents (B, C, T', H', W'), a scalar."""
        return outlier_penalty(z, r)
