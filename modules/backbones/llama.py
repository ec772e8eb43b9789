"""LLaMA-style video DiT as in Movie Gen (Polyak et al. 2024, "Movie Gen: A Cast of Media Foundation
Models", §3.1.3, Table 1): the LLaMA3 transformer (Dubey et al. 2024, "The Llama 3 Herd of Models") —
RMSNorm pre-norm, SwiGLU feed-forward, no biases — with Movie Gen's three changes for video:
bidirectional (non-causal) self-attention over all video tokens, a text cross-attention after the
self-attention of every block, and the diffusion time fed through adaptive layer norm (DiT, Peebles &
Xie 2023).

(B, C, T, H, W) → patchify by (pt, ph, pw) (Movie Gen: (1, 2, 2)) → tokens (B, N, C·pt·ph·pw) → Linear →
`depth` blocks → RMSNorm + AdaLN + Linear → unpatchify → (B, C_out, T, H, W). One block, x (B, N, D):

    x ← x + g_i·SelfAttn_i(modulate(RMSNorm(x), shift_i, scale_i))   for each self-attention sublayer i
    x ← x + CrossAttn(RMSNorm_w(x), text, mask)
    x ← x + g·SwiGLU(modulate(RMSNorm(x), shift, scale))

Every Linear of a block is bias-free (LLaMA). The modulated RMSNorms have no weight of their own
((1 + scale) plays its part); the cross-attention one has a learned weight (RMSNorm_w). Queries and
keys get QK-norm (RMSNorm over all D channels, ViT-22B) and 3D RoPE (`modules.layers.rope`), built once
per forward and shared by all blocks. Movie Gen instead adds factorized learnable position embeddings;
we keep vidlab's 3D RoPE, which works at any grid size. `attention` picks the self-attention layout of
`modules.layers.attention` ('full' as Movie Gen; 'factorized' and 'window' for ablations).

AdaLN, our choices (the paper only says it follows DiT): one projection of the timestep embedding,
SiLU → Linear(D, 3·(n_self + 1)·D), shared by all blocks, plus a learned per-block table
(3·(n_self + 1), D) added to it (PixArt-α's adaLN-single, as Wan and our DiT). A separate projection
per block, as in DiT, would add 6·D² parameters per block: 10.9 B at the 30B shape, on top of the
29 B the blocks already hold, which Movie Gen's reported 30 B total does not seem to leave room for.
Also our choice: projection and tables start at zero, so every gate is 0 (AdaLN-Zero); with the
cross-attention output projection zero too (PixArt-α), each block is exactly the identity at
initialisation, and with the final Linear zero the output is 0.

Outside the blocks: the patch embedding (Movie Gen's 3D convolution, here a Linear on patches) and the
text projection, Linear then LayerNorm as Movie Gen projects each text encoder, keep their biases.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from modules.backbones.dit import _linear_flops, patchify, unpatchify
from modules.conditioning import Conditioning
from modules.layers.adaln import AdaLNZero, modulate
from modules.layers.attention import LAYOUTS, WINDOWS, CrossAttention, SelfAttention, TokenWindows, window_count
from modules.layers.embeddings import TimestepEmbedder
from modules.layers.mlp import SwiGLU
from modules.layers.norms import RMSNorm


def llama_ffn_hidden(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """LLaMA's SwiGLU width (reference `FeedForward`): 2/3 of 4·dim, so that the three matrices hold
    as many parameters as a 4·dim GELU MLP's two, times `ffn_dim_multiplier`, rounded up to a multiple
    of `multiple_of`. dim 4096 → 11008 (LLaMA 7B); dim 6144 → 16384 (Movie Gen 30B, Table 1)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * -(-hidden // multiple_of)


class LlamaBlock(nn.Module):
    """AdaLN-gated self-attention sublayer(s), pre-norm text cross-attention, AdaLN-gated SwiGLU; see
    the module docstring. `n_self` = 1 for full and window attention, 2 for factorized."""

    def __init__(self, dim: int, heads: int, ffn_hidden: int, qk_norm: bool = True, n_self: int = 1) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim, elementwise_affine=False)
        self.attn = nn.ModuleList([SelfAttention(dim, heads, qk_norm, bias=False) for _ in range(n_self)])
        self.norm_cross = RMSNorm(dim)
        self.cross_attn = CrossAttention(dim, dim, heads, qk_norm, bias=False)
        self.norm2 = RMSNorm(dim, elementwise_affine=False)
        self.ffn = SwiGLU(dim, ffn_hidden)
        self.modulation = nn.Parameter(torch.zeros(3 * (n_self + 1), dim))  # per-block AdaLN table

    def forward(self, x: Tensor, e: Tensor, text: Tensor, text_mask: Tensor, windows: list[TokenWindows]) -> Tensor:
        """x (B, N, D); e (B, 3·(n_self + 1), D) the shared AdaLN projection; text (B, L, D);
        text_mask (B, L) bool; windows: one `TokenWindows` per self-attention sublayer -> (B, N, D)."""
        mod = (e + self.modulation).unbind(1)  # 3·(n_self + 1) × (B, D): (shift, scale, gate) per sublayer
        for i, (attn, win) in enumerate(zip(self.attn, windows)):
            shift, scale, gate = mod[3 * i : 3 * i + 3]
            x = torch.addcmul(x, gate[:, None], attn(modulate(self.norm1(x), shift, scale), win))
        x = x + self.cross_attn(self.norm_cross(x), text, text_mask)
        shift, scale, gate = mod[-3:]
        return torch.addcmul(x, gate[:, None], self.ffn(modulate(self.norm2(x), shift, scale)))


class LlamaFinalLayer(nn.Module):
    """x (B, N, D) -> RMSNorm -> modulate by (shift, scale) = learned table + c -> bias-free Linear
    -> (B, N, patch_volume·C_out); c (B, D) is the timestep embedding."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, elementwise_affine=False)
        self.linear = nn.Linear(dim, out_dim, bias=False)
        self.modulation = nn.Parameter(torch.zeros(2, dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = (self.modulation + c[:, None]).unbind(1)  # 2 × (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))


class LlamaDiT(nn.Module):
    """Movie Gen-style LLaMA video denoiser; see the module docstring. Satisfies
    `modules.backbones.base.Denoiser`.

    forward(x (B, C, T, H, W), t (B,), cond) -> (B, out_channels, T, H, W).
    `t` arrives already scaled by the objective (e.g. t·1000); it is only embedded here.

    ffn_hidden: SwiGLU width; None takes LLaMA's rule `llama_ffn_hidden(dim, multiple_of,
    ffn_dim_multiplier)`. attention: 'full' | 'factorized' | 'window'; window: (wt, wh, ww) tokens, for
    'window' only. rope_theta: base of the 3D RoPE frequencies.
    """

    identity_at_init = True

    def __init__(
        self,
        in_channels: int,
        text_dim: int,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        patch: list[int] | tuple = (1, 2, 2),
        ffn_hidden: int | None = None,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        qk_norm: bool = True,
        out_channels: int | None = None,
        grad_checkpointing: bool = False,
        attention: str = "full",
        window: list[int] | tuple = (4, 8, 8),
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        if len(patch) != 3:
            raise ValueError(f"patch must be (pt, ph, pw), got {patch}")
        if attention not in LAYOUTS:
            raise ValueError(f"attention must be one of {sorted(LAYOUTS)}, got {attention!r}")
        if len(window) != 3 or min(window) < 1:
            raise ValueError(f"window must be three positive sizes (wt, wh, ww), got {window}")
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"dim {dim} must split into {heads} heads of even size (3D RoPE)")
        self.in_channels = in_channels
        self.out_channels = out_channels if out_channels is not None else in_channels
        self.patch = tuple(int(p) for p in patch)
        self.dim, self.heads = dim, heads
        if ffn_hidden is None:
            ffn_hidden = llama_ffn_hidden(dim, multiple_of, ffn_dim_multiplier)
        self.ffn_hidden = ffn_hidden
        self.attention, self.window = attention, tuple(int(w) for w in window)
        self.rope_theta = rope_theta
        self.grad_checkpointing = grad_checkpointing
        n_self = len(LAYOUTS[attention])
        patch_volume = self.patch[0] * self.patch[1] * self.patch[2]

        self.x_embedder = nn.Linear(in_channels * patch_volume, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.time_proj = AdaLNZero(dim, dim, 3 * (n_self + 1))  # shared by all blocks
        self.text_embedder = nn.Sequential(nn.Linear(text_dim, dim), nn.LayerNorm(dim))  # Movie Gen's projection
        self.blocks = nn.ModuleList([LlamaBlock(dim, heads, self.ffn_hidden, qk_norm, n_self) for _ in range(depth)])
        self.final_layer = LlamaFinalLayer(dim, patch_volume * self.out_channels)
        self.init_weights()

    def init_weights(self) -> None:
        """Every Linear weight ~ N(0, 0.02²) (GPT-2, LLaMA's reference training code as in torchtitan),
        biases 0, norm weights 1; then zero AdaLN projection and tables (every gate 0), zero
        cross-attention output projections and a zero final Linear: each block is the identity and the
        output 0. In place, so a meta-device build + `to_empty` + `init_weights()` is a working model."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        self.time_proj.reset_parameters()
        for module in (*self.blocks, self.final_layer):
            nn.init.zeros_(module.modulation)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
        nn.init.zeros_(self.final_layer.linear.weight)

    def token_windows(
        self,
        grid: tuple[int, int, int],
        batch: int,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> list[TokenWindows]:
        """One `TokenWindows` (3D RoPE rotations, padding mask) per self-attention sublayer, shared by
        all blocks; a float64 `dtype` gives float64 RoPE angles."""
        head_dim = self.dim // self.heads
        return [
            TokenWindows.build(kind, grid, batch, head_dim, self.window, True, self.rope_theta, 0, device, dtype)
            for kind in LAYOUTS[self.attention]
        ]

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        B, _, T, H, W = x.shape
        if t.dim() == 0:
            t = t.expand(B)
        if t.dim() == 2:
            raise NotImplementedError(
                f"LlamaDiT takes one time per sample, t of shape (B,); got per-frame t {tuple(t.shape)}"
            )
        if t.shape != (B,):
            raise ValueError(f"t must have shape (B,) = ({B},), got {tuple(t.shape)}")
        pt, ph, pw = self.patch
        tokens = patchify(x, self.patch)  # (B, N, C·pt·ph·pw), raises on indivisible sizes
        grid = (T // pt, H // ph, W // pw)
        windows = self.token_windows(grid, B, x.device, x.dtype)
        h = self.x_embedder(tokens)  # (B, N, D)
        c = self.t_embedder(t)  # (B, D)
        e = torch.stack(self.time_proj(c), dim=1)  # (B, 3·(n_self + 1), D)
        text = self.text_embedder(cond.tokens)  # (B, L, D)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, e, text, cond.mask, windows, use_reentrant=False)
            else:
                h = block(h, e, text, cond.mask, windows)
        out = self.final_layer(h, c)  # (B, N, pt·ph·pw·C_out)
        return unpatchify(out, self.patch, grid, self.out_channels)  # (B, C_out, T, H, W)

    def flops(self, x_shape: tuple[int, int, int, int, int], text_len: int) -> int:
        """Analytic forward FLOPs for an input (B, C, T, H, W) and `text_len` text tokens: 2 per
        multiply-add of every matmul (Kaplan et al. 2020 §2.1), attention scores q·kᵀ and values
        softmax·v included (padded window tokens too); norms, RoPE and elementwise ops ignored.
        A training step (forward + backward) costs about 3× this."""
        B, _, T, H, W = x_shape
        grid = (T // self.patch[0], H // self.patch[1], W // self.patch[2])
        N, D, L = grid[0] * grid[1] * grid[2], self.dim, text_len
        total = _linear_flops(self.x_embedder, B * N) + _linear_flops(self.final_layer, B * N)
        total += _linear_flops(self.t_embedder, B) + _linear_flops(self.time_proj, B)
        total += _linear_flops(self.text_embedder, B * L)
        for block in self.blocks:
            for kind, attn in zip(LAYOUTS[self.attention], block.attn):
                n_win, S = window_count(grid, WINDOWS[kind](grid, self.window))
                total += _linear_flops(attn.qkv, B * n_win * S) + _linear_flops(attn.proj, B * N)
                total += 2 * 2 * B * n_win * S * S * D  # q·kᵀ and softmax·v over every window
            cross = block.cross_attn
            total += _linear_flops(cross.q, B * N) + _linear_flops(cross.kv, B * L) + _linear_flops(cross.proj, B * N)
            total += 2 * 2 * B * N * L * D  # q·kᵀ and softmax·v against the text
            total += _linear_flops(block.ffn, B * N)
        return total
