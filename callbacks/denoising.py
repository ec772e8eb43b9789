"""Log the denoising error at matched log-SNR (`eval.denoising`) on a fixed held-out batch to MLflow.

Unlike the training loss, ``eval/x0_mse`` compares across objectives: every arm, whatever its path
(rectified flow, VP diffusion), time density or prediction (velocity, ε, v), is asked for the same
thing, the clean latent x0 from x_t at log-SNR λ = log(α²/σ²) ∈ ``log_snrs``, on the same clips, the
same captions and the same noise ε (a generator seeded with ``seed`` afresh at every evaluation).
See eval/denoising.py for why equal λ means an identical denoising task on every path.

Metrics, per evaluation, at the trainer's global step: ``eval/x0_mse_lsnr{λ}`` (e.g.
``eval/x0_mse_lsnr-4``) = mean over clips and latent elements of (x̂0 − x0)², and ``eval/x0_mse`` =
their mean over the λ grid (an unweighted average over a uniform λ grid, i.e. the x0 error integrated
against a flat density in λ, cf. Kingma & Gao 2023's weighting functions w(λ)).

The clips: ``data``, a datamodule built from its own config node (configs/callbacks/ablation.yaml
renders a Shapes set with another seed than training, so the clips are held out), whose dataset's
first ``num_clips`` items are used in order; without ``data`` the trainer's datamodule is used (its
val split when it has one, else its train split; both fixed by ``data.seed``, not by the run seed).
Clips go through ``pl_module.vae.encode`` and captions through ``pl_module.encode_text`` (no caption
dropout), exactly as in training.

Every rank evaluates (under FSDP the forward needs all ranks; under DDP the ranks compute the same
numbers), the logger writes on rank 0 (Lightning loggers are rank-zero only).
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import torch
from torch import Tensor

from callbacks.held_out import HeldOutMetric
from eval.denoising import DEFAULT_LOG_SNRS, matched_snr_x0_error, metric_name


class DenoisingError(HeldOutMetric):
    """Evaluate `eval.denoising.matched_snr_x0_error` at train end and every ``every_n_steps`` (0: end only).

    data: a LightningDataModule (built from a ``_target_`` node) whose ``dataset`` holds the held-out
    clips, or None for the trainer's datamodule; num_clips: clips evaluated (the first ones, in
    order); batch_size: clips per forward pass (ε is drawn chunk by chunk from one generator, so
    keep it, like ``seed``, the same across the arms compared); log_snrs: the λ grid;
    seed: the noise generator's seed; prefix: metric name prefix. ``results`` holds the metrics of
    the latest evaluation. The loop over clips is `callbacks.held_out.HeldOutMetric`.
    """

    summary = "x0_mse"

    def __init__(
        self,
        data: Any = None,
        num_clips: int = 64,
        batch_size: int = 16,
        log_snrs: Sequence[float] = DEFAULT_LOG_SNRS,
        seed: int = 0,
        every_n_steps: int = 0,
        prefix: str = "eval/",
    ) -> None:
        if not log_snrs:
            raise ValueError("log_snrs must list at least one log-SNR")
        self.log_snrs = [float(v) for v in log_snrs]
        super().__init__(data, num_clips, batch_size, seed, every_n_steps, prefix)

    def measure(self, module: L.LightningModule, x0: Tensor, cond: Any, generator: torch.Generator) -> Tensor:
        """(L, b): the x0 error of each clip at each λ (the same ε at every evaluation, in every arm)."""
        return matched_snr_x0_error(module.objective, module.backbone, x0, cond, self.log_snrs, generator,
                                    per_sample=True)

    def names(self) -> list[str]:
        return [metric_name(lam, self.prefix) for lam in self.log_snrs]
