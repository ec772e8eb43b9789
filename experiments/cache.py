"""``vidlab cache-latents``: encode an experiment's data once into a latent cache (datamodules/latent_cache.py).

The experiment is the one ``vidlab fit`` trains. Its ``data`` is either a ``latent_cache`` node (the
clips of ``data.source`` are cached where that node looks for them) or any other video datamodule
(cached under ``<output_dir>/latents/``, ready for an experiment whose ``data.source`` is that node).
"""

from __future__ import annotations

import lightning as L
import torch

from datamodules.latent_cache import CacheResult, LatentCacheDataModule, build_cache
from experiments.build import build_parts, instantiate
from experiments.config import Composed


def run_cache(composed: Composed, batch_size: int | None = None, shard_size: int = 256,
              device: str | None = None, progress: bool = True) -> CacheResult:
    """Build the autoencoder and text encoder as ``vidlab fit`` does, then write (or find) the cache.

    Seeded like `experiments.fit.run_fit` before the parts are built, so a randomly initialised part
    gets the weights a fit starts from (a trainable text encoder's are not in the fingerprint: training
    encodes captions live with it). ``batch_size`` (encoding) defaults to the data's own.
    """
    cfg = composed.cfg
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    parts = build_parts(composed)
    data = instantiate(cfg["data"], f"{composed.sources.get('data', 'config')} [data]")
    root, path = cfg["output_dir"], None
    if isinstance(data, LatentCacheDataModule):
        data, root, path = data.source, data.root, data.path
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return build_cache(parts.vae, parts.text, data, root=root, path=path, config=cfg,
                       batch_size=batch_size or getattr(data, "batch_size", 8), shard_size=shard_size,
                       device=device, progress=progress)
