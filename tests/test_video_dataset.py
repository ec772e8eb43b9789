"""mp4 I/O and VideoDataset: clip sampling checked against frames whose brightness encodes
their index, crops against two-tone frames. Bad files and captions: tests/test_bad_input.py."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from datamodules.mp4 import read_mp4, write_mp4
from datamodules.video import VideoDataModule, VideoDataset, collate_videos

STEP = 8  # frame i has brightness STEP * i


def _ramp(num_frames: int, height: int = 32, width: int = 32) -> np.ndarray:
    """uint8 (T, H, W, 3): frame i is uniform gray STEP * i."""
    return np.repeat(np.arange(num_frames, dtype=np.uint8) * STEP, height * width * 3).reshape(
        num_frames, height, width, 3)


def _indices(video: torch.Tensor) -> list[int]:
    """Frame indices of a ramp clip (C, T, H, W) in [-1, 1], read from the mean brightness."""
    gray = (video.mean(dim=(0, 2, 3)) + 1) * 127.5
    return [int(round(v / STEP)) for v in gray.tolist()]


def _two_tone(height: int, width: int, num_frames: int = 4, vertical: bool = True) -> np.ndarray:
    """uint8 (T, H, W, 3): dark (20) left / top half, bright (230) right / bottom half."""
    frames = np.full((num_frames, height, width, 3), 20, dtype=np.uint8)
    if vertical:
        frames[:, :, width // 2:] = 230
    else:
        frames[:, height // 2:] = 230
    return frames


def _jsonl(root: Path, rows: list[dict], name: str = "captions.jsonl") -> None:
    (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def ramps(tmp_path) -> Path:
    for name, n in (("a.mp4", 24), ("b.mp4", 30), ("c.mp4", 20)):
        write_mp4(tmp_path / name, _ramp(n))
    _jsonl(tmp_path, [{"video": "a.mp4", "caption": "first"}, {"video": "b.mp4", "caption": "second"},
                      {"video": "c.mp4", "caption": "third, with a comma"}])
    return tmp_path


# ---------------------------------------------------------------------------------- mp4 files


def test_write_mp4_round_trip_h264_faststart(tmp_path):
    path = tmp_path / "ramp.mp4"
    write_mp4(path, _ramp(16), fps=12)
    assert [p.name for p in tmp_path.iterdir()] == ["ramp.mp4"]  # temp file moved into place
    frames = read_mp4(path)
    assert frames.shape == (16, 32, 32, 3) and frames.dtype == np.uint8
    assert np.abs(frames.astype(int) - _ramp(16)).max() <= 3
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 12
    data = path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # +faststart


def test_write_mp4_rejects_odd_size(tmp_path):
    path = tmp_path / "odd.mp4"
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*31x32"):
        write_mp4(path, np.zeros((2, 31, 32, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("width", [16, 24, 48])
def test_read_mp4_widths_decord_pads(tmp_path, width):
    # decord 0.6 fails get_batch on these widths (padded RGB rows); read_mp4 must not.
    frames = _two_tone(16, width)
    write_mp4(tmp_path / "w.mp4", frames)
    back = read_mp4(tmp_path / "w.mp4")
    assert back.shape == frames.shape and np.abs(back.astype(int) - frames).max() <= 4


# ----------------------------------------------------------------------------- clip sampling


def test_item_equals_decoded_frames(ramps):
    ds = VideoDataset(ramps, num_frames=5, frame_stride=2)
    assert len(ds) == 3 and len(list(ds)) == 3  # IndexError ends iteration
    for i, name in enumerate(("a.mp4", "b.mp4", "c.mp4")):
        item = ds[i]
        video = item["video"]
        assert video.shape == (3, 5, 32, 32) and video.dtype == torch.float32
        assert video.min() >= -1 and video.max() <= 1
        assert item["path"] == str(ramps / name) and item["caption"] == ds.captions[i]
        idx = _indices(video)
        reference = torch.from_numpy(read_mp4(ramps / name)[idx]).permute(3, 0, 1, 2) / 127.5 - 1
        torch.testing.assert_close(video, reference.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("stride", [1, 3])
def test_fixed_stride(ramps, stride):
    ds = VideoDataset(ramps, num_frames=6, frame_stride=stride, seed=1)
    starts = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            idx = _indices(ds[i]["video"])
            assert idx == list(range(idx[0], idx[0] + 6 * stride, stride))
            assert 0 <= idx[-1] < ds.lengths[i]
            starts.add((i, idx[0]))
    assert len(starts) > len(ds)  # random start among the valid ones


def test_random_stride_in_range_and_reproducible(ramps):
    ds = VideoDataset(ramps, num_frames=4, frame_stride=[2, 4], seed=3)
    twin = VideoDataset(ramps, num_frames=4, frame_stride=(2, 4), seed=3)
    other = VideoDataset(ramps, num_frames=4, frame_stride=[2, 4], seed=4)
    strides, differs = set(), False
    for epoch in range(6):
        for d in (ds, twin, other):
            d.set_epoch(epoch)
        for i in range(len(ds)):
            idx = _indices(ds[i]["video"])
            step = idx[1] - idx[0]
            assert 2 <= step <= 4 and np.all(np.diff(idx) == step)
            strides.add(step)
            assert torch.equal(ds[i]["video"], twin[i]["video"])  # same seed, index, epoch
            differs |= not torch.equal(ds[i]["video"], other[i]["video"])
    assert strides == {2, 3, 4} and differs


def test_too_long_clip_needs_whole_video(ramps):
    ds = VideoDataset(ramps, num_frames=24, frame_stride=[1, 5])  # b (30 frames) and a (24) fit
    assert sorted(Path(p).name for p in ds.paths) == ["a.mp4", "b.mp4"]
    assert _indices(ds[0]["video"]) == list(range(24))  # stride capped at 1 for a 24-frame video


# ------------------------------------------------------------------------------ resize, crop


@pytest.mark.parametrize("size, shape, edge", [
    (None, (32, 64), 32),
    (16, (16, 16), 8),  # 32x64 -> 16x32, centre crop columns 8..24, edge at column 16
    ([16, 24], (16, 24), 12),  # -> 16x32, crop columns 4..28
    ([40, 40], (40, 40), 20),  # -> 40x80, crop columns 20..60
])
def test_resize_and_center_crop(tmp_path, size, shape, edge):
    write_mp4(tmp_path / "wide.mp4", _two_tone(32, 64))
    _jsonl(tmp_path, [{"path": "wide.mp4", "text": "two tones"}])
    video = VideoDataset(tmp_path, num_frames=4, size=size)[0]["video"]
    assert video.shape == (3, 4, *shape)
    dark, bright = 20 / 127.5 - 1, 230 / 127.5 - 1
    assert (video[..., : edge - 1] - dark).abs().max() < 0.05
    assert (video[..., edge + 1:] - bright).abs().max() < 0.05


def test_resize_tall_video(tmp_path):
    write_mp4(tmp_path / "tall.mp4", _two_tone(64, 32, vertical=False))
    _jsonl(tmp_path, [{"video": "tall.mp4", "caption": ""}])
    video = VideoDataset(tmp_path, num_frames=4, size=16)[0]["video"]  # -> 32x16, rows 8..24
    assert video.shape == (3, 4, 16, 16)
    assert video[:, :, :7].mean() < -0.5 and video[:, :, 9:].mean() > 0.5


def test_random_crop(tmp_path):
    write_mp4(tmp_path / "wide.mp4", _two_tone(32, 64))
    _jsonl(tmp_path, [{"video": "wide.mp4", "caption": "x"}])
    ds = VideoDataset(tmp_path, num_frames=4, size=16, crop="random", seed=0)
    edges = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        video = ds[0]["video"]
        columns = (video.mean(dim=(0, 1, 2)) > 0).int()  # (W,): 0 dark, 1 bright
        assert torch.all(columns.diff() >= 0)  # one window, dark then bright
        edges.add(int(columns.argmax()) if columns.any() else 16)
        assert torch.equal(video, ds[0]["video"])  # reproducible within an epoch
    assert len(edges) >= 3


# ----------------------------------------------------------------------------- caption files


def test_jsonl_and_csv_agree(ramps):
    with open(ramps / "captions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "text"])
        for row in (ramps / "captions.jsonl").read_text().splitlines():
            record = json.loads(row)
            writer.writerow([record["video"], record["caption"]])
    a = VideoDataset(ramps, num_frames=3)
    b = VideoDataset(ramps, captions="captions.csv", num_frames=3)
    assert b.captions == ["first", "second", "third, with a comma"] == a.captions
    for i in range(3):
        assert torch.equal(a[i]["video"], b[i]["video"]) and a[i]["path"] == b[i]["path"]


# Malformed caption files and bad video files (corrupt, truncated, empty, wrong codec, too short,
# missing, unlisted) are the bad-input corpus: tests/test_bad_input.py.


def test_collate_videos():
    items = [{"video": torch.zeros(3, 2, 4, 4), "caption": f"c{i}", "path": f"p{i}"} for i in range(3)]
    batch = collate_videos(items)
    assert batch["video"].shape == (3, 3, 2, 4, 4)
    assert batch["caption"] == ["c0", "c1", "c2"] and batch["path"] == ["p0", "p1", "p2"]


def test_video_datamodule(ramps):
    dm = VideoDataModule(str(ramps), num_frames=4, frame_stride=[1, 2], size=16, batch_size=2,
                         val_fraction=0.34)
    dm.setup("fit")
    assert len(dm.train_dataset) == 2 and len(dm.val_dataset) == 1
    (batch,) = list(dm.train_dataloader())
    assert batch["video"].shape == (2, 3, 4, 16, 16) and len(batch["caption"]) == 2
    assert [b["video"].shape[0] for b in dm.val_dataloader()] == [1]
    assert dm.prompts(2) == ["first", "second"]
    with pytest.raises(ValueError, match="3 distinct captions, 4 requested"):
        dm.prompts(4)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_clip_sampler_redraws_per_epoch_reproducibly_in_workers(ramps, num_workers):
    """The epoch travels with the index: random strides and starts change every epoch, the same on
    every run, also inside DataLoader worker processes (where set_epoch on the dataset is lost)."""

    def epochs(dm: VideoDataModule) -> list[list[tuple[str, tuple[int, ...]]]]:
        loader = dm.train_dataloader()
        out = []
        for epoch in range(3):
            loader.sampler.set_epoch(epoch)  # what Lightning's fit loop does
            out.append([(p, tuple(_indices(v))) for b in loader for p, v in zip(b["path"], b["video"])])
        return out

    def module() -> VideoDataModule:
        dm = VideoDataModule(str(ramps), num_frames=4, frame_stride=[1, 5], seed=3, batch_size=1,
                             num_workers=num_workers)
        dm.setup("fit")
        return dm

    first, again = epochs(module()), epochs(module())
    assert first == again  # reproducible from the seed
    assert len({tuple(e) for e in first}) == 3  # each epoch draws anew
    for epoch in first:
        assert sorted(p for p, _ in epoch) == sorted(module().dataset.paths)  # every clip once
