"""sha256 digests that identify what a cache was built from: settings, tensors, modules and files.

Shared by the latent cache (`datamodules.latent_cache`) and the cached reference statistics of the
evaluation metrics (`eval.reference`). No Lightning imports.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from torch import Tensor, nn

WHOLE_FILE_BYTES = 8 << 20  # files up to this size are hashed whole
EDGE_BYTES = 1 << 20  # larger ones: size + first and last MiB
NOT_FINGERPRINTED = {"training", "path"}  # module attributes that do not change what it computes


def json_digest(value: Any) -> str:
    """sha256 of canonical JSON (sorted keys, non-JSON values as ``str``): the digest of a settings dict."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def tensor_digest(x: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (e.g. the identity of a set of clips in memory)."""
    flat = x.detach().cpu().contiguous().reshape(-1)
    h = hashlib.sha256(f"{flat.dtype}:{tuple(x.shape)}".encode())
    h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(_plain(v) for v in value)


def module_digest(module: nn.Module, weights: bool = True) -> str:
    """sha256 of a module's class, public scalar attributes and (``weights``) state-dict tensors."""
    h = hashlib.sha256()
    cls = type(module)
    settings = {k: v for k, v in vars(module).items()
                if not k.startswith("_") and k not in NOT_FINGERPRINTED and _plain(v)}
    h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    if weights:
        for key, tensor in module.state_dict().items():  # key order
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            h.update(f"{key}:{flat.dtype}:{tuple(tensor.shape)}".encode())
            h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file: whole up to 8 MiB; else its size, first and last MiB (a real dataset is read
    once per check, not end to end)."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        if size <= WHOLE_FILE_BYTES:
            h.update(handle.read())
        else:
            h.update(str(size).encode())
            h.update(handle.read(EDGE_BYTES))
            handle.seek(size - EDGE_BYTES)
            h.update(handle.read(EDGE_BYTES))
    return h.hexdigest()


def video_set_digest(root: str | os.PathLike, paths: list[str], captions: list[str]) -> str:
    """sha256 of a set of videos as listed: each video's path relative to ``root``, its size in bytes
    and its caption, in order. Only ``stat`` is read, never the files, so it is cheap enough to
    compute at every fit start on a dataset of any size (the identity MLflow records as the run's
    dataset input); a re-encoded file of another size, a renamed, added or dropped video or an
    edited caption changes it. The latent cache hashes contents too (`file_digest`), as a stale
    cache must be refused for any change."""
    h = hashlib.sha256()
    for path, caption in zip(paths, captions):
        h.update(json.dumps([os.path.relpath(path, root), os.path.getsize(path), caption]).encode())
    return h.hexdigest()
