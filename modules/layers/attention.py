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


def _as_pairs(x: Tensor, heads: int) -> Tensor:
    """Complex view (..., heads, d/2) of a real (..., D) tensor whose last dim is contiguous."""
    return torch.view_as_complex(x.unflatten(-1, (heads, -1, 2)))


class _QKVNormRope(torch.autograd.Function):
    """qkv (B, n_win, S, 3·D) -> q, k (B, n_win, S, D) with QK-norm and RoPE, and v (a view of qkv).

    Queries and keys are handled as one (2, ..., D) tensor, and the row scale r = 1/√(mean(x²) + ε)
    is folded into the rotation (both act per row and pair): with u = w ⊙ x,

        y = R·(r·u) = (r·e^{iθ}) ⊙ u   (complex pairs; R = rotation by θ)
        h = r·Rᵀg,  ∂L/∂w = Σ_rows h ⊙ x,  ∂L/∂x = w ⊙ h − x·r²·(h ⊙ x)·w / D

    (the RMSNorm backward of `modules.layers.norms` with ĝ = Rᵀg). The forward writes q and k in
    two passes (x·w, then one complex multiply) after the norm's reduction; the backward writes
    ∂L/∂q, ∂L/∂k and ∂L/∂v straight into one (B, n_win, S, 3·D) gradient of qkv, so the `unbind`
    of qkv needs no concatenation in the backward.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, wq: Tensor, wk: Tensor, eps: float, freqs: Tensor | None, heads: int):
        D = qkv.shape[-1] // 3
        parts = qkv.unflatten(-1, (3, D))  # (B, n_win, S, 3, D)
        x = parts[..., :2, :].movedim(-2, 0)  # (2, B, n_win, S, D), q and k
        w = torch.stack([wq, wk])[:, None, None, None, :]  # (2, 1, 1, 1, D)
        work = torch.promote_types(x.dtype, torch.float32)
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=work).square_().div_(D).add_(eps).rsqrt_()
        r = r.to(x.dtype)  # (2, B, n_win, S, 1)
        y = x * w  # (2, B, n_win, S, D)
        if freqs is not None:
            _as_pairs(y, heads).mul_(r[..., None] * freqs)  # r·e^{iθ}: (2, B, n_win, S, 1, d/2)
        else:
            y.mul_(r)
        ctx.save_for_backward(qkv, w, r, freqs)
        ctx.heads = heads
        return y[0], y[1], parts[..., 2, :]

    @staticmethod
    def backward(ctx, grad_q: Tensor | None, grad_k: Tensor | None, grad_v: Tensor | None):
        qkv, w, r, freqs = ctx.saved_tensors
        heads, D = ctx.heads, qkv.shape[-1] // 3
        x = qkv.unflatten(-1, (3, D))  # (B, n_win, S, 3, D)
        grad = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)  # (B, n_win, S, 3·D)
        parts = grad.unflatten(-1, (3, D))  # (B, n_win, S, 3, D)
        grad_w = []
        for i, g in enumerate((grad_q, grad_k)):
            if g is None:
                parts[..., i, :].zero_()
                grad_w.append(None)
                continue
            if freqs is not None:  # h = r·Rᵀg, a fresh (B, n_win, S, D)
                g = g if g.stride(-1) == 1 and all(st % 2 == 0 for st in g.stride()[:-1]) else g.contiguous()
                h = torch.view_as_real(_as_pairs(g, heads) * (r[i, ..., None] * freqs.conj())).flatten(-3)
            else:
                h = g * r[i]
            t = h * x[..., i, :]  # h ⊙ x
            grad_w.append(t.reshape(-1, D).sum(0))  # (D,)
            dot = (t.view(-1, D) @ w[i].flatten()).view_as(r[i])  # Σ_d h·x·w: (B, n_win, S, 1)
            torch.mul(h, w[i], out=parts[..., i, :]).addcmul_(x[..., i, :], dot.mul_(r[i].square()).div_(D), value=-1)
        if grad_v is None:
            parts[..., 2, :].zero_()
        else:
            parts[..., 2, :].copy_(grad_v)
        return grad, grad_w[0], grad_w[1], None, None, None


def qkv_norm_rope(
    qkv: Tensor, q_norm: RMSNorm | None, k_norm: RMSNorm | None, freqs: Tensor | None, heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """qkv (B, n_win, S, 3·D) -> q, k, v each (B, n_win, S, heads, d): QK-norm (when the norms are
    given) then RoPE (when `freqs`, (n_win, S, 1, d/2)) on q and k; one autograd node in fp32/fp64
    with both norms (`_QKVNormRope`), else `qk_norm_rope` on each."""
    if (
        q_norm is not None
        and k_norm is not None
        and q_norm.weight is not None
        and k_norm.weight is not None
        and q_norm.eps == k_norm.eps
        and qkv.dtype in (torch.float32, torch.float64)
        and qkv.stride(-1) == 1
        and not torch.compiler.is_compiling()  # inductor fuses the plain form (and has no complex codegen)
    ):
        q, k, v = _QKVNormRope.apply(qkv, q_norm.weight, k_norm.weight, q_norm.eps, freqs, heads)
        return tuple(z.unflatten(-1, (heads, -1)) for z in (q, k, v))
    q, k, v = qkv.unflatten(-1, (3, -1)).unbind(-2)  # each (B, n_win, S, D)
    return qk_norm_rope(q, q_norm, freqs, heads), qk_norm_rope(k, k_norm, freqs, heads), v.unflatten(-1, (heads, -1))


def qk_norm_rope(x: Tensor, norm: RMSNorm | None, freqs: Tensor | None, heads: int) -> Tensor:
    """Queries or keys x (B, n_win, S, D) -> (B, n_win, S, heads, d): QK-norm (when `norm`) then
    RoPE (when `freqs`, shaped (n_win, S, 1, d/2)); one autograd node when both, in fp32/fp64."""
    if norm is not None and freqs is not None and x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling():
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
        qkv = self.qkv(x).unflatten(0, per_sample)  # (B, n_win, S, 3·D)
        q, k, v = (z.flatten(0, 1) for z in qkv_norm_rope(qkv, self.q_norm, self.k_norm, windows.freqs, h))  # (G, S, h, d)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=windows.mask
        )  # (G, h, S, d); the CPU kernel lays it out as (G, S, h, d), so the reshape below is a view
        out = window_merge(out.transpose(1, 2).reshape(G, S, D), windows.grid, windows.window)  # (B, N, D)
        return self.proj(out)


class CrossAttention(nn.Module):
    """Queries from x (B, N, D), keys/values from text (B, L, D_ctx) with a key mask.

    mask: (B, L) bool, True = valid token. Every row needs at least one valid token (the text
    encoders guarantee it), otherwise softmax over an empty set gives NaN.

    Short context (heads·L ≤ D / 2, on CPU): the output projection is applied to the values before
    the attention instead of after it, which is the same function by associativity:

        Σ_h (P_h·V_h)·W_hᵀ + b = [P_1 … P_heads]·[V_1·W_1ᵀ; …; V_heads·W_headsᵀ] + b

    with P_h (N, L) the attention weights of head h, V_h (L, d) its values and W_h (D, d) the
    columns of the projection that read head h. It costs 2·N·(heads·L)·D instead of 2·N·D·D
    multiply-adds per sample (a quarter for 6 heads × 16 text tokens at D = 384), and the scores
    and softmax are small (N, heads, L) tensors computed with plain matmuls instead of a flash kernel
    built for long keys. Measured on the DiT benchmark's (4, 320, 384) queries and 16 text tokens,
    CPU fp32, 2 threads: forward + backward 15.3 ms instead of 20.4 ms. Long contexts (Wan's 512
    T5 tokens) keep the projection after `F.scaled_dot_product_attention`.
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
        h, L = self.heads, context.shape[1]
        q = qk_norm_rope(self.q(x), self.q_norm, None, h)  # (B, N, h, d)
        k, v = self.kv(context).unflatten(-1, (2, D)).unbind(2)  # each (B, L, D)
        k, v = qk_norm_rope(k, self.k_norm, None, h), v.unflatten(-1, (h, -1))  # each (B, L, h, d)
        if x.device.type == "cpu" and 2 * h * L <= D:
            return self._project_values_first(q, k, v, mask)
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, L), broadcast over heads and queries
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
        )  # (B, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)

    def _project_values_first(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """q (B, N, h, d), k and v (B, L, h, d), mask (B, L) -> proj(attention) (B, N, D_out), with the
        projection moved onto the values (see the class docstring)."""
        B, N, h, d = q.shape
        L = k.shape[1]
        scores = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1) * d**-0.5)  # (B, h, N, L)
        attn = scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)  # (B, h, N, L)
        attn = attn.transpose(1, 2).reshape(B, N, h * L)  # (B, N, h·L), head-major columns
        D_out = self.proj.weight.shape[0]
        w = self.proj.weight.view(D_out, h, d).permute(1, 2, 0)  # (h, d, D_out): W_hᵀ
        vw = torch.bmm(v.permute(2, 0, 1, 3).reshape(h, B * L, d), w)  # (h, B·L, D_out): V_h·W_hᵀ
        vw = vw.view(h, B, L, D_out).transpose(0, 1).reshape(B, h * L, D_out)  # (B, h·L, D_out)
        if self.proj.bias is None:
            return torch.bmm(attn, vw)  # (B, N, D_out)
        return torch.baddbmm(self.proj.bias, attn, vw)  # (B, N, D_out)
