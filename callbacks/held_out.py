"""A fixed set of held-out clips for evaluation callbacks, loaded once.

``data`` is a datamodule built from its own config node (e.g. Shapes rendered with another seed than
training, so the clips are held out); its dataset's first ``num_clips`` items are used, in order.
Without ``data`` the trainer's datamodule is used: its val split when it has one, else its train
split (both fixed by the data's own seed, not by the run seed).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor


class HeldOutClips:
    """The first ``num_clips`` videos (N, 3, T, H, W) in [-1, 1] and captions of ``data``'s dataset."""

    def __init__(self, data: Any, num_clips: int, owner: str) -> None:
        if num_clips < 1:
            raise ValueError(f"{owner}: num_clips must be positive, got {num_clips}")
        self.data, self.num_clips, self.owner = data, num_clips, owner
        self._clips: tuple[Tensor, list[str]] | None = None

    def dataset(self, trainer: L.Trainer) -> Any:
        if self.data is not None:
            if getattr(self.data, "dataset", None) is None:
                self.data.prepare_data()
                self.data.setup("fit")
            return self.data.dataset
        datamodule = trainer.datamodule
        if datamodule is None:
            raise RuntimeError(f"{self.owner}: no 'data' given and the trainer has no datamodule")
        return getattr(datamodule, "val_dataset", None) or datamodule.train_dataset

    def load(self, trainer: L.Trainer) -> tuple[Tensor, list[str]]:
        if self._clips is None:
            dataset = self.dataset(trainer)
            if len(dataset) < self.num_clips:
                raise ValueError(f"{self.owner}: {self.num_clips} clips requested, the dataset has {len(dataset)}")
            items = [dataset[i] for i in range(self.num_clips)]
            self._clips = torch.stack([it["video"] for it in items]), [it["caption"] for it in items]
        return self._clips
