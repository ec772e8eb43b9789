"""Log the backbone's model card (parameters, checkpoint sizes, FLOPs; `modules.backbones.card`) to
MLflow when fit starts: ``model_card.json`` as an artifact and the key numbers as metrics
(``model/params_total``, ``model/flops_train_step``, ...) so runs can be sorted by them.

The latent shape the FLOPs refer to comes from the autoencoder, ``vae.latent_shape(num_frames,
height, width)``, at the data's clip size and batch size (per device), given by config interpolation
(configs/callbacks/default.yaml). Without a clip size or text length the card has no FLOPs.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from mlflow.entities import Metric, Param

from modules.backbones.card import model_card

METRICS = {  # metric name -> path in the card
    "model/params_total": ("params", "total"),
    "model/params_trainable": ("params", "trainable"),
    "model/params_active": ("params", "active"),
    "model/checkpoint_bytes_fp32": ("checkpoint_bytes", "fp32"),
    "model/checkpoint_bytes_bf16": ("checkpoint_bytes", "bf16"),
    "model/checkpoint_bytes_int8": ("checkpoint_bytes", "int8"),
    "model/flops_forward": ("flops", "forward"),
    "model/flops_train_step": ("flops", "train_step"),
    "model/flops_sampling_step": ("flops", "sampling_step"),
}


def _uses_cfg(module: L.LightningModule) -> bool:
    """Whether sampling runs the null branch: any scale other than a constant 1."""
    guidance = getattr(module, "guidance", None)
    if guidance is None:
        return False
    return getattr(guidance, "cfg_scales", None) is not None or float(guidance.cfg_scale) != 1.0


class ModelCard(L.Callback):
    """On fit start (global rank 0): compute the card of ``pl_module.backbone`` and log it.

    batch_size, num_frames, height, width: the training clip (pixels); text_len: text tokens the
    backbone sees; sampling_steps: sampler steps; cfg: whether sampling uses guidance (default:
    from ``pl_module.guidance``). ``card`` holds the last card computed.
    """

    def __init__(
        self,
        batch_size: int = 1,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        text_len: int | None = None,
        sampling_steps: int | None = None,
        cfg: bool | None = None,
        artifact_file: str = "model_card.json",
    ) -> None:
        self.batch_size = batch_size
        self.clip = (num_frames, height, width)
        self.text_len = text_len
        self.sampling_steps = sampling_steps
        self.cfg = cfg
        self.artifact_file = artifact_file
        self.card: dict[str, Any] | None = None

    def compute(self, pl_module: L.LightningModule) -> dict[str, Any]:
        """The card of ``pl_module.backbone`` at this callback's clip and text size."""
        cfg = _uses_cfg(pl_module) if self.cfg is None else self.cfg
        x_shape = None
        if None not in self.clip:
            x_shape = (self.batch_size, *pl_module.vae.latent_shape(*self.clip))  # (B, C, T', H', W')
        return model_card(pl_module.backbone, x_shape, self.text_len, self.sampling_steps, cfg)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self.card = self.compute(pl_module)
        run_id = getattr(trainer.logger, "run_id", None)
        if run_id is None:
            return
        client = trainer.logger.experiment
        now = int(time.time() * 1000)
        metrics = []
        for name, (section, key) in METRICS.items():
            value = self.card[section][key]
            if value is not None:
                metrics.append(Metric(name, float(value), now, 0))
        params = [Param("model/x_shape", str(self.card["x_shape"])), Param("model/text_len", str(self.card["text_len"]))]
        client.log_batch(run_id, metrics=metrics, params=params)
        client.log_dict(run_id, self.card, self.artifact_file)
