"""The causal 3D VAE family: Wan 2.1's video VAE and its relatives (HunyuanVideo, CV-VAE).

Wan: Open and Advanced Large-Scale Video Generative Models (Wan Team, 2025, arXiv:2503.20314),
"Wan-VAE"; HunyuanVideo: A Systematic Framework For Large Video Generative Models (Kong et al., 2024,
arXiv:2412.03603), "3D VAE" (causal Conv3D, first frame alone, 4×8×8 compression, 16 channels).

Every temporal operation is causal, so an output frame depends on input frames up to its own time
only. The first frame is encoded alone (a video is an image followed by groups of ``r_t`` frames):
``T = 1 + k·r_t`` frames give ``1 + k`` latent frames and back. Causality is what makes a *feature
cache* possible: encode frame 0, then chunks of ``r_t`` frames, decode one latent frame at a time,
each causal convolution padding its chunk with the last ``kernel_t − 1`` input frames of the chunk
before instead of zeros. The result equals the one-shot pass and needs memory flat in video length.

Causality holds because
- convolutions pad ``kernel_t − 1`` frames in front and none behind (`CausalConv3d`);
- norms act per position (RMS norm over channels, as Wan), never over time;
- attention is per frame (spatial self-attention over ``H·W`` tokens);
- temporal downsampling keeps frame 0 alone, then a stride-2 conv over frames ``(2j−2, 2j−1, 2j)``;
  temporal upsampling keeps frame 0 alone and turns each later frame into 2 (Wan's ``time_conv``).

With the Wan preset the network is the same function as diffusers' ``AutoencoderKLWan`` (Wan 2.1,
``is_residual=False``), and with ``residual=True`` the same as its Wan 2.2 layout (``is_residual=True``,
without the 2×2 patchify); tests/test_causal3d.py loads its weights and compares. On CPU the
convolutions run oneDNN in channels-last-3d (`Conv3d`), which makes the chunked pass several times
faster than PyTorch's default kernel choice for few-frame chunks.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.vaes.base import DiagonalGaussian, LatentAutoencoder

FeatureCache = dict[nn.Module, Any]
"""Per-module state carried from one chunk to the next: a causal conv's last input frames, or a
flag saying the first frame has been seen. ``None`` instead of a dict means one-shot (zero padding)."""


_CHANNELS_LAST = torch.channels_last_3d


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that on CPU in float32 always runs oneDNN. PyTorch's backend heuristic
    sends batch-1 inputs with B·C·T·H ≤ 20480 (every chunk of a few frames) to its reference
    ``slow_conv3d``, 2–3× slower than oneDNN in channels-last-3d; the result is the same up to
    float rounding, and autograd works as for ``F.conv3d``. ``torch.backends.mkldnn.flags(enabled=False)``
    turns it off. Elsewhere (GPU, other dtypes, CPU mixed precision, meta) it is ``nn.Conv3d``."""

    def forward(self, x: Tensor) -> Tensor:
        onednn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
        cpu_fp32 = x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
        if onednn and cpu_fp32:
            x = x.contiguous(memory_format=_CHANNELS_LAST)  # a no-op but where a 1-frame chunk lost the layout
            w, b = self.weight, self.bias
            return torch.mkldnn_convolution(x, w, b, self.padding, self.stride, self.dilation, self.groups)
        return super().forward(x)


class CausalConv3d(Conv3d):
    """Conv3d, stride 1, padded ``kernel_t − 1`` frames in front and none behind; spatial padding
    ``k // 2`` on both sides. (B, C_in, T, H, W) -> (B, C_out, T, H, W).

    With a ``cache`` dict, the front padding is the last ``kernel_t − 1`` input frames of the
    previous call (zeros on the first call), and this call's last frames are stored for the next.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int] = 3) -> None:
        k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        super().__init__(in_channels, out_channels, k, padding=(0, k[1] // 2, k[2] // 2))
        self.time_pad = k[0] - 1

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        if self.time_pad == 0:
            return super().forward(x)
        prev = cache.get(self) if cache is not None else None
        if prev is None:
            x = F.pad(x, (0, 0, 0, 0, self.time_pad, 0))  # (B, C, pad + T, H, W), zeros in front
        else:
            x = torch.cat([prev, x], dim=2)  # (B, C, pad + T, H, W)
        if cache is not None:
            cache[self] = x[:, :, -self.time_pad :].clone()  # the frames the next chunk pads with
        return super().forward(x)


def rms_norm_channels(x: Tensor, gamma: Tensor, scale: float) -> Tensor:
    """Wan's norm over dim 1, ``F.normalize(x, dim=1) · scale · γ``: 1 / max(‖x‖₂, 1e-12) accumulated in
    ≥ float32, applied in x's dtype. (Under CPU bf16 autocast F.normalize returns float32, so every
    SiLU, residual add and conv-input cast after it ran in float32: a training step 1.2x slower.)"""
    acc = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 input
    inv = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=acc).clamp_min(1e-12).reciprocal()
    gamma = gamma.view((-1,) + (1,) * (x.dim() - 2))  # broadcast over positions
    return x * (inv * scale).to(x.dtype) * gamma.to(x.dtype)


def _norm_silu(x: Tensor, gamma: Tensor, scale: float) -> Tensor:
    return F.silu(rms_norm_channels(x, gamma, scale))


@functools.cache
def _compiled_norm_silu() -> Any:
    """`_norm_silu` through torch.compile (dynamic shapes: one graph for every level and clip size).
    Eager it is ~7 memory passes forward and more backward; fused, a training step of the 4×8×8 preset
    at batch 16 in bf16 is 1.3x faster on CPU, 1,150 -> 880 ms (one-off compile, 30-50 s cold on 2 cores)."""
    return torch.compile(_norm_silu, dynamic=True)


class RMSNorm(nn.Module):
    """Per-position RMS norm over channels (Wan): ``x / ‖x‖₂ · √C · γ``; acts on each frame and
    pixel alone, so it keeps causality and chunk equivalence. (B, C, ...) -> same.

    ``silu(x)`` is ``F.silu(self(x))``, the pre-activation of every conv after a norm; with
    ``compiled = True`` (set by ``CausalVAE3d(compile=True)``) it runs as one fused kernel."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim))
        self.compiled = False

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm_channels(x, self.gamma, self.scale)

    def silu(self, x: Tensor) -> Tensor:
        return (_compiled_norm_silu() if self.compiled else _norm_silu)(x, self.gamma, self.scale)


class ResBlock(nn.Module):
    """norm → SiLU → CausalConv3d(3) → norm → SiLU → CausalConv3d(3), plus a 1×1×1 shortcut when
    the width changes. (B, C_in, T, H, W) -> (B, C_out, T, H, W)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3)
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        h = self.conv1(self.norm1.silu(x), cache)
        h = self.conv2(self.norm2.silu(h), cache)
        return self.shortcut(x) + h


class FrameAttention(nn.Module):
    """Single-head self-attention over the ``H·W`` positions of each frame separately (Wan's
    ``AttentionBlock``), pre-RMS-norm, residual. (B, C, T, H, W) -> same."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)  # (B·T, H·W, C)
        q, k, v = self.qkv(tokens).unsqueeze(1).chunk(3, dim=-1)  # each (B·T, 1, H·W, C)
        out = self.proj(F.scaled_dot_product_attention(q, k, v).squeeze(1))  # (B·T, H·W, C)
        out = out.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)  # (B, C, T, H, W)
        return x + out


class Downsample(nn.Module):
    """Spatial ÷2 (pad right/bottom by 1, 3×3 conv stride 2, per frame), then optionally temporal ÷2:
    frame 0 is kept alone, output frame j ≥ 1 is a (3, 1, 1) conv over frames (2j−2, 2j−1, 2j).
    (B, C, T, H, W) -> (B, C, 1 + (T − 1)/2 or T, H/2, W/2). Chunks after the first must have an
    even length; the cache holds the last input frame."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.spatial = Conv3d(dim, dim, (1, 3, 3), stride=(1, 2, 2))
        self.time_conv = Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        x = self.spatial(F.pad(x, (0, 1, 0, 1)))  # (B, C, T, H/2, W/2)
        if self.time_conv is None:
            return x
        prev = cache.get(self) if cache is not None else None
        seq = x if prev is None else torch.cat([prev, x], dim=2)  # (B, C, [1 +] T, H/2, W/2)
        if (seq.shape[2] - 1) % 2:
            raise ValueError(f"temporal downsampling needs 1 + 2k frames in all (cache included), got {seq.shape[2]}")
        if cache is not None:
            cache[self] = seq[:, :, -1:].clone()
        out = self.time_conv(seq) if seq.shape[2] > 1 else seq[:, :, :0]  # (B, C, (len − 1)/2, ...)
        return torch.cat([x[:, :, :1], out], dim=2) if prev is None else out


class Upsample(nn.Module):
    """Optionally temporal ×2 (frame 0 kept alone, each later frame becomes 2 through a causal
    (3, 1, 1) conv to 2·C channels, as Wan's ``time_conv``), then spatial nearest ×2 and a 3×3 conv
    to ``out_dim``. (B, C, T, H, W) -> (B, out_dim, 1 + 2(T − 1) or T, 2H, 2W)."""

    def __init__(self, dim: int, out_dim: int, temporal: bool) -> None:
        super().__init__()
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1)) if temporal else None
        self.spatial = Conv3d(dim, out_dim, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        if self.time_conv is not None:
            x = self._upsample_time(x, cache)
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")  # (B, C, T, 2H, 2W)
        return self.spatial(x)

    def _upsample_time(self, x: Tensor, cache: FeatureCache | None) -> Tensor:
        started = cache is not None and cache.get(self, False)
        if cache is not None:
            cache[self] = True
        first, rest = (x[:, :, :0], x) if started else (x[:, :, :1], x[:, :, 1:])
        b, c, t, h, w = rest.shape
        if t == 0:
            return first
        y = self.time_conv(rest, cache).permute(0, 2, 3, 4, 1)  # (B, T', H, W, 2C): channels s·C + c of sub-frame s
        y = y.reshape(b, t, h, w, 2, c).permute(0, 1, 4, 2, 3, 5)  # (B, T', 2, H, W, C)
        y = y.reshape(b, 2 * t, h, w, c).permute(0, 4, 1, 2, 3)  # (B, C, 2T', H, W), channels-last in memory
        return torch.cat([first, y], dim=2) if first.shape[2] else y


class MidBlock(nn.Module):
    """ResBlock → [FrameAttention] → ResBlock at the lowest resolution. (B, C, T, H, W) -> same."""

    def __init__(self, dim: int, attention: bool) -> None:
        super().__init__()
        self.res1 = ResBlock(dim, dim)
        self.attn = FrameAttention(dim) if attention else None
        self.res2 = ResBlock(dim, dim)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        x = self.res1(x, cache)
        if self.attn is not None:
            x = self.attn(x)
        return self.res2(x, cache)


def _fold(x: Tensor, ft: int, fs: int) -> Tensor:
    """(B, C, T, H, W) -> (B, C·ft·fs·fs, T/ft, H/fs, W/fs): each channel's (ft, fs, fs) neighbourhood
    becomes ft·fs² consecutive channels (space- and time-to-channel)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * ft * fs * fs, t // ft, h // fs, w // fs)


def _unfold(x: Tensor, ft: int, fs: int) -> Tensor:
    """Inverse of `_fold`: (B, C·ft·fs·fs, T, H, W) -> (B, C, T·ft, H·fs, W·fs)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c // (ft * fs * fs), ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // (ft * fs * fs), t * ft, h * fs, w * fs)


class AverageDown(nn.Module):
    """Wan 2.2's parameter-free shortcut around a downsampling stage (after DC-AE's space-to-channel
    residual, Chen et al. 2024, arXiv:2410.10733 §3.2): fold each (ft, fs, fs) neighbourhood into
    channels, then average groups of ``in·ft·fs²/out`` channels. Time is padded in front to a multiple
    of ``ft``, so frame 0 (with one zero frame) is a group of its own, as in the main path; later
    chunks are multiples of ``ft``. (B, in, T, H, W) -> (B, out, ⌈T/ft⌉, H/fs, W/fs)."""

    def __init__(self, in_dim: int, out_dim: int, ft: int, fs: int) -> None:
        super().__init__()
        if (in_dim * ft * fs * fs) % out_dim:
            raise ValueError(f"AverageDown: {in_dim}·{ft}·{fs}² channels do not split into {out_dim} groups")
        self.out_dim, self.ft, self.fs = out_dim, ft, fs

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % self.ft, 0))  # zeros in front: (B, C, ft·k, H, W)
        x = _fold(x, self.ft, self.fs)  # (B, C·ft·fs², T/ft, H/fs, W/fs)
        return x.unflatten(1, (self.out_dim, -1)).mean(2)  # (B, out, T/ft, H/fs, W/fs)


class DuplicateUp(nn.Module):
    """The decoder's mirror of `AverageDown` (Wan 2.2, DC-AE): repeat each channel ``out·ft·fs²/in``
    times, unfold channels into (ft, fs, fs) neighbourhoods, and on the first chunk drop the
    ``ft − 1`` frames before frame 0. (B, in, T, H, W) -> (B, out, T·ft [− ft + 1], H·fs, W·fs)."""

    def __init__(self, in_dim: int, out_dim: int, ft: int, fs: int) -> None:
        super().__init__()
        if (out_dim * ft * fs * fs) % in_dim:
            raise ValueError(f"DuplicateUp: {out_dim}·{ft}·{fs}² channels are not a multiple of {in_dim}")
        self.repeats, self.ft, self.fs = out_dim * ft * fs * fs // in_dim, ft, fs

    def forward(self, x: Tensor, first: bool) -> Tensor:
        x = _unfold(x.repeat_interleave(self.repeats, dim=1), self.ft, self.fs)  # (B, out, T·ft, H·fs, W·fs)
        return x[:, :, self.ft - 1 :] if first else x


class ResidualDownStage(nn.Module):
    """One encoder level with Wan 2.2's shortcut: ResBlocks → [Downsample], plus `AverageDown` of the
    stage input. (B, in, T, H, W) -> (B, out, T', H', W')."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, down: bool, temporal: bool) -> None:
        super().__init__()
        self.res = nn.ModuleList([ResBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks)])
        self.resample = Downsample(out_dim, temporal) if down else None
        self.shortcut = AverageDown(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        h = x
        for block in self.res:
            h = block(h, cache)
        if self.resample is not None:
            h = self.resample(h, cache)
        return h + self.shortcut(x)


class ResidualUpStage(nn.Module):
    """One decoder level with Wan 2.2's shortcut: ResBlocks → [Upsample keeping the width], plus
    `DuplicateUp` of the stage input. (B, in, T, H, W) -> (B, out, T', H', W')."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, up: bool, temporal: bool) -> None:
        super().__init__()
        self.res = nn.ModuleList([ResBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks + 1)])
        self.resample = Upsample(out_dim, out_dim, temporal) if up else None
        self.shortcut = DuplicateUp(in_dim, out_dim, 2 if temporal else 1, 2) if up else None

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        first = cache is None or not cache.get(self, False)  # frame 0 is in this call
        if cache is not None:
            cache[self] = True
        h = x
        for block in self.res:
            h = block(h, cache)
        if self.resample is None:
            return h
        return self.resample(h, cache) + self.shortcut(x, first)


class Encoder3d(nn.Module):
    """video (B, 3, T, H, W) -> moments (B, 2·z_dim, T', H', W') = [mean, logvar] (Wan ``Encoder3d``
    followed by ``conv1``, its 1×1×1 "quant" conv). Widths ``base·[1] + base·mults``; level i has
    ``num_res_blocks`` ResBlocks, then (except the last) a Downsample, temporal where asked.
    ``residual``: each level is a `ResidualDownStage` (Wan 2.2)."""

    def __init__(self, in_channels: int, base: int, mults: Sequence[int], num_res_blocks: int,
                 temporal: Sequence[bool], z_dim: int, attention: bool, residual: bool = False) -> None:
        super().__init__()
        dims = [base * m for m in [1, *mults]]
        self.conv_in = CausalConv3d(in_channels, dims[0], 3)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(mults) - 1
            if residual:  # one stage module per level (Wan 2.2)
                layers.append(ResidualDownStage(in_dim, out_dim, num_res_blocks, not last, not last and temporal[i]))
                continue
            for _ in range(num_res_blocks):
                layers.append(ResBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(mults) - 1:
                layers.append(Downsample(out_dim, temporal[i]))
        self.down = nn.ModuleList(layers)
        self.mid = MidBlock(dims[-1], attention)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * z_dim, 3)
        self.quant = CausalConv3d(2 * z_dim, 2 * z_dim, 1)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        x = self.conv_in(x.contiguous(memory_format=_CHANNELS_LAST), cache)
        for layer in self.down:
            x = layer(x, cache)
        x = self.mid(x, cache)
        return self.quant(self.conv_out(self.norm_out.silu(x), cache))


class Decoder3d(nn.Module):
    """raw latents (B, z_dim, T', H', W') -> video (B, out_channels, T, H, W) (Wan ``conv2``, the
    1×1×1 "post-quant" conv, then ``Decoder3d``). Widths mirror the encoder; level i has
    ``num_res_blocks + 1`` ResBlocks, then (except the last) an Upsample that halves the width, as
    in Wan 2.1. ``residual``: each level is a `ResidualUpStage` (Wan 2.2)."""

    def __init__(self, out_channels: int, base: int, mults: Sequence[int], num_res_blocks: int,
                 temporal: Sequence[bool], z_dim: int, attention: bool, residual: bool = False) -> None:
        super().__init__()
        dims = [base * m for m in [mults[-1], *mults[::-1]]]
        self.post_quant = CausalConv3d(z_dim, z_dim, 1)
        self.conv_in = CausalConv3d(z_dim, dims[0], 3)
        self.mid = MidBlock(dims[0], attention)
        layers: list[nn.Module] = []
        for i, out_dim in enumerate(dims[1:]):
            last = i == len(mults) - 1
            if residual:  # one stage module per level, the Upsample keeps the width (Wan 2.2)
                layers.append(ResidualUpStage(dims[i], out_dim, num_res_blocks, not last, not last and temporal[i]))
                continue
            in_dim = dims[i] if i == 0 else dims[i] // 2
            for _ in range(num_res_blocks + 1):
                layers.append(ResBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(mults) - 1:
                layers.append(Upsample(out_dim, out_dim // 2, temporal[i]))
        self.up = nn.ModuleList(layers)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], out_channels, 3)

    def forward(self, z: Tensor, cache: FeatureCache | None = None) -> Tensor:
        x = self.conv_in(self.post_quant(z.contiguous(memory_format=_CHANNELS_LAST)), cache)
        x = self.mid(x, cache)
        for layer in self.up:
            x = layer(x, cache)
        return self.conv_out(self.norm_out.silu(x), cache)


class CausalVAE3d(LatentAutoencoder):
    """Causal 3D VAE (Wan 2.1 architecture): video (B, 3, 1 + k·r_t, H, W) in [-1, 1] <-> raw latents
    (B, latent_channels, 1 + k, H / 2^(L−1), W / 2^(L−1)), with L = len(channel_mults) levels and
    ``r_t = 2^(number of True in temporal_downsample)``.

    ``chunked=True`` makes ``posterior`` / ``decode_raw`` run with a feature cache (encode: frame 0,
    then chunks of ``r_t`` frames; decode: one latent frame at a time): the same function, memory
    flat in video length. Both methods also take ``chunked=`` to override it per call.

    ``residual=True`` is Wan 2.2's VAE layout (diffusers' ``is_residual``): every level adds a
    parameter-free space-to-channel shortcut (`AverageDown` / `DuplicateUp`) around its ResBlocks
    and resampling, and decoder levels keep their width through the Upsample.

    ``compile=True`` runs every norm → SiLU pair through one torch.compile'd kernel (`RMSNorm.silu`):
    the same function, 1.3x faster training steps on CPU after a one-off 30-50 s compile; the
    convolutions and everything else stay eager.
    """

    causal = True

    def __init__(
        self,
        base_width: int = 96,
        channel_mults: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        temporal_downsample: Sequence[bool] = (False, True, True),
        latent_channels: int = 16,
        mid_attention: bool = True,
        in_channels: int = 3,
        chunked: bool = False,
        residual: bool = False,
        compile: bool = False,
    ) -> None:
        mults, temporal = list(channel_mults), [bool(t) for t in temporal_downsample]
        if len(temporal) != len(mults) - 1:
            raise ValueError(
                f"CausalVAE3d: temporal_downsample needs one flag per downsampling level "
                f"(len(channel_mults) − 1 = {len(mults) - 1}), got {len(temporal)}"
            )
        spatial = 2 ** (len(mults) - 1)
        super().__init__(latent_channels, (2 ** sum(temporal), spatial, spatial))
        self.in_channels, self.chunked = in_channels, chunked
        args = (base_width, mults, num_res_blocks)
        self.encoder = Encoder3d(in_channels, *args, temporal, latent_channels, mid_attention, residual)
        self.decoder = Decoder3d(in_channels, *args, temporal[::-1], latent_channels, mid_attention, residual)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.compiled = compile

    def moments(self, video: Tensor, chunked: bool | None = None) -> Tensor:
        """video (B, C, 1 + k·r_t, H, W) -> [mean, logvar] (B, 2·latent_channels, 1 + k, H', W')."""
        if video.dim() != 5 or video.shape[1] != self.in_channels:
            expected = f"(B, {self.in_channels}, T, H, W)"
            raise ValueError(f"CausalVAE3d: expected video {expected}, got {tuple(video.shape)}")
        self.latent_shape(*video.shape[2:])  # ValueError naming a wrong frame count or frame size
        if not (self.chunked if chunked is None else chunked):
            return self.encoder(video).contiguous()
        cache: FeatureCache = {}
        rt = self.compression[0]
        chunks = [video[:, :, :1]] + [video[:, :, i : i + rt] for i in range(1, video.shape[2], rt)]  # 1, r_t, r_t…
        return torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2).contiguous()

    def posterior(self, video: Tensor, chunked: bool | None = None) -> DiagonalGaussian:
        """video (B, 3, 1 + k·r_t, H, W) -> q(z | video) over raw latents (B, C, 1 + k, H', W')."""
        mean, logvar = self.moments(video, chunked).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode_raw(self, z: Tensor, chunked: bool | None = None) -> Tensor:
        """raw latents (B, C, 1 + k, H', W') -> video (B, 3, 1 + k·r_t, H'·r_s, W'·r_s), unclamped."""
        if z.dim() != 5 or z.shape[1] != self.latent_channels or z.shape[2] < 1:
            expected = f"(B, {self.latent_channels}, T' >= 1, H', W')"
            raise ValueError(f"CausalVAE3d: expected latents {expected}, got {tuple(z.shape)}")
        if not (self.chunked if chunked is None else chunked):
            return self.decoder(z).contiguous()
        cache: FeatureCache = {}
        return torch.cat([self.decoder(frame, cache) for frame in z.split(1, dim=2)], dim=2).contiguous()
