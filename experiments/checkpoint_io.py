"""Checkpoint files written atomically: a temporary file in the target folder, flushed to disk, then
``os.replace`` onto the final name. A process killed mid-write (kill -9, node failure, full disk)
leaves the previous checkpoint untouched and at most a ``.<name>.<pid>.tmp`` file, never a torn
``last.ckpt``. (Lightning's own save goes through an fsspec transaction whose temporary file lives in
the system temp folder, so the final move can be a copy across filesystems.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO` with an atomic `save_checkpoint` (reading is unchanged)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
