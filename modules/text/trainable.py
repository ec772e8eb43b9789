"""A small text encoder trained from scratch with the generator; needs no weights.

Tokenizer: lowercase words (regex \\w+) → id = 2 + crc32(word) mod (vocab_size − 2), stable
across processes and machines (Python's hash() is salted per process); id 0 = padding,
id 1 = BOS, always first, so "" gives exactly one valid token. Encoder: embedding + learned
positions + `depth` pre-norm nn.TransformerEncoderLayer with the key padding mask + LayerNorm.
"""

from __future__ import annotations

import re
import zlib

import torch
from torch import Tensor, nn

from modules.conditioning import Conditioning
from modules.text.base import TextEncoder

PAD, BOS = 0, 1


class TrainableTextEncoder(TextEncoder):
    def __init__(
        self, dim: int = 128, vocab_size: int = 4096, max_length: int = 32, depth: int = 1, heads: int = 4
    ) -> None:
        super().__init__()
        if vocab_size < 3:
            raise ValueError(f"vocab_size must be >= 3 (pad, BOS, words), got {vocab_size}")
        self.dim = dim
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(max_length, dim))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                batch_first=True, norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def word_id(self, word: str) -> int:
        """Stable id of one lowercase word: 2 + crc32(utf-8 bytes) mod (vocab_size − 2)."""
        return 2 + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - 2)

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """prompts -> ids (B, max_length) long, mask (B, max_length) bool; BOS first, then words,
        truncated to max_length, right-padded with PAD."""
        ids = torch.full((len(prompts), self.max_length), PAD, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            row = [BOS] + [self.word_id(w) for w in re.findall(r"\w+", prompt.lower())]
            row = row[: self.max_length]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids != PAD

    def forward(self, prompts: list[str]) -> Conditioning:
        ids, mask = self.tokenize(list(prompts))
        ids, mask = ids.to(self.pos.device), mask.to(self.pos.device)
        x = self.embed(ids) + self.pos[None]  # (B, L, dim)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=~mask)  # True in the padding mask = ignore
        return Conditioning(self.norm(x), mask)
