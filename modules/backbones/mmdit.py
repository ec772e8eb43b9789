"""MMDiT video backbone, dual-stream then single-stream, as in HunyuanVideo (Kong et al. 2024,
"HunyuanVideo: A Systematic Framework For Large Video Generative Models", §4.2) and Open-Sora 2.0
(Peng et al. 2025), both after Flux and SD3's MMDiT (Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis", §4).

(B, C, T, H, W) → patchify by (pt, ph, pw) → video tokens x (B, N, D); text tokens (B, L, D_text) →
Linear → text tokens c_txt (B, L, D) (Flux's `txt_in`); timestep → TimestepEmbedder → c (B, D).

`double_depth` dual-stream blocks: the video and the text stream each have their own weights (AdaLN,
QKV, QK-norm, output projection, MLP) and meet in one joint self-attention over [x; c_txt]:

    q, k, v = concat over the sequence of each stream's QKV(modulate(LN(s), shift₁ˢ, scale₁ˢ))
    a = Attention(q, k, v) split back into (a_x, a_txt)             one softmax over N + L keys
    s ← s + g₁ˢ·Projˢ(a_s);  s ← s + g₂ˢ·MLPˢ(modulate(LN(s), shift₂ˢ, scale₂ˢ))    s ∈ {x, txt}

then `single_depth` single-stream blocks on h = [x; c_txt] (B, N + L, D) with shared weights, the
parallel attention + MLP block of Flux / HunyuanVideo (ViT-22B's parallel layers):

    u = modulate(LN(h), shift, scale);   [qkv, m] = Linear₁(u)
    h ← h + g·Linear₂([Attention(qkv), GELU(m)])

and a final layer (AdaLN + Linear) on the N video tokens, unpatchified to (B, C_out, T, H, W).

Choices, as HunyuanVideo unless said:
- QK-norm is RMSNorm over each head's d channels (HunyuanVideo, Flux, SD3), not over all D as the
  Wan-style `DiT` does.
- 3D RoPE (`modules.layers.rope`) rotates video queries and keys only; text tokens are unrotated. We
  give them position (0, 0, 0), whose rotation is exactly the identity: this is HunyuanVideo's
  "no RoPE on text" and Flux / Open-Sora 2.0's all-zero text ids at once. The band split t/h/w is
  `rope.axis_bands` (Wan's 44/42/42 for d = 128), not HunyuanVideo's 16/56/56; theta `rope_theta`.
- Text padding: a key mask over [video; text] (video always valid), so no query ever attends to a
  padded text token; padded tokens are also zeroed at entry, so even NaN padding cannot leak through
  0·NaN. The video output is the same as with the padding cut off. Padded text positions still carry
  values along the text stream; they are never read. Every row has N ≥ 1 valid video keys, so a text
  with no valid token is fine too (unlike cross-attention).
- Modulation: each dual-block stream, each single block and the final layer has its own SiLU → Linear
  of c (HunyuanVideo's `ModulateDiT`; no shared table as in Wan), zero-initialised (AdaLN-Zero).
- Omitted from HunyuanVideo: the token refiner on the text (a plain Linear here), the CLIP pooled
  vector and the guidance embedding added to c, the first-frame token replacement of I2V.

Identity at init: every AdaLN Linear is zero, so every gate is 0 and every block returns its inputs
exactly; the final Linear is zero, so the output is 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from modules.backbones.dit import _linear_flops, patchify, unpatchify
from modules.conditioning import Conditioning
from modules.layers.adaln import AdaLNZero, modulate
from modules.layers.embeddings import TimestepEmbedder
from modules.layers.mlp import Mlp
from modules.layers.norms import RMSNorm
from modules.layers.rope import apply_rope, grid_positions, rope_frequencies


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def split_heads(
    qkv: Tensor, heads: int, q_norm: RMSNorm | None, k_norm: RMSNorm | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused projections qkv (B, S, 3·D), features ordered (3, heads, d) -> q, k, v each (B, S, heads, d),
    with q and k RMS-normalised per head when the norms are given."""
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).unbind(2)  # each (B, S, h, d)
    return (q if q_norm is None else q_norm(q)), (k if k_norm is None else k_norm(k)), v


def joint_attention(q: Tensor, k: Tensor, v: Tensor, freqs: Tensor, key_mask: Tensor) -> Tensor:
    """softmax(R(q)·R(k)ᵀ / √d + mask)·v over the joint sequence (Vaswani et al. 2017, eq. 1).

    q, k, v: (B, S, heads, d), S = N video + L text tokens; freqs (S, 1, d/2) complex RoPE rotations
    R (the identity 1 + 0i on text); key_mask (B, 1, 1, S) bool, True = a key that may be attended.
    Returns (B, S, heads·d).
    """
    B, S, h, d = q.shape
    q, k = apply_rope(q, freqs), apply_rope(k, freqs)  # (B, S, h, d)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask
    )  # (B, h, S, d)
    return out.transpose(1, 2).reshape(B, S, h * d)  # (B, S, D)


class Stream(nn.Module):
    """One stream's own weights inside a dual-stream block (HunyuanVideo's `img_*` or `txt_*`):
    AdaLN-Zero (shift, scale, gate) × (attention, MLP), fused QKV with per-head QK-norm, output
    projection and GELU-tanh MLP."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, qk_norm: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.modulation = AdaLNZero(dim, dim, 6)
        self.norm1 = _layer_norm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // heads) if qk_norm else None
        self.k_norm = RMSNorm(dim // heads) if qk_norm else None
        self.proj = nn.Linear(dim, dim)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, mlp_hidden)

    def attention_inputs(self, s: Tensor, mod: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """s (B, S, D), mod the 6 × (B, D) modulation -> q, k, v each (B, S, heads, d)."""
        shift, scale = mod[0], mod[1]
        return split_heads(self.qkv(modulate(self.norm1(s), shift, scale)), self.heads, self.q_norm, self.k_norm)

    def residuals(self, s: Tensor, attn: Tensor, mod: tuple[Tensor, ...]) -> Tensor:
        """s (B, S, D), attn (B, S, D) this stream's rows of the joint attention -> (B, S, D)."""
        gate, shift, scale, gate_mlp = mod[2:]
        s = torch.addcmul(s, gate[:, None], self.proj(attn))
        return torch.addcmul(s, gate_mlp[:, None], self.mlp(modulate(self.norm2(s), shift, scale)))


class DualStreamBlock(nn.Module):
    """Video and text streams with separate weights and one joint attention (module docstring)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, qk_norm: bool = True) -> None:
        super().__init__()
        self.video = Stream(dim, heads, mlp_hidden, qk_norm)
        self.text = Stream(dim, heads, mlp_hidden, qk_norm)

    def forward(self, x: Tensor, txt: Tensor, c: Tensor, key_mask: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, N, D) video, txt (B, L, D) text, c (B, D) timestep embedding, key_mask (B, 1, 1, N + L),
        freqs (N + L, 1, d/2) -> (x, txt) updated, same shapes."""
        mod_x, mod_txt = self.video.modulation(c), self.text.modulation(c)  # 6 × (B, D) each
        qx, kx, vx = self.video.attention_inputs(x, mod_x)  # (B, N, h, d) each
        qt, kt, vt = self.text.attention_inputs(txt, mod_txt)  # (B, L, h, d) each
        q, k, v = (torch.cat(pair, dim=1) for pair in ((qx, qt), (kx, kt), (vx, vt)))  # (B, N + L, h, d)
        attn = joint_attention(q, k, v, freqs, key_mask)  # (B, N + L, D)
        N = x.shape[1]
        return self.video.residuals(x, attn[:, :N], mod_x), self.text.residuals(txt, attn[:, N:], mod_txt)


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP on the joint sequence with shared weights (Flux / HunyuanVideo
    `MMSingleStreamBlock`): Linear₁ gives qkv and the MLP input, Linear₂ maps [attention, GELU(MLP)]
    back to D; one AdaLN-Zero (shift, scale, gate)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, qk_norm: bool = True) -> None:
        super().__init__()
        self.heads, self.mlp_hidden = heads, mlp_hidden
        self.modulation = AdaLNZero(dim, dim, 3)
        self.norm = _layer_norm(dim)
        self.linear1 = nn.Linear(dim, 3 * dim + mlp_hidden)
        self.q_norm = RMSNorm(dim // heads) if qk_norm else None
        self.k_norm = RMSNorm(dim // heads) if qk_norm else None
        self.act = nn.GELU(approximate="tanh")
        self.linear2 = nn.Linear(dim + mlp_hidden, dim)

    def forward(self, h: Tensor, c: Tensor, key_mask: Tensor, freqs: Tensor) -> Tensor:
        """h (B, N + L, D) = [video; text], c (B, D), key_mask (B, 1, 1, N + L), freqs (N + L, 1, d/2)
        -> (B, N + L, D)."""
        shift, scale, gate = self.modulation(c)  # 3 × (B, D)
        qkv, m = self.linear1(modulate(self.norm(h), shift, scale)).split([3 * h.shape[-1], self.mlp_hidden], -1)
        attn = joint_attention(*split_heads(qkv, self.heads, self.q_norm, self.k_norm), freqs, key_mask)  # (B, S, D)
        return torch.addcmul(h, gate[:, None], self.linear2(torch.cat([attn, self.act(m)], dim=-1)))


class FinalLayer(nn.Module):
    """x (B, N, D) -> modulate(LN(x), shift, scale) with (shift, scale) = SiLU → Linear of c (B, D)
    (HunyuanVideo's `FinalLayer`) -> Linear -> (B, N, out_dim)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.modulation = AdaLNZero(dim, dim, 2)
        self.norm = _layer_norm(dim)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c)  # 2 × (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))


class MMDiT(nn.Module):
    """MMDiT denoiser (module docstring). Satisfies `modules.backbones.base.Denoiser`.

    forward(x (B, C, T, H, W), t (B,), cond) -> (B, out_channels, T, H, W); cond.tokens (B, L, text_dim),
    cond.mask (B, L) bool, True = real token. `t` arrives already scaled by the objective; it is only
    embedded. `blocks` holds the `double_depth` dual-stream blocks, then the `single_depth` single-stream
    blocks; each takes the video stream (dual) or [video; text] (single) first and returns it first.
    MLP hidden width round(dim·mlp_ratio).
    """

    identity_at_init = True  # AdaLN-Zero: every gate starts at 0

    def __init__(
        self,
        in_channels: int,
        text_dim: int,
        dim: int = 128,
        double_depth: int = 2,
        single_depth: int = 2,
        heads: int = 4,
        patch: list[int] | tuple = (1, 2, 2),
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        grad_checkpointing: bool = False,
        rope_theta: float = 10000.0,
        out_channels: int | None = None,
    ) -> None:
        super().__init__()
        if len(patch) != 3:
            raise ValueError(f"patch must be (pt, ph, pw), got {patch}")
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"dim {dim} must split into {heads} heads of even size (RoPE rotates pairs)")
        if double_depth < 0 or single_depth < 1:
            raise ValueError(
                f"need double_depth >= 0 and single_depth >= 1, got {double_depth}, {single_depth}: with no "
                "single-stream block the last dual block's text outputs go unused (SD3 prunes them)"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels if out_channels is not None else in_channels
        self.patch = tuple(int(p) for p in patch)
        self.dim, self.heads, self.double_depth = dim, heads, double_depth
        self.rope_theta = rope_theta
        self.grad_checkpointing = grad_checkpointing
        patch_volume = self.patch[0] * self.patch[1] * self.patch[2]
        hidden = round(dim * mlp_ratio)

        self.x_embedder = nn.Linear(in_channels * patch_volume, dim)  # = HunyuanVideo's Conv3d patch embed
        self.t_embedder = TimestepEmbedder(dim)
        self.txt_in = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList(
            [DualStreamBlock(dim, heads, hidden, qk_norm) for _ in range(double_depth)]
            + [SingleStreamBlock(dim, heads, hidden, qk_norm) for _ in range(single_depth)]
        )
        self.final_layer = FinalLayer(dim, patch_volume * self.out_channels)
        self.init_weights()

    def init_weights(self) -> None:
        """DiT initialisation: Xavier-uniform Linears with zero bias, N(0, 0.02) timestep MLP, unit
        RMSNorm weights, zero AdaLN Linears (every gate 0) and a zero final Linear (output 0)."""
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
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def rope_table(
        self, grid: tuple[int, int, int], text_len: int, device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """RoPE rotations of [video; text] (N + L, 1, d/2) complex: video tokens at their (t, h, w) grid
        positions, text tokens at (0, 0, 0), i.e. unrotated. float64 `dtype` gives complex128."""
        pos = grid_positions(grid, device=device)  # (N, 3)
        pos = torch.cat([pos, pos.new_zeros(text_len, 3)])  # (N + L, 3)
        work = torch.promote_types(dtype, torch.float32)
        return rope_frequencies(pos, self.dim // self.heads, self.rope_theta, work)[:, None]  # (N + L, 1, d/2)

    def _run(self, block: nn.Module, *args: Tensor):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        B, _, T, H, W = x.shape
        if t.dim() == 0:
            t = t.expand(B)
        if t.dim() == 2:
            raise NotImplementedError(
                f"MMDiT takes one time per sample, t of shape (B,); got per-frame t {tuple(t.shape)}"
            )
        if t.shape != (B,):
            raise ValueError(f"t must have shape (B,) = ({B},), got {tuple(t.shape)}")
        pt, ph, pw = self.patch
        tokens = patchify(x, self.patch)  # (B, N, C·pt·ph·pw), raises on indivisible sizes
        grid = (T // pt, H // ph, W // pw)
        N, L = tokens.shape[1], cond.tokens.shape[1]
        h = self.x_embedder(tokens)  # (B, N, D)
        c = self.t_embedder(t)  # (B, D)
        mask = cond.mask
        txt = self.txt_in(torch.where(mask[..., None], cond.tokens, 0).to(h.dtype))  # (B, L, D), padding zeroed
        key_mask = torch.cat([mask.new_ones(B, N), mask], dim=1)[:, None, None, :]  # (B, 1, 1, N + L)
        freqs = self.rope_table(grid, L, x.device, x.dtype)  # (N + L, 1, d/2)
        for block in self.blocks[: self.double_depth]:
            h, txt = self._run(block, h, txt, c, key_mask, freqs)
        h = torch.cat([h, txt], dim=1)  # (B, N + L, D)
        for block in self.blocks[self.double_depth :]:
            h = self._run(block, h, c, key_mask, freqs)
        out = self.final_layer(h[:, :N], c)  # (B, N, pt·ph·pw·C_out)
        return unpatchify(out, self.patch, grid, self.out_channels)  # (B, C_out, T, H, W)

    def flops(self, x_shape: tuple[int, int, int, int, int], text_len: int) -> int:
        """Analytic forward FLOPs for an input (B, C, T, H, W) and `text_len` text tokens: 2 per
        multiply-add of every matmul (Kaplan et al. 2020 §2.1), attention scores and values over all
        N + L tokens included (padding is computed); norms, RoPE and elementwise ops are ignored.
        A training step (forward + backward) costs about 3× this."""
        B, _, T, H, W = x_shape
        N = (T // self.patch[0]) * (H // self.patch[1]) * (W // self.patch[2])
        L, D = text_len, self.dim
        S = N + L
        total = _linear_flops(self.x_embedder, B * N) + _linear_flops(self.txt_in, B * L)
        total += _linear_flops(self.t_embedder, B) + _linear_flops(self.final_layer.modulation, B)
        total += _linear_flops(self.final_layer.linear, B * N)
        for block in self.blocks:
            total += 2 * 2 * B * S * S * D  # q·kᵀ and softmax·v over the joint sequence
            if isinstance(block, DualStreamBlock):
                for stream, rows in ((block.video, B * N), (block.text, B * L)):
                    total += _linear_flops(stream.modulation, B)
                    total += sum(_linear_flops(m, rows) for m in (stream.qkv, stream.proj, stream.mlp))
            else:
                total += _linear_flops(block.modulation, B)
                total += _linear_flops(block.linear1, B * S) + _linear_flops(block.linear2, B * S)
        return total
