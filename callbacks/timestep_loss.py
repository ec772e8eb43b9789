"""Log the validation loss at fixed time buckets (`eval.timestep_loss`) on held-out clips to MLflow.

The training loss mixes noise levels and redraws t and ε every batch; here the objective's own loss
is evaluated at K fixed times t_k, the quantiles (k + 1/2)/K of its training time density (or
explicit ``times``), on the same clips, captions and noise ε at every evaluation (a generator seeded
with ``seed`` afresh each time, on the module's device: CPU and GPU runs draw different ε). Each
curve then moves only when the network does, and shows at which noise levels the model learns.

Metrics, per evaluation, at the trainer's global step: ``val/loss_t{t_k:.3f}`` (e.g.
``val/loss_t0.062``; the bucket time is in the name) = mean over clips of the per-sample training
loss at t = t_k, and ``val/loss`` = their mean over the K buckets, a midpoint-rule estimate of the
training loss (each bucket holds 1/K of the training density). Losses compare within one objective
only (eval/denoising.py's ``eval/x0_mse`` compares across objectives).

The clips: ``data``, a datamodule built from its own config node (configs/callbacks/default.yaml
renders a Shapes set with another seed than training), whose dataset's first ``num_clips`` items are
used in order; without ``data`` the trainer's datamodule (val split if any, else train). Clips go
through ``pl_module.vae.encode``, captions through ``pl_module.encode_text`` (no caption dropout).

Every rank evaluates (under FSDP the forward needs all ranks; under DDP the ranks compute the same
numbers), the logger writes on rank 0 (Lightning loggers are rank-zero only).
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import torch
from torch import Tensor

from callbacks.held_out import HeldOutMetric
from eval.timestep_loss import DEFAULT_SAMPLES, loss_at_times, metric_name, time_quantiles
from modules.objectives.flow import latent_positions

F64 = torch.float64


class TimestepLoss(HeldOutMetric):
    """Evaluate `eval.timestep_loss.loss_at_times` at train end and every ``every_n_steps`` (0: end only).

    data: a LightningDataModule (built from a ``_target_`` node) whose ``dataset`` holds the held-out
    clips, or None for the trainer's datamodule; num_clips: clips evaluated (the first ones, in
    order); batch_size: clips per forward pass (ε is drawn chunk by chunk from one generator, so keep
    it, like ``seed``, fixed across the runs compared); num_buckets: K quantile buckets of the
    objective's time density, or ``times``: explicit bucket times in [0, 1]; seed: the noise
    generator's seed; prefix: metric name prefix. ``times`` holds the bucket times (K,) once known,
    ``results`` the metrics of the latest evaluation. The loop over clips is
    `callbacks.held_out.HeldOutMetric`.
    """

    summary = "loss"

    def __init__(
        self,
        data: Any = None,
        num_clips: int = 16,
        batch_size: int = 16,
        num_buckets: int = 8,
        times: Sequence[float] | None = None,
        seed: int = 0,
        every_n_steps: int = 0,
        prefix: str = "val/",
    ) -> None:
        if num_buckets < 1:
            raise ValueError(f"TimestepLoss: num_buckets must be positive, got {num_buckets}")
        if times is not None and (len(times) == 0 or not all(0.0 <= float(t) <= 1.0 for t in times)):
            raise ValueError(f"TimestepLoss: times must be a non-empty list in [0, 1], got {times}")
        super().__init__(data, num_clips, batch_size, seed, every_n_steps, prefix)
        self.num_buckets = num_buckets
        self.times: Tensor | None = None if times is None else torch.tensor([float(t) for t in times], dtype=F64)

    def bucket_times(self, objective: Any, x0: Tensor) -> Tensor:
        """(K,) float64: the explicit ``times``, or the quantile buckets of ``objective`` at x0's
        resolution (latent positions T·H·W of x0 (B, C, T, H, W)), computed once."""
        if self.times is None:
            self.times = time_quantiles(objective, self.num_buckets, DEFAULT_SAMPLES, tokens=latent_positions(x0))
        names = [metric_name(t, self.prefix) for t in self.times.tolist()]
        if len(set(names)) < len(names):
            raise ValueError(f"TimestepLoss: bucket times {self.times.tolist()} collide in the metric names {names}")
        return self.times

    def generator(self, module: L.LightningModule) -> torch.Generator:
        """On the module's device (the noise is drawn there): CPU and GPU runs draw different ε."""
        return torch.Generator(device=module.device).manual_seed(self.seed)

    def measure(self, module: L.LightningModule, x0: Tensor, cond: Any, generator: torch.Generator) -> Tensor:
        """(K, b): each clip's training loss at each bucket time, the same ε in every bucket."""
        times = self.bucket_times(module.objective, x0)
        return loss_at_times(module.objective, module.backbone, x0, cond, times, generator, per_sample=True)

    def names(self) -> list[str]:
        return [metric_name(t, self.prefix) for t in self.times.tolist()]
