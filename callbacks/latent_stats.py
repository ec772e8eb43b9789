"""Measure an autoencoder's per-channel latent mean and std at the end of training and store them as
its normalisation (`LatentAutoencoder.set_latent_stats`), so that ``encode`` of the trained model
returns latents of zero mean and unit variance per channel — what Wan's ``latents_mean`` /
``latents_std`` and SD's ``scaling_factor`` are, measured instead of copied.

The statistics are over every element (clips, frames, positions) of the posterior means of
``num_clips`` training clips (the trainer datamodule's val split if it has one, else train; the
first clips in order), accumulated in float64. They are measured when training ends, whatever ended
it (max_steps, max_time, an interrupt); `experiments.fit.run_fit` writes ``last.ckpt`` after that, so
it carries them. Logged to MLflow as ``latent_stats.json`` and ``latent/mean_c{i}`` / ``latent/std_c{i}``.
"""

from __future__ import annotations

import json
import lightning as L
import torch
from torch import Tensor

from callbacks.held_out import HeldOutClips


@torch.no_grad()
def channel_stats(encode: Any, videos: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std (C,) over every element of ``encode(videos)`` (B, C, T', H', W')."""
    total = total_sq = None
    count = 0
    for i in range(0, len(videos), batch_size):
        z = encode(videos[i : i + batch_size]).double()  # (b, C, T', H', W')
        flat = z.transpose(0, 1).reshape(z.shape[1], -1)  # (C, b·T'·H'·W')
        s, sq = flat.sum(1), flat.square().sum(1)
        total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
        count += flat.shape[1]
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0) * count / max(count - 1, 1)
    return mean, var.sqrt()


class LatentStats(L.Callback):
    """Sets ``pl_module.vae``'s latent statistics from its posterior means at the end of training."""

    def __init__(self, num_clips: int = 64, batch_size: int = 8, min_std: float = 1e-6) -> None:
        self._clips = HeldOutClips(None, num_clips, "LatentStats")
        self.batch_size, self.min_std = batch_size, min_std
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    def measure(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        videos, _ = self._clips.load(trainer)
        vae = module.vae
        was_training = vae.training
        vae.eval()
        try:
            with trainer.precision_plugin.forward_context():
                mean, std = channel_stats(lambda v: vae.posterior(v.to(module.device)).mode(), videos, self.batch_size)
        finally:
            vae.train(was_training)
        self.mean, self.std = mean.float(), std.clamp_min(self.min_std).float()
        vae.set_latent_stats(self.mean.to(vae.latent_mean.device), self.std.to(vae.latent_std.device))
        if trainer.logger is not None and trainer.is_global_zero:
            step = trainer.global_step
            metrics = {f"latent/mean_c{i}": float(m) for i, m in enumerate(self.mean)}
            metrics.update({f"latent/std_c{i}": float(s) for i, s in enumerate(self.std)})
            trainer.logger.log_metrics(metrics, step=step)
            run = getattr(trainer.logger, "run_id", None)
            if run is not None:
                stats = {"mean": self.mean.tolist(), "std": self.std.tolist(), "num_clips": len(videos), "step": step}
                trainer.logger.experiment.log_text(run, json.dumps(stats, indent=2), "latent_stats.json")

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.measure(trainer, module)
