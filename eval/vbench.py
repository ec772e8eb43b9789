"""VBench (Huang et al. 2024, "VBench: Comprehensive Benchmark Suite for Video Generative Models").

The real `vbench` package (0.1.5) scores a folder of mp4 files; it runs in its own environment,
`.venv-vbench` (`make vbench-env`), because it pins transformers==4.33.2, numpy<2, timm<=1.0.12 and
imports torchvision, which vidlab's CPU torch lacks. This module stays in vidlab's environment and
imports neither vbench nor Lightning: it checks the dimensions and their weights, runs
`eval/vbench_worker.py` with the other interpreter, parses the JSON vbench writes and logs it.

Custom-input mode: the prompt of `<prompt>-<seed>.mp4` is `<prompt>` (vbench strips `-<digits>`
itself; callbacks/samples.py `video_filename` writes that name). In that mode vbench refuses
object_class, multiple_objects, scene, appearance_style, color and spatial_relationship: they need
the standard prompt suite and its auxiliary info, so `run_vbench` refuses them up front.

Weights: vbench reads them from `VBENCH_CACHE_DIR` (default `~/.cache/vbench`) and shells out to
wget when one is missing, which offline fails far from the cause. `run_vbench` checks first, per
dimension, the files vbench's `init_submodules` (vbench/utils.py) would look for in local mode
(`local=True`: CLIP and DINO from the cache too, not from ~/.cache/clip or GitHub) and raises
`MissingVBenchWeights` naming the dimension, the file, `VBENCH_CACHE_DIR` and where it comes from.

Aggregation (VBench's published normalisation, table in shared/REFERENCE.md):
    norm_d   = (raw_d − Min_d) / (Max_d − Min_d)                  (not clipped: may leave [0, 1])
    Quality  = Σ_{d∈Q} w_d · norm_d / Σ_{d∈Q} w_d                 over the quality dimensions run
    Semantic = Σ_{d∈S} w_d · norm_d / Σ_{d∈S} w_d                 over the semantic dimensions run
    Total    = (4 · Quality + 1 · Semantic) / 5                   only when both groups were run
With every dimension present these are VBench's numbers; with a subset they are the same formula
over what was run, not comparable to published Quality / Semantic / Total (custom-input mode
cannot run six of the nine semantic dimensions at all).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PYTHON = REPO_ROOT / ".venv-vbench" / "bin" / "python"
WORKER = Path(__file__).resolve().with_name("vbench_worker.py")
QUALITY, SEMANTIC = "Quality", "Semantic"
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0  # Total = (4·Quality + 1·Semantic) / 5


@dataclass(frozen=True)
class DimensionSpec:
    """One row of VBench's normalisation table: raw scores are mapped by (raw − min) / (max − min)."""

    min: float
    max: float
    weight: float
    group: str  # QUALITY or SEMANTIC


# shared/REFERENCE.md "## VBench", as published with VBench's leaderboard (scripts/constant.py).
NORMALISATION: dict[str, DimensionSpec] = {
    "subject_consistency": DimensionSpec(0.1462, 1.0, 1.0, QUALITY),
    "background_consistency": DimensionSpec(0.2615, 1.0, 1.0, QUALITY),
    "temporal_flickering": DimensionSpec(0.6293, 1.0, 1.0, QUALITY),
    "motion_smoothness": DimensionSpec(0.706, 0.9975, 1.0, QUALITY),
    "dynamic_degree": DimensionSpec(0.0, 1.0, 0.5, QUALITY),
    "aesthetic_quality": DimensionSpec(0.0, 1.0, 1.0, QUALITY),
    "imaging_quality": DimensionSpec(0.0, 1.0, 1.0, QUALITY),
    "object_class": DimensionSpec(0.0, 1.0, 1.0, SEMANTIC),
    "multiple_objects": DimensionSpec(0.0, 1.0, 1.0, SEMANTIC),
    "human_action": DimensionSpec(0.0, 1.0, 1.0, SEMANTIC),
    "color": DimensionSpec(0.0, 1.0, 1.0, SEMANTIC),
    "spatial_relationship": DimensionSpec(0.0, 1.0, 1.0, SEMANTIC),
    "scene": DimensionSpec(0.0, 0.8222, 1.0, SEMANTIC),
    "appearance_style": DimensionSpec(0.0009, 0.2855, 1.0, SEMANTIC),
    "temporal_style": DimensionSpec(0.0, 0.364, 1.0, SEMANTIC),
    "overall_consistency": DimensionSpec(0.0, 0.364, 1.0, SEMANTIC),
}

# vbench.VBench.check_dimension_requires_extra_info: refused in custom-input mode.
CUSTOM_INPUT_UNSUPPORTED = frozenset(
    {"object_class", "multiple_objects", "scene", "appearance_style", "color", "spatial_relationship"}
)
SUPPORTED_DIMENSIONS: tuple[str, ...] = tuple(d for d in NORMALISATION if d not in CUSTOM_INPUT_UNSUPPORTED)

_CLIP_B32 = ("clip_model/ViT-B-32.pt", "https://openaipublic.azureedge.net/clip/models/"
             "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt")
_CLIP_L14 = ("clip_model/ViT-L-14.pt", "https://openaipublic.azureedge.net/clip/models/"
             "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt")
_DINO_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"
_GRIT = ("grit_model/grit_b_densecap_objectdet.pth",
         "https://datarelease.blob.core.windows.net/grit/models/grit_b_densecap_objectdet.pth")
_VICLIP = [
    ("ViCLIP/ViClip-InternVid-10M-FLT.pth",
     "https://huggingface.co/OpenGVLab/VBench_Used_Models/resolve/main/ViClip-InternVid-10M-FLT.pth"),
    ("ViCLIP/bpe_simple_vocab_16e6.txt.gz",
     "https://raw.githubusercontent.com/openai/CLIP/main/clip/bpe_simple_vocab_16e6.txt.gz"),
]

# Files (relative to VBENCH_CACHE_DIR) each dimension reads in local mode, with where vbench would
# fetch them: vbench 0.1.5 utils.init_submodules, aesthetic_quality.get_aesthetic_model,
# third_party/ViCLIP/simple_tokenizer.default_bpe. subject_consistency: init_submodules checks the
# DINO clone and dino_model/dino_vitbase16_pretrain.pth, but DINO's hubconf then loads its weights
# through torch.hub's checkpoint cache, which the worker points at dino_model/ (so checkpoints/).
WEIGHTS: dict[str, list[tuple[str, str]]] = {
    "subject_consistency": [
        ("dino_model/facebookresearch_dino_main/hubconf.py", "git clone https://github.com/facebookresearch/dino"),
        ("dino_model/dino_vitbase16_pretrain.pth", _DINO_URL),
        ("dino_model/checkpoints/dino_vitbase16_pretrain.pth", _DINO_URL + " (same file)"),
    ],
    "background_consistency": [_CLIP_B32],
    "temporal_flickering": [],
    "motion_smoothness": [("amt_model/amt-s.pth", "https://huggingface.co/lalala125/AMT/resolve/main/amt-s.pth")],
    "dynamic_degree": [("raft_model/models/raft-things.pth",
                        "https://dl.dropboxusercontent.com/s/4j4z58wuv8o0mfz/models.zip (unzipped)")],
    "aesthetic_quality": [
        _CLIP_L14,
        ("aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth",
         "https://github.com/LAION-AI/aesthetic-predictor/blob/main/sa_0_4_vit_l_14_linear.pth?raw=true"),
    ],
    "imaging_quality": [("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",
                         "https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/"
                         "musiq_spaq_ckpt-358bb6af.pth")],
    "object_class": [_GRIT],
    "multiple_objects": [_GRIT],
    "human_action": [("umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth",
                      "https://huggingface.co/OpenGVLab/VBench_Used_Models/resolve/main/"
                      "l16_ptk710_ftk710_ftk400_f16_res224.pth")],
    "color": [_GRIT],
    "spatial_relationship": [_GRIT],
    "scene": [("caption_model/tag2text_swin_14m.pth",
               "https://huggingface.co/spaces/xinyu1205/recognize-anything/resolve/main/tag2text_swin_14m.pth")],
    "appearance_style": [_CLIP_B32],
    "temporal_style": _VICLIP,
    "overall_consistency": _VICLIP,
}


class MissingVBenchWeights(FileNotFoundError):
    """A dimension's weight file is not under VBENCH_CACHE_DIR (raised before vbench would wget it)."""


class VBenchEnvironmentMissing(FileNotFoundError):
    """The interpreter of the vbench environment does not exist (`make vbench-env` builds it)."""


@dataclass
class VBenchResult:
    """Parsed output of one vbench run.

    scores: raw score per dimension, in [0, 1] (vbench's mean over videos).
    per_video: per dimension, one row per video: {"video": file name, "prompt": str, "score": float}.
    results_json: the `{name}_eval_results.json` vbench wrote.
    skipped: per dimension, videos of the folder vbench left out (temporal_flickering silently
        drops a video OpenCV cannot decode); empty when every video was scored.
    """

    scores: dict[str, float]
    per_video: dict[str, list[dict[str, Any]]]
    results_json: Path
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def aggregate(self) -> dict[str, Any]:
        """`normalised_scores(self.scores)`."""
        return normalised_scores(self.scores)


def _check_dimensions(dimensions: list[str] | tuple[str, ...]) -> None:
    unknown = [d for d in dimensions if d not in NORMALISATION]
    if unknown:
        raise ValueError(f"unknown VBench dimension(s) {unknown}; known: {sorted(NORMALISATION)}")


def total_score(quality: float, semantic: float) -> float:
    """VBench's Total = (4 · Quality + 1 · Semantic) / 5 (same unit in and out: fractions or %)."""
    return (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)


def normalised_scores(raw: dict[str, float]) -> dict[str, Any]:
    """Normalise raw VBench scores and aggregate them (see the module docstring for the equations).

    Args:
        raw: dimension -> raw score, any subset of `NORMALISATION`.

    Returns:
        {"normalised": {dimension: (raw − Min) / (Max − Min)}, and, when at least one dimension of
        the group was given, "quality" and/or "semantic"; "total" only when both are present}.
        Values are fractions (multiply by 100 for the leaderboard's percentages).

    Raises:
        ValueError: an unknown dimension or a non-finite score (named).
    """
    _check_dimensions(list(raw))
    normalised: dict[str, float] = {}
    sums = {QUALITY: [0.0, 0.0], SEMANTIC: [0.0, 0.0]}  # group -> [Σ w·norm, Σ w]
    for dimension, value in raw.items():
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"VBench dimension {dimension!r}: score {value} is not finite")
        spec = NORMALISATION[dimension]
        norm = (value - spec.min) / (spec.max - spec.min)
        normalised[dimension] = norm
        sums[spec.group][0] += spec.weight * norm
        sums[spec.group][1] += spec.weight
    out: dict[str, Any] = {"normalised": normalised}
    for key, group in (("quality", QUALITY), ("semantic", SEMANTIC)):
        if sums[group][1] > 0:
            out[key] = sums[group][0] / sums[group][1]
    if "quality" in out and "semantic" in out:
        out["total"] = total_score(out["quality"], out["semantic"])
    return out


def vbench_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The weights folder: `cache_dir`, else $VBENCH_CACHE_DIR, else ~/.cache/vbench (vbench's rule)."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("VBENCH_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "vbench"


def required_weights(dimension: str, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """The files `dimension` reads under the cache folder (empty for temporal_flickering).

    Raises:
        ValueError: an unknown dimension.
    """
    _check_dimensions([dimension])
    root = vbench_cache_dir(cache_dir)
    return [root / rel for rel, _ in WEIGHTS[dimension]]


def check_weights(dimensions: list[str] | tuple[str, ...], cache_dir: str | os.PathLike | None = None) -> None:
    """Raise `MissingVBenchWeights` for the first file a dimension needs that is not there."""
    _check_dimensions(dimensions)
    root = vbench_cache_dir(cache_dir)
    for dimension in dimensions:
        for rel, source in WEIGHTS[dimension]:
            path = root / rel
            if not path.is_file():
                raise MissingVBenchWeights(
                    f"VBench dimension {dimension!r} needs {path}, which does not exist "
                    f"(VBENCH_CACHE_DIR={root}). Get it from {source} and place it there; "
                    f"vbench would try to download it at run time, which fails offline."
                )


def prompt_from_filename(name: str) -> str:
    """`<prompt>-<seed>.mp4` -> `<prompt>`; no `-<digits>` suffix -> the stem (vbench's rule)."""
    return re.sub(r"-\d+$", "", Path(name).stem)


def _as_score(value: Any) -> float:
    """A per-video result as a float (dynamic_degree stores bools); lists are averaged."""
    if isinstance(value, (list, tuple)):
        return float(sum(float(v) for v in value) / len(value)) if value else math.nan
    return float(value)


def parse_results(results_json: str | os.PathLike, full_info_json: str | os.PathLike | None = None,
                  videos: list[str] | None = None) -> VBenchResult:
    """Parse vbench's `{dimension: [score, [{"video_path", "video_results"}, ...]]}` file.

    Args:
        results_json: `{output}/{name}_eval_results.json`.
        full_info_json: `{output}/{name}_full_info.json` (prompt_en and video_list per entry), the
            prompts vbench itself used; without it prompts come from the file names.
        videos: file names expected in every dimension; those missing are reported in `skipped`.
    """
    results_json = Path(results_json)
    raw = json.loads(results_json.read_text())
    prompts: dict[str, str] = {}
    if full_info_json is not None and Path(full_info_json).is_file():
        for entry in json.loads(Path(full_info_json).read_text()):
            video_list = entry.get("video_list", [])
            for path in video_list if isinstance(video_list, list) else [video_list]:
                prompts[Path(path).name] = entry.get("prompt_en", "")
    scores: dict[str, float] = {}
    per_video: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, list[str]] = {}
    for dimension, (score, video_results) in raw.items():
        scores[dimension] = float(score)
        rows = []
        for item in video_results:
            name = Path(item["video_path"]).name
            rows.append({"video": name, "prompt": prompts.get(name, prompt_from_filename(name)),
                         "score": _as_score(item["video_results"])})
        per_video[dimension] = rows
        if videos is not None:
            missing = sorted(set(videos) - {row["video"] for row in rows})
            if missing:
                skipped[dimension] = missing
    return VBenchResult(scores=scores, per_video=per_video, results_json=results_json, skipped=skipped)


def run_vbench(
    videos_dir: str | os.PathLike,
    dimensions: list[str] | tuple[str, ...],
    output_dir: str | os.PathLike,
    python: str | os.PathLike = DEFAULT_PYTHON,
    device: str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    name: str = "vidlab",
    timeout: float | None = None,
) -> VBenchResult:
    """Score every mp4 of `videos_dir` on `dimensions` with the real vbench, in custom-input mode.

    Checks, in order and before anything runs: the dimensions are known and allowed in custom-input
    mode, their weights exist under the cache folder, the vbench interpreter exists. Then runs
    `eval/vbench_worker.py` with `python` (isolated: `-I`, so neither PYTHONPATH nor this repo is on
    its path), VBENCH_CACHE_DIR set to the cache folder, cwd `output_dir`.

    Args:
        videos_dir: folder of `<prompt>-<seed>.mp4` files.
        dimensions: e.g. ["temporal_flickering", "subject_consistency"]; see SUPPORTED_DIMENSIONS.
        output_dir: where vbench writes `{name}_full_info.json` and `{name}_eval_results.json`.
        python: the vbench environment's interpreter (default: this repo's .venv-vbench).
        device: "cpu" or "cuda" (vbench moves its models there).
        cache_dir: weights folder; default $VBENCH_CACHE_DIR or ~/.cache/vbench.
        name: file-name prefix of vbench's outputs.
        timeout: seconds before the worker is killed (None: no limit).

    Raises:
        ValueError: unknown, unsupported or no dimensions, or no mp4 in `videos_dir`.
        MissingVBenchWeights: names the dimension, the file and VBENCH_CACHE_DIR.
        VBenchEnvironmentMissing: `python` does not exist; run `make vbench-env`.
        RuntimeError: the worker failed (its exit code and the end of its output).
    """
    dimensions = list(dimensions)
    if not dimensions:
        raise ValueError("run_vbench: no dimensions given")
    _check_dimensions(dimensions)
    refused = [d for d in dimensions if d in CUSTOM_INPUT_UNSUPPORTED]
    if refused:
        raise ValueError(f"VBench dimension(s) {refused} need the standard prompt suite and are refused in "
                         f"custom-input mode; supported here: {list(SUPPORTED_DIMENSIONS)}")
    videos_dir, output_dir = Path(videos_dir).resolve(), Path(output_dir).resolve()
    videos = sorted(p.name for p in videos_dir.glob("*") if p.suffix.lower() == ".mp4")
    if not videos:
        raise ValueError(f"run_vbench: no .mp4 files in {videos_dir}")
    root = vbench_cache_dir(cache_dir).resolve()
    check_weights(dimensions, root)
    python = Path(python)
    if not python.is_file():
        raise VBenchEnvironmentMissing(
            f"the vbench environment's interpreter {python} does not exist: run `make vbench-env` "
            f"(builds .venv-vbench, pinned in constraints-vbench.txt)"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    results_json = output_dir / f"{name}_eval_results.json"
    results_json.unlink(missing_ok=True)  # a stale file must not pass for this run's
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env["VBENCH_CACHE_DIR"] = str(root)
    cmd = [str(python), "-I", str(WORKER), "--videos-dir", str(videos_dir), "--output-dir", str(output_dir),
           "--name", name, "--device", device, "--dimensions", *dimensions]
    proc = subprocess.run(cmd, cwd=output_dir, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-4000:]).strip()
        raise RuntimeError(f"vbench worker failed (exit {proc.returncode}) on {videos_dir} for {dimensions}:\n{tail}")
    result = parse_results(results_json, output_dir / f"{name}_full_info.json", videos)
    for dimension, missing in result.skipped.items():
        warnings.warn(f"vbench skipped {len(missing)} video(s) for {dimension}: {missing}", stacklevel=2)
    return result


def log_vbench(client: Any, run_id: str, result: VBenchResult, step: int = 0) -> dict[str, float]:
    """Log a `VBenchResult` to an MLflow run; returns the metrics logged.

    Metrics: `vbench/<dimension>` (raw), `vbench/<dimension>_normalised`, and `vbench/quality`,
    `vbench/semantic`, `vbench/total` when `normalised_scores` gives them. Tables: one per dimension,
    `vbench/<dimension>.json` (columns video, prompt, score), plus vbench's own results JSON.

    Args:
        client: an `mlflow.tracking.MlflowClient`.
        run_id: the run to log into.
        result: from `run_vbench`.
        step: the training step the videos come from.
    """
    aggregate = normalised_scores(result.scores)
    metrics = {f"vbench/{d}": s for d, s in result.scores.items()}
    metrics.update({f"vbench/{d}_normalised": v for d, v in aggregate["normalised"].items()})
    metrics.update({f"vbench/{k}": aggregate[k] for k in ("quality", "semantic", "total") if k in aggregate})
    for key, value in metrics.items():
        client.log_metric(run_id, key, value, step=step)
    for dimension, rows in result.per_video.items():
        table = {col: [row[col] for row in rows] for col in ("video", "prompt", "score")}
        client.log_table(run_id, data=table, artifact_file=f"vbench/{dimension}.json")
    if result.results_json.is_file():
        client.log_artifact(run_id, str(result.results_json), artifact_path="vbench")
    return metrics


if __name__ == "__main__":  # python -m eval.vbench VIDEOS_DIR OUTPUT_DIR DIM [DIM ...]
    _result = run_vbench(sys.argv[1], sys.argv[3:], sys.argv[2])
    print(json.dumps({"scores": _result.scores, **normalised_scores(_result.scores)}, indent=2))
