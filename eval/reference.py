"""Reference feature statistics cached on disk, keyed by a fingerprint of data + protocol + detector.

An FVD against a fixed real set recomputes the same real-side statistics at every evaluation: I3D at
224×224 over thousands of clips is the most expensive part of the metric. The float64 sums (Σx,
Σxxᵀ, N) of the real features depend only on

- the data (which clips: a digest of their pixels, or of the files they come from),
- the protocol (frames, offset, resize, size: `eval.fvd.FVDProtocol`), and
- the feature network (its weight file's SHA-1, or `datamodules.digest.module_digest`),

so they are stored once under ``<folder>/<fingerprint>.pt`` (+ a readable ``.json`` beside it that
lists what the fingerprint covers) and read back whenever all three match. Changing any of them
changes the fingerprint, so a stale file is never read. Files load with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from datamodules.digest import json_digest
from eval.fvd import statistics_from_sums


@dataclass
class FeatureSums:
    """Σx (d,), Σxxᵀ (d, d) in float64 and the count n: the sufficient statistics of a Gaussian fit,
    which add across batches and ranks."""

    total: Tensor
    outer: Tensor
    n: int

    @classmethod
    def of(cls, features: Tensor) -> "FeatureSums":
        """Sums of features (N, d)."""
        x = features.double()
        return cls(x.sum(0), x.T @ x, x.shape[0])

    def __add__(self, other: "FeatureSums") -> "FeatureSums":
        return FeatureSums(self.total + other.total, self.outer + other.outer, self.n + other.n)

    def statistics(self, ddof: int = 1) -> tuple[Tensor, Tensor]:
        """(μ (d,), Σ (d, d)) float64 with 1/(n − ddof) (`eval.fvd.statistics_from_sums`)."""
        return statistics_from_sums(self.total, self.outer, self.n, ddof)


def fingerprint(key: dict[str, Any]) -> str:
    """The cache key: the first 24 hex digits of `json_digest` over data, protocol and detector."""
    return json_digest(key)[:24]


def cached_feature_sums(folder: str | os.PathLike, key: dict[str, Any],
                        compute: Callable[[], FeatureSums]) -> tuple[FeatureSums, bool]:
    """Read ``<folder>/<fingerprint(key)>.pt`` or run ``compute`` and write it (atomically).

    key: JSON-able description of everything the statistics depend on, e.g. ``{"data": digest,
    "protocol": protocol.to_dict(), "detector": sha1}``. Returns the sums and whether they came from
    the cache.
    """
    folder = Path(folder)
    name = fingerprint(key)
    file = folder / f"{name}.pt"
    if file.is_file():
        blob = torch.load(file, map_location="cpu", weights_only=True)
        return FeatureSums(blob["total"], blob["outer"], int(blob["n"])), True
    sums = compute()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f"{name}.pt.{os.getpid()}.tmp")
    torch.save({"total": sums.total, "outer": sums.outer, "n": sums.n}, tmp)
    os.replace(tmp, file)
    (folder / f"{name}.json").write_text(json.dumps(key, indent=2, sort_keys=True, default=str))
    return sums, False
