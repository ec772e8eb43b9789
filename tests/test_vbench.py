"""eval/vbench.py: VBench's normalisation by hand, the weight checks, and a real vbench run.

The real run (temporal_flickering, the one dimension without weights) goes through .venv-vbench,
which `make test` builds (`make vbench-env`); it is skipped only when that environment is absent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from callbacks.samples import video_filename
from datamodules.mp4 import read_mp4, write_mp4
from eval.vbench import (
    DEFAULT_PYTHON,
    NORMALISATION,
    SUPPORTED_DIMENSIONS,
    MissingVBenchWeights,
    VBenchEnvironmentMissing,
    log_vbench,
    normalised_scores,
    parse_results,
    prompt_from_filename,
    required_weights,
    run_vbench,
    total_score,
)

# Measured on this machine (8 clips: still, flicker, sliding square at crf 0/18/23, uniform noise,
# 8x8 colour blocks; 64x64 and 192x256): vbench's per-video scores (OpenCV's FFmpeg, BGR) against
# this file's decord (RGB) and against PyAV agree to |Δ| <= 1.6e-8. The three decoders give the
# same pixels; what is left is vbench's float32 mean (cv2.absdiff on float32, np.mean in float32).
TOLERANCE = 1e-6


# ---------------------------------------------------------------- normalisation, by hand


def test_normalisation_hand_computed():
    raw = {
        # (raw − Min) / (Max − Min) chosen to land on round numbers:
        "temporal_flickering": 0.6293 + 0.5 * (1.0 - 0.6293),  # = 0.81465 -> 0.5
        "subject_consistency": 0.1462 + 0.75 * (1.0 - 0.1462),  # = 0.78655 -> 0.75
        "dynamic_degree": 0.4,  # Min 0, Max 1 -> 0.4, weight 0.5
        "overall_consistency": 0.273,  # / 0.364 -> 0.75
        "temporal_style": 0.091,  # / 0.364 -> 0.25
    }
    out = normalised_scores(raw)
    expected_norm = {"temporal_flickering": 0.5, "subject_consistency": 0.75, "dynamic_degree": 0.4,
                     "overall_consistency": 0.75, "temporal_style": 0.25}
    assert out["normalised"] == pytest.approx(expected_norm, abs=1e-12)
    # Quality  = (1·0.5 + 1·0.75 + 0.5·0.4) / (1 + 1 + 0.5) = 1.45 / 2.5 = 0.58
    # Semantic = (1·0.75 + 1·0.25) / (1 + 1)               = 1.0 / 2   = 0.5
    # Total    = (4·0.58 + 1·0.5) / 5                       = 2.82 / 5  = 0.564
    assert out["quality"] == pytest.approx(0.58, abs=1e-12)
    assert out["semantic"] == pytest.approx(0.5, abs=1e-12)
    assert out["total"] == pytest.approx(0.564, abs=1e-12)


def test_normalisation_partial_groups():
    # Only quality dimensions: Quality over what was run, no Semantic, hence no Total.
    # motion_smoothness: (0.7643 − 0.706) / (0.9975 − 0.706) = 0.0583 / 0.2915 = 0.2
    # Quality = (1·0.2 + 0.5·1.0) / (1 + 0.5) = 0.7 / 1.5 = 0.4666…
    out = normalised_scores({"motion_smoothness": 0.7643, "dynamic_degree": 1.0})
    assert out["normalised"]["motion_smoothness"] == pytest.approx(0.2, abs=1e-12)
    assert out["quality"] == pytest.approx(0.7 / 1.5, abs=1e-12)
    assert "semantic" not in out and "total" not in out
    # Only semantic: scene (0.4111 / 0.8222 = 0.5) and appearance_style ((0.1432 − 0.0009) / 0.2846 = 0.5)
    out = normalised_scores({"scene": 0.4111, "appearance_style": 0.1432})
    assert out["semantic"] == pytest.approx(0.5, abs=1e-12)
    assert "quality" not in out and "total" not in out
    # Not clipped: a raw score under Min gives a negative normalised value, as in VBench's script.
    assert normalised_scores({"temporal_flickering": 0.6293 - 0.3707})["normalised"]["temporal_flickering"] == (
        pytest.approx(-1.0, abs=1e-12))
    assert normalised_scores({}) == {"normalised": {}}


def test_total_matches_published_numbers():
    # CogVideoX-5B on the leaderboard: Quality 82.75, Semantic 77.04, Total 81.61 (%).
    # (4·82.75 + 77.04) / 5 = (331.0 + 77.04) / 5 = 408.04 / 5 = 81.608
    assert total_score(82.75, 77.04) == pytest.approx(81.608, abs=1e-9)
    assert round(total_score(82.75, 77.04), 2) == 81.61


def test_table_is_the_published_one():
    assert len(NORMALISATION) == 16
    assert sum(s.group == "Quality" for s in NORMALISATION.values()) == 7
    assert NORMALISATION["dynamic_degree"].weight == 0.5
    assert (NORMALISATION["motion_smoothness"].min, NORMALISATION["motion_smoothness"].max) == (0.706, 0.9975)
    assert (NORMALISATION["appearance_style"].min, NORMALISATION["appearance_style"].max) == (0.0009, 0.2855)
    assert set(SUPPORTED_DIMENSIONS) == set(NORMALISATION) - {
        "object_class", "multiple_objects", "scene", "appearance_style", "color", "spatial_relationship"}


def test_unknown_and_refused_dimensions(tmp_path):
    with pytest.raises(ValueError, match="unknown VBench dimension.*sharpness"):
        normalised_scores({"sharpness": 0.5})
    with pytest.raises(ValueError, match="unknown VBench dimension.*sharpness"):
        required_weights("sharpness")
    with pytest.raises(ValueError, match="not finite"):
        normalised_scores({"temporal_flickering": math.nan})
    videos = _write_videos(tmp_path / "videos", {"a cat": _static()})
    with pytest.raises(ValueError, match="custom-input mode"):
        run_vbench(videos, ["color"], tmp_path / "out")
    with pytest.raises(ValueError, match="unknown VBench dimension"):
        run_vbench(videos, ["sharpness"], tmp_path / "out")


# ---------------------------------------------------------------- weights and environment


def test_required_weights_follow_vbench_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path / "cache"))
    assert required_weights("temporal_flickering") == []
    assert required_weights("imaging_quality") == [tmp_path / "cache/pyiqa_model/musiq_spaq_ckpt-358bb6af.pth"]
    assert required_weights("motion_smoothness", tmp_path / "other") == [tmp_path / "other/amt_model/amt-s.pth"]


def test_missing_weights_name_the_file(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(cache))
    videos = _write_videos(tmp_path / "videos", {"a cat": _static()})
    with pytest.raises(MissingVBenchWeights) as info:
        run_vbench(videos, ["temporal_flickering", "subject_consistency"], tmp_path / "out",
                   python=tmp_path / "no-env/bin/python")  # weights are checked before the env
    message = str(info.value)
    assert "'subject_consistency'" in message and f"VBENCH_CACHE_DIR={cache}" in message
    assert str(cache / "dino_model/facebookresearch_dino_main/hubconf.py") in message
    # With the CLIP file present, aesthetic_quality names the next missing one: the LAION head.
    clip_file = cache / "clip_model/ViT-L-14.pt"
    clip_file.parent.mkdir(parents=True)
    clip_file.write_bytes(b"")
    with pytest.raises(MissingVBenchWeights, match="aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth"):
        run_vbench(videos, ["aesthetic_quality"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing ran


def test_missing_environment_says_how_to_build_it(tmp_path):
    videos = _write_videos(tmp_path / "videos", {"a cat": _static()})
    with pytest.raises(VBenchEnvironmentMissing, match="make vbench-env"):
        run_vbench(videos, ["temporal_flickering"], tmp_path / "out", python=tmp_path / "no-env/bin/python")


# ---------------------------------------------------------------- parsing and MLflow


def _fake_results(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    results = {
        "temporal_flickering": [0.9, [{"video_path": "/v/a cat-0.mp4", "video_results": 0.8},
                                      {"video_path": "/v/a dog-1.mp4", "video_results": 1.0}]],
        "dynamic_degree": [0.5, [{"video_path": "/v/a cat-0.mp4", "video_results": True},
                                 {"video_path": "/v/a dog-1.mp4", "video_results": False}]],
    }
    (folder / "r_eval_results.json").write_text(json.dumps(results))
    full_info = [{"prompt_en": "a cat", "dimension": ["temporal_flickering"], "video_list": ["/v/a cat-0.mp4"]}]
    (folder / "r_full_info.json").write_text(json.dumps(full_info))
    return folder / "r_eval_results.json", folder / "r_full_info.json"


def test_parse_results(tmp_path):
    results_json, full_info = _fake_results(tmp_path)
    result = parse_results(results_json, full_info, videos=["a cat-0.mp4", "a dog-1.mp4", "a bird-2.mp4"])
    assert result.scores == {"temporal_flickering": 0.9, "dynamic_degree": 0.5}
    assert result.per_video["temporal_flickering"] == [
        {"video": "a cat-0.mp4", "prompt": "a cat", "score": 0.8},  # prompt from vbench's full_info
        {"video": "a dog-1.mp4", "prompt": "a dog", "score": 1.0},  # prompt from the file name
    ]
    assert [r["score"] for r in result.per_video["dynamic_degree"]] == [1.0, 0.0]  # bools
    assert result.skipped == {"temporal_flickering": ["a bird-2.mp4"], "dynamic_degree": ["a bird-2.mp4"]}
    assert prompt_from_filename("a red car, at dusk-12.mp4") == "a red car, at dusk"
    assert prompt_from_filename("no seed.mp4") == "no seed"


def test_log_vbench_to_mlflow(tmp_path):
    result = parse_results(*_fake_results(tmp_path / "r"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("vbench", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    logged = log_vbench(client, run_id, result, step=7)
    metrics = client.get_run(run_id).data.metrics
    # temporal_flickering: (0.9 − 0.6293) / 0.3707; dynamic_degree 0.5 -> Quality = (1·n_tf + 0.5·0.5) / 1.5
    n_tf = (0.9 - 0.6293) / 0.3707
    assert metrics["vbench/temporal_flickering"] == 0.9
    assert metrics["vbench/quality"] == pytest.approx((n_tf + 0.25) / 1.5, abs=1e-9)
    assert "vbench/semantic" not in metrics and "vbench/total" not in metrics
    assert logged.keys() == metrics.keys()
    assert client.get_metric_history(run_id, "vbench/quality")[0].step == 7
    files = {f.path for f in client.list_artifacts(run_id, "vbench")}
    assert {"vbench/temporal_flickering.json", "vbench/dynamic_degree.json", "vbench/r_eval_results.json"} <= files
    table = json.loads((tmp_path / "art" / run_id / "artifacts/vbench/temporal_flickering.json").read_text())
    assert table["columns"] == ["video", "prompt", "score"]
    assert table["data"][0] == ["a cat-0.mp4", "a cat", 0.8]


# ---------------------------------------------------------------- the real vbench


def _static(t: int = 8, size: int = 64) -> np.ndarray:
    """A still gradient: every frame the same."""
    y, x = np.mgrid[0:size, 0:size]
    frame = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    return np.repeat(frame[None], t, axis=0)


def _flicker(t: int = 8, size: int = 64) -> np.ndarray:
    """Whole frames alternating between two grey levels."""
    levels = np.array([64, 192] * t, dtype=np.uint8)[:t]
    return np.broadcast_to(levels[:, None, None, None], (t, size, size, 3)).copy()


def _moving(t: int = 8, size: int = 64) -> np.ndarray:
    """A coloured square sliding 4 px a frame over a dark background."""
    video = np.full((t, size, size, 3), 20, dtype=np.uint8)
    for i in range(t):
        video[i, 16:32, 4 * i: 4 * i + 16] = (230, 120, 40)
    return video


def _noise(t: int = 8, size: int = 64) -> np.ndarray:
    """Uniform noise, a new draw every frame: the worst case for yuv420p and the decoders' conversions."""
    return np.random.default_rng(0).integers(0, 256, (t, size, size, 3), dtype=np.uint8)


def _write_videos(folder: Path, videos: dict[str, np.ndarray], crf: dict[str, int] | None = None) -> Path:
    """Each video as `<prompt>-<seed>.mp4` (seed = its index) with vidlab's writer; crf 18 unless given."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (prompt, frames) in enumerate(videos.items()):
        write_mp4(folder / video_filename(prompt, seed), frames, fps=8, crf=(crf or {}).get(prompt, 18))
    return folder


def _flickering_score(path: Path) -> float:
    """(255 − mean |frame_{i+1} − frame_i|) / 255 over the decoded uint8 frames (decord, RGB)."""
    frames = read_mp4(path).astype(np.float64)  # (T, H, W, 3)
    return (255.0 - np.abs(np.diff(frames, axis=0)).mean()) / 255.0


@pytest.mark.skipif(not DEFAULT_PYTHON.is_file(),
                    reason=f"{DEFAULT_PYTHON} does not exist: `make vbench-env` builds it (`make test` does)")
def test_temporal_flickering_matches_recomputation(tmp_path, monkeypatch):
    """The real vbench against an independent decode (decord here, OpenCV in vbench).

    Mean |Δframe| does not depend on channel order (vbench's frames are BGR). The still clip is
    written at crf 0: at crf 18 x264 keeps refining the first frame in later P-frames (score 0.99938).
    """
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path / "empty-cache"))  # needs no weights
    clips = {"a still gradient": _static(), "a flickering grey": _flicker(), "a sliding orange square": _moving(),
             "television static": _noise()}
    videos = _write_videos(tmp_path / "videos", clips, crf={"a still gradient": 0})
    result = run_vbench(videos, ["temporal_flickering"], tmp_path / "out", timeout=600)
    rows = {row["video"]: row for row in result.per_video["temporal_flickering"]}
    assert sorted(rows) == sorted(p.name for p in videos.glob("*.mp4")) and result.skipped == {}
    for name, row in rows.items():
        assert row["prompt"] == prompt_from_filename(name)
        assert row["score"] == pytest.approx(_flickering_score(videos / name), abs=TOLERANCE), name
    assert rows[video_filename("a still gradient", 0)]["score"] == 1.0
    # every pair differs by |192 − 64| = 128 levels: (255 − 128) / 255 = 127 / 255, up to compression
    assert rows[video_filename("a flickering grey", 1)]["score"] == pytest.approx(127 / 255, abs=2 / 255)
    assert 0.9 < rows[video_filename("a sliding orange square", 2)]["score"] < 1.0
    mean = float(np.mean([row["score"] for row in rows.values()]))
    assert result.scores["temporal_flickering"] == pytest.approx(mean, abs=1e-12)
    assert normalised_scores(result.scores)["quality"] == pytest.approx((mean - 0.6293) / 0.3707, abs=1e-12)
