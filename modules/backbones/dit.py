"""DiT for video latents (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"),
with text cross-attention in each block as in PixArt-α and Wan.

(B, C, T, H, W) → patchify by (pt, ph, pw) → tokens (B, N, C·pt·ph·pw) → Linear → + 3D sin-cos
position embedding → `depth` blocks of [AdaLN-Zero self-attention, pre-norm text
cross-attention, AdaLN-Zero MLP] → AdaLN + Linear → unpatchify → (B, C_out, T, H, W).
At initialisation every block is the identity (gates and the cross-attention output are zero)
and the final layer outputs zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from modules.conditioning import Conditioning
from modules.layers.adaln import AdaLNZero, modulate
from modules.layers.attention import CrossAttention, SelfAttention
from modules.layers.embeddings import TimestepEmbedder, sincos_3d
from modules.layers.mlp import Mlp


def patchify(x: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """x (B, C, T, H, W) -> tokens (B, T'·H'·W', C·pt·ph·pw), T' = T / pt etc.

    Tokens are in row-major (t, h, w) order; each token's features are ordered (C, pt, ph, pw).
    """
    B, C, T, H, W = x.shape
    pt, ph, pw = patch
    if T % pt or H % ph or W % pw:
        raise ValueError(
            f"input (T, H, W) = ({T}, {H}, {W}) is not divisible by patch (pt, ph, pw) = {tuple(patch)}"
        )
    x = x.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw)  # (B, C, T', pt, H', ph, W', pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, T', H', W', C, pt, ph, pw)
    return x.reshape(B, (T // pt) * (H // ph) * (W // pw), C * pt * ph * pw)  # (B, N, P)


def unpatchify(tokens: Tensor, patch: tuple[int, int, int], grid: tuple[int, int, int], channels: int) -> Tensor:
    """Inverse of `patchify`: tokens (B, T'·H'·W', C·pt·ph·pw) -> (B, C, T'·pt, H'·ph, W'·pw)."""
    B = tokens.shape[0]
    pt, ph, pw = patch
    nt, nh, nw = grid
    x = tokens.reshape(B, nt, nh, nw, channels, pt, ph, pw)  # (B, T', H', W', C, pt, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, T', pt, H', ph, W', pw)
    return x.reshape(B, channels, nt * pt, nh * ph, nw * pw)  # (B, C, T, H, W)


class DiTBlock(nn.Module):
    """x ← x + g₁·SelfAttn(modulate(LN(x)));  x ← x + CrossAttn(LN(x), text);
    x ← x + g₂·MLP(modulate(LN(x))), with (shift, scale, g) from the timestep embedding c."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads, qk_norm)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, dim, heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN = AdaLNZero(dim, dim, 6)

    def forward(self, x: Tensor, c: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """x (B, N, D), c (B, D), text (B, L, D), text_mask (B, L) bool -> (B, N, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN(c)  # 6 × (B, D)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(self.norm_cross(x), text, text_mask)
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """x (B, N, D) -> AdaLN (shift, scale from c) -> Linear -> (B, N, patch_volume·C_out)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN = AdaLNZero(dim, dim, 2)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN(c)  # 2 × (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Video DiT denoiser; see the module docstring. Satisfies `modules.backbones.base.Denoiser`.

    forward(x (B, C, T, H, W), t (B,), cond) -> (B, out_channels, T, H, W).
    `t` arrives already scaled by the objective (e.g. t·1000); it is only embedded here.
    """

    def __init__(
        self,
        in_channels: int,
        text_dim: int,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        patch: list[int] | tuple = (1, 2, 2),
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        out_channels: int | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if len(patch) != 3:
            raise ValueError(f"patch must be (pt, ph, pw), got {patch}")
        self.in_channels = in_channels
        self.out_channels = out_channels if out_channels is not None else in_channels
        self.patch = tuple(int(p) for p in patch)
        self.dim = dim
        self.grad_checkpointing = grad_checkpointing
        patch_volume = self.patch[0] * self.patch[1] * self.patch[2]

        self.x_embedder = nn.Linear(in_channels * patch_volume, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.text_embedder = Mlp(text_dim, dim, dim)
        self.blocks = nn.ModuleList([DiTBlock(dim, heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.final_layer = FinalLayer(dim, patch_volume * self.out_channels)
        self.init_weights()

    def init_weights(self) -> None:
        """DiT initialisation: Xavier-uniform Linears with zero bias, N(0, 0.02) timestep MLP,
        zero AdaLN (every gate 0) and zero final Linear; plus a zero cross-attention output
        projection (PixArt-α) so that each block is exactly the identity at initialisation."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, AdaLNZero):
                module.reset_parameters()
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        B, _, T, H, W = x.shape
        if t.dim() == 0:
            t = t.expand(B)
        if t.dim() == 2:
            raise NotImplementedError(
                f"DiT takes one time per sample, t of shape (B,); got per-frame t {tuple(t.shape)}"
            )
        if t.shape != (B,):
            raise ValueError(f"t must have shape (B,) = ({B},), got {tuple(t.shape)}")
        pt, ph, pw = self.patch
        tokens = patchify(x, self.patch)  # (B, N, C·pt·ph·pw), raises on indivisible sizes
        grid = (T // pt, H // ph, W // pw)
        pos = sincos_3d(grid, self.dim, device=x.device).to(tokens.dtype)  # (N, D)
        h = self.x_embedder(tokens) + pos[None]  # (B, N, D)
        c = self.t_embedder(t)  # (B, D)
        text = self.text_embedder(cond.tokens)  # (B, L, D)
        mask = cond.mask
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, c, text, mask, use_reentrant=False)
            else:
                h = block(h, c, text, mask)
        out = self.final_layer(h, c)  # (B, N, pt·ph·pw·C_out)
        return unpatchify(out, self.patch, grid, self.out_channels)  # (B, C_out, T, H, W)
