"""3D rotary position embedding (RoPE, Su et al. 2021 "RoFormer", eq. 34) for a (T', H', W')
token grid, with one frequency band per axis as in Wan 2.1 (`rope_apply`) and Movie Gen (§3.1.2).

Band split of a head of `head_dim` = d channels (each band is even: channels rotate in pairs):

    d_h = d_w = 2·(d // 6),   d_t = d − d_h − d_w         d = 64 → (24, 20, 20); d = 128 → (44, 42, 42)

Channels are paired as Wan pairs them, adjacent and interleaved: pair j is channels (2j, 2j+1), the
first d_t/2 pairs rotate with the time index, the next d_h/2 with the row, the last d_w/2 with the
column. Within a band of size d_b, pair i rotates by the angle pos·θ^(−2i/d_b) (θ = 10000).

As a complex number z_j = x_{2j} + i·x_{2j+1}, the rotation is z_j·e^{i·pos·ω_j}: one complex
multiplication per pair, which is a rotation (norm preserving), and (R_p q)·(R_k k) depends on
p − k only (RoFormer eq. 16), on every axis separately.

Positions are the integer grid indices, time starting at `t_offset` (a frame-autoregressive model
generating frame k uses `t_offset = k`). Frequencies are computed on the fly for any grid size.
"""

from __future__ import annotations

import torch
from torch import Tensor


def axis_bands(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (d_t, d_h, d_w) of one head: h and w get 2·(d // 6), t the remainder."""
    if head_dim % 2:
        raise ValueError(f"3D RoPE rotates channel pairs and needs an even head_dim, got {head_dim}")
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def grid_positions(grid: tuple[int, int, int], t_offset: int = 0, device: torch.device | None = None) -> Tensor:
    """Integer (t, h, w) coordinates of a (T', H', W') grid in row-major (t, h, w) token order, the
    order of `modules.backbones.dit.patchify`. Returns (T'·H'·W', 3) int64; t starts at `t_offset`."""
    nt, nh, nw = grid
    axes = [torch.arange(n, device=device) for n in (nt, nh, nw)]
    axes[0] = axes[0] + t_offset
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (N, 3)


def rope_frequencies(
    positions: Tensor, head_dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Unit complex rotations e^{i·pos·ω} of every channel pair for tokens at `positions`.

    positions: (..., 3) (t, h, w) coordinates (any leading shape, e.g. (N, 3) or windows (G, S, 3)).
    Returns (..., head_dim // 2) complex (complex64 for float32 `dtype`, complex128 for float64):
    pairs [0, d_t/2) use t, [d_t/2, (d_t+d_h)/2) use h, the rest use w; ω_i = θ^(−2i/d_b) in each band.
    """
    omegas = [
        theta ** (-torch.arange(0, band, 2, dtype=dtype, device=positions.device) / band)  # (band/2,)
        for band in axis_bands(head_dim)
    ]
    pos = positions.to(dtype)
    angles = torch.cat([pos[..., axis, None] * omega for axis, omega in enumerate(omegas)], dim=-1)  # (..., d/2)
    return torch.polar(torch.ones_like(angles), angles)  # (..., d/2) complex


def rotate_(x: Tensor, freqs: Tensor) -> Tensor:
    """In place and outside autograd: `x = apply_rope(x, freqs)` for a float32/float64 x whose last
    dim is contiguous. Its backward is the rotation by `freqs.conj()`, which needs nothing saved."""
    torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(freqs)  # (..., d/2) complex view of x
    return x


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate channel pairs (2j, 2j+1) of x by `freqs` (RoFormer eq. 34 in complex form).

    x: (..., d) real, e.g. queries (B, heads, N, d) with freqs (N, d/2), or (B, N, heads, d) with
    freqs (N, 1, d/2): freqs broadcasts against x's shape with the last dim halved.
    Half-precision inputs are rotated in float32 and cast back. Returns a tensor shaped like x.
    Under `torch.compile` the same rotation is written with cos and sin, which inductor can fuse.
    """
    work = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 -> fp32, fp32 and fp64 stay
    pairs = x.to(work).unflatten(-1, (-1, 2))  # (..., d/2, 2)
    if torch.compiler.is_compiling():  # inductor generates no code for complex tensors: real form
        cos, sin = torch.view_as_real(freqs).unbind(-1)  # (..., d/2) each
        a, b = pairs.unbind(-1)  # (..., d/2) each
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)  # (..., d)
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(s % 2 for s in pairs.stride()[:-1]):
        pairs = pairs.contiguous()  # view_as_complex needs whole complex numbers in memory
    return torch.view_as_real(torch.view_as_complex(pairs) * freqs).flatten(-2).to(x.dtype)  # (..., d)
