"""Block-causal self-attention over frames, with a key/value cache for frame-by-frame generation.

Tokens are grouped by frame ((t, h, w) row-major order, S = H'·W' tokens per frame) and frames by
chunk of `chunk` frames. A query in chunk c attends to every key of chunks ≤ c (bidirectional inside
its chunk, causal across chunks: the block-causal mask of CausVid, Yin et al. 2024, and of
diffusion forcing with chunks, Chen et al. 2024), optionally only to the `context` frames before its
chunk's first frame (a sliding window). Generation runs one chunk at a time: the keys and values of
earlier frames come from `KVCache` instead of being recomputed, and a sliding window bounds the
cache, so rollouts can run longer than the training clip.

With RoPE, the attention score of a query and a key depends only on their position difference
(RoFormer eq. 16), so absolute frame indices can keep growing past the training length without
re-rotating cached keys: a window of `context` frames sees the same relative positions at frame 100
as at frame 10. Cached generation therefore computes exactly what a full forward over all frames
with the windowed block-causal mask computes (`frame_causal_mask`).

QK-norm and RoPE go through `modules.layers.attention.qk_norm_rope`, as in every other attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.layers.attention import qk_norm_rope
from modules.layers.norms import RMSNorm


def frame_causal_mask(
    frames: int, tokens_per_frame: int, chunk: int = 1, context: int | None = None, device: torch.device | None = None
) -> Tensor:
    """(N, N) bool, N = frames·tokens_per_frame, True where query token i may attend to key token j:
    the key's chunk is not later than the query's, and (with `context`) the key's frame is at most
    `context` frames before the first frame of the query's chunk."""
    f = torch.arange(frames, device=device)
    first = (f // chunk) * chunk  # (T,) first frame of each frame's chunk
    allowed = f[None, :] < first[:, None] + chunk  # key chunk ≤ query chunk, (T_q, T_k)
    if context is not None:
        allowed &= f[None, :] >= first[:, None] - context
    return allowed.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)  # (N, N)


@dataclass
class KVCache:
    """Keys and values of the frames generated so far, one entry per attention layer, after QK-norm
    and RoPE. `next_frame` is the absolute index (RoPE time position) of the next frame to generate;
    with `max_frames`, only the last `max_frames` frames are kept (a sliding window), so memory stays
    bounded on long rollouts.

    Storage: per layer a (B, heads, capacity, d) buffer for keys and one for values, holding
    `lengths[layer]` tokens. `extend` writes a chunk's keys and values right after the held tokens and
    returns views of held + chunk for the attention, so a denoising step costs a write of the chunk
    instead of a concatenation that copies the whole cache (which made every step's cost grow with
    the rollout's length: 7.5 % of a 10-frame rollout of the benchmark model). `commit` keeps the
    last written chunk. Capacity grows geometrically without a window; with one it is window + chunk.
    """

    max_frames: int | None = None
    keys: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B, heads, capacity, d) buffer
    values: dict[int, Tensor] = field(default_factory=dict)
    lengths: dict[int, int] = field(default_factory=dict)  # layer -> tokens held
    next_frame: int = 0

    def get(self, layer: int) -> tuple[Tensor | None, Tensor | None]:
        """The held keys and values of `layer`, views (B, heads, length, d), or (None, None)."""
        n = self.lengths.get(layer, 0)
        if not n:
            return None, None
        return self.keys[layer][:, :, :n], self.values[layer][:, :, :n]

    def extend(self, layer: int, k: Tensor, v: Tensor, tokens_per_frame: int) -> tuple[Tensor, Tensor]:
        """Write one chunk's k, v (B, heads, n, d) after the held tokens (not yet kept: see `commit`)
        and return held + chunk as views (B, heads, length + n, d)."""
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            raise RuntimeError("KVCache is written in place for generation: run cached forwards under torch.no_grad()")
        held, n = self.lengths.get(layer, 0), k.shape[2]
        buf = self.keys.get(layer)
        if buf is not None and (buf.shape[:2] != k.shape[:2] or buf.shape[3] != k.shape[3]):
            raise ValueError(f"a chunk's keys {tuple(k.shape)} do not match the cache's {tuple(buf.shape)}")
        if buf is None or buf.shape[2] < held + n:
            if self.max_frames is not None:
                capacity = self.max_frames * tokens_per_frame + n
            else:
                capacity = max(held + n, 2 * (buf.shape[2] if buf is not None else n))
            shape = (*k.shape[:2], capacity, k.shape[3])
            new_k, new_v = k.new_empty(shape), v.new_empty(shape)
            if held:
                new_k[:, :, :held], new_v[:, :, :held] = self.get(layer)
            self.keys[layer], self.values[layer] = new_k, new_v
        self.keys[layer][:, :, held : held + n] = k
        self.values[layer][:, :, held : held + n] = v
        return self.keys[layer][:, :, : held + n], self.values[layer][:, :, : held + n]

    def commit(self, layer: int, n: int, tokens_per_frame: int) -> None:
        """Keep the `n` tokens the last `extend` wrote, then drop frames beyond the window."""
        total = self.lengths.get(layer, 0) + n
        if self.max_frames is not None and total > self.max_frames * tokens_per_frame:
            keep = self.max_frames * tokens_per_frame
            for buf in (self.keys[layer], self.values[layer]):
                buf[:, :, :keep] = buf[:, :, total - keep : total].clone()  # the regions may overlap
            total = keep
        self.lengths[layer] = total

    def frames(self, tokens_per_frame: int) -> int:
        """Frames held now (the same for every layer)."""
        return next(iter(self.lengths.values()), 0) // tokens_per_frame


class FrameCausalAttention(nn.Module):
    """x (B, N, D) -> (B, N, D): softmax(q·kᵀ / √d)·v under a block-causal mask, QK-norm, 3D RoPE.

    Training / full recomputation: ``forward(x, freqs, mask)`` with the (N, N) mask of
    `frame_causal_mask`. Generation: ``forward(x, freqs, None, cache, layer, commit)`` where x is
    one chunk following the cached frames; its queries see every cached key and every key of the
    chunk (the cache already holds only the window), and ``commit=True`` appends the chunk's keys
    and values to the cache.
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool = True, bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.q_norm = RMSNorm(dim) if qk_norm else None
        self.k_norm = RMSNorm(dim) if qk_norm else None
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(
        self,
        x: Tensor,
        freqs: Tensor | None,
        mask: Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
        commit: bool = False,
        tokens_per_frame: int = 1,
    ) -> Tensor:
        """freqs (1, N, 1, d/2) complex RoPE rotations of x's tokens or None; mask (N, N) bool or
        None (all keys visible)."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, 1, N, 3, D).unbind(3)  # each (B, 1, N, D), one "window"
        q = qk_norm_rope(q, self.q_norm, freqs, self.heads)[:, 0].transpose(1, 2)  # (B, h, N, d)
        k = qk_norm_rope(k, self.k_norm, freqs, self.heads)[:, 0].transpose(1, 2)  # (B, h, N, d)
        v = v[:, 0].unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, h, N, d)
        if cache is not None:
            k, v = cache.extend(layer, k, v, tokens_per_frame)  # (B, h, M + N, d): held frames, then x's
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, d)
        if cache is not None and commit:
            cache.commit(layer, N, tokens_per_frame)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))
