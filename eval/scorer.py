"""Score a set of generated videos with the configured metrics: the one place the training callback
(`callbacks/evaluation.py`) and ``vidlab eval`` (`experiments/evaluate.py`) share.

Metrics (names as logged, under a prefix such as ``eval/``):

- ``probe``: ``probe_acc_{color,shape,motion,background,joint}``, how often the Shapes probe
  (`eval.probe`) reads back what each video's prompt asked;
- ``fvd_probe``: the Fréchet distance between Gaussians fitted to the probe's features of the
  reference clips and of the generated videos (not FVD, see `eval.probe`);
- ``fvd``: FVD (Unterthiner et al. 2018) with an I3D detector under a named protocol
  (`eval.fvd.PROTOCOLS`); reference statistics are cached by fingerprint (`eval.reference`);
- ``vbench``: the real VBench over the saved mp4s in its own environment (`eval.vbench`).

The work is split so it can be sharded: `features` runs per video (any rank, any batch), the
rows are gathered, and `scores` turns all rows into numbers; `per_video` says, from the same rows,
what the probe read in each video and whether it matches its prompt (the evaluation table).
No Lightning imports.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from datamodules.digest import module_digest
from eval.fvd import PROTOCOLS, FVDProtocol, frechet_distance, preprocess
from eval.i3d import I3D_FILENAME, I3D_SHA1, TORCHSCRIPT_FILENAME, TORCHSCRIPT_SHA1, load_detector
from eval.probe import ATTRIBUTES, ShapesProbe, caption_labels, scores_from_predictions
from eval.reference import FeatureSums, cached_feature_sums

METRICS: tuple[str, ...] = ("probe", "fvd_probe", "fvd", "vbench")
PUBLISHED_SHA1 = {I3D_FILENAME: I3D_SHA1, TORCHSCRIPT_FILENAME: TORCHSCRIPT_SHA1}


def check_metrics(metrics: Sequence[str]) -> list[str]:
    """The metric names, validated: an unknown one raises ValueError naming the nearest known one."""
    out = []
    for name in metrics:
        name = name.strip()
        if name not in METRICS:
            near = difflib.get_close_matches(name, METRICS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"unknown metric {name!r}{hint}; known: {', '.join(METRICS)}")
        out.append(name)
    return out


def resolve_protocol(protocol: str | FVDProtocol) -> FVDProtocol:
    if isinstance(protocol, FVDProtocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown FVD protocol {protocol!r}; known: {sorted(PROTOCOLS)}")
    return PROTOCOLS[protocol]


class VideoScorer:
    """Features and scores of generated videos for ``metrics`` (a subset of `METRICS`).

    probe: a trained `ShapesProbe`, needed by ``probe`` and ``fvd_probe``; protocol: an FVD protocol
    name or object; detector: an `InceptionI3d`-like module (B, 3, F, S, S) → (B, d), or None to
    load ``protocol.detector`` from ``detector_path`` / ``VIDLAB_WEIGHTS_DIR`` (first use);
    device: where the networks run.
    """

    def __init__(self, metrics: Sequence[str], probe: ShapesProbe | None = None,
                 protocol: str | FVDProtocol = "fvd2048_16f", detector: nn.Module | None = None,
                 detector_path: str | os.PathLike | None = None, detector_sha1: str | None = "published",
                 device: str | torch.device = "cpu", batch_size: int = 16) -> None:
        self.metrics = check_metrics(metrics)
        if probe is None and {"probe", "fvd_probe"} & set(self.metrics):
            raise ValueError("metrics 'probe' and 'fvd_probe' need a trained Shapes probe")
        self.probe = probe.to(device).eval() if probe is not None else None
        self.protocol = resolve_protocol(protocol)
        self._detector = detector
        self.detector_path, self.detector_sha1 = detector_path, detector_sha1
        self.device, self.batch_size = torch.device(device), batch_size

    @property
    def detector(self) -> nn.Module:
        if self._detector is None:
            self._detector = load_detector(self.protocol.detector, self.detector_path, self.detector_sha1)
        return self._detector.to(self.device).eval()

    def feature_kinds(self) -> list[str]:
        """The per-video rows `features` returns: ``probe_pred`` (N, 4) class indices (as float),
        ``probe_features`` (N, d_probe), ``i3d`` (N, 400)."""
        kinds = []
        if "probe" in self.metrics:
            kinds.append("probe_pred")
        if "fvd_probe" in self.metrics:
            kinds.append("probe_features")
        if "fvd" in self.metrics:
            kinds.append("i3d")
        return kinds

    @torch.no_grad()
    def features(self, videos: Tensor, kinds: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Per-video rows of each of ``kinds`` (default: every kind in `feature_kinds`) for videos
        (N, 3, T, H, W) in [-1, 1]; float32 on the CPU, computed in batches of ``batch_size``."""
        rows: dict[str, list[Tensor]] = {k: [] for k in (kinds or self.feature_kinds())}
        for start in range(0, videos.shape[0], self.batch_size):
            x = videos[start:start + self.batch_size].to(self.device, torch.float32)
            if "probe_pred" in rows or "probe_features" in rows:
                h = self.probe.features(x)  # (b, d)
                if "probe_features" in rows:
                    rows["probe_features"].append(h.cpu())
                if "probe_pred" in rows:
                    pred = [self.probe.heads[a](h).argmax(-1) for a in ATTRIBUTES]
                    rows["probe_pred"].append(torch.stack(pred, 1).float().cpu())  # (b, 4)
            if "i3d" in rows:
                rows["i3d"].append(self.detector(preprocess(x, self.protocol)).float().cpu())
        return {k: torch.cat(v) for k, v in rows.items()}

    # -- reference statistics ----------------------------------------------------------------------

    def detector_id(self) -> str:
        """The detector's identity: the SHA-1 its file was checked against, else its weights' digest."""
        if self.detector_sha1 == "published":
            return PUBLISHED_SHA1[self.protocol.detector]
        return self.detector_sha1 or module_digest(self.detector)

    def reference_key(self, kind: str, data_id: Any) -> dict[str, Any]:
        """What the reference statistics of feature ``kind`` depend on (the cache fingerprint)."""
        if kind == "i3d":
            return {"data": data_id, "features": kind, "protocol": self.protocol.to_dict(),
                    "detector": self.detector_id()}
        return {"data": data_id, "features": kind, "probe": module_digest(self.probe)}

    def reference(self, videos: Tensor, data_id: Any, cache_dir: str | os.PathLike | None = None
                  ) -> dict[str, FeatureSums]:
        """Feature sums of the reference (real) clips (N, 3, T, H, W) for the Fréchet metrics.

        data_id: a JSON-able identity of the clips (e.g. `datamodules.digest.tensor_digest`);
        with ``cache_dir`` the sums are read from / written to ``<cache_dir>/<fingerprint>.pt``.
        """
        out = {}
        for kind in (k for k in self.feature_kinds() if k in ("probe_features", "i3d")):
            def compute(kind: str = kind) -> FeatureSums:
                return FeatureSums.of(self.features(videos, [kind])[kind])

            out[kind] = (compute() if cache_dir is None
                         else cached_feature_sums(cache_dir, self.reference_key(kind, data_id), compute)[0])
        return out

    # -- scores ------------------------------------------------------------------------------------

    def scores(self, rows: dict[str, Tensor], prompts: Sequence[str],
               reference: dict[str, FeatureSums] | None = None) -> dict[str, float]:
        """Numbers from all videos' rows (see `features`) and their prompts (N,).

        ``probe_acc_*`` from ``probe_pred``; ``fvd_probe`` and ``fvd`` from the Fréchet distance
        between the reference sums and the generated rows, both with the protocol's ddof.
        """
        out: dict[str, float] = {}
        if "probe_pred" in rows:
            pred = rows["probe_pred"].long()
            out.update(scores_from_predictions({a: pred[:, i] for i, a in enumerate(ATTRIBUTES)}, prompts))
        for kind, name in (("probe_features", "fvd_probe"), ("i3d", "fvd")):
            if kind in rows:
                if reference is None or kind not in reference:
                    raise ValueError(f"metric {name!r} needs reference statistics for {kind!r}")
                ref = reference[kind].statistics(self.protocol.ddof)
                gen = FeatureSums.of(rows[kind]).statistics(self.protocol.ddof)
                out[name] = float(frechet_distance(*ref, *gen))
        return out

    def per_video(self, rows: dict[str, Tensor], prompts: Sequence[str]) -> list[dict[str, Any]]:
        """One dict per video (N,) from the rows of `features`: with ``probe_pred``, the class the
        probe read per attribute (``probe_color`` ... as names) and whether it is the prompt's
        (``probe_color_correct`` ..., ``probe_joint_correct``: all four). Their means over the
        videos are `scores`' ``probe_acc_*``. Empty dicts for metrics with no per-video value
        (the Fréchet distances are set statistics)."""
        out: list[dict[str, Any]] = [{} for _ in prompts]
        if "probe_pred" in rows:
            pred = rows["probe_pred"].long()  # (N, 4) class indices in ATTRIBUTES order
            for i, prompt in enumerate(prompts):
                want = caption_labels(prompt)
                for j, attribute in enumerate(ATTRIBUTES):
                    got = int(pred[i, j])
                    out[i][f"probe_{attribute}"] = self.probe.vocab[attribute][got]
                    out[i][f"probe_{attribute}_correct"] = got == want[attribute]
                out[i]["probe_joint_correct"] = all(out[i][f"probe_{a}_correct"] for a in ATTRIBUTES)
        return out

    def protocol_record(self, num_generated: int, reference: dict[str, FeatureSums] | None = None) -> dict:
        """Everything that changes the numbers, to log next to them."""
        record: dict[str, Any] = {"metrics": list(self.metrics), "num_generated": num_generated}
        if "fvd" in self.metrics:
            record["fvd"] = {**self.protocol.to_dict(), "detector_path": str(self.detector_path or ""),
                             "num_reference": reference["i3d"].n if reference and "i3d" in reference else None}
        if {"probe", "fvd_probe"} & set(self.metrics):
            record["probe"] = {"digest": module_digest(self.probe)[:16], **self.probe.config,
                               "ddof": self.protocol.ddof,
                               "num_reference": (reference["probe_features"].n
                                                 if reference and "probe_features" in reference else None)}
        return record
