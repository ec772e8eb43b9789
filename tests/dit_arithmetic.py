"""Hand arithmetic of `modules.backbones.dit.DiT` (the layout of its module docstring), written out
layer by layer so tests can hold the model card and the FLOP counter to it. Update these two
functions together with any change of the DiT's layers.

Notation: C in/out channels, P = pt·ph·pw, D dim, F = round(D·mlp_ratio) MLP hidden, D_t text width,
d = D / heads, N tokens per sample, L text tokens, 256 the sinusoidal timestep features.
"""

from __future__ import annotations

import math


def linear(fan_in: int, fan_out: int) -> int:
    """Parameters of nn.Linear with bias: weight + bias."""
    return fan_in * fan_out + fan_out


def dit_parameters(
    in_channels: int, text_dim: int, dim: int, depth: int, heads: int, patch: tuple[int, int, int],
    mlp_ratio: float = 4.0, qk_norm: bool = True,
) -> int:
    """Full attention, GELU MLP: x_embedder, t_embedder (256 → D → D), the shared AdaLN projection
    (D → 6·D, Wan), text_embedder (D_t → D → D), `depth` blocks, final layer."""
    C, P, D, F, d = in_channels, math.prod(patch), dim, round(dim * mlp_ratio), dim // heads
    qk = 2 * D if qk_norm else 0  # RMSNorm weights on all D channels of the queries and keys (Wan)
    block = (
        linear(D, 3 * D) + qk + linear(D, D)  # self-attention: fused qkv, QK-norm, output projection
        + 2 * D  # norm_cross: LayerNorm with weight and bias (norm1, norm2 have none)
        + linear(D, D) + linear(D, 2 * D) + qk + linear(D, D)  # cross-attention: q, kv, QK-norm, proj
        + linear(D, F) + linear(F, D)  # MLP
        + 6 * D  # the block's own modulation table (6, D), added to the shared projection
    )
    return (
        linear(C * P, D)  # x_embedder
        + linear(256, D) + linear(D, D)  # t_embedder
        + linear(D, 6 * D)  # shared AdaLN projection: shift, scale, gate for attention and MLP
        + linear(text_dim, D) + linear(D, D)  # text_embedder
        + depth * block
        + linear(D, P * C) + 2 * D  # final layer: Linear and its (shift, scale) table added to c (Wan)
    )


def dit_forward_flops(
    x_shape: tuple[int, int, int, int, int], text_len: int, text_dim: int, dim: int, depth: int,
    patch: tuple[int, int, int], mlp_ratio: float = 4.0,
) -> int:
    """Full attention, GELU MLP. Matmul FLOPs (2 per multiply-add) of one forward: every Linear,
    plus attention QKᵀ and AV = 2·2·N·M·D for N queries over M keys (over all heads)."""
    B, C, T, H, W = x_shape
    pt, ph, pw = patch
    N, L, D, F, P = (T // pt) * (H // ph) * (W // pw), text_len, dim, round(dim * mlp_ratio), pt * ph * pw

    def mm(rows: int, fan_in: int, fan_out: int) -> int:
        return 2 * rows * fan_in * fan_out

    block = (
        mm(B * N, D, 3 * D) + 4 * B * N * N * D + mm(B * N, D, D)  # self-attention
        + mm(B * N, D, D) + mm(B * L, D, 2 * D) + 4 * B * N * L * D + mm(B * N, D, D)  # cross-attention
        + mm(B * N, D, F) + mm(B * N, F, D)  # MLP
    )
    return (
        mm(B * N, C * P, D)  # x_embedder
        + mm(B, 256, D) + mm(B, D, D)  # t_embedder
        + mm(B, D, 6 * D)  # shared AdaLN projection
        + mm(B * L, text_dim, D) + mm(B * L, D, D)  # text_embedder
        + depth * block
        + mm(B * N, D, P * C)  # final layer (its shift and scale are a table plus c: no matmul)
    )
