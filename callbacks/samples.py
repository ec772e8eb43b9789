"""Sample videos for fixed prompts and seeds, every N steps and at the end, logged to MLflow as mp4.

File names follow VBench's custom-input convention ``<prompt>-<seed>.mp4`` so a folder of samples
can be scored as is; MLflow keeps them under ``samples/step_NNNNNN/`` where its artifact viewer plays
them (H.264, yuv420p, faststart).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor

from callbacks.cadence import EveryNSteps
from datamodules.mp4 import write_mp4


def to_uint8_frames(video: Tensor, display_scale: int = 1) -> np.ndarray:
    """One video ``(3, T, H, W)`` in [-1, 1] → ``uint8 (T, H·s, W·s, 3)`` (nearest upscale by s)."""
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if display_scale > 1:
        x = x.repeat_interleave(display_scale, dim=2).repeat_interleave(display_scale, dim=3)
    return x.permute(1, 2, 3, 0).cpu().numpy()  # (T, H, W, 3)


def video_filename(prompt: str, seed: int) -> str:
    """VBench custom-input naming: the prompt itself, then ``-<seed>.mp4`` (``/`` made safe)."""
    return f"{prompt.replace('/', '_').strip()[:180]}-{seed}.mp4"


def save_videos(videos: Tensor, prompts: list[str], seeds: list[int], folder: Path, fps: int = 8,
                display_scale: int = 1) -> list[Path]:
    """Write each ``(3, T, H, W)`` video of ``videos (B, 3, T, H, W)`` to ``folder``; returns paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for video, prompt, seed in zip(videos, prompts, seeds):
        path = folder / video_filename(prompt, seed)
        write_mp4(path, to_uint8_frames(video, display_scale), fps=fps)
        paths.append(path)
    return paths


class SampleVideos(EveryNSteps):
    """Generate every (prompt, seed) pair with the model being trained and log the mp4 files.

    Every rank generates (a sharded model needs all of them in each forward); global rank 0 writes
    and logs. The generation calls the raw backbone, not the DDP wrapper, so no gradient sync runs.
    """

    def __init__(self, every_n_steps: int = 100, prompts: list[str] | None = None, seeds: list[int] | None = None,
                 num_frames: int = 8, height: int = 32, width: int = 32, fps: int = 8, display_scale: int = 1,
                 cfg_scale: float | None = None):
        if not prompts:
            raise ValueError("SampleVideos: 'prompts' must list at least one prompt")
        super().__init__(every_n_steps)
        self.prompts = list(prompts)
        self.seeds = list(seeds or [0])
        self.num_frames, self.height, self.width = num_frames, height, width
        self.fps, self.display_scale, self.cfg_scale = fps, display_scale, cfg_scale
        self.paths: list[Path] = []  # the files of the latest round

    def run(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Generate on every rank (FSDP2 gathers each block's weights from all ranks in every forward;
        under DDP the other ranks would only wait for rank 0 at the next gradient all-reduce), then
        write and log the videos on global rank 0."""
        step = trainer.global_step
        pairs = [(p, s) for p in self.prompts for s in self.seeds]
        prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
        videos = module.generate(prompts, seeds, self.num_frames, self.height, self.width, self.cfg_scale)
        if not trainer.is_global_zero:
            return
        run = getattr(trainer.logger, "run_id", None) or "no-logger"
        folder = Path(module.config.get("output_dir", "outputs")) / "samples" / run / f"step_{step:06d}"
        self.paths = save_videos(videos, prompts, seeds, folder, self.fps, self.display_scale)
        if run != "no-logger":
            for path in self.paths:
                trainer.logger.experiment.log_artifact(run, str(path), artifact_path=f"samples/step_{step:06d}")
