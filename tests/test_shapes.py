"""The procedural shapes dataset: determinism, reuse, and that the decoded video shows what
the caption says (colour at the shape's centre, background in the far corner, motion of the
colour centroid). References are computed here from the attributes, not from the renderer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.mp4 import read_mp4
from datamodules.shapes import (BACKGROUNDS, COLORS, MOTIONS, SHAPES, ShapesDataModule, caption,
                                generate_shapes, render_clip, sample_attributes)

T, H, W = 8, 32, 32
ARGS = dict(num_videos=48, num_frames=T, height=H, width=W, progress=False)
TOL = 24  # max abs RGB error at interior pixels, crf 18 + yuv420p (measured: <= 14 at 32x32)


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("a"), seed=0, **ARGS)


@pytest.fixture(scope="module")
def clips(folder) -> list[tuple[dict, np.ndarray]]:
    return [(rec, read_mp4(folder / rec["video"])) for rec in _records(folder)]


def _expected_center(obj: dict, t: int) -> tuple[float, float]:
    """Straight-line centre in pixels (sampled paths never reach a wall)."""
    dx, dy = MOTIONS[obj["motion"]]
    s = obj["travel"] * t / (T - 1)
    return (obj["x"] + dx * s) * W, (obj["y"] + dy * s) * H


def test_constants():
    assert len(SHAPES) >= 5 and {"circle", "square", "triangle", "diamond"} <= set(SHAPES)
    assert len(COLORS) >= 6 and len(BACKGROUNDS) >= 3 and {"black", "gray"} <= set(BACKGROUNDS)
    assert set(MOTIONS) == {"left", "right", "up", "down", "up-left", "up-right",
                            "down-left", "down-right", "static"}
    for name, (dx, dy) in MOTIONS.items():
        assert np.hypot(dx, dy) == pytest.approx(0.0 if name == "static" else 1.0)


def test_deterministic_and_reused(folder, tmp_path):
    again = generate_shapes(tmp_path / "b", seed=0, **ARGS)
    assert again != folder and again.name == folder.name
    assert (again / "captions.jsonl").read_bytes() == (folder / "captions.jsonl").read_bytes()
    for rec in _records(folder):  # same bytes (x264 made deterministic), so same frames
        assert (again / rec["video"]).read_bytes() == (folder / rec["video"]).read_bytes(), rec["video"]
    for rec in _records(folder)[:8]:
        np.testing.assert_array_equal(read_mp4(again / rec["video"]), read_mp4(folder / rec["video"]))

    other = generate_shapes(tmp_path / "b", seed=1, **ARGS)
    assert other != again
    assert (other / "captions.jsonl").read_text() != (again / "captions.jsonl").read_text()

    stamps = {p.name: p.stat().st_mtime_ns for p in again.iterdir()}
    assert generate_shapes(tmp_path / "b", seed=0, **ARGS) == again
    assert {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == stamps
    assert json.loads((again / "DONE").read_text())["seed"] == 0


def test_incomplete_folder_is_regenerated(tmp_path):
    args = dict(ARGS, num_videos=3)
    folder = generate_shapes(tmp_path, **args)
    reference = (folder / "captions.jsonl").read_bytes()
    (folder / "DONE").unlink()
    (folder / "00001.mp4").write_bytes(b"half written")
    assert generate_shapes(tmp_path, **args) == folder
    assert (folder / "DONE").is_file() and (folder / "captions.jsonl").read_bytes() == reference
    assert read_mp4(folder / "00001.mp4").shape == (T, H, W, 3)


def test_decoded_colours_match_attributes(clips):
    corners = [(0, 0), (0, W - 1), (H - 1, 0), (H - 1, W - 1)]
    for rec, video in clips:
        assert video.shape == (T, H, W, 3)
        (obj,) = rec["objects"]
        for t in range(T):
            cx, cy = _expected_center(obj, t)
            centre = video[t, int(cy), int(cx)].astype(int)
            assert np.abs(centre - COLORS[obj["color"]]).max() <= TOL, (rec["video"], t, centre)
            y, x = max(corners, key=lambda c: (c[0] - cy) ** 2 + (c[1] - cx) ** 2)
            corner = video[t, y, x].astype(int)
            assert np.abs(corner - BACKGROUNDS[rec["background"]]).max() <= TOL, (rec["video"], t)


def _centroid(frame: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    mask = np.linalg.norm(frame.astype(float) - color, axis=-1) < 60
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])  # pixel i covers [i, i + 1)


def test_centroid_moves_in_captioned_direction(clips):
    seen = set()
    for rec, video in clips:
        (obj,) = rec["objects"]
        seen.add(obj["motion"])
        path = np.stack([_centroid(f, COLORS[obj["color"]]) for f in video])  # (T, 2)
        for t in (0, T - 1):  # the colour centroid sits on the geometric centre
            np.testing.assert_allclose(path[t], _expected_center(obj, t), atol=1.0)
        shift = path[-1] - path[0]
        for axis, d in enumerate(MOTIONS[obj["motion"]]):
            if d == 0:
                assert abs(shift[axis]) < 1.0, (rec["caption"], shift)
            else:
                assert np.sign(shift[axis]) == np.sign(d) and abs(shift[axis]) > 3, (rec["caption"], shift)
    assert seen == set(MOTIONS)  # 48 clips cover every motion


def _words(obj: dict) -> list[str]:
    motion = "standing still" if obj["motion"] == "static" else f"moving {obj['motion']}"
    return [obj["shape"], obj["color"], motion]


def test_captions_mention_attributes(folder):
    for rec in _records(folder):
        text = rec["caption"]
        assert text.endswith(f"on a {rec['background']} background") and " and " not in text
        assert all(word in text for word in _words(rec["objects"][0])), text


def test_two_objects(tmp_path):
    folder = generate_shapes(tmp_path, **dict(ARGS, num_videos=12), two_object_prob=1.0)
    for rec in _records(folder):
        first, second = rec["objects"]
        assert first["color"] != second["color"]
        assert rec["caption"].count(" and ") == 1
        head, tail = rec["caption"].split(" and ")
        assert all(w in head for w in _words(first)) and all(w in tail for w in _words(second))


def test_caption_wording():
    obj = dict(x=0.5, y=0.5, size=0.25, travel=0.3)
    one = {"objects": [dict(obj, shape="circle", color="red", motion="left")], "background": "black"}
    assert caption(one) == "a red circle moving left on a black background"
    still = {"objects": [dict(obj, shape="square", color="blue", motion="static")], "background": "gray"}
    assert caption(still) == "a blue square standing still on a gray background"
    two = {"objects": one["objects"] + [dict(obj, shape="triangle", color="green", motion="up")],
           "background": "black"}
    assert caption(two) == "a red circle moving left and a green triangle moving up on a black background"
    orange = {"objects": [dict(obj, shape="star", color="orange", motion="up-left")], "background": "navy"}
    assert caption(orange).startswith("an orange star moving up-left")


def test_colours_contrast_with_background():
    rng = np.random.default_rng(0)
    for _ in range(300):
        attrs = sample_attributes(rng, two_object_prob=0.5)
        for obj in attrs["objects"]:
            assert np.linalg.norm(np.subtract(COLORS[obj["color"]], BACKGROUNDS[attrs["background"]])) > 128


def test_render_geometry_and_bounce():
    # A white square of half-width 0.85 * 8 px at the centre of a black 32x32 frame.
    still = {"objects": [dict(shape="square", color="white", motion="static", x=0.5, y=0.5,
                              size=0.25, travel=0.0)], "background": "black"}
    frame = render_clip(still, 1, H, W)[0]
    assert (frame[10:22, 10:22] == 255).all() and (frame[:8] == 0).all() and (frame[:, 25:] == 0).all()
    # Moving right further than the room left: the shape bounces back and never leaves the frame.
    bounce = {"objects": [dict(still["objects"][0], shape="circle", motion="right", x=0.6, travel=0.6)],
              "background": "black"}
    xs = [_centroid(f, (255, 255, 255))[0] for f in render_clip(bounce, 9, H, W)]
    assert max(xs) <= (1 - 0.25) * W + 0.5 and xs[-1] < max(xs) - 3
    assert (render_clip(bounce, 9, H, W)[..., 0] > 0).sum(axis=(1, 2)).min() >= np.pi * 8**2 * 0.9


def test_datamodule(tmp_path):
    dm = ShapesDataModule(root=str(tmp_path), num_videos=20, batch_size=4, val_fraction=0.25)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"video", "caption", "path"}
    assert batch["video"].shape == (4, 3, T, H, W) and batch["video"].dtype == torch.float32
    assert batch["video"].min() >= -1 and batch["video"].max() <= 1
    assert len(batch["caption"]) == 4 and all(isinstance(c, str) for c in batch["caption"])
    assert all(Path(p).is_file() for p in batch["path"])
    assert len(dm.train_dataloader()) == 15 // 4  # drop_last
    val_paths = [p for b in dm.val_dataloader() for p in b["path"]]
    assert len(val_paths) == 5 and not set(val_paths) & set(dm.dataset.paths[i] for i in dm.train_dataset.indices)
    # the shuffle is seeded: a fresh loader yields the same first batch
    assert next(iter(dm.train_dataloader()))["path"] == batch["path"]
    prompts = dm.prompts(5)
    assert len(set(prompts)) == 5 and set(prompts) <= set(dm.dataset.captions)
