"""Self-attention over a (T', H', W') token grid in three layouts, and text cross-attention; both
through `F.scaled_dot_product_attention` (SDPA) with a fused QKV projection.

Layouts (config string -> the self-attention sublayers of one block):

- `full`: one sublayer, every token attends to all T'·H'·W' tokens (DiT, Wan).
- `factorized`: two sublayers, each with its own weights and its own residual: temporal attention
  over the T' tokens at each spatial location, then spatial attention over the H'·W' tokens of each
  frame (divided space-time attention of TimeSformer, Bertasius et al. 2021; Latte variant 3).
- `window`: one sublayer, attention inside non-overlapping local 3D windows of (wt, wh, ww) tokens
  (Swin, Liu et al. 2021, without the shifted windows; Video Swin in 3D). A window larger than the
  grid is clamped to it; a grid not divisible by the window is zero-padded at the far end of each
  axis and the padded keys are masked out (padded queries are computed and dropped).

Every layout is the same operation on a different grouping: tokens are cut into windows
(full = one window, temporal = (T', 1, 1), spatial = (1, H', W')), attended within each window, and
put back. 3D RoPE is applied to queries and keys with each token's own (t, h, w) position.
QK-norm (Dehghani et al. 2023, ViT-22B), which keeps attention logits bounded when training at scale:
RMSNorm over all D channels of the queries (and of the keys) before the heads are split, as Wan and
diffusers' `rms_norm_across_heads` do (SD3 and Flux normalise each head separately).

For speed on CPU, QK-norm and RoPE run as one autograd node (`_QKNormRope`): the rotation needs
nothing saved (its backward rotates back by the conjugate), so the normalised tensor is rotated in
place and the pair allocates one tensor in the forward instead of three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.layers.norms import RMSNorm, rms_norm_backward, rms_norm_forward
from modules.layers.rope import apply_rope, grid_positions, rope_frequencies, rotate_

Grid = tuple[int, int, int]

# config string -> kinds of its self-attention sublayers, applied in this order within a block
LAYOUTS: dict[str, tuple[str, ...]] = {
    "full": ("full",),
    "factorized": ("temporal", "spatial"),
    "window": ("window",),
}

# sublayer kind -> its window (wt, wh, ww) for a (T', H', W') grid and the configured window size
WINDOWS = {
    "full": lambda grid, window: grid,
    "temporal": lambda grid, window: (grid[0], 1, 1),
    "spatial": lambda grid, window: (1, grid[1], grid[2]),
    "window": lambda grid, window: tuple(min(int(w), g) for w, g in zip(window, grid)),
}


def padded_grid(grid: Grid, window: Grid) -> Grid:
    """The grid rounded up to a whole number of windows on every axis."""
    return tuple(-(-g // w) * w for g, w in zip(grid, window))


def window_count(grid: Grid, window: Grid) -> tuple[int, int]:
    """(windows per sample, tokens per window) of the padded grid."""
    n_windows = 1
    for g, w in zip(padded_grid(grid, window), window):
        n_windows *= g // w
    return n_windows, window[0] * window[1] * window[2]


def window_partition(x: Tensor, grid: Grid, window: Grid) -> Tensor:
    """Tokens (B, T'·H'·W', C) in (t, h, w) order -> windows (B·n_windows, wt·wh·ww, C).

    Windows are ordered (batch, t, h, w) and tokens inside a window (t, h, w). Axes not divisible
    by the window are zero-padded at the end. A window that spans whole trailing axes (full,
    spatial) costs no copy.
    """
    B, _, C = x.shape
    (nt, nh, nw), (wt, wh, ww) = grid, window
    pt, ph, pw = padded_grid(grid, window)
    x = x.view(B, nt, nh, nw, C)  # (B, T', H', W', C)
    if (pt, ph, pw) != grid:
        x = F.pad(x, (0, 0, 0, pw - nw, 0, ph - nh, 0, pt - nt))  # (B, pt, ph, pw, C)
    x = x.view(B, pt // wt, wt, ph // wh, wh, pw // ww, ww, C)  # (B, nT, wt, nH, wh, nW, ww, C)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)  # (B, nT, nH, nW, wt, wh, ww, C)
    return x.reshape(-1, wt * wh * ww, C)  # (B·n_windows, S, C)


def window_merge(x: Tensor, grid: Grid, window: Grid) -> Tensor:
    """Inverse of `window_partition`: (B·n_windows, wt·wh·ww, C) -> (B, T'·H'·W', C), padding cropped."""
    (nt, nh, nw), (wt, wh, ww) = grid, window
    pt, ph, pw = padded_grid(grid, window)
    C = x.shape[-1]
    x = x.view(-1, pt // wt, ph // wh, pw // ww, wt, wh, ww, C)  # (B, nT, nH, nW, wt, wh, ww, C)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7)  # (B, nT, wt, nH, wh, nW, ww, C)
    x = x.reshape(-1, pt, ph, pw, C)  # (B, pt, ph, pw, C)
    if (pt, ph, pw) != grid:
        x = x[:, :nt, :nh, :nw]  # (B, T', H', W', C)
    return x.reshape(-1, nt * nh * nw, C)  # (B, N, C)


@dataclass
class TokenWindows:
    """How one self-attention sublayer groups the token grid, built once per forward and shared by
    every block: the window, RoPE rotations of the tokens in window order (n_windows, S, 1, d/2)
    complex or None, and the key mask (B·n_windows, 1, 1, S) bool (True = real token) or None when
    nothing is padded."""

    grid: Grid
    window: Grid
    freqs: Tensor | None
    mask: Tensor | None

    @classmethod
    def build(
        cls,
        kind: str,
        grid: Grid,
        batch: int,
        head_dim: int,
        window: Grid | None = None,
        rope: bool = True,
        rope_theta: float = 10000.0,
        t_offset: int = 0,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> TokenWindows:
        """`kind` is a sublayer kind of `LAYOUTS`; `window` is only read for kind 'window';
        `dtype` float64 gives float64 RoPE angles (complex128)."""
        win = WINDOWS[kind](grid, window)
        freqs = mask = None
        if rope:
            pos = window_partition(grid_positions(grid, t_offset, device)[None], grid, win)  # (n_win, S, 3)
            freqs = rope_frequencies(pos, head_dim, rope_theta, torch.promote_types(dtype, torch.float32))
            freqs = freqs[:, :, None]  # (n_win, S, 1, d/2), broadcast over heads
        if padded_grid(grid, win) != grid:
            valid = torch.ones(1, grid[0] * grid[1] * grid[2], 1, dtype=torch.bool, device=device)
            valid = window_partition(valid, grid, win)[..., 0]  # (n_win, S)
            mask = valid.repeat(batch, 1)[:, None, None, :]  # (B·n_win, 1, 1, S)
        return cls(grid, win, freqs, mask)


class _QKNormRope(torch.autograd.Function):
    """x (B, n_win, S, D) -> RMSNorm over D (weight w), then RoPE per head of size D / heads."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, freqs: Tensor, heads: int) -> Tensor:
        y, r = rms_norm_forward(x, weight, eps)  # (B, n_win, S, D)
        rotate_(y.unflatten(-1, (heads, -1)), freqs)  # freqs (n_win, S, 1, d/2)
        ctx.save_for_backward(x, r, weight, freqs)
        ctx.heads = heads
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None, None]:
        x, r, weight, freqs = ctx.saved_tensors
        grad = apply_rope(grad.unflatten(-1, (ctx.heads, -1)), freqs.conj()).flatten(-2)  # rotate back
        grad_x, grad_w = rms_norm_backward(grad, x, r, weight, grad_is_scratch=True)
        return grad_x, grad_w, None, None, None


def qk_norm_rope(x: Tensor, norm: RMSNorm | None, freqs: Tensor | None, heads: int) -> Tensor:
    """Queries or keys x (B, n_win, S, D) -> (B, n_win, S, heads, d): QK-norm (when `norm`) then
    RoPE (when `freqs`, shaped (n_win, S, 1, d/2)); one autograd node when both, in fp32/fp64."""
    if norm is not None and freqs is not None and x.dtype in (torch.float32, torch.float64):
        return _QKNormRope.apply(x, norm.weight, norm.eps, freqs, heads).unflatten(-1, (heads, -1))
    x = (norm(x) if norm is not None else x).unflatten(-1, (heads, -1))  # (B, n_win, S, h, d)
    return apply_rope(x, freqs) if freqs is not None else x


class SelfAttention(nn.Module):
    """x (B, N, D) -> (B, N, D): softmax(q·kᵀ / √d_head)·v inside the windows of `windows`, with
    QK-norm and 3D RoPE on q and k."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = True, bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.q_norm = RMSNorm(dim) if qk_norm else None
        self.k_norm = RMSNorm(dim) if qk_norm else None
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor, windows: TokenWindows) -> Tensor:
        B, N, D = x.shape
        h = self.heads
        x = window_partition(x, windows.grid, windows.window)  # (G, S, D), G = B·n_win
        G, S, _ = x.shape
        per_sample = (B, window_count(windows.grid, windows.window)[0])  # RoPE broadcasts over the batch
        q, k, v = self.qkv(x).view(G, S, 3, D).unflatten(0, per_sample).unbind(3)  # each (B, n_win, S, D)
        q = qk_norm_rope(q, self.q_norm, windows.freqs, h).flatten(0, 1)  # (G, S, h, d)
        k = qk_norm_rope(k, self.k_norm, windows.freqs, h).flatten(0, 1)  # (G, S, h, d)
        v = v.flatten(0, 1).unflatten(-1, (h, -1))  # (G, S, h, d)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=windows.mask
        )  # (G, h, S, d); the CPU kernel lays it out as (G, S, h, d), so the reshape below is a view
        out = window_merge(out.transpose(1, 2).reshape(G, S, D), windows.grid, windows.window)  # (B, N, D)
        return self.proj(out)


class CrossAttention(nn.Module):
    """Queries from x (B, N, D), keys/values from text (B, L, D_ctx) with a key mask.

    mask: (B, L) bool, True = valid token. Every row needs at least one valid token (the text
    encoders guarantee it), otherwise softmax over an empty set gives NaN.
    """

    def __init__(self, dim: int, context_dim: int, heads: int, qk_norm: bool = True, bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=bias)
        self.q_norm = RMSNorm(dim) if qk_norm else None
        self.k_norm = RMSNorm(dim) if qk_norm else None
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        B, N, D = x.shape
        h = self.heads
        q = qk_norm_rope(self.q(x), self.q_norm, None, h)  # (B, N, h, d)
        k, v = self.kv(context).unflatten(-1, (2, D)).unbind(2)  # each (B, L, D)
        k, v = qk_norm_rope(k, self.k_norm, None, h), v.unflatten(-1, (h, -1))  # each (B, L, h, d)
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, L), broadcast over heads and queries
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
        )  # (B, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)
