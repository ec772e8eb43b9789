"""A Shapes probe: a small video classifier that reads colour, shape, motion and background.

No pretrained video network is available offline, so the embedded demo scores generated videos
with a classifier trained on real Shapes clips: a video "passes" an attribute when the probe reads
back what its prompt asked for. `probe_scores` reports per-attribute and joint accuracy;
`fvd_probe` is the Fréchet distance (Heusel et al. 2017) between Gaussians fitted to the probe's
penultimate features. It is *not* FVD (Unterthiner et al. 2018 use an I3D network trained on
Kinetics) and must never be logged under the name ``fvd``.

Scope: single-object clips (``two_object_prob = 0``). A caption names the object's colour, shape,
motion and the background; vocabularies come from `datamodules.shapes`, never copied here.
Videos are ``float (N, 3, T, H, W)`` in ``[-1, 1]`` (DESIGN.md). No Lightning imports.

Measured (2 CPU threads, 1000 steps x 32 clips, ~100 s, 8x32x32, 256 held-out clips of another
seed): colour, motion and background 100 %, shape 98 %. Shape needs the object mask input (see
`ShapesProbe`): without it the same budget reads shape 88 % (300 steps: ~42 %).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.shapes import BACKGROUNDS, COLORS, MOTIONS, SHAPES, render_clip, sample_attributes
from eval.fvd import feature_statistics, frechet_distance

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "motion", "background")


def vocabularies() -> dict[str, list[str]]:
    """Class names per attribute, in the order of `datamodules.shapes`."""
    return {"color": list(COLORS), "shape": list(SHAPES), "motion": list(MOTIONS),
            "background": list(BACKGROUNDS)}


def _alt(names: Sequence[str]) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))  # longest first


_OBJECT = (rf"an? (?P<color>{_alt(COLORS)}) (?P<shape>{_alt(SHAPES)}) "
           rf"(?:moving (?P<motion>{_alt([m for m in MOTIONS if m != 'static'])})|standing still)")
_OBJECT_RE = re.compile(_OBJECT)
_CAPTION_RE = re.compile(rf"(?P<objects>{_OBJECT}(?: and {_OBJECT.replace('?P<', '?P<b_')})*)"
                         rf" on an? (?P<background>{_alt(BACKGROUNDS)}) background")


def parse_caption(text: str) -> dict:
    """Inverse of `datamodules.shapes.caption` for the attributes a caption states.

    Returns:
        ``{"objects": [{"color", "shape", "motion"}, ...], "background": name}``.

    Raises:
        ValueError: the text is not a Shapes caption.
    """
    m = _CAPTION_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a Shapes caption: {text!r}")
    objects = [{"color": o["color"], "shape": o["shape"], "motion": o["motion"] or "static"}
               for o in _OBJECT_RE.finditer(m["objects"])]
    return {"objects": objects, "background": m["background"]}


def caption_labels(text: str) -> dict[str, int]:
    """Class indices ``{attribute: index}`` of a single-object caption (see `vocabularies`)."""
    parsed = parse_caption(text)
    if len(parsed["objects"]) != 1:
        raise ValueError(f"the probe reads single-object clips only; got {text!r}")
    obj, vocab = parsed["objects"][0], vocabularies()
    names = {"color": obj["color"], "shape": obj["shape"], "motion": obj["motion"],
             "background": parsed["background"]}
    return {a: vocab[a].index(names[a]) for a in ATTRIBUTES}


class ShapesProbe(nn.Module):
    """Three Conv3d blocks → [average pool to a 2x4x4 grid (where/when, for
    motion), global max pool (what, for shape)] → ``feature_dim`` features → one head per attribute.

    The network sees the RGB clip plus a fourth channel, the object mask m = Σ_c |x_c − b_c| with b
    the clip's background colour (its per-channel median over all pixels: the background covers
    most of every Shapes frame). The mask is the same for every colour pair, so shape is learnt once
    instead of once per colour combination.

    Input ``(N, 3, T, H, W)`` in ``[-1, 1]``; any ``T ≥ 1``, ``H, W ≥ 4`` (adaptive pooling).
    """

    def __init__(self, vocab: dict[str, list[str]] | None = None, width: int = 16,
                 feature_dim: int = 64) -> None:
        super().__init__()
        self.vocab = vocab or vocabularies()
        self.config = {"width": width, "feature_dim": feature_dim}
        c = width
        self.body = nn.Sequential(
            nn.Conv3d(4, c, 3, padding=1), nn.ReLU(),  # RGB + object mask
            nn.MaxPool3d((1, 2, 2)),  # (N, c, T, H/2, W/2)
            nn.Conv3d(c, 2 * c, 3, padding=1), nn.ReLU(),
            nn.MaxPool3d((1, 2, 2)),  # (N, 2c, T, H/4, W/4)
            nn.Conv3d(2 * c, 4 * c, 3, padding=1), nn.ReLU(),
        )
        self.grid = nn.Sequential(nn.AdaptiveAvgPool3d((2, 4, 4)), nn.Flatten())  # where/when: motion
        self.glob = nn.Sequential(nn.AdaptiveMaxPool3d(1), nn.Flatten())  # what, anywhere: shape
        self.proj = nn.Sequential(nn.Linear(4 * c * 33, feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({a: nn.Linear(feature_dim, len(v)) for a, v in self.vocab.items()})

    def features(self, video: Tensor) -> Tensor:
        """``(N, 3, T, H, W)`` → ``(N, feature_dim)``."""
        background = video.flatten(2).median(dim=2).values[:, :, None, None, None]  # (N, 3, 1, 1, 1)
        mask = (video - background).abs().sum(1, keepdim=True)  # (N, 1, T, H, W)
        h = self.body(torch.cat([video, mask], dim=1))  # (N, 4c, T, H/4, W/4)
        return self.proj(torch.cat([self.grid(h), self.glob(h)], dim=1))  # (N, d)

    def forward(self, video: Tensor) -> dict[str, Tensor]:
        """``(N, 3, T, H, W)`` → ``{attribute: logits (N, classes)}``."""
        h = self.features(video)
        return {a: head(h) for a, head in self.heads.items()}


def render_set(num_clips: int, seed: int, num_frames: int = 8, height: int = 32,
               width: int = 32) -> tuple[Tensor, list[str]]:
    """Single-object Shapes clips rendered in memory (no mp4): ``(N, 3, T, H, W)`` in [-1, 1] and
    their captions. Clip ``i`` draws from ``np.random.default_rng([seed, i])``."""
    from datamodules.shapes import caption

    clips, prompts = [], []
    for i in range(num_clips):
        attrs = sample_attributes(np.random.default_rng([seed, i]), 0.0)
        clips.append(render_clip(attrs, num_frames, height, width))  # uint8 (T, H, W, 3)
        prompts.append(caption(attrs))
    video = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    return video.contiguous(), prompts  # (N, 3, T, H, W)


def _labels(prompts: Sequence[str]) -> dict[str, Tensor]:
    rows = [caption_labels(p) for p in prompts]
    return {a: torch.tensor([r[a] for r in rows]) for a in ATTRIBUTES}


def _augment(video: Tensor, gen: torch.Generator) -> Tensor:
    """Codec-like corruption so the probe transfers to decoded H.264: for half the clips a 3x3
    spatial blur (mixed in at a random strength, like yuv420p chroma smearing), then Gaussian noise
    of std up to 0.05 per clip."""
    n = video.shape[0]
    blurred = F.avg_pool3d(video, (1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
    mix = torch.rand(n, 1, 1, 1, 1, generator=gen) * (torch.rand(n, 1, 1, 1, 1, generator=gen) < 0.5)
    video = video + mix * (blurred - video)
    sigma = 0.05 * torch.rand(n, 1, 1, 1, 1, generator=gen)
    return (video + sigma * torch.randn(video.shape, generator=gen)).clamp(-1.0, 1.0)


def train_probe(steps: int = 1000, batch_size: int = 32, num_clips: int = 2048, seed: int = 0,
                num_frames: int = 8, height: int = 32, width: int = 32, lr: float = 1.5e-3,
                width_mult: int = 16, feature_dim: int = 64, augment: bool = True,
                log: dict | None = None) -> ShapesProbe:
    """Train a probe on ``num_clips`` in-memory rendered clips (seed ``seed``) with AdamW for
    ``steps`` steps of summed per-attribute cross-entropy; deterministic in its arguments.

    ``log``, if given, receives ``{"train_seconds", "final_loss"}``.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    video, prompts = render_set(num_clips, seed, num_frames, height, width)
    labels = _labels(prompts)
    model = ShapesProbe(width=width_mult, feature_dim=feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    start, loss = time.perf_counter(), torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(0, num_clips, (batch_size,), generator=gen)
        x = video[idx]
        if augment:
            x = _augment(x, gen)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[a], labels[a][idx]) for a in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    if log is not None:
        log.update(train_seconds=time.perf_counter() - start, final_loss=float(loss.detach()))
    return model


def save_probe(model: ShapesProbe, path: str | Path) -> None:
    """State dict + vocabularies + config: everything `load_probe` needs to rebuild."""
    torch.save({"state_dict": model.state_dict(), "vocab": model.vocab, "config": model.config},
               path)


def load_probe(path: str | Path) -> ShapesProbe:
    """Rebuild a saved probe; loads with ``weights_only=True`` (no pickled code)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = ShapesProbe(vocab=blob["vocab"], width=blob["config"]["width"],
                        feature_dim=blob["config"]["feature_dim"])
    model.load_state_dict(blob["state_dict"])
    return model.eval()


@torch.no_grad()
def _batched(fn, videos: Tensor, batch_size: int) -> list:
    return [fn(videos[i:i + batch_size]) for i in range(0, videos.shape[0], batch_size)]


@torch.no_grad()
def probe_predictions(model: ShapesProbe, videos: Tensor, batch_size: int = 64) -> dict[str, Tensor]:
    """``(N, 3, T, H, W)`` → ``{attribute: class index (N,)}``."""
    model.eval()
    outs = _batched(model, videos, batch_size)
    return {a: torch.cat([o[a] for o in outs]).argmax(-1) for a in model.vocab}


def probe_scores(model: ShapesProbe, videos: Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """How often the probe reads back what each prompt asked (`scores_from_predictions`)."""
    if videos.shape[0] != len(prompts):
        raise ValueError(f"{videos.shape[0]} videos but {len(prompts)} prompts")
    return scores_from_predictions(probe_predictions(model, videos), prompts)


def scores_from_predictions(pred: dict[str, Tensor], prompts: Sequence[str]) -> dict[str, float]:
    """Accuracy of predicted class indices ``{attribute: (N,)}`` against the prompts' attributes.

    Returns:
        ``{"probe_acc_color", "probe_acc_shape", "probe_acc_motion", "probe_acc_background",
        "probe_acc_joint"}``; joint = all four attributes right on the same video.
    """
    want = _labels(prompts)
    right = {a: pred[a].cpu() == want[a] for a in ATTRIBUTES}
    scores = {f"probe_acc_{a}": right[a].float().mean().item() for a in ATTRIBUTES}
    scores["probe_acc_joint"] = torch.stack(list(right.values())).all(0).float().mean().item()
    return scores


def cached_probe(folder: str | Path, **train_args) -> ShapesProbe:
    """`train_probe(**train_args)` once, then read back: ``<folder>/shapes_probe_<digest>.pt``, the
    digest over the training arguments (training is deterministic in them)."""
    from datamodules.digest import json_digest

    path = Path(folder) / f"shapes_probe_{json_digest(train_args)[:16]}.pt"
    if path.is_file():
        return load_probe(path)
    model = train_probe(**train_args)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_probe(model, tmp)
    tmp.replace(path)
    return model


@torch.no_grad()
def probe_features(model: ShapesProbe, videos: Tensor, batch_size: int = 64) -> Tensor:
    """``(N, 3, T, H, W)`` → penultimate features ``(N, d)``."""
    model.eval()
    return torch.cat(_batched(model.features, videos, batch_size))


def fvd_probe(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, d)``, ``(M, d)``.

    Log it as ``fvd_probe``; it is not comparable to I3D-based FVD. Maths: `eval.fvd`
    (float64 statistics, trace of the square root via the eigenvalues of Σ1 Σ2).
    """
    return float(frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b)))
