"""Generate videos from a trained run or checkpoint (``vidlab sample``)."""

from __future__ import annotations

from pathlib import Path


from callbacks.samples import save_videos
from experiments.build import build_system
from experiments.config import Composed, ConfigError
from experiments.export import read_checkpoint
from experiments.tracking import client
from modules.system import GeneratorSystem


def resolve_checkpoint(run_or_path: str) -> Path:
    """A checkpoint (``.ckpt`` file, sharded ``.ckpt/`` folder or ``.safetensors`` export) as given,
    or the ``vidlab.checkpoint`` of an MLflow run id."""
    path = Path(run_or_path)
    if path.suffix in (".ckpt", ".safetensors") or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return path
    try:
        run = client().get_run(run_or_path)
    except Exception as exc:  # mlflow raises its own exception types for unknown ids
        raise ConfigError(f"{run_or_path!r} is neither a checkpoint file nor a run id in the store: {exc}") from exc
    tag = run.data.tags.get("vidlab.checkpoint")
    if not tag or not Path(tag).exists():
        raise FileNotFoundError(f"run {run_or_path} has no checkpoint on this machine (tag vidlab.checkpoint={tag!r})")
    return Path(tag)


def load_system(path: Path, averaged: bool = True) -> GeneratorSystem:
    """Rebuild the generator from the config stored in the checkpoint and load its weights (any form
    `experiments.export.read_checkpoint` reads; never executes pickled code). A run trained with
    ``ema.enabled`` gets its averaged weights unless ``averaged`` is False."""
    try:
        ckpt = read_checkpoint(path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    cfg = ckpt["vidlab_config"]
    system = build_system(Composed(cfg, {k: f"{path} (stored config)" for k in cfg}, cfg.get("presets", {})))
    system.load_state_dict(ckpt["state_dict"])
    if averaged and system.ema is not None:
        system.ema.copy_to(system)
    return system.eval()


def sample(run_or_path: str, prompts: list[str], seeds: list[int], out_dir: Path, num_frames: int | None = None,
           height: int | None = None, width: int | None = None, cfg_scale: float | None = None,
           display_scale: int = 4, fps: int = 8) -> list[Path]:
    """Every prompt × seed as an mp4 in ``out_dir``; sizes default to the run's sample callback."""
    system = load_system(resolve_checkpoint(run_or_path))
    shown = (system.config.get("callbacks") or {}).get("samples") or {}
    num_frames = num_frames or shown.get("num_frames") or 8
    height = height or shown.get("height") or 32
    width = width or shown.get("width") or 32
    pairs = [(p, s) for p in prompts for s in seeds]
    videos = system.generate([p for p, _ in pairs], [s for _, s in pairs], num_frames, height, width, cfg_scale)
    return save_videos(videos, [p for p, _ in pairs], [s for _, s in pairs], out_dir, fps, display_scale)
