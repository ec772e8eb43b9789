"""Conditioning: what a backbone is conditioned on, as one typed object (not a dict).

Text tokens come from a `modules/text` encoder; `context` is reserved for conditioning frames
(image-to-video, continuation) and is carried along untouched here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Conditioning:
    """Text conditioning for a batch.

    tokens:  (B, L, D) float text features.
    mask:    (B, L) bool, True = valid token (False = padding, ignored by cross-attention).
    context: optional (B, C, T, H, W) conditioning frames, or None.
    """

    tokens: Tensor
    mask: Tensor
    context: Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens.dim() != 3:
            raise ValueError(f"tokens must be (B, L, D), got shape {tuple(self.tokens.shape)}")
        if self.mask.shape != self.tokens.shape[:2]:
            raise ValueError(
                f"mask shape {tuple(self.mask.shape)} does not match tokens (B, L) = "
                f"{tuple(self.tokens.shape[:2])}"
            )
        if self.mask.dtype != torch.bool:
            self.mask = self.mask.bool()

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> Conditioning:
        """Return a copy with every tensor moved to `device`."""
        context = None if self.context is None else self.context.to(device)
        return Conditioning(self.tokens.to(device), self.mask.to(device), context)

    def select(self, index: Tensor) -> Conditioning:
        """The rows ``index`` (a (K,) long tensor) of the batch: tokens (K, L, D), mask (K, L)."""
        context = None if self.context is None else self.context[index]
        return Conditioning(self.tokens[index], self.mask[index], context)

    @staticmethod
    def cat(a: Conditioning, b: Conditioning) -> Conditioning:
        """Concatenate two conditionings along the batch: (Ba + Bb, max(La, Lb), D).

        The shorter token sequence is right-padded with zeros and mask False, so the two
        may come from prompts of different lengths (batched classifier-free guidance).
        """
        if a.tokens.shape[-1] != b.tokens.shape[-1]:
            raise ValueError(f"token dims differ: {a.tokens.shape[-1]} vs {b.tokens.shape[-1]}")
        if (a.context is None) != (b.context is None):
            raise ValueError("cannot concatenate a Conditioning with context and one without")
        length = max(a.tokens.shape[1], b.tokens.shape[1])

        def pad(c: Conditioning) -> tuple[Tensor, Tensor]:
            extra = length - c.tokens.shape[1]
            tokens = F.pad(c.tokens, (0, 0, 0, extra))  # (B, L, D) -> (B, length, D)
            mask = F.pad(c.mask, (0, extra), value=False)  # (B, L) -> (B, length)
            return tokens, mask

        (ta, ma), (tb, mb) = pad(a), pad(b)
        context = None if a.context is None else torch.cat([a.context, b.context], dim=0)
        return Conditioning(torch.cat([ta, tb], dim=0), torch.cat([ma, mb], dim=0), context)
