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

from callbacks.cadence import EveryNSteps


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
        datamodule = trainer.datamodule if trainer is not None else None
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


class HeldOutMetric(EveryNSteps):
    """Base of the metrics averaged over held-out clips (`callbacks.denoising`, `callbacks.timestep_loss`).

    Every ``every_n_steps`` (0: end only) and at train end: the clips, ``batch_size`` at a time, go
    through ``module.vae.encode`` and their captions through ``module.encode_text`` (as in training,
    no caption dropout), with the module in eval mode under the trainer's precision context; a
    generator seeded with ``seed`` afresh each time gives the same noise at every evaluation.
    Subclasses return per-clip values (L, b) from `measure` for the L names of `names`; the results
    are the means over clips, plus ``<prefix><summary>`` = their mean over the L names.

    Every rank evaluates (under FSDP the forward needs all ranks; under DDP the ranks compute the
    same numbers); the logger writes on rank 0 (Lightning loggers are rank-zero only).
    """

    summary = "mean"

    def __init__(self, data: Any, num_clips: int, batch_size: int, seed: int, every_n_steps: int,
                 prefix: str) -> None:
        if batch_size < 1:
            raise ValueError(f"{type(self).__name__}: batch_size must be positive, got {batch_size}")
        super().__init__(every_n_steps)
        self.data = data
        self.num_clips, self.batch_size, self.seed, self.prefix = num_clips, batch_size, seed, prefix
        self.results: dict[str, float] = {}
        self._held_out = HeldOutClips(data, num_clips, type(self).__name__)

    def clips(self, trainer: L.Trainer) -> tuple[Tensor, list[str]]:
        """The held-out videos (N, 3, T, H, W) in [-1, 1] and their captions, loaded once."""
        return self._held_out.load(trainer)

    def generator(self, module: L.LightningModule) -> torch.Generator:
        """The noise generator of one evaluation (CPU by default)."""
        return torch.Generator().manual_seed(self.seed)

    def measure(self, module: L.LightningModule, x0: Tensor, cond: Any, generator: torch.Generator) -> Tensor:
        """Per-clip values (L, b) of latents x0 (b, C, T', H', W') with conditioning ``cond``."""
        raise NotImplementedError

    def names(self) -> list[str]:
        """The L metric names, in the order of `measure`'s rows (known after the first `measure`)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
        """The metrics of ``module`` now: {name: mean over clips} and the summary."""
        videos, captions = self.clips(trainer)
        generator = self.generator(module)
        was_training = module.training
        module.eval()
        total: Tensor | None = None
        try:
            with trainer.precision_plugin.forward_context():
                for start in range(0, self.num_clips, self.batch_size):
                    video = videos[start : start + self.batch_size].to(module.device)  # (b, 3, T, H, W)
                    x0 = module.vae.encode(video).float()  # (b, C, T', H', W') normalised latents
                    cond = module.encode_text(captions[start : start + self.batch_size])
                    values = self.measure(module, x0, cond, generator).to(torch.float64).cpu()  # (L, b)
                    total = values.sum(1) if total is None else total + values.sum(1)
        finally:
            module.train(was_training)
        mean = total / self.num_clips  # (L,)
        metrics = {name: float(m) for name, m in zip(self.names(), mean)}
        metrics[f"{self.prefix}{self.summary}"] = float(mean.mean())
        return metrics

    def run(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        step = trainer.global_step
        self.results = self.evaluate(trainer, module)
        if trainer.logger is not None:
            trainer.logger.log_metrics(self.results, step=step)
