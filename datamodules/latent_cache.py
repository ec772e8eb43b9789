"""Latent cache: encode a video dataset once (latents and text embeddings), train the generator from it.

``vidlab cache-latents EXPERIMENT [overrides]`` (`experiments/cache.py`) calls `build_cache`; the data
preset ``latent_cache`` (`LatentCacheDataModule`) serves the cache to ``vidlab fit``, and
`GeneratorSystem.training_step` takes ``batch["latent"]`` as x0 instead of calling ``vae.encode``.

A cache is one folder, ``<root>/latents/<fingerprint[:16]>/``:

- ``shard-00000.pt`` ...: ``torch.save`` of plain tensors (``torch.load(..., weights_only=True)``):
  ``{"latent": (n, C, T', H', W'), "text": (n, L, D), "text_mask": (n, L) bool, "caption": [n str],
  "index": (n,) long}``, items in dataset order;
- ``null_text.pt``: ``{"text": (L, D), "text_mask": (L,)}``, the encoding of ``""`` (caption dropout);
- ``manifest.json``: fingerprint, count, shards (file, count, bytes), shapes, dtype and the config it
  came from. Written last, atomically (temp file + ``os.replace``): a folder without it is partial.

The fingerprint (`fingerprint`) is a sha256 over four parts, each a sha256 itself so a refusal can say
which part changed:

- ``vae``: the autoencoder's class, its public scalar attributes (``patch``, ``shift``, ``scale``,
  ``latent_channels`` ...) and every state-dict tensor (key, dtype, shape, bytes, in key order);
- ``text``: the text encoder, the same way. A weights folder's ``path`` is not in it, the weights are.
  A *trainable* encoder is trained with the generator, so `GeneratorSystem` encodes captions live with
  it and the cached text goes unused: its weights are left out (class and settings stay in);
- ``data``: the source datamodule's ``data_fingerprint()`` if it has one; else, for each video of its
  dataset in order: path relative to the dataset root, size in bytes, a content hash (the whole file
  up to 8 MiB, else the first and last MiB) and its caption;
- ``clip``: the source datamodule's class, num_frames, stride range, size, crop and data seed.

Batch size, workers, validation split, shard size and device are not in it.

Randomness: the cache holds **one clip per video, the one `VideoDataset` draws for epoch 0** from the
data seed (exactly the clip an uncached run sees in its first epoch). Data with a random stride range,
random crops or videos longer than the clip then trains on that one draw every epoch; `build_cache`
warns and the manifest lists those draws under ``fixed_draws``. Shapes has none (whole clips, stride 1).

Refusals (`LatentCacheError`, a FileNotFoundError naming the folder and the rebuild command):
missing (no folder for this fingerprint), partial (no manifest, a shard missing or of the wrong size),
stale (the manifest's fingerprint is not this config's, or only caches of other settings exist).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.progress import track
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from datamodules.digest import file_digest, json_digest, module_digest
from datamodules.video import ClipSampler, collate_videos, loader_generator

log = logging.getLogger("vidlab.data")

FORMAT = 1
REBUILD = "vidlab cache-latents EXPERIMENT [overrides]"
_PARTS = {"vae": "autoencoder (class, settings or weights)", "text": "text encoder",
          "data": "video files or captions", "clip": "clip settings (num_frames, stride, size, crop, seed)"}


class LatentCacheError(FileNotFoundError):
    """No usable cache: ``kind`` is ``missing``, ``partial`` or ``stale``; the message names the folder
    and the command that rebuilds it."""

    def __init__(self, kind: str, folder: Path, detail: str) -> None:
        self.kind, self.folder = kind, Path(folder)
        super().__init__(f"{kind} latent cache {folder}: {detail}. Rebuild it with: {REBUILD} "
                         "(the experiment and overrides of this run)")


# -- fingerprint -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    """sha256 hex digests of the four parts (see the module docstring) and of all of them together."""

    parts: dict[str, str]

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps({"format": FORMAT, **self.parts}, sort_keys=True).encode()).hexdigest()


def source_dataset(source: L.LightningDataModule) -> Any:
    """The source datamodule's `VideoDataset` (sets it up on first use)."""
    if getattr(source, "dataset", None) is None:
        source.setup("fit")
    dataset = getattr(source, "dataset", None)
    if dataset is None or not hasattr(dataset, "paths"):
        raise ValueError(f"latent cache: the source {type(source).__name__} has no VideoDataset as .dataset after setup")
    return dataset


def clip_settings(source: L.LightningDataModule) -> dict[str, Any]:
    """What decides the cached clip of each video besides the file: the source class, num_frames,
    stride range, size, crop and the data seed (which fixes the epoch-0 draw)."""
    d = source_dataset(source)
    cls = type(source)
    return {"source": f"{cls.__module__}.{cls.__qualname__}", "num_frames": d.num_frames,
            "frame_stride": list(d.stride_range), "size": None if d.size is None else list(d.size),
            "crop": d.crop, "seed": d.seed, "draw": "epoch 0"}


def fingerprint(vae: nn.Module, text_encoder: nn.Module, source: L.LightningDataModule) -> Fingerprint:
    """The fingerprint of the cache that ``vae`` and ``text_encoder`` make of ``source``'s clips."""
    own = getattr(source, "data_fingerprint", None)
    if callable(own):
        data = json_digest(str(own()))
    else:
        d = source_dataset(source)
        h = hashlib.sha256()
        for path, caption in zip(d.paths, d.captions):  # (relative path, bytes, content, caption) per video
            h.update(json.dumps([os.path.relpath(path, d.root), os.path.getsize(path), file_digest(path), caption]).encode())
        data = h.hexdigest()
    trainable = any(p.requires_grad for p in text_encoder.parameters())
    return Fingerprint({"vae": module_digest(vae), "text": module_digest(text_encoder, weights=not trainable),
                        "data": data, "clip": json_digest(clip_settings(source))})


def cache_folder(root: str | os.PathLike, fp: Fingerprint) -> Path:
    return Path(root) / "latents" / fp.digest[:16]


# -- checking a folder -----------------------------------------------------------------------------


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _differences(theirs: dict[str, str], ours: Fingerprint) -> str:
    changed = [_PARTS[k] for k in _PARTS if theirs.get(k) != ours.parts[k]]
    return ", ".join(changed) or "cache format"


def check_cache(folder: str | os.PathLike, fp: Fingerprint) -> dict[str, Any]:
    """The manifest of a complete cache in ``folder`` made with fingerprint ``fp``.

    Raises:
        LatentCacheError: missing, partial or stale (see the module docstring).
    """
    folder = Path(folder)
    if not folder.is_dir():
        others = sorted((m for m in folder.parent.glob("*/manifest.json")), key=lambda p: p.stat().st_mtime)
        manifest = _read_manifest(others[-1].parent) if others else None
        if manifest is not None:
            raise LatentCacheError("stale", folder, f"no cache for fingerprint {fp.digest[:16]}; the latest "
                                   f"cache beside it, {others[-1].parent.name}, differs in: "
                                   f"{_differences(manifest.get('parts', {}), fp)}")
        raise LatentCacheError("missing", folder, f"no cache for fingerprint {fp.digest[:16]}")
    manifest = _read_manifest(folder)
    if manifest is None:
        raise LatentCacheError("partial", folder, "no readable manifest.json (an interrupted cache-latents?)")
    if manifest.get("fingerprint") != fp.digest:
        raise LatentCacheError("stale", folder, f"built with fingerprint {str(manifest.get('fingerprint'))[:16]}, "
                               f"this config needs {fp.digest[:16]}; differs in: {_differences(manifest.get('parts', {}), fp)}")
    for entry in [*manifest["shards"], manifest["null_text"]]:
        file = folder / entry["file"]
        if not file.is_file():
            raise LatentCacheError("partial", folder, f"{entry['file']} is missing")
        if file.stat().st_size != entry["bytes"]:
            raise LatentCacheError("partial", folder, f"{entry['file']} has {file.stat().st_size} bytes, "
                                   f"the manifest says {entry['bytes']} (truncated or rewritten)")
    if sum(s["count"] for s in manifest["shards"]) != manifest["count"]:
        raise LatentCacheError("partial", folder, "the shards do not add up to the manifest's count")
    return manifest


# -- building --------------------------------------------------------------------------------------


@dataclass
class CacheResult:
    folder: Path
    fingerprint: str
    count: int
    built: bool  # False: a complete cache with this fingerprint was already there


def _save(obj: Any, file: Path) -> int:
    """torch.save through a temp file and ``os.replace``; returns the file's size in bytes."""
    tmp = file.with_name(file.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, file)
    return file.stat().st_size


def _fixed_draws(dataset: Any) -> list[str]:
    """The random choices of `VideoDataset` that the cache fixes at their epoch-0 draw."""
    lo, hi = dataset.stride_range
    fixed = ["frame_stride"] if lo < hi else []
    if any(n > (dataset.num_frames - 1) * lo + 1 for n in dataset.lengths):
        fixed.append("start")
    if dataset.crop == "random" and dataset.size is not None:
        fixed.append("crop")
    return fixed


@torch.no_grad()
def build_cache(vae: nn.Module, text_encoder: nn.Module, source: L.LightningDataModule, root: str | os.PathLike,
                path: str | os.PathLike | None = None, config: dict[str, Any] | None = None, batch_size: int = 8,
                shard_size: int = 256, device: str | torch.device = "cpu", progress: bool = True) -> CacheResult:
    """Encode every clip of ``source`` (its epoch-0 draw, dataset order) into a cache folder.

    Video goes through ``vae.encode`` (eval mode, no grad) in batches of ``batch_size``; captions through
    ``text_encoder`` (tokens (L, D), mask (L,) per clip), and ``""`` once for the null encoding. Shards of
    ``shard_size`` clips are written first, ``manifest.json`` last. A complete cache with the same
    fingerprint already in the folder is left untouched (``built=False``); anything else there that a
    cache writes (shards, manifest, temp files) is removed first.
    """
    source.prepare_data()
    fp = fingerprint(vae, text_encoder, source)
    folder = Path(path) if path is not None else cache_folder(root, fp)
    try:
        manifest = check_cache(folder, fp)
        return CacheResult(folder, fp.digest, manifest["count"], built=False)
    except LatentCacheError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    for pattern in ("manifest.json", "shard-*.pt", "null_text.pt", "*.tmp"):
        for stale in folder.glob(pattern):
            stale.unlink()

    dataset = source_dataset(source)
    fixed = _fixed_draws(dataset)
    if fixed:
        log.warning("latent cache: %s are random in this data; the cache holds the epoch-0 draw of each "
                    "video, so training from it sees that one clip every epoch", ", ".join(fixed))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=[(i, 0) for i in range(len(dataset))],
                        collate_fn=collate_videos, num_workers=getattr(source, "num_workers", 0))
    modes = [(m, m.training) for m in (vae, text_encoder)]
    for module, _ in modes:
        module.to(device).eval()
    shards: list[dict[str, Any]] = []
    pending: dict[str, list] = {"latent": [], "text": [], "text_mask": [], "caption": []}
    latent_shape: list[int] = []

    def flush(final: bool = False) -> None:
        while len(pending["caption"]) >= shard_size or (final and pending["caption"]):
            n = min(shard_size, len(pending["caption"]))
            start = sum(s["count"] for s in shards)
            shard = {k: torch.stack(pending[k][:n]) for k in ("latent", "text", "text_mask")}
            shard["caption"], shard["index"] = pending["caption"][:n], torch.arange(start, start + n)
            file = f"shard-{len(shards):05d}.pt"
            shards.append({"file": file, "count": n, "bytes": _save(shard, folder / file)})
            for k in pending:
                del pending[k][:n]

    try:
        for batch in track(loader, description=f"caching {folder.name}", disable=not progress):
            z = vae.encode(batch["video"].to(device)).cpu()  # (B, C, T', H', W'), normalised by the VAE
            cond = text_encoder(list(batch["caption"]))  # tokens (B, L, D), mask (B, L)
            latent_shape = list(z.shape[1:])
            pending["latent"] += list(z.unbind(0))
            pending["text"] += list(cond.tokens.float().cpu().unbind(0))
            pending["text_mask"] += list(cond.mask.cpu().unbind(0))
            pending["caption"] += list(batch["caption"])
            flush()
        flush(final=True)
        null = text_encoder([""])
        null_text = {"text": null.tokens[0].float().cpu(), "text_mask": null.mask[0].cpu()}
    finally:
        for module, mode in modes:
            module.train(mode)
    null_bytes = _save(null_text, folder / "null_text.pt")

    manifest = {
        "format": FORMAT, "fingerprint": fp.digest, "parts": fp.parts, "count": len(dataset),
        "shards": shards, "null_text": {"file": "null_text.pt", "bytes": null_bytes},
        "latent_shape": latent_shape, "text_shape": list(null_text["text"].shape), "dtype": str(z.dtype),
        "clip": clip_settings(source), "fixed_draws": fixed, "skipped": dict(getattr(dataset, "skipped", {})),
        "source_root": str(dataset.root), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config,
    }
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, default=str))
    os.replace(tmp, folder / "manifest.json")
    return CacheResult(folder, fp.digest, len(dataset), built=True)


# -- reading ---------------------------------------------------------------------------------------


class LatentCacheDataset(Dataset):
    """The items of a checked cache folder: ``{"latent": (C, T', H', W'), "text": (L, D),
    "text_mask": (L,), "caption": str}``. Shards are memory-mapped (``torch.load(mmap=True)``)."""

    def __init__(self, folder: str | os.PathLike, manifest: dict[str, Any]) -> None:
        folder = Path(folder)
        self.shards = [torch.load(folder / s["file"], map_location="cpu", weights_only=True, mmap=True)
                       for s in manifest["shards"]]
        for shard, entry in zip(self.shards, manifest["shards"]):
            if len(shard["caption"]) != entry["count"] or shard["latent"].shape[0] != entry["count"]:
                raise LatentCacheError("partial", folder, f"{entry['file']} holds fewer items than the manifest says")
        self.starts = [0]
        for entry in manifest["shards"]:
            self.starts.append(self.starts[-1] + entry["count"])
        null = torch.load(folder / manifest["null_text"]["file"], map_location="cpu", weights_only=True)
        self.null_text, self.null_text_mask = null["text"], null["text_mask"]
        self.captions = [c for shard in self.shards for c in shard["caption"]]

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        """Item ``index``; ``(index, epoch)`` (what `ClipSampler` yields) is accepted, the epoch ignored."""
        if isinstance(index, tuple):
            index = index[0]
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cached clips")
        s = bisect.bisect_right(self.starts, index) - 1
        shard, j = self.shards[s], index - self.starts[s]
        return {"latent": shard["latent"][j], "text": shard["text"][j], "text_mask": shard["text_mask"][j],
                "caption": shard["caption"][j]}


def collate_latents(items: list[dict[str, Any]], null_text: Tensor, null_text_mask: Tensor) -> dict[str, Any]:
    """Batch: ``latent`` (B, C, T', H', W'), ``text`` (B, L, D), ``text_mask`` (B, L), ``caption`` [B],
    and the null encoding ``null_text`` (L, D), ``null_text_mask`` (L,) for caption dropout."""
    batch: dict[str, Any] = {k: torch.stack([it[k] for it in items]) for k in ("latent", "text", "text_mask")}
    batch["caption"] = [it["caption"] for it in items]
    batch["null_text"], batch["null_text_mask"] = null_text, null_text_mask
    return batch


class LatentCacheDataModule(L.LightningDataModule):
    """Serves a cache of ``source`` built by ``vidlab cache-latents``, refusing a stale or partial one.

    Args:
        source: the datamodule the cache was built from (a `VideoDataModule`, e.g. Shapes), built from
            the ``data.source`` config node. It is set up (its videos probed and hashed) to recompute the
            fingerprint; its videos are not decoded.
        root: the cache lives in ``root/latents/<fingerprint[:16]>/`` (the preset: ``${output_dir}``).
        path: a cache folder to use instead (its fingerprint must still match).
        batch_size, num_workers: of the train loader (``drop_last=True``).
        seed: shuffles the order (`ClipSampler`, reshuffled per epoch); None: the source's seed, so
            batches come in the same order as training from the videos.
        vae, text_encoder: the generator's, injected by ``experiments.build.build_datamodule``.

    Batches: see `collate_latents`. ``null_text`` / ``null_text_mask`` are also attributes after setup.
    """

    def __init__(self, source: L.LightningDataModule, root: str = "outputs", path: str | None = None,
                 batch_size: int = 8, num_workers: int = 0, seed: int | None = None, shuffle: bool = True,
                 vae: nn.Module | None = None, text_encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.source, self.root, self.path = source, root, path
        self.batch_size, self.num_workers, self.seed, self.shuffle = batch_size, num_workers, seed, shuffle
        self.vae, self.text_encoder = vae, text_encoder
        self.dataset: LatentCacheDataset | None = None
        self.folder: Path | None = None
        self.manifest: dict[str, Any] | None = None

    def prepare_data(self) -> None:
        self.source.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """Recompute the fingerprint from the current vae, text encoder and source; open the cache."""
        if self.dataset is not None:
            return
        if self.vae is None or self.text_encoder is None:
            raise ValueError("LatentCacheDataModule needs the generator's vae and text_encoder to check the "
                             "cache's fingerprint: build it with experiments.build.build_datamodule(composed, "
                             "vae=..., text_encoder=...)")
        fp = fingerprint(self.vae, self.text_encoder, self.source)
        self.folder = Path(self.path) if self.path is not None else cache_folder(self.root, fp)
        self.manifest = check_cache(self.folder, fp)
        self.dataset = LatentCacheDataset(self.folder, self.manifest)
        self.null_text, self.null_text_mask = self.dataset.null_text, self.dataset.null_text_mask

    def train_dataloader(self) -> DataLoader:
        assert self.dataset is not None, "call setup() first"
        seed = getattr(self.source, "seed", 0) if self.seed is None else self.seed
        return DataLoader(self.dataset, batch_size=self.batch_size, drop_last=True,
                          sampler=ClipSampler(range(len(self.dataset)), seed, self.shuffle),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          generator=loader_generator(seed),
                          collate_fn=partial(collate_latents, null_text=self.null_text,
                                             null_text_mask=self.null_text_mask))

    def prompts(self, n: int) -> list[str]:
        """The first ``n`` distinct cached captions, in dataset order."""
        distinct = list(dict.fromkeys(self.dataset.captions if self.dataset else source_dataset(self.source).captions))
        if len(distinct) < n:
            raise ValueError(f"the cache has {len(distinct)} distinct captions, {n} requested")
        return distinct[:n]
