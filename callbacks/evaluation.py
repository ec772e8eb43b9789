"""Sample K videos for fixed prompts and seeds, score them (`eval.scorer`), log numbers, protocol,
videos and two tables to MLflow: every ``every_n_steps`` and at the end of fit.

Tables (MLflow ``log_table``, JSON the artifact viewer shows as a table), per step:
``eval/step_NNNNNN/videos.json``, one row per generated video (index, prompt, seed, file, the
artifact path when the mp4 was logged, what the probe read and whether it is right, each VBench
dimension's score), and ``eval/step_NNNNNN/dimensions.json``, one row per probe attribute and VBench
dimension (score, and VBench's normalised score).

Prompts and seeds: ``prompts`` if given (cycled to ``num_videos``), else the captions of the first
``num_videos`` reference clips (held out from training); video i gets seed ``seed + i``. The same
videos are asked for at every evaluation, in every arm of an ablation and on any number of devices.

Sharding (DDP or FSDP): rank r generates videos r, r + W, r + 2W, ... and pads its share to
⌈K / W⌉ with repeats of its last video, so every rank runs the same number of sampler calls (under
FSDP each forward is a collective) and contributes equal-sized rows to one `all_gather`: ranks with
less work never leave a collective unmatched. Feature rows are gathered, padding dropped, and
global rank 0 computes and logs the scores. Every rank writes its own mp4s into one folder
(``<output_dir>/eval/<run>/step_NNNNNN/``, on a filesystem all ranks share), which VBench reads.

The reference clips (``reference``, a datamodule node; Shapes of another seed by default) are
loaded once; their feature statistics are cached on disk under ``<output_dir>/eval/reference/``
keyed by a fingerprint of clips + protocol + network (`eval.reference`). The Shapes probe is
trained once on rank 0 and cached under ``<output_dir>/eval/probes/``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from torch import Tensor

from callbacks.cadence import EveryNSteps
from callbacks.held_out import HeldOutClips
from callbacks.samples import save_videos, video_filename
from datamodules.digest import tensor_digest
from eval.probe import cached_probe
from eval.reference import FeatureSums
from eval.scorer import VideoScorer, check_metrics


def shard(num_videos: int, rank: int, world: int) -> tuple[list[int], int]:
    """This rank's video indices (r, r + W, ...) and its padded share ⌈K / W⌉ (every rank's)."""
    return list(range(rank, num_videos, world)), math.ceil(num_videos / world)


def unshard(gathered: Tensor, num_videos: int) -> Tensor:
    """Rows gathered from every rank (W, per_rank, ...) → (K, ...) in global video order.

    Row j of rank r is video r + j·W (`shard`); rows past K are padding and are dropped.
    """
    world, per_rank = gathered.shape[:2]
    order = gathered.transpose(0, 1).reshape(world * per_rank, *gathered.shape[2:])  # row j·W + r
    return order[:num_videos]


class VideoEvaluation(EveryNSteps):
    """Generate, score and log; see the module docstring.

    metrics: subset of ``probe, fvd_probe, fvd, vbench``; num_videos: K; prompts/seed: see above;
    num_frames/height/width/cfg_scale: generation settings; batch_size: videos per sampler call;
    reference: datamodule node of real clips (None: the trainer's datamodule) and num_reference
    of them; protocol/detector_path: FVD settings; probe: `eval.probe.train_probe` arguments;
    vbench_dimensions: VBench dimensions for ``vbench``; log_videos: mp4s logged per evaluation.
    """

    def __init__(self, every_n_steps: int = 0, metrics: Sequence[str] = ("probe", "fvd_probe"),
                 num_videos: int = 32, prompts: Sequence[str] | None = None, seed: int = 0,
                 num_frames: int = 8, height: int = 32, width: int = 32, cfg_scale: float | None = None,
                 batch_size: int = 16, reference: Any = None, num_reference: int = 256,
                 protocol: str = "fvd2048_16f", detector_path: str | None = None,
                 probe: dict[str, Any] | None = None, vbench_dimensions: Sequence[str] = ("temporal_flickering",),
                 log_videos: int = 4, fps: int = 8, display_scale: int = 1, prefix: str = "eval/") -> None:
        super().__init__(every_n_steps)
        self.metrics = check_metrics(metrics)
        if num_videos < 1 or batch_size < 1:
            raise ValueError(f"VideoEvaluation: num_videos and batch_size must be positive, got {num_videos}, {batch_size}")
        self.num_videos, self.prompts, self.seed = num_videos, list(prompts or []), seed
        self.num_frames, self.height, self.width, self.cfg_scale = num_frames, height, width, cfg_scale
        self.batch_size, self.protocol, self.detector_path = batch_size, protocol, detector_path
        self.probe_args = dict(probe or {})
        self.vbench_dimensions = list(vbench_dimensions)
        self.log_videos, self.fps, self.display_scale, self.prefix = log_videos, fps, display_scale, prefix
        self._reference_clips = HeldOutClips(reference, max(num_reference, 1), "VideoEvaluation")
        self._scorer: VideoScorer | None = None
        self._reference: dict[str, FeatureSums] | None = None
        self._protocol_logged = False
        self.results: dict[str, float] = {}
        self.folder: Path | None = None
        self.per_video: list[dict[str, Any]] = []  # rows of the latest evaluation (global rank 0)

    # -- once ----------------------------------------------------------------------------------------

    def output_dir(self, module: L.LightningModule) -> Path:
        return Path(module.config.get("output_dir", "outputs")) if hasattr(module, "config") else Path("outputs")

    def scorer(self, trainer: L.Trainer | None, module: L.LightningModule) -> VideoScorer:
        """Built on first use; the probe is trained on rank 0 while the others wait, then read."""
        if self._scorer is None:
            probe = None
            if {"probe", "fvd_probe"} & set(self.metrics):
                args = {"num_frames": self.num_frames, "height": self.height, "width": self.width, **self.probe_args}
                folder = self.output_dir(module) / "eval" / "probes"
                if trainer is None or trainer.is_global_zero:
                    probe = cached_probe(folder, **args)
                if trainer is not None:
                    trainer.strategy.barrier("vidlab-probe")
                if probe is None:
                    probe = cached_probe(folder, **args)
            self._scorer = VideoScorer([m for m in self.metrics if m != "vbench"], probe, self.protocol,
                                       detector_path=self.detector_path, device=module.device,
                                       batch_size=self.batch_size)
        return self._scorer

    def prompts_and_seeds(self, trainer: L.Trainer | None) -> tuple[list[str], list[int]]:
        if self.prompts:
            prompts = [self.prompts[i % len(self.prompts)] for i in range(self.num_videos)]
        else:
            _, captions = self._reference_clips.load(trainer)
            if len(captions) < self.num_videos:
                raise ValueError(f"VideoEvaluation: {self.num_videos} videos asked, the reference has "
                                 f"{len(captions)} captions; set 'prompts' or num_reference")
            prompts = list(captions[:self.num_videos])
        return prompts, [self.seed + i for i in range(self.num_videos)]

    def reference(self, trainer: L.Trainer | None, module: L.LightningModule) -> dict[str, FeatureSums]:
        """Reference sums (rank 0), cached on disk by fingerprint."""
        if self._reference is None:
            videos, _ = self._reference_clips.load(trainer)
            cache = self.output_dir(module) / "eval" / "reference"
            self._reference = self.scorer(trainer, module).reference(videos, tensor_digest(videos), cache)
        return self._reference

    # -- every evaluation ------------------------------------------------------------------------------

    def generate(self, module: L.LightningModule, prompts: list[str], seeds: list[int]) -> Tensor:
        """Videos (n, 3, T, H, W) for this rank's prompts, ``batch_size`` per sampler call."""
        out = []
        for start in range(0, len(prompts), self.batch_size):
            out.append(module.generate(prompts[start:start + self.batch_size], seeds[start:start + self.batch_size],
                                       self.num_frames, self.height, self.width, self.cfg_scale).cpu())
        return torch.cat(out)

    def evaluate(self, module: L.LightningModule, trainer: L.Trainer | None = None, run_id: str = "no-logger",
                 step: int = 0) -> tuple[dict[str, float], dict[str, Any], Any] | None:
        """Generate this rank's share, gather, and on global rank 0 return (scores, protocol record,
        VBench result or None); other ranks return None. ``trainer`` None: one process (`vidlab eval
        --run`), reference clips from the ``reference`` node."""
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        scorer = self.scorer(trainer, module)
        prompts, seeds = self.prompts_and_seeds(trainer)
        mine, per_rank = shard(self.num_videos, rank, world)
        padded = (mine + [mine[-1] if mine else 0] * per_rank)[:per_rank]  # equal work on every rank
        videos = self.generate(module, [prompts[i] for i in padded], [seeds[i] for i in padded])

        self.folder = self.output_dir(module) / "eval" / run_id / f"step_{step:06d}"
        save_videos(videos[:len(mine)], [prompts[i] for i in mine], [seeds[i] for i in mine], self.folder,
                    self.fps, self.display_scale)
        rows = scorer.features(videos)  # (per_rank, d) each
        if world > 1:
            rows = {k: unshard(trainer.strategy.all_gather(v.to(module.device)).cpu(), self.num_videos)
                    for k, v in rows.items()}
            trainer.strategy.barrier("vidlab-eval-videos")  # every rank's mp4s are on disk
            if not trainer.is_global_zero:
                return None
        reference = self.reference(trainer, module) if {"fvd", "fvd_probe"} & set(self.metrics) else None
        scores = scorer.scores(rows, prompts, reference) if scorer.metrics else {}
        per_video = scorer.per_video(rows, prompts) if scorer.metrics else [{} for _ in prompts]
        self.per_video = [{"index": i, "prompt": p, "seed": s, "file": video_filename(p, s), **extra}
                          for i, (p, s, extra) in enumerate(zip(prompts, seeds, per_video))]
        vbench = None
        if "vbench" in self.metrics:
            from eval.vbench import run_vbench

            vbench = run_vbench(self.folder, self.vbench_dimensions, self.folder / "vbench")
        return scores, scorer.protocol_record(self.num_videos, reference), vbench

    def run(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        run_id = getattr(trainer.logger, "run_id", None) or "no-logger"
        out = self.evaluate(module, trainer, run_id, trainer.global_step)
        if out is None:
            return
        scores, protocol, vbench = out
        self.results = {f"{self.prefix}{k}": v for k, v in scores.items()}
        if trainer.logger is not None and getattr(trainer.logger, "run_id", None):
            self.results.update(log_evaluation(trainer.logger.experiment, trainer.logger.run_id, trainer.global_step,
                                               self.results, protocol, vbench, self.folder, self.log_videos,
                                               first=not self._protocol_logged, per_video=self.per_video))
            self._protocol_logged = True


def log_evaluation(client: Any, run_id: str, step: int, metrics: dict[str, float], protocol: dict[str, Any],
                   vbench: Any, folder: Path | None, log_videos: int, first: bool = True,
                   per_video: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Metrics at ``step``; with ``first`` the protocol as ``eval/protocol.json`` (+ a tag naming the
    FVD preset); the first ``log_videos`` mp4s of ``folder`` (in seed order) under ``eval/step_N/``;
    VBench's metrics and per-video tables (`eval.vbench.log_vbench`), whose metrics are returned;
    the tables of the module docstring (`evaluation_tables`; ``per_video`` rows as
    `VideoEvaluation.evaluate` leaves them, None: no per-video table)."""
    import pandas
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in metrics.items()])
    if first:  # fixed for the run: logged once
        client.log_text(run_id, json.dumps(protocol, indent=2, default=str), "eval/protocol.json")
        if "fvd" in protocol:
            client.set_tag(run_id, "vidlab.eval.fvd_protocol", protocol["fvd"]["name"])
    logged: dict[str, str] = {}  # file name -> artifact path
    if folder is not None:
        videos = sorted(folder.glob("*.mp4"), key=lambda p: int(p.stem.rpartition("-")[2]))
        for path in videos[:log_videos]:
            client.log_artifact(run_id, str(path), artifact_path=f"eval/step_{step:06d}")
            logged[path.name] = f"eval/step_{step:06d}/{path.name}"
    vbench_metrics: dict[str, float] = {}
    if vbench is not None:
        from eval.vbench import log_vbench

        vbench_metrics = log_vbench(client, run_id, vbench, step)
    for name, rows in zip(("videos", "dimensions"), evaluation_tables(metrics, vbench, per_video, logged)):
        if rows:  # records (one dict per row) -> DataFrame
            client.log_table(run_id, data=pandas.DataFrame(rows), artifact_file=f"eval/step_{step:06d}/{name}.json")
    return vbench_metrics


def evaluation_tables(metrics: dict[str, float], vbench: Any, per_video: list[dict[str, Any]] | None,
                      logged: dict[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of ``videos.json`` and ``dimensions.json`` (module docstring).

    Videos: ``per_video`` plus ``artifact`` (where the mp4 is in the run, "" when not logged) and
    ``vbench_<dimension>`` (VBench's per-video score, matched by file name; None when VBench left the
    video out). Dimensions: ``probe_acc_<attribute>`` of ``metrics`` (any prefix) as metric
    ``probe``, then each VBench dimension with its raw and normalised score.
    """
    videos = []
    vbench_scores = {dim: {row["video"]: row["score"] for row in rows}
                     for dim, rows in (vbench.per_video.items() if vbench is not None else ())}
    for row in per_video or []:
        extra = {f"vbench_{dim}": scores.get(row["file"]) for dim, scores in vbench_scores.items()}
        videos.append({**row, "artifact": logged.get(row["file"], ""), **extra})
    dimensions: list[dict[str, Any]] = []
    for key, value in metrics.items():
        name = key.rpartition("/")[2]
        if name.startswith("probe_acc_"):
            dimensions.append({"metric": "probe", "dimension": name.removeprefix("probe_acc_"),
                               "score": float(value), "normalised": None})
    if vbench is not None:
        from eval.vbench import normalised_scores

        normalised = normalised_scores(vbench.scores)["normalised"]
        for dim, score in vbench.scores.items():
            dimensions.append({"metric": "vbench", "dimension": dim, "score": float(score),
                               "normalised": normalised.get(dim)})
    return videos, dimensions
