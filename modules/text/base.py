"""The text-encoder contract: prompts in, `Conditioning` out.

tokens (B, max_length, dim) padded/truncated to `max_length`; mask (B, max_length) bool, True on
real tokens. The empty prompt "" is the null condition (CFG, condition dropout) and must give at
least one valid token, so cross-attention never sees an all-masked row.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import nn

from modules.conditioning import Conditioning


class TextEncoder(nn.Module, ABC):
    dim: int
    max_length: int

    @abstractmethod
    def forward(self, prompts: list[str]) -> Conditioning:
        """prompts: B strings -> Conditioning(tokens (B, max_length, dim), mask (B, max_length))."""
        ...
