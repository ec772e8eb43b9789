"""Multi-head self-attention and text cross-attention through `F.scaled_dot_product_attention`.

Optional QK-norm (RMSNorm on each head's queries and keys, per head channel) as in SD3 / Wan,
which keeps attention logits bounded when training at scale (Dehghani et al. 2023, ViT-22B).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SelfAttention(nn.Module):
    """x (B, N, D) -> (B, N, D); softmax(q·kᵀ / √d_head)·v over all N tokens."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads)  # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class CrossAttention(nn.Module):
    """Queries from x (B, N, D), keys/values from text (B, L, D_ctx) with a key mask.

    mask: (B, L) bool, True = valid token. Every row needs at least one valid token (the text
    encoders guarantee it), otherwise softmax over an empty set gives NaN.
    """

    def __init__(self, dim: int, context_dim: int, heads: int, qk_norm: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        B, N, D = x.shape
        L = context.shape[1]
        d = D // self.heads
        q = self.q(x).view(B, N, self.heads, d).transpose(1, 2)  # (B, h, N, d)
        kv = self.kv(context).view(B, L, 2, self.heads, d)  # (B, L, 2, h, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, L, d)
        q, k = self.q_norm(q), self.k_norm(k)
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, L), broadcast over heads and queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)
