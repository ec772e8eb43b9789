"""Wan-style DiT for video latents (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"; Wan 2.1 §3.1), with text cross-attention in each block as in PixArt-α and Wan.

(B, C, T, H, W) → patchify by (pt, ph, pw) (Wan: (1, 2, 2)) → tokens (B, N, C·pt·ph·pw) → Linear →
`depth` blocks → AdaLN + Linear → unpatchify → (B, C_out, T, H, W). One block:

    x ← x + g_i·SelfAttn_i(modulate(LN(x), shift_i, scale_i))   for each self-attention sublayer i
    x ← x + CrossAttn(LN(x), text, mask)
    x ← x + g·MLP(modulate(LN(x), shift, scale))

Self-attention layout is `full`, `factorized` (two sublayers: temporal then spatial) or `window`
(local 3D windows), see `modules.layers.attention`; queries and keys get QK-norm (RMSNorm) and 3D
RoPE (`modules.layers.rope`), computed once per forward and shared by all blocks. RoPE replaces the
absolute sin-cos position embedding (as in Wan); `abs_pos=True` adds the latter as well.

AdaLN as in Wan: one projection of the timestep embedding, SiLU → Linear(D, 3·(n_self + 1)·D), is
shared by all blocks, and each block adds its own learned table (3·(n_self + 1), D) to it; the final
layer's (shift, scale) are its own table plus the timestep embedding. Projection and tables start at
zero (AdaLN-Zero): every gate is 0 and, with the cross-attention output projection zero (PixArt-α),
every block is exactly the identity at initialisation; the final Linear is zero, so is the output.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from modules.conditioning import Conditioning
from modules.layers.adaln import AdaLNZero, layer_norm_modulate, modulate
from modules.layers.attention import LAYOUTS, WINDOWS, CrossAttention, SelfAttention, TokenWindows, window_count
from modules.layers.embeddings import TimestepEmbedder, sincos_3d
from modules.layers.mlp import Mlp, SwiGLU

# feed-forward choices: DiT / Wan's GELU-tanh MLP, the exact-GELU MLP, SwiGLU (LLaMA, Movie Gen)
MLPS = {"gelu_tanh": Mlp, "gelu": partial(Mlp, approximate="none"), "swiglu": SwiGLU}


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
    """AdaLN-Zero self-attention sublayer(s), pre-norm text cross-attention, AdaLN-Zero MLP; see the
    module docstring. `n_self` = 1 for full and window attention, 2 for factorized."""

    def __init__(
        self, dim: int, heads: int, mlp_hidden: int, qk_norm: bool = True, n_self: int = 1, mlp: str = "gelu_tanh"
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = nn.ModuleList([SelfAttention(dim, heads, qk_norm) for _ in range(n_self)])
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, dim, heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLPS[mlp](dim, mlp_hidden)
        self.modulation = nn.Parameter(torch.zeros(3 * (n_self + 1), dim))  # Wan's per-block table

    def forward(self, x: Tensor, e: Tensor, text: Tensor, text_mask: Tensor, windows: list[TokenWindows]) -> Tensor:
        """x (B, N, D); e (B, 3·(n_self + 1), D) the shared AdaLN projection; text (B, L, D);
        text_mask (B, L) bool; windows: one `TokenWindows` per self-attention sublayer -> (B, N, D)."""
        mod = (e + self.modulation).unbind(1)  # 3·(n_self + 1) × (B, D): (shift, scale, gate) per sublayer
        for i, (attn, win) in enumerate(zip(self.attn, windows)):
            shift, scale, gate = mod[3 * i : 3 * i + 3]
            x = torch.addcmul(x, gate[:, None], attn(layer_norm_modulate(x, shift, scale, self.norm1.eps), win))
        x = x + self.cross_attn(self.norm_cross(x), text, text_mask)
        shift, scale, gate = mod[-3:]
        return torch.addcmul(x, gate[:, None], self.mlp(layer_norm_modulate(x, shift, scale, self.norm2.eps)))


class FinalLayer(nn.Module):
    """x (B, N, D) -> LN -> modulate by (shift, scale) = learned table + c (Wan's head) -> Linear
    -> (B, N, patch_volume·C_out); c (B, D) is the timestep embedding."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.modulation = nn.Parameter(torch.zeros(2, dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = (self.modulation + c[:, None]).unbind(1)  # 2 × (B, D)
        return self.linear(layer_norm_modulate(x, shift, scale, self.norm.eps))


def _linear_flops(module: nn.Module, rows: int) -> int:
    """2·rows·in·out summed over every nn.Linear in `module` (each applied once to `rows` rows)."""
    return sum(2 * rows * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


class DiT(nn.Module):
    """Video DiT denoiser; see the module docstring. Satisfies `modules.backbones.base.Denoiser`.

    forward(x (B, C, T, H, W), t (B,), cond) -> (B, out_channels, T, H, W).
    `t` arrives already scaled by the objective (e.g. t·1000); it is only embedded here.

    attention: 'full' | 'factorized' | 'window'; window: (wt, wh, ww) tokens, for 'window' only.
    mlp: 'gelu_tanh' (`Mlp`, as DiT and Wan) | 'gelu' (exact GELU) | 'swiglu' (`SwiGLU`), hidden
    width round(dim·mlp_ratio).
    rope: 3D RoPE on queries and keys (theta `rope_theta`); abs_pos: add the 3D sin-cos embedding.
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
        attention: str = "full",
        window: list[int] | tuple = (4, 8, 8),
        mlp: str = "gelu_tanh",
        rope: bool = True,
        rope_theta: float = 10000.0,
        abs_pos: bool = False,
    ) -> None:
        super().__init__()
        if len(patch) != 3:
            raise ValueError(f"patch must be (pt, ph, pw), got {patch}")
        if attention not in LAYOUTS:
            raise ValueError(f"attention must be one of {sorted(LAYOUTS)}, got {attention!r}")
        if mlp not in MLPS:
            raise ValueError(f"mlp must be one of {sorted(MLPS)}, got {mlp!r}")
        if len(window) != 3 or min(window) < 1:
            raise ValueError(f"window must be three positive sizes (wt, wh, ww), got {window}")
        if dim % heads or (rope and (dim // heads) % 2):
            raise ValueError(f"dim {dim} must split into {heads} heads (of even size with RoPE)")
        self.in_channels = in_channels
        self.out_channels = out_channels if out_channels is not None else in_channels
        self.patch = tuple(int(p) for p in patch)
        self.dim, self.heads = dim, heads
        self.attention, self.window = attention, tuple(int(w) for w in window)
        self.rope, self.rope_theta, self.abs_pos = rope, rope_theta, abs_pos
        self.grad_checkpointing = grad_checkpointing
        n_self = len(LAYOUTS[attention])
        patch_volume = self.patch[0] * self.patch[1] * self.patch[2]

        self.x_embedder = nn.Linear(in_channels * patch_volume, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.time_proj = AdaLNZero(dim, dim, 3 * (n_self + 1))  # shared by all blocks (Wan)
        self.text_embedder = Mlp(text_dim, dim, dim)
        self.blocks = nn.ModuleList(
            [DiTBlock(dim, heads, round(dim * mlp_ratio), qk_norm, n_self, mlp) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(dim, patch_volume * self.out_channels)
        self.init_weights()

    def init_weights(self) -> None:
        """DiT initialisation: Xavier-uniform Linears with zero bias, N(0, 0.02) timestep MLP,
        zero AdaLN projection and tables (every gate 0) and zero final Linear; plus a zero
        cross-attention output projection (PixArt-α) so that each block is exactly the identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, AdaLNZero):
                module.reset_parameters()
        for module in (*self.blocks, self.final_layer):
            nn.init.zeros_(module.modulation)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def token_windows(
        self,
        grid: tuple[int, int, int],
        batch: int,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        t_offset: int = 0,
    ) -> list[TokenWindows]:
        """One `TokenWindows` per self-attention sublayer (RoPE and masks), shared by all blocks;
        `t_offset` shifts the RoPE time positions (frame k of a frame-by-frame generator)."""
        return [
            TokenWindows.build(
                kind, grid, batch, self.dim // self.heads, self.window, self.rope, self.rope_theta,
                t_offset, device, dtype,
            )
            for kind in LAYOUTS[self.attention]
        ]

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
        windows = self.token_windows(grid, B, x.device, x.dtype)
        h = self.x_embedder(tokens)  # (B, N, D)
        if self.abs_pos:
            h = h + sincos_3d(grid, self.dim, device=x.device).to(h.dtype)[None]  # (B, N, D)
        c = self.t_embedder(t)  # (B, D)
        e = torch.stack(self.time_proj(c), dim=1)  # (B, 3·(n_self + 1), D)
        text = self.text_embedder(cond.tokens)  # (B, L, D)
        mask = cond.mask
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, e, text, mask, windows, use_reentrant=False)
            else:
                h = block(h, e, text, mask, windows)
        out = self.final_layer(h, c)  # (B, N, pt·ph·pw·C_out)
        return unpatchify(out, self.patch, grid, self.out_channels)  # (B, C_out, T, H, W)

    def flops(self, x_shape: tuple[int, int, int, int, int], text_len: int) -> int:
        """Analytic forward FLOPs for an input (B, C, T, H, W) and `text_len` text tokens: 2 per
        multiply-add of every matmul (Kaplan et al. 2020 §2.1 counting), attention scores and
        values included, padded window tokens included; norms and elementwise ops are ignored.
        A training step (forward + backward) costs about 3× this."""
        B, _, T, H, W = x_shape
        grid = (T // self.patch[0], H // self.patch[1], W // self.patch[2])
        N, D, L = grid[0] * grid[1] * grid[2], self.dim, text_len
        total = _linear_flops(self.x_embedder, B * N) + _linear_flops(self.final_layer.linear, B * N)
        total += _linear_flops(self.t_embedder, B) + _linear_flops(self.time_proj, B)
        total += _linear_flops(self.text_embedder, B * L)
        for block in self.blocks:
            for kind, attn in zip(LAYOUTS[self.attention], block.attn):
                n_win, S = window_count(grid, WINDOWS[kind](grid, self.window))
                total += _linear_flops(attn.qkv, B * n_win * S) + _linear_flops(attn.proj, B * N)
                total += 2 * 2 * B * n_win * S * S * D  # q·kᵀ and softmax·v
            cross = block.cross_attn
            total += _linear_flops(cross.q, B * N) + _linear_flops(cross.kv, B * L) + _linear_flops(cross.proj, B * N)
            total += 2 * 2 * B * N * L * D
            total += _linear_flops(block.mlp, B * N)
        return total
