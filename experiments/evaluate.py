"""``vidlab eval``: score a folder of mp4s, or sample and score a trained run; results go to MLflow.

- ``--videos DIR``: every ``*.mp4`` of DIR (prompts from VBench-style names ``<prompt>-<seed>.mp4``)
  is scored; the numbers land in a new run (``eval <DIR name>``) of the configured experiment.
  The Fréchet metrics compare with ``--reference DIR`` (mp4s), or, for the Shapes metrics, with
  held-out Shapes clips rendered in memory at the videos' size.
- ``--run RUN_ID``: the run's last checkpoint generates the videos of its ``callbacks.evaluation``
  node (or that node's defaults), and the numbers are logged into that run at the checkpoint's step.

Scoring is `eval.scorer.VideoScorer`, the same code the training callback uses.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor

from callbacks.evaluation import VideoEvaluation, log_evaluation
from datamodules.digest import file_digest, json_digest
from datamodules.mp4 import read_mp4
from eval.probe import cached_probe, render_set
from eval.reference import FeatureSums
from eval.scorer import VideoScorer, check_metrics
from eval.vbench import prompt_from_filename
from experiments.config import REPO_CONFIGS, ConfigError
from experiments.export import read_checkpoint
from experiments.tracking import client as mlflow_client
from experiments.tracking import experiment_id

log = logging.getLogger("vidlab.eval")

REFERENCE_SEED = 1000  # held-out Shapes: another seed than any training set (data.seed 0)


@dataclass
class EvalResult:
    run_id: str
    scores: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)  # file -> why it was not read


def read_folder(folder: str | Path) -> tuple[Tensor, list[str], list[Path], dict[str, str]]:
    """Every ``*.mp4`` of ``folder`` (sorted): videos (N, 3, T, H, W) in [-1, 1], prompts from the
    file names, the paths read, and the files skipped with the reason (unreadable, or another
    size than the first video's)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"videos folder {folder} does not exist")
    clips, prompts, paths, skipped = [], [], [], {}
    for path in sorted(folder.glob("*.mp4")):
        try:
            frames = read_mp4(path)  # uint8 (T, H, W, 3)
        except Exception as exc:  # decord raises its own DECORDError for corrupt files
            skipped[str(path)] = f"unreadable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            continue
        if clips and frames.shape != clips[0].shape:
            skipped[str(path)] = f"shape {frames.shape}, the first video has {clips[0].shape}"
            continue
        clips.append(frames)
        prompts.append(prompt_from_filename(path))
        paths.append(path)
    for path, why in skipped.items():
        log.warning("skipped %s: %s", path, why)
    if not clips:
        raise FileNotFoundError(f"no readable .mp4 in {folder} (skipped: {len(skipped)})")
    video = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    return video.contiguous(), prompts, paths, skipped


def folder_id(paths: Sequence[Path]) -> str:
    """Identity of a reference folder for the statistics cache: names and contents of its files."""
    return json_digest([[p.name, file_digest(p)] for p in paths])


def evaluate_folder(videos_dir: str | Path, metrics: Sequence[str], reference_dir: str | Path | None = None,
                    protocol: str = "fvd2048_16f", detector_path: str | None = None,
                    vbench_dimensions: Sequence[str] = ("temporal_flickering",), num_reference: int = 256,
                    probe_steps: int = 1000, experiment: str | None = None) -> EvalResult:
    """Score the mp4s of ``videos_dir`` and log the numbers to a new MLflow run."""
    metrics = check_metrics(metrics)
    cfg = {"output_dir": os.environ.get("VIDLAB_OUTPUT_DIR", "outputs"),  # base.yaml's defaults
           "tracking": {"uri": None, "experiment": experiment or "vidlab"}}
    out_dir = Path(cfg["output_dir"])
    videos, prompts, paths, skipped = read_folder(videos_dir)
    _, _, frames, height, width = videos.shape
    probe = None
    if {"probe", "fvd_probe"} & set(metrics):
        probe = cached_probe(out_dir / "eval" / "probes", steps=probe_steps, num_frames=frames, height=height,
                             width=width)
    scorer = VideoScorer([m for m in metrics if m != "vbench"], probe, protocol, detector_path=detector_path)
    reference = None
    if {"fvd", "fvd_probe"} & set(metrics):
        reference = _reference(scorer, reference_dir, num_reference, videos.shape, out_dir)
    rows = scorer.features(videos) if scorer.metrics else {}
    scores = scorer.scores(rows, prompts, reference) if scorer.metrics else {}
    per_video = [{"index": i, "prompt": prompt, "file": path.name, **extra} for i, (prompt, path, extra)
                 in enumerate(zip(prompts, paths, scorer.per_video(rows, prompts) if rows else [{}] * len(paths)))]
    vbench = None
    if "vbench" in metrics:
        from eval.vbench import run_vbench

        vbench = run_vbench(Path(videos_dir), list(vbench_dimensions), out_dir / "eval" / "vbench" / Path(videos_dir).name)
    client = mlflow_client(cfg)
    run = client.create_run(experiment_id(cfg), run_name=f"eval {Path(videos_dir).name}",
                            tags={"vidlab.eval.videos": str(Path(videos_dir).resolve()),
                                  "vidlab.eval.reference": str(reference_dir or "")})
    record = scorer.protocol_record(videos.shape[0], reference)
    record["skipped_videos"] = skipped
    results = {f"eval/{k}": v for k, v in scores.items()}
    if skipped:
        results["eval/skipped_videos"] = float(len(skipped))
    results.update(log_evaluation(client, run.info.run_id, 0, results, record, vbench, None, 0, per_video=per_video))
    client.set_terminated(run.info.run_id)
    return EvalResult(run.info.run_id, results, skipped)


def _reference(scorer: VideoScorer, reference_dir: str | Path | None, num_reference: int,
               shape: tuple[int, ...], out_dir: Path) -> dict[str, FeatureSums]:
    cache = out_dir / "eval" / "reference"
    if reference_dir is not None:
        ref, _, paths, _ = read_folder(reference_dir)
        return scorer.reference(ref, folder_id(paths), cache)
    if "fvd" in scorer.metrics:
        raise ConfigError("metric 'fvd' needs --reference DIR (real videos); only the Shapes metrics have a "
                          "built-in reference")
    _, _, frames, height, width = shape
    ref, _ = render_set(num_reference, REFERENCE_SEED, frames, height, width)
    data_id = {"shapes": REFERENCE_SEED, "clips": num_reference, "size": [frames, height, width]}
    return scorer.reference(ref, data_id, cache)


def evaluate_run(run_id: str, metrics: Sequence[str] | None = None, num_videos: int | None = None) -> EvalResult:
    """Generate with the run's last checkpoint, score, and log into that run at the checkpoint's step."""
    from experiments.build import instantiate
    from experiments.sample import load_system, resolve_checkpoint

    path = resolve_checkpoint(run_id)
    system = load_system(path)
    step = read_checkpoint(path)["global_step"]
    cfg = system.config
    node = dict((cfg.get("callbacks") or {}).get("evaluation") or default_node(cfg))
    if metrics:
        node["metrics"] = check_metrics(metrics)
    if num_videos:
        node["num_videos"] = num_videos
    node["every_n_steps"] = 0
    callback: VideoEvaluation = instantiate(node, f"run {run_id}: callbacks.evaluation")
    scores, protocol, vbench = callback.evaluate(system, None, run_id, step)
    results = {f"{callback.prefix}{k}": v for k, v in scores.items()}
    results.update(log_evaluation(mlflow_client(cfg), run_id, step, results, protocol, vbench, callback.folder,
                                  callback.log_videos, per_video=callback.per_video))
    return EvalResult(run_id, results)


def default_node(cfg: dict[str, Any]) -> dict[str, Any]:
    """configs/callbacks/default.yaml's ``evaluation`` node, its ``${...}`` resolved against ``cfg``
    (the run's stored config: data size, output_dir)."""
    node = OmegaConf.load(REPO_CONFIGS / "callbacks" / "default.yaml").get("evaluation")
    if node is None:
        raise ConfigError("configs/callbacks/default.yaml has no 'evaluation' node")
    root = OmegaConf.create({k: v for k, v in cfg.items() if k != "callbacks"})
    root["_evaluation"] = node
    return OmegaConf.to_container(root["_evaluation"], resolve=True)
