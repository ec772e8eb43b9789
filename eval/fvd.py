"""Fréchet Video Distance (Unterthiner et al. 2018, "Towards Accurate Generative Models of Video").

FVD = ‖μ_r − μ_g‖² + tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2})  over I3D features (eval/i3d.py), i.e. the
Fréchet distance between Gaussians fitted to real and generated features (Dowson & Landau 1982).

tr((Σ_r Σ_g)^{1/2}) is the sum of the square roots of the eigenvalues of Σ_r Σ_g (a product of two
PSD matrices has real non-negative eigenvalues; round-off imaginary parts and tiny negatives are
dropped), computed in float64 — the route torchmetrics' FID takes, and equal to scipy.linalg.sqrtm.

The number depends on the protocol (frames, offset, resize, input range, N, 1/N vs 1/(N−1)): log
`FVDProtocol.to_dict()` next to every value. FVD@2048 and FVD@10000 are not comparable (bias ~1/N).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); mu (d,), sigma (d, d) → float64 scalar."""
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    eig = torch.linalg.eigvals(sigma1 @ sigma2)
    tr_sqrt = eig.real.clamp(min=0).sqrt().sum()
    return (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_sqrt


def statistics_from_sums(total: Tensor, outer: Tensor, n: int, ddof: int = 1) -> tuple[Tensor, Tensor]:
    """(μ, Σ) from Σx (d,), Σxxᵀ (d, d) and n: Σ = (Σxxᵀ − n μμᵀ) / (n − ddof); ddof 1 → 1/(N−1), 0 → 1/N."""
    if n - ddof <= 0:
        raise ValueError(f"need more than {ddof} samples for the covariance, got {n}")
    total, outer = total.double(), outer.double()
    mu = total / n
    return mu, (outer - n * torch.outer(mu, mu)) / (n - ddof)


def feature_statistics(features: Tensor, ddof: int = 1) -> tuple[Tensor, Tensor]:
    """float64 mean (d,) and covariance (d, d) of features (N, d); ddof 1 → 1/(N−1), 0 → 1/N."""
    x = features.double()
    return statistics_from_sums(x.sum(0), x.T @ x, x.shape[0], ddof)


@dataclass(frozen=True)
class FVDProtocol:
    """Everything that changes an FVD number, to be logged with it.

    resize: "direct" (straight to size×size, bilinear) or "short_side_crop" (short side to size,
    bilinear, then centre crop). Videos enter `preprocess` in [-1, 1] and leave in [-1, 1] (the
    range the i3d_pretrained_400 network expects; no second normalisation).
    """

    name: str
    num_frames: int = 16
    frame_offset: int = 0
    size: int = 224
    resize: str = "direct"
    input_range: str = "[-1, 1]"
    num_samples: int = 2048
    ddof: int = 1
    detector: str = "i3d_pretrained_400.pt"

    def to_dict(self) -> dict:
        return asdict(self)


PROTOCOLS: dict[str, FVDProtocol] = {
    # StyleGAN-V's fvd2048_16f settings (16 frames from the start, straight resize to 224, 2048
    # samples, 1/(N−1)); StyleGAN-V itself uses its TorchScript detector, which is not loaded here.
    "fvd2048_16f": FVDProtocol("fvd2048_16f", resize="direct"),
    # VideoGPT / TATS preprocessing: short side to 224 then centre crop, 16 frames, 1/(N−1).
    "videogpt_16f": FVDProtocol("videogpt_16f", resize="short_side_crop"),
}


def preprocess(videos: Tensor, protocol: FVDProtocol) -> Tensor:
    """Apply a protocol's frame window and resize: (B, 3, T, H, W) in [-1, 1] → (B, 3, F, S, S)."""
    b, c, t, h, w = videos.shape
    end = protocol.frame_offset + protocol.num_frames
    if t < end:
        raise ValueError(f"protocol {protocol.name} needs frames [{protocol.frame_offset}, {end}), video has {t}")
    x = videos[:, :, protocol.frame_offset:end].float()
    f, s = protocol.num_frames, protocol.size
    x = x.transpose(1, 2).reshape(b * f, c, h, w)  # frames as images
    if protocol.resize == "direct":
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
    elif protocol.resize == "short_side_crop":
        scale = s / min(h, w)
        nh, nw = max(s, math.ceil(h * scale - 1e-6)), max(s, math.ceil(w * scale - 1e-6))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
        top, left = (nh - s) // 2, (nw - s) // 2
        x = x[:, :, top:top + s, left:left + s]
    else:
        raise ValueError(f"unknown resize {protocol.resize!r}")
    return x.reshape(b, f, c, s, s).transpose(1, 2)  # (B, 3, F, S, S)


class FrechetVideoDistance(Metric):
    """FVD as a torchmetrics Metric with float64 running sums (Σx, Σxxᵀ, N) that sum under DDP.

    `update(x, real)`: x is videos (B, 3, T, H, W) when a `feature_extractor` is given (applied after
    `preprocess` if a `protocol` is given), else features (B, d). `compute()` → float64 scalar.
    Written on `Metric` rather than `FrechetInceptionDistance` so 1/N vs 1/(N−1) is selectable and
    video tensors pass without torchmetrics' image checks.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, feature_extractor: nn.Module | None = None, num_features: int = 400,
                 protocol: FVDProtocol | None = None, ddof: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.extractor = feature_extractor
        self.protocol = protocol
        self.ddof = ddof if ddof is not None else (protocol.ddof if protocol is not None else 1)
        d = getattr(feature_extractor, "num_features", num_features)
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, x: Tensor, real: bool) -> None:
        if self.extractor is not None:
            if self.protocol is not None:
                x = preprocess(x, self.protocol)
            x = self.extractor(x)
        feats = x.double()  # (B, d)
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + feats.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + feats.T @ feats)
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + feats.shape[0])

    def compute(self) -> Tensor:
        mu_r, sig_r = statistics_from_sums(self.real_sum, self.real_outer, int(self.real_n), self.ddof)
        mu_f, sig_f = statistics_from_sums(self.fake_sum, self.fake_outer, int(self.fake_n), self.ddof)
        return frechet_distance(mu_r, sig_r, mu_f, sig_f)
