"""Run one composed experiment: build, train, sample, and record everything in one MLflow run."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger

from callbacks.resume import ResumeState
from callbacks.samples import SampleVideos
from experiments.build import build_callbacks, build_datamodule, build_system, trainer_kwargs
from experiments.checkpoint_io import AtomicCheckpointIO
from experiments.config import Composed, to_yaml
from experiments.export import export_safetensors
from experiments.ranks import global_rank, publish_run_id, shared_run_id
from experiments.tracking import RunRecord, git_state, log_config, make_logger, tracking_uri
from modules.parallel import FSDP2Strategy, recover_sharded_checkpoint
from modules.system import NonFiniteLossError


@dataclass
class FitResult:
    run_id: str
    final_loss: float | None
    checkpoint: Path | None
    samples: list[Path] = field(default_factory=list)
    skipped_videos: int = 0


def run_fit(composed: Composed, run_id: str | None = None, tags: dict[str, str] | None = None,
            resume: bool = False) -> FitResult:
    """Train ``composed`` into a new MLflow run (or ``run_id``, an existing one) and return a summary.

    ``resume``: continue ``run_id`` from its ``checkpoints/<run_id>/last.ckpt`` (model, optimizer,
    schedule, loops, every rank's RNG states and the position in the epoch: `callbacks.resume`),
    logging into the same MLflow run.

    The run gets the flattened config as params, ``config.yaml``, the git commit, the presets as
    ``vidlab.preset.<group>`` tags, its environment, dataset input and system metrics while it trains
    (`experiments.tracking.RunRecord`) and, at the end, ``vidlab.checkpoint`` (the last checkpoint).
    """
    cfg = composed.cfg
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    system = build_system(composed)
    datamodule = build_datamodule(  # the latent cache checks its fingerprint against the system's parts
        composed, vae=getattr(system, "vae", None), text_encoder=getattr(system, "text_model", None))
    callbacks = build_callbacks(composed)
    kwargs = trainer_kwargs(composed)  # its ConfigErrors come before anything is written

    preset_tags = {f"vidlab.preset.{group}": name for group, name in composed.presets.items()}
    if global_rank() == 0:
        logger = make_logger(cfg, run_id=run_id, tags={**preset_tags, **(tags or {})})
        client, run = logger.experiment, logger.run_id
        # set here too: MLFlowLogger ignores its tags when it resumes an existing run (sweep children)
        for key, value in {**git_state(), **preset_tags, **(tags or {})}.items():
            client.set_tag(run, key, value)
        if resume:  # params are immutable in MLflow: the config of this attempt goes beside the first one
            client.log_text(run, to_yaml(cfg), "config_resumed.yaml")
        else:
            log_config(client, run, cfg)
        publish_run_id(cfg["output_dir"], run)  # the other ranks log nothing but use its folders
    else:
        run = shared_run_id(cfg["output_dir"])
        logger = MLFlowLogger(experiment_name=cfg["tracking"]["experiment"], tracking_uri=tracking_uri(cfg), run_id=run)
        client = None

    ckpt_dir = Path(cfg["output_dir"]) / "checkpoints" / run
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, filename="step{step:06d}", auto_insert_metric_name=False,
        every_n_train_steps=cfg["checkpoint"]["every_n_steps"], save_top_k=cfg["checkpoint"]["keep_last"],
        monitor="step", mode="max", save_last=True,
    )
    sharded = isinstance(kwargs.get("strategy"), FSDP2Strategy)  # torch.distributed.checkpoint writes the shards
    trainer = L.Trainer(
        **kwargs, logger=logger, callbacks=[*callbacks, RunRecord(cfg, resume), ResumeState(), checkpoint],
        default_root_dir=cfg["output_dir"], plugins=None if sharded else [AtomicCheckpointIO()],
    )
    ckpt_path = None
    if resume:
        ckpt_path = ckpt_dir / "last.ckpt"
        recover_sharded_checkpoint(ckpt_path)  # an fsdp run killed between the two renames of its save
        if not ckpt_path.exists():
            raise FileNotFoundError(f"run {run} has no checkpoint to resume from: {ckpt_path} does not exist")
    try:
        trainer.fit(system, datamodule=datamodule, ckpt_path=ckpt_path)
    except NonFiniteLossError as exc:  # weights and checkpoints are as of the last finite step
        if trainer.is_global_zero:
            client.set_tag(run, "vidlab.stopped", str(exc)[:5000])
            if checkpoint.last_model_path:
                client.set_tag(run, "vidlab.checkpoint", checkpoint.last_model_path)
        raise

    last = ckpt_dir / "last.ckpt"
    # ModelCheckpoint writes last.ckpt on its step cadence only; the final state (steps after the last
    # multiple of every_n_steps, an autoencoder's latent statistics) is written here, on every rank
    trainer.save_checkpoint(last, weights_only=False)  # full state: optimizer, schedules, loops
    if sharded:  # one file that loads into a one-process model (vidlab sample, vidlab eval --run)
        trainer.strategy.barrier("vidlab-export")  # every rank's shards are on disk
        if trainer.is_global_zero:
            client.set_tag(run, "vidlab.checkpoint_sharded", str(last))
            last = export_safetensors(last)
    if trainer.is_global_zero:
        client.set_tag(run, "vidlab.checkpoint", str(last))
        if cfg.get("task") == "autoencoder" and last.exists():
            client.set_tag(run, "vidlab.autoencoder", str(export_autoencoder(last, cfg)))
    skipped = _skipped_videos(datamodule)
    if skipped and trainer.is_global_zero:
        client.log_metric(run, "data/skipped_videos", skipped)
    loss = trainer.callback_metrics.get("train/loss")
    samples = [p for cb in callbacks if isinstance(cb, SampleVideos) for p in cb.paths]
    if samples and trainer.is_global_zero:
        client.set_tag(run, "vidlab.samples_dir", str(samples[0].parent))
    return FitResult(run, None if loss is None else float(loss), last if last.exists() else None, samples, skipped)


def export_autoencoder(last: Path, cfg: dict[str, Any]) -> Path:
    """Copy a trained autoencoder's last checkpoint to ``<output_dir>/autoencoders/<name>/last.ckpt``
    (atomically: temp file + rename), the stable path ``vae=pretrained vae.checkpoint=...`` reads."""
    target = Path(cfg["output_dir"]) / "autoencoders" / str(cfg["name"]) / "last.ckpt"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".ckpt.tmp")
    shutil.copyfile(last, tmp)
    os.replace(tmp, target)
    return target


def _skipped_videos(datamodule: Any) -> int:
    """How many unreadable videos the datamodule's datasets skipped (0 when it does not say)."""
    total = 0
    for name in ("train_dataset", "val_dataset", "dataset"):
        dataset = getattr(datamodule, name, None)
        total += len(getattr(dataset, "skipped", {}) or {})
    return total
