"""Frame-autoregressive video DiT: block-causal attention over frames, one noise level per frame,
and frame-by-frame generation with a key/value cache.

Training is diffusion forcing (Chen et al. 2024, "Diffusion Forcing: Next-token Prediction Meets
Full-Sequence Diffusion"): every frame of a clip gets its own noise level, t (B, T), and each
frame's prediction sees only its own chunk and earlier ones (`frame_causal_mask`). Generation
(CausVid, Yin et al. 2024; Self-Forcing, Huang et al. 2025) denoises one chunk of `chunk` frames at
a time from t = 1 to 0 with the sampler, then runs the clean chunk once at t = 0 to add its keys and
values to a `KVCache`; later chunks attend to the cache instead of recomputing the past. With
`context` set, attention reaches only that many frames before the chunk, in training and in the
cache alike, so rollouts longer than the training clip keep the training-time context.

Blocks are the DiT's (`modules.backbones.dit`, Wan-style): LayerNorm + AdaLN-Zero self-attention,
text cross-attention, AdaLN-Zero MLP; the difference is that the AdaLN shift / scale / gate come
from each token's own frame time, so the modulation is computed per frame: the (B, T·S, D) token
stream is viewed as (B·T, S, D), S = H'·W' tokens per frame, and `modulate` broadcasts one vector
per frame. The time patch size must be 1 (one token frame per latent frame).

forward(x (B, C, T, H, W), t (B,) or (B, T), cond, cache=None, commit=False):
- cache None: all T frames under the block-causal mask (training, or full recomputation);
- cache given: x is the next chunk (≤ `chunk` frames) after the cached frames, at RoPE time
  positions cache.next_frame…; ``commit=True`` appends its keys and values and advances the cache.
`modules.samplers.rollout.frame_rollout` drives generation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from modules.conditioning import Conditioning
from modules.layers.adaln import AdaLNZero, modulate
from modules.layers.attention import CrossAttention, TokenWindows
from modules.layers.embeddings import TimestepEmbedder
from modules.layers.frame_attention import FrameCausalAttention, KVCache, frame_causal_mask
from modules.layers.mlp import Mlp
from modules.backbones.dit import MLPS, FinalLayer, _linear_flops, patchify, unpatchify


class FrameBlock(nn.Module):
    """DiT block with per-frame AdaLN-Zero modulation and block-causal self-attention."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, qk_norm: bool = True, mlp: str = "gelu_tanh") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = FrameCausalAttention(dim, heads, qk_norm)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, dim, heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLPS[mlp](dim, mlp_hidden)
        self.modulation = nn.Parameter(torch.zeros(6, dim))  # per-block table added to the shared projection

    def forward(
        self,
        x: Tensor,
        e: Tensor,
        text: Tensor,
        text_mask: Tensor,
        freqs: Tensor | None,
        attn_mask: Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
        commit: bool = False,
    ) -> Tensor:
        """x (B, T·S, D); e (B·T, 6, D) the shared AdaLN projection of each frame's time; text
        (B, L, D) with text_mask (B, L); freqs / attn_mask / cache as `FrameCausalAttention`."""
        B, N, D = x.shape
        frames = e.shape[0] // B if B else 1
        S = N // frames
        shift1, scale1, gate1, shift2, scale2, gate2 = (e + self.modulation).unbind(1)  # 6 × (B·T, D)
        h = modulate(self.norm1(x.view(B * frames, S, D)), shift1, scale1).view(B, N, D)
        h = self.attn(h, freqs, attn_mask, cache, layer, commit, S)  # (B, N, D)
        x = torch.addcmul(x.view(B * frames, S, D), gate1[:, None], h.view(B * frames, S, D)).view(B, N, D)
        x = x + self.cross_attn(self.norm_cross(x), text, text_mask)
        xf = x.view(B * frames, S, D)
        return torch.addcmul(xf, gate2[:, None], self.mlp(modulate(self.norm2(xf), shift2, scale2))).view(B, N, D)


class FrameAR(nn.Module):
    """Frame-autoregressive denoiser; see the module docstring. Satisfies `Denoiser`, with per-frame t.

    chunk: frames denoised together (bidirectional inside a chunk, causal across chunks);
    context: frames before a chunk that it may attend to (None = all; the KV cache then grows with
    the rollout). Other arguments as `modules.backbones.dit.DiT` (full attention only).
    """

    per_frame_time = True  # the objective draws one t per frame in training (diffusion forcing)

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
        chunk: int = 1,
        context: int | None = None,
        mlp: str = "gelu_tanh",
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        if len(patch) != 3 or int(patch[0]) != 1:
            raise ValueError(f"patch must be (1, ph, pw): one token frame per latent frame, got {list(patch)}")
        if chunk < 1 or (context is not None and context < 0):
            raise ValueError(f"chunk must be ≥ 1 and context ≥ 0 (or None), got chunk={chunk}, context={context}")
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"dim {dim} must split into {heads} heads of even size (RoPE)")
        if mlp not in MLPS:
            raise ValueError(f"mlp must be one of {sorted(MLPS)}, got {mlp!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels if out_channels is not None else in_channels
        self.patch = tuple(int(p) for p in patch)
        self.dim, self.heads, self.rope_theta = dim, heads, rope_theta
        self.chunk, self.context = int(chunk), None if context is None else int(context)
        self.grad_checkpointing = grad_checkpointing
        patch_volume = self.patch[1] * self.patch[2]

        self.x_embedder = nn.Linear(in_channels * patch_volume, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.time_proj = AdaLNZero(dim, dim, 6)  # shared by all blocks (Wan)
        self.text_embedder = Mlp(text_dim, dim, dim)
        self.blocks = nn.ModuleList(
            [FrameBlock(dim, heads, round(dim * mlp_ratio), qk_norm, mlp) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(dim, patch_volume * self.out_channels)
        self.init_weights()

    def init_weights(self) -> None:
        """As `DiT.init_weights`: Xavier-uniform Linears with zero bias, N(0, 0.02) timestep MLP, zero
        AdaLN projection, tables, cross-attention output and final Linear (every block the identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
        self.time_proj.reset_parameters()
        for module in (*self.blocks, self.final_layer):
            nn.init.zeros_(module.modulation)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def new_cache(self) -> KVCache:
        """An empty cache holding at most `context` frames (all frames when context is None)."""
        return KVCache(max_frames=self.context)

    def forward(
        self, x: Tensor, t: Tensor, cond: Conditioning, cache: KVCache | None = None, commit: bool = False
    ) -> Tensor:
        B, _, T, H, W = x.shape
        if t.dim() == 0:
            t = t.expand(B)
        if t.dim() == 1:
            t = t[:, None].expand(-1, T)  # one time for every frame
        if t.shape != (B, T):
            raise ValueError(f"t must have shape (B,) or (B, T) = ({B}, {T}), got {tuple(t.shape)}")
        if cache is not None and T > self.chunk:
            raise ValueError(f"with a cache, x is one chunk of at most {self.chunk} frames, got {T}")
        _, ph, pw = self.patch
        grid = (T, H // ph, W // pw)
        S = grid[1] * grid[2]
        offset = 0 if cache is None else cache.next_frame
        freqs = TokenWindows.build(
            "full", grid, B, self.dim // self.heads, None, True, self.rope_theta, offset, x.device, x.dtype
        ).freqs  # (1, N, 1, d/2)
        attn_mask = None if cache is not None else frame_causal_mask(T, S, self.chunk, self.context, x.device)
        h = self.x_embedder(patchify(x, self.patch))  # (B, N, D); patchify raises on indivisible sizes
        c = self.t_embedder(t.reshape(-1))  # (B·T, D)
        e = torch.stack(self.time_proj(c), dim=1)  # (B·T, 6, D)
        text, text_mask = self.text_embedder(cond.tokens), cond.mask  # (B, L, D), (B, L)
        for layer, block in enumerate(self.blocks):
            args = (h, e, text, text_mask, freqs, attn_mask, cache, layer, commit)
            if self.grad_checkpointing and torch.is_grad_enabled() and cache is None:
                h = checkpoint(block, *args, use_reentrant=False)
            else:
                h = block(*args)
        if cache is not None and commit:
            cache.next_frame += T
        out = self.final_layer(h.view(B * T, S, self.dim), c).view(B, T * S, self.final_layer.linear.out_features)
        return unpatchify(out, self.patch, grid, self.out_channels)  # (B, C_out, T, H, W)

    def flops(self, x_shape: tuple[int, int, int, int, int], text_len: int) -> int:
        """Analytic forward FLOPs of a full (uncached) forward, counted as `DiT.flops` counts them
        (2 per multiply-add of every matmul; SDPA computes every score, masked or not)."""
        B, _, T, H, W = x_shape
        N, D, L = T * (H // self.patch[1]) * (W // self.patch[2]), self.dim, text_len
        total = _linear_flops(self.x_embedder, B * N) + _linear_flops(self.final_layer.linear, B * N)
        total += _linear_flops(self.t_embedder, B * T) + _linear_flops(self.time_proj, B * T)
        total += _linear_flops(self.text_embedder, B * L)
        for block in self.blocks:
            total += _linear_flops(block.attn, B * N) + 2 * 2 * B * N * N * D
            cross = block.cross_attn
            total += _linear_flops(cross.q, B * N) + _linear_flops(cross.kv, B * L) + _linear_flops(cross.proj, B * N)
            total += 2 * 2 * B * N * L * D + _linear_flops(block.mlp, B * N)
        return total
