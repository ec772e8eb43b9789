"""Reconstruction quality of an autoencoder being trained: PSNR and SSIM on held-out clips, and
side-by-side mp4s (original | reconstruction) logged to MLflow.

PSNR and SSIM come from torchmetrics on pixels mapped from [-1, 1] to [0, 1] (``data_range`` 1),
per frame: clips (N, 3, T, H, W) are folded to N·T images, SSIM with torchmetrics' defaults
(Gaussian window 11, σ 1.5; Wang et al. 2004). PSNR is computed over all pixels of all clips at once
(``reduction`` over the whole set, i.e. 10·log10(1 / MSE) of the pooled MSE), the way autoencoder
papers report it for a test set. The reconstruction goes through the posterior mean
(`AutoencoderSystem.reconstruct`).

Metrics, at the trainer's global step: ``{prefix}psnr``, ``{prefix}ssim``, ``{prefix}l1``. Videos
under ``reconstructions/step_NNNNNN/`` in the run's artifacts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from callbacks.cadence import EveryNSteps
from callbacks.held_out import HeldOutClips
from callbacks.samples import save_videos


def frames_01(video: Tensor) -> Tensor:
    """(N, 3, T, H, W) in [-1, 1] -> (N·T, 3, H, W) in [0, 1]."""
    n, c, t, h, w = video.shape
    return ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)


def reconstruction_metrics(videos: Tensor, recons: Tensor) -> dict[str, float]:
    """PSNR (dB), SSIM and L1 (in [-1, 1] units) of ``recons`` against ``videos``, both (N, 3, T, H, W)."""
    x, y = frames_01(videos), frames_01(recons)
    psnr = PeakSignalNoiseRatio(data_range=1.0)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
    return {
        "psnr": float(psnr(y, x)),
        "ssim": float(ssim(y, x)),
        "l1": float((videos.float() - recons.float()).abs().mean()),
    }


class Reconstructions(EveryNSteps):
    """Every ``every_n_steps`` (0: only at the end) and at train end: reconstruct ``num_clips``
    held-out clips, log PSNR / SSIM / L1, and write the first ``num_videos`` side by side as mp4.

    data: a datamodule node (built) with the held-out clips, or None for the trainer's datamodule.
    ``results`` holds the latest metrics.
    """

    def __init__(self, data: Any = None, num_clips: int = 16, batch_size: int = 8, every_n_steps: int = 0,
                 num_videos: int = 4, fps: int = 8, display_scale: int = 4, prefix: str = "val/") -> None:
        if batch_size < 1:
            raise ValueError(f"Reconstructions: batch_size must be positive, got {batch_size}")
        self._held_out = HeldOutClips(data, num_clips, "Reconstructions")
        super().__init__(every_n_steps)
        self.batch_size, self.num_videos = batch_size, num_videos
        self.fps, self.display_scale, self.prefix = fps, display_scale, prefix
        self.results: dict[str, float] = {}
        self.paths: list[Path] = []

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> tuple[dict[str, float], Tensor, Tensor]:
        videos, _ = self._held_out.load(trainer)
        with trainer.precision_plugin.forward_context():
            recons = torch.cat([
                module.reconstruct(videos[i : i + self.batch_size].to(module.device)).float().cpu()
                for i in range(0, len(videos), self.batch_size)
            ])
        metrics = {f"{self.prefix}{k}": v for k, v in reconstruction_metrics(videos, recons).items()}
        return metrics, videos, recons

    def run(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        step = trainer.global_step
        self.results, videos, recons = self.evaluate(trainer, module)
        if trainer.logger is None or not trainer.is_global_zero:
            return
        trainer.logger.log_metrics(self.results, step=step)
        run = getattr(trainer.logger, "run_id", None)
        if run is None or self.num_videos <= 0:
            return
        k = min(self.num_videos, len(videos))
        pairs = torch.cat([videos[:k], recons[:k]], dim=-1)  # (k, 3, T, H, 2W): original | reconstruction
        _, captions = self._held_out.load(trainer)
        folder = Path(module.config.get("output_dir", "outputs")) / "reconstructions" / run / f"step_{step:06d}"
        self.paths = save_videos(pairs, captions[:k], list(range(k)), folder, self.fps, self.display_scale)
        for path in self.paths:
            trainer.logger.experiment.log_artifact(run, str(path), artifact_path=f"reconstructions/step_{step:06d}")
