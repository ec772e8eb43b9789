"""A dataset over any folder of videos plus a captions file, decoded with decord.

Items are ``{"video": float32 (C, T, H, W) in [-1, 1], "caption": str, "path": str}``;
`collate_videos` stacks them into ``(B, C, T, H, W)`` batches; `VideoDataModule` serves them to
Lightning with a seeded shuffle and an optional held-out split.

Bad files never stop training: at construction every listed video's header is opened and
missing, empty, unreadable (with what FFmpeg finds in it: no video stream, a codec decord cannot
decode) or too-short files are dropped; a file that opens but fails to decode later is replaced by
the next valid item. Each skipped file is recorded in ``dataset.skipped`` (path → reason) and logged
once on the ``vidlab.data`` logger. Captions: a malformed line or a missing column is an error naming
the file and line; an empty caption is kept (it is the null condition) and video files under the
root that no row names are left out (``dataset.unlisted``), each reported in one warning.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path

import decord
import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from datamodules.mp4 import decode_frames, describe_container

log = logging.getLogger("vidlab.data")

_VIDEO_KEYS = ("video", "path")
_CAPTION_KEYS = ("caption", "text")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")  # files `unlisted` looks for


def _pick(record: dict, keys: tuple[str, ...], where: str) -> str:
    for key in keys:
        value = record.get(key)
        if value is not None and (key in _CAPTION_KEYS or value != ""):
            return str(value)
    raise ValueError(f"{where}: missing key, expected one of {keys}")


def read_captions(file: str | os.PathLike) -> list[tuple[str, str]]:
    """Parse a captions file into ``(video, caption)`` pairs, in file order.

    ``.jsonl``: one JSON object per non-empty line. ``.csv``: a header row, then one row per
    video. Either uses the key ``video`` or ``path`` and ``caption`` or ``text``.

    Raises:
        FileNotFoundError: no such file (names it and the caption files its folder does have).
        ValueError: unknown extension, or a malformed line / missing key (names file and line).
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"captions file {file} not found ({_caption_files_hint(file.parent)}); it lists "
                                "each video and its caption: .jsonl lines {\"video\": ..., \"caption\": ...} "
                                "or .csv columns video,caption")
    records: list[tuple[str, str]] = []
    if file.suffix == ".jsonl":
        for lineno, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{file}, line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: malformed JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            records.append((_pick(record, _VIDEO_KEYS, where), _pick(record, _CAPTION_KEYS, where)))
    elif file.suffix == ".csv":
        with open(file, newline="") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            for keys in (_VIDEO_KEYS, _CAPTION_KEYS):
                if not any(k in columns for k in keys):
                    raise ValueError(f"{file}, line 1: header {columns} lacks one of {keys}")
            for row in reader:
                where = f"{file}, line {reader.line_num}"
                if None in row or None in row.values():  # too many / too few fields
                    raise ValueError(f"{where}: malformed row, expected {len(columns)} fields")
                records.append((_pick(row, _VIDEO_KEYS, where), _pick(row, _CAPTION_KEYS, where)))
    else:
        raise ValueError(f"{file}: captions must be .jsonl or .csv")
    return records


def _caption_files_hint(folder: Path) -> str:
    if not folder.is_dir():
        return f"the folder {folder} does not exist"
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".jsonl", ".csv"))
    return f"that folder has {', '.join(found)}" if found else "that folder has no .jsonl or .csv file"


def _int_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """An int ``v`` → ``(v, v)``; a two-element sequence → its two ints."""
    if isinstance(value, Integral):
        return int(value), int(value)
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, Integral) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


def _stride_range(frame_stride: int | Sequence[int]) -> tuple[int, int]:
    lo, hi = _int_pair(frame_stride, "frame_stride")
    if not 1 <= lo <= hi:
        raise ValueError(f"frame_stride needs 1 <= lo <= hi, got {frame_stride!r}")
    return lo, hi


def _target_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    h, w = _int_pair(size, "size")
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return h, w


def _check_clip(num_frames: int, crop: str) -> None:
    if not isinstance(num_frames, Integral) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")


class VideoDataset(Dataset):
    """Clips of ``num_frames`` frames from a folder of videos listed in a captions file.

    Args:
        root: folder holding the captions file; relative video paths are relative to it.
        captions: captions file name inside ``root`` (or an absolute path), ``.jsonl``/``.csv``.
        num_frames: frames per clip, ``T``.
        frame_stride: distance between sampled frames; an int, or ``[lo, hi]`` for a stride
            drawn per item (inclusive), capped so the clip fits in the video.
        size: ``None`` keeps the native size; an int resizes the short side to it then crops a
            square; ``[h, w]`` resizes so both fit then crops to ``h x w``. Resizing is bilinear
            with antialiasing (`torch.nn.functional.interpolate`).
        crop: ``"center"`` or ``"random"``.
        seed: with the item index and the epoch (`set_epoch`) seeds stride, start and crop,
            so an item is reproducible whatever the worker or order.
    """

    def __init__(self, root: str | os.PathLike, captions: str = "captions.jsonl",
                 num_frames: int = 8, frame_stride: int | tuple[int, int] | list[int] = 1,
                 size: int | list[int] | None = None, crop: str = "center", seed: int = 0) -> None:
        _check_clip(num_frames, crop)
        self.root = Path(root)
        self.num_frames = num_frames
        self.stride_range = _stride_range(frame_stride)
        self.size = _target_size(size)
        self.crop = crop
        self.seed = seed
        self.epoch = 0
        self.skipped: dict[str, str] = {}
        self.paths: list[str] = []
        self.captions: list[str] = []
        self.lengths: list[int] = []
        self._bad: set[int] = set()  # valid at construction, failed to decode later

        captions_file = self.root / captions
        records = read_captions(captions_file)
        if not records:
            raise ValueError(f"{captions_file} lists no video")
        self.unlisted = _unlisted_videos(self.root, {os.path.normpath(self.root / v) for v, _ in records})
        if self.unlisted:
            log.warning("%d video file(s) under %s have no row in %s and are not used: %s", len(self.unlisted),
                        self.root, captions_file, _some(self.unlisted))
        empty = [video for video, text in records if not text.strip()]
        if empty:
            log.warning("%s: %d of %d captions are empty; those videos train as the null condition \"\": %s",
                        captions_file, len(empty), len(records), _some(empty))
        min_span = (num_frames - 1) * self.stride_range[0] + 1
        for video, text in records:
            path = str(self.root / video)
            length, reason = self._probe(path)
            if reason is None and length < min_span:
                reason = f"too short: {length} frames, {min_span} needed"
            if reason is not None:
                self._skip(path, reason)
                continue
            self.paths.append(path)
            self.captions.append(text)
            self.lengths.append(length)
        if not self.paths:
            reasons = _some([f"{Path(p).name}: {why}" for p, why in self.skipped.items()], sep="; ")
            raise ValueError(f"no valid video in {self.root}: all {len(self.skipped)} listed in {captions_file} "
                             f"were skipped ({reasons})")

    @staticmethod
    def _probe(path: str) -> tuple[int, str | None]:
        """Open a video's header: ``(frame count, None)`` or ``(0, reason it is unusable)``."""
        if not os.path.isfile(path):
            return 0, "missing"
        if os.path.getsize(path) == 0:
            return 0, "empty file (0 bytes)"
        try:
            return len(decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)), None
        except Exception as exc:  # decord raises RuntimeError or its own DECORDError
            return 0, f"unreadable: {describe_container(path)}; decord: {_decord_message(exc)}"

    def _skip(self, path: str, reason: str) -> None:
        if path not in self.skipped:
            self.skipped[path] = reason
            log.warning("skipping video %s: %s", path, reason)

    def set_epoch(self, epoch: int) -> None:
        """Reseed random strides, starts and crops for a new epoch (call from the loop)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        """Item ``index``, or on a decode failure the next decodable one (wrapping around).

        ``(index, epoch)`` (what `ClipSampler` yields) draws that epoch's stride, start and crop; the
        epoch travels with the index, so it reaches DataLoader worker processes too.
        """
        if isinstance(index, tuple):
            index, self.epoch = index
        if not -len(self.paths) <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for {len(self.paths)} videos")
        for offset in range(len(self.paths)):
            i = (index + offset) % len(self.paths)
            if i in self._bad:
                continue
            try:
                video = self._load(i)
            except Exception as exc:
                self._bad.add(i)
                self._skip(self.paths[i], f"decode failed: {_first_line(exc)}")
                continue
            return {"video": video, "caption": self.captions[i], "path": self.paths[i]}
        raise RuntimeError(f"no decodable video left in {self.root}")

    def _load(self, i: int) -> torch.Tensor:
        """Decode, resize and crop clip ``i``: ``float32 (C, T, H, W)`` in ``[-1, 1]``."""
        rng = np.random.default_rng([self.seed, self.epoch, i])
        lo, hi = self.stride_range
        max_stride = (self.lengths[i] - 1) // (self.num_frames - 1) if self.num_frames > 1 else hi
        stride = min(int(rng.integers(lo, hi + 1)), max_stride)
        span = (self.num_frames - 1) * stride + 1
        start = int(rng.integers(0, self.lengths[i] - span + 1))
        indices = list(range(start, start + span, stride))

        reader = decord.VideoReader(self.paths[i], ctx=decord.cpu(0), num_threads=1)
        frames = decode_frames(reader, indices)  # uint8 (T, H, W, 3)
        video = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (T, C, H, W)
        if self.size is not None:
            video = self._resize_crop(video, rng)
        return video.permute(1, 0, 2, 3).contiguous()  # (C, T, H, W)

    def _resize_crop(self, video: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """``(T, C, H, W)`` → ``(T, C, h, w)``: scale so ``h x w`` fits, then crop."""
        h, w = self.size
        height, width = video.shape[-2:]
        scale = max(h / height, w / width)
        new_h, new_w = max(h, round(height * scale)), max(w, round(width * scale))
        if (new_h, new_w) != (height, width):
            video = F.interpolate(video, size=(new_h, new_w), mode="bilinear",
                                  align_corners=False, antialias=True).clamp_(-1.0, 1.0)
        if self.crop == "center":
            top, left = (new_h - h) // 2, (new_w - w) // 2
        else:
            top, left = int(rng.integers(0, new_h - h + 1)), int(rng.integers(0, new_w - w + 1))
        return video[..., top:top + h, left:left + w]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _decord_message(exc: BaseException) -> str:
    """decord's first line without its ``[hh:mm:ss] src/file.cc:NN: Check failed: ...`` preamble."""
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", _first_line(exc).partition(": ")[2])
    return text.rpartition("ERROR ")[2].strip()[:200] or type(exc).__name__


def _some(items: list[str], n: int = 3, sep: str = ", ") -> str:
    """The first ``n`` items for a log line, then how many more."""
    more = f"{sep}... ({len(items) - n} more)" if len(items) > n else ""
    return sep.join(items[:n]) + more


def _unlisted_videos(root: Path, listed: set[str]) -> list[str]:
    """Video files under ``root`` (hidden ones aside) that the captions file does not name. The walk
    costs far less than the header probe every listed video gets."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.relpath(os.path.join(folder, f), root) for f in sorted(files)
                  if f.lower().endswith(VIDEO_SUFFIXES) and not f.startswith(".")
                  and os.path.normpath(os.path.join(folder, f)) not in listed]
    return found


def collate_videos(items: list[dict]) -> dict:
    """Batch items: ``video`` stacked to ``float (B, C, T, H, W)``; other keys kept as lists."""
    batch: dict = {"video": torch.stack([item["video"] for item in items])}
    for key in items[0]:
        if key != "video":
            batch[key] = [item[key] for item in items]
    return batch


def loader_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator: each new iterator (every epoch) draws its worker base seed from
    it instead of from torch's global generator, whose draws (diffusion times, noise, caption
    dropout) then depend on training steps only, which is what exact resume restores."""
    return torch.Generator().manual_seed(seed)


class ClipSampler(DistributedSampler):
    """Yields ``(index, epoch)`` over ``indices``, shuffled by ``seed + epoch`` when ``shuffle``, and
    under torch.distributed this rank's share: positions rank, rank + W, ... of that order (padded
    with its first items to a multiple of W, as `DistributedSampler` does).

    Lightning calls ``set_epoch`` before every epoch, so each epoch has its own order and its own
    random clip draws (see `VideoDataset.__getitem__`), the same on every run with the same seed.
    It is a `DistributedSampler` so Lightning uses it as is instead of wrapping it, which lets
    `skip_once` (used by `callbacks.resume.ResumeState`) start the next iteration after the clips a
    resumed run already trained on, on every rank alike.
    """

    def __init__(self, indices: Sequence[int], seed: int = 0, shuffle: bool = True) -> None:
        # DistributedSampler.__init__ is not called: rank and world size are read when iterating,
        # after Lightning has set up the process group
        self.indices, self.seed, self.shuffle, self.epoch = list(indices), seed, shuffle, 0
        self._skip = 0

    @staticmethod
    def _rank_world() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_once(self, count: int) -> None:
        """Leave out the first ``count`` items of this rank's next iteration only."""
        self._skip = count

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self._rank_world()[1])

    def __iter__(self):
        order = list(range(len(self.indices)))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.indices), generator=generator).tolist()
        rank, world = self._rank_world()
        if world > 1:
            order = (order + order[: len(self) * world - len(order)])[rank::world]
        skip, self._skip = self._skip, 0
        return iter([(self.indices[i], self.epoch) for i in order[skip:]])


class VideoDataModule(L.LightningDataModule):
    """A `VideoDataset` over a folder, split into train / val, served in seeded batches.

    Batches: ``{"video": float (B, 3, T, H, W) in [-1, 1], "caption": list[str],
    "path": list[str]}``. The train loader shuffles with a generator seeded by ``seed`` and drops
    the last incomplete batch; ``val_fraction`` of the clips (a seeded choice, at least one when
    non-zero) are held out for the val loader.

    The train loader's `ClipSampler` re-shuffles and re-draws random strides / starts / crops every
    epoch (Lightning calls its ``set_epoch``), reproducibly from ``seed``.
    """

    def __init__(self, root: str, captions: str = "captions.jsonl", num_frames: int = 16,
                 frame_stride: int | list[int] = 1, size: int | list[int] | None = None,
                 crop: str = "center", seed: int = 0, batch_size: int = 4, num_workers: int = 0,
                 val_fraction: float = 0.0) -> None:
        super().__init__()
        # checked here, at build time, so a bad value stops before a run is created
        _check_clip(num_frames, crop)
        _stride_range(frame_stride)
        _target_size(size)
        if not isinstance(batch_size, Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(num_workers, Integral) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.root, self.captions = root, captions
        self.dataset_kwargs = dict(num_frames=num_frames, frame_stride=frame_stride, size=size,
                                   crop=crop, seed=seed)
        self.seed, self.batch_size, self.num_workers = seed, batch_size, num_workers
        self.val_fraction = val_fraction
        self.dataset: VideoDataset | None = None
        self.train_dataset: Subset | None = None
        self.val_dataset: Subset | None = None

    def dataset_root(self) -> Path:
        """The folder holding the videos and the captions file (subclasses may create it)."""
        return Path(self.root)

    def setup(self, stage: str | None = None) -> None:
        """Open the dataset (probing every video once) and split it."""
        if self.dataset is not None:
            return
        self.dataset = VideoDataset(self.dataset_root(), self.captions, **self.dataset_kwargs)
        n = len(self.dataset)
        n_val = min(max(round(n * self.val_fraction), 1), n - 1) if self.val_fraction > 0 else 0
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.val_dataset = Subset(self.dataset, sorted(order[:n_val]))
        self.train_dataset = Subset(self.dataset, sorted(order[n_val:]))

    def train_dataloader(self) -> DataLoader:
        """Shuffled with a seeded generator, ``drop_last=True``."""
        return DataLoader(self.dataset, batch_size=self.batch_size, drop_last=True,
                          sampler=ClipSampler(self.train_dataset.indices, self.seed),
                          num_workers=self.num_workers, collate_fn=collate_videos,
                          persistent_workers=self.num_workers > 0, generator=loader_generator(self.seed))

    def val_dataloader(self) -> DataLoader | list:
        """The held-out clips in order, or ``[]`` (no validation) when ``val_fraction == 0``."""
        if not self.val_dataset:
            return []
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=collate_videos)

    def prompts(self, n: int) -> list[str]:
        """The first ``n`` distinct captions in file order (e.g. for sample callbacks).

        Raises:
            ValueError: the captions file has fewer than ``n`` distinct captions.
        """
        captions = [text for _, text in read_captions(self.dataset_root() / self.captions)]
        distinct = list(dict.fromkeys(captions))
        if len(distinct) < n:
            raise ValueError(f"{self.dataset_root()} has {len(distinct)} distinct captions, {n} requested")
        return distinct[:n]
