"""A procedural text-to-video dataset: coloured shapes moving on plain backgrounds.

Each clip holds one or two filled shapes, each moving in a straight line (one of 8 directions
or standing still), and a caption that says so ("a red circle moving left on a black
background"). Clips are rendered once to real H.264 mp4 files plus ``captions.jsonl`` under
``root/shapes-<fingerprint>/`` and then read back through the ordinary `VideoDataset`, so the
procedural data takes exactly the same path (decord, codec artefacts) as real data.

Geometry, in relative units so one set of attributes renders at any resolution:

- ``x``, ``y``: the start centre as a fraction of width / height (``y`` grows downwards).
- ``size``: the shape's radius as a fraction of ``min(H, W)``.
- ``travel``: distance the centre moves over the whole clip, as a fraction of width / height
  along each axis (scaled by the unit direction). The path does not depend on ``num_frames``;
  more frames sample it more finely.

At the walls the motion **bounces** (the centre is reflected into the range that keeps the
shape inside the frame). `sample_attributes` picks start positions so that a sampled path
never reaches a wall, so the captioned direction holds for the whole clip; the bounce only
matters for hand-written attributes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import track

from datamodules.mp4 import write_mp4
from datamodules.video import VideoDataModule

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
    "orange": (255, 140, 0),
}

_DIAG = 1.0 / math.sqrt(2.0)
MOTIONS: dict[str, tuple[float, float]] = {  # unit (dx, dy), image coordinates (y down)
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-left": (-_DIAG, -_DIAG),
    "up-right": (_DIAG, -_DIAG),
    "down-left": (-_DIAG, _DIAG),
    "down-right": (_DIAG, _DIAG),
    "static": (0.0, 0.0),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (100, 100, 100),
    "navy": (10, 20, 70),
}

MIN_CONTRAST = 150.0  # least Euclidean RGB distance between a shape's colour and its background
SIZE_RANGE = (0.20, 0.28)  # radius, fraction of min(H, W)
TWO_OBJECT_SCALE = 0.7  # both objects of a two-object clip are smaller, so they fit side by side
TRAVEL_RANGE = (0.25, 0.35)  # distance over the clip, fraction of the frame
SUPERSAMPLE = 2  # render at 2x then box-downsample: mild anti-aliasing
_FORMAT_VERSION = 2  # bump when rendering changes, so old folders are not reused


def _contrast(color: str, background: str) -> float:
    return float(np.linalg.norm(np.subtract(COLORS[color], BACKGROUNDS[background])))


def _sample_object(rng: np.random.Generator, background: str, exclude_colors: set[str],
                   scale: float) -> dict:
    colors = [c for c in COLORS if c not in exclude_colors and _contrast(c, background) >= MIN_CONTRAST]
    motion = str(rng.choice(list(MOTIONS)))
    size = scale * float(rng.uniform(*SIZE_RANGE))
    travel = 0.0 if motion == "static" else float(rng.uniform(*TRAVEL_RANGE))
    start = []
    for d in MOTIONS[motion]:  # per axis: start and end centre both in [size, 1 - size]
        lo, hi = size - min(0.0, d * travel), 1.0 - size - max(0.0, d * travel)
        start.append(float(rng.uniform(lo, hi)))
    return {
        "shape": str(rng.choice(SHAPES)),
        "color": str(rng.choice(colors)),
        "motion": motion,
        "x": round(start[0], 4),
        "y": round(start[1], 4),
        "size": round(size, 4),
        "travel": round(travel, 4),
    }


def _path(obj: dict, steps: int = 9) -> np.ndarray:
    """Centre positions ``(steps, 2)`` along the unbounced path, relative units."""
    dx, dy = MOTIONS[obj["motion"]]
    s = np.linspace(0.0, obj["travel"], steps)[:, None]
    return np.array([obj["x"], obj["y"]]) + s * np.array([dx, dy])


def sample_attributes(rng: np.random.Generator, two_object_prob: float) -> dict:
    """Draw the attributes of one clip.

    Args:
        rng: the only source of randomness (one generator per clip keeps clips independent).
        two_object_prob: probability of a second object: a different colour, both objects
            scaled by `TWO_OBJECT_SCALE`, their paths kept apart (rejection sampling, up to 100
            tries, so rare clips may still overlap; the second is drawn on top).

    Returns:
        ``{"objects": [obj] or [obj, obj], "background": name}`` where each ``obj`` is
        ``{"shape", "color", "motion", "x", "y", "size", "travel"}`` (see module docstring).
    """
    background = str(rng.choice(list(BACKGROUNDS)))
    if rng.random() >= two_object_prob:
        return {"objects": [_sample_object(rng, background, set(), 1.0)], "background": background}
    for _ in range(100):  # rejection: keep the two paths apart so neither hides the other
        first = _sample_object(rng, background, set(), TWO_OBJECT_SCALE)
        second = _sample_object(rng, background, {first["color"]}, TWO_OBJECT_SCALE)
        gap = np.linalg.norm(_path(first) - _path(second), axis=1).min()
        if gap > first["size"] + second["size"]:
            break
    return {"objects": [first, second], "background": background}


def caption(attrs: dict) -> str:
    """Describe a clip as a prompt.

    Example: ``"a red circle moving left and a green triangle standing still on a black
    background"``.
    """

    def phrase(obj: dict) -> str:
        article = "an" if obj["color"][0] in "aeiou" else "a"
        motion = "standing still" if obj["motion"] == "static" else f"moving {obj['motion']}"
        return f"{article} {obj['color']} {obj['shape']} {motion}"

    objects = " and ".join(phrase(obj) for obj in attrs["objects"])
    return f"{objects} on a {attrs['background']} background"


def _bounce(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect positions into ``[lo, hi]`` (a triangle wave), i.e. bounce off the walls."""
    if hi <= lo:
        return np.full_like(p, 0.5 * (lo + hi))
    q = np.mod(p - lo, 2.0 * (hi - lo))
    return lo + np.where(q <= hi - lo, q, 2.0 * (hi - lo) - q)


def centers(obj: dict, num_frames: int, height: int, width: int) -> np.ndarray:
    """Centre of an object in each frame, in pixels, after bouncing.

    Returns:
        ``float (T, 2)`` as ``(x, y)``; pixel ``i`` covers ``[i, i + 1)``.
    """
    dx, dy = MOTIONS[obj["motion"]]
    s = obj["travel"] * np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    rx, ry = obj["size"] * min(height, width) / width, obj["size"] * min(height, width) / height
    x = _bounce(obj["x"] + dx * s, rx, 1.0 - rx) * width
    y = _bounce(obj["y"] + dy * s, ry, 1.0 - ry) * height
    return np.stack([x, y], axis=1)


def _star_mask(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Five-pointed star, one point up: fold the angle into a half-sector [0, 36°] and test
    which side of the outer-vertex → inner-vertex edge the point lies on."""
    rho, phi = np.hypot(u, v), np.arctan2(v, u) + np.pi / 2  # 0 rad points up
    a = np.mod(phi, 2 * np.pi / 5)
    a = np.minimum(a, 2 * np.pi / 5 - a)
    qx, qy = rho * np.cos(a), rho * np.sin(a)
    ax, ay = r, 0.0  # outer vertex
    inner = 0.45 * r
    bx, by = inner * math.cos(math.pi / 5), inner * math.sin(math.pi / 5)
    return (bx - ax) * (qy - ay) - (by - ay) * (qx - ax) >= 0  # origin's side of edge A→B


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a shape of radius ``r`` at offsets ``(u, v)`` from its centre (y down)."""
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85 * r
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= r
    if shape == "triangle":  # equilateral, pointing up, centroid at the centre
        c = math.sqrt(3) / 2
        return (v <= r / 2) & (-c * u - v / 2 <= r / 2) & (c * u - v / 2 <= r / 2)
    if shape == "star":
        return _star_mask(u, v, r)
    if shape == "cross":
        w = 0.38 * r
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(u) <= w) & (np.abs(v) <= r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_clip(attrs: dict, num_frames: int, height: int, width: int) -> np.ndarray:
    """Render a clip: filled shapes over a plain background, later objects on top.

    Masks are evaluated at 2x2 sub-pixel positions and averaged (box downsampling), so edges
    are mildly anti-aliased while interiors keep the exact named colour.

    Returns:
        ``uint8 (T, H, W, 3)`` RGB.
    """
    k = SUPERSAMPLE
    sub = (np.arange(k) + 0.5) / k  # sub-pixel offsets inside a pixel
    ys = (np.arange(height)[:, None] + sub[None, :]).reshape(-1)  # (H*k,)
    xs = (np.arange(width)[:, None] + sub[None, :]).reshape(-1)  # (W*k,)
    clip = np.empty((num_frames, height, width, 3), dtype=np.float32)
    clip[:] = np.asarray(BACKGROUNDS[attrs["background"]], dtype=np.float32)
    for obj in attrs["objects"]:
        r = obj["size"] * min(height, width)
        color = np.asarray(COLORS[obj["color"]], dtype=np.float32)
        for t, (cx, cy) in enumerate(centers(obj, num_frames, height, width)):
            mask = _shape_mask(obj["shape"], xs[None, :] - cx, ys[:, None] - cy, r)  # (H*k, W*k)
            cover = mask.reshape(height, k, width, k).mean(axis=(1, 3))[..., None]  # (H, W, 1)
            clip[t] = clip[t] * (1.0 - cover) + color * cover
    return np.clip(np.rint(clip), 0, 255).astype(np.uint8)


def _fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]


def _config(num_videos: int, num_frames: int, height: int, width: int, seed: int,
            two_object_prob: float, fps: int) -> dict:
    return {"version": _FORMAT_VERSION, "num_videos": num_videos, "num_frames": num_frames,
            "height": height, "width": width, "seed": seed,
            "two_object_prob": float(two_object_prob), "fps": fps}


def shapes_folder(root: str | Path, num_videos: int, num_frames: int, height: int, width: int,
                  seed: int = 0, two_object_prob: float = 0.0, fps: int = 8) -> Path:
    """Where `generate_shapes` with these arguments writes: ``root/shapes-<fingerprint>``."""
    config = _config(num_videos, num_frames, height, width, seed, two_object_prob, fps)
    return Path(root) / f"shapes-{_fingerprint(config)}"


def generate_shapes(root: str | Path, num_videos: int, num_frames: int, height: int, width: int,
                    seed: int = 0, two_object_prob: float = 0.0, fps: int = 8,
                    progress: bool = True) -> Path:
    """Render the dataset to disk once; later calls with the same arguments reuse it.

    Writes ``00000.mp4 …`` (``uint8 (num_frames, height, width, 3)`` each), ``captions.jsonl``
    (``{"video", "caption", "objects", "background"}`` per line) and finally a ``DONE`` marker
    holding the fingerprint JSON. A folder whose marker matches is returned untouched; otherwise
    the set is rendered into a temporary folder of this process and renamed into place (a folder
    without a marker, from an interrupted run, is replaced), so ranks that render at once do not
    collide. Clip ``i`` is drawn from
    ``np.random.default_rng([seed, i])``, so output is deterministic in the arguments.

    Returns:
        The dataset folder.
    """
    config = _config(num_videos, num_frames, height, width, seed, two_object_prob, fps)
    marker_text = json.dumps(config, sort_keys=True)
    folder = shapes_folder(root, num_videos, num_frames, height, width, seed, two_object_prob, fps)
    marker = folder / "DONE"
    if marker.is_file() and marker.read_text() == marker_text:
        return folder
    # render into a folder of this process's own, then rename it into place: processes that render
    # the same set at once (the ranks of a job) never write into each other's files
    work = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    lines = []
    for i in track(range(num_videos), description=f"rendering {folder.name}", disable=not progress):
        attrs = sample_attributes(np.random.default_rng([seed, i]), two_object_prob)
        name = f"{i:05d}.mp4"
        write_mp4(work / name, render_clip(attrs, num_frames, height, width), fps=fps)
        lines.append(json.dumps({"video": name, "caption": caption(attrs), **attrs}))
    (work / "captions.jsonl").write_text("\n".join(lines) + "\n")
    (work / "DONE").write_text(marker_text)
    if marker.is_file() and marker.read_text() == marker_text:  # another process finished first
        shutil.rmtree(work)
        return folder
    if folder.exists():  # an interrupted or stale render
        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.rename(work, folder)
    except OSError:  # another process renamed its copy into place in between: the same content
        shutil.rmtree(work, ignore_errors=True)
    return folder


class ShapesDataModule(VideoDataModule):
    """The shapes dataset as a `VideoDataModule`: rendered in `prepare_data`, read back whole
    (``num_frames`` clips, stride 1, native size) like any folder of videos.

    Batches: ``{"video": float (B, 3, T, H, W) in [-1, 1], "caption": list[str],
    "path": list[str]}``.
    """

    def __init__(self, root: str = "outputs/data", num_videos: int = 256, num_frames: int = 8,
                 height: int = 32, width: int = 32, seed: int = 0, two_object_prob: float = 0.0,
                 fps: int = 8, batch_size: int = 8, num_workers: int = 0,
                 val_fraction: float = 0.0) -> None:
        super().__init__(root, num_frames=num_frames, frame_stride=1, size=None, seed=seed,
                         batch_size=batch_size, num_workers=num_workers, val_fraction=val_fraction)
        self.generate_kwargs: dict[str, Any] = dict(
            root=root, num_videos=num_videos, num_frames=num_frames, height=height, width=width,
            seed=seed, two_object_prob=two_object_prob, fps=fps)

    def prepare_data(self) -> None:
        """Render the dataset (once per node, on local rank 0, as Lightning arranges)."""
        generate_shapes(**self.generate_kwargs, progress=True)

    def dataset_root(self) -> Path:
        """The rendered folder; renders it first (silently) if `prepare_data` has not run."""
        return generate_shapes(**self.generate_kwargs, progress=False)
