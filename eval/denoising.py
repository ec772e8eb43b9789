"""Denoising error at matched signal-to-noise ratio: one number that compares objectives.

Training losses do not compare across objectives: rectified flow regresses the velocity ε − x0 under
its own time density, DDPM-ε regresses ε under uniform steps, v-prediction regresses α·ε − σ·x0, and
each implicitly weights the x0 error differently at each noise level (Kingma et al. 2021, "Variational
Diffusion Models" §5; Kingma & Gao 2023, "Understanding Diffusion Objectives as the ELBO with Simple
Data Augmentation", §2-3; Hang et al. 2023 write the ratios out). What does compare is the error of
the clean-sample estimate at a given noise level, measured on a scale every path shares: the
signal-to-noise ratio

    SNR(t) = α(t)² / σ(t)²,      λ(t) = log SNR(t)      (Kingma et al. 2021 §2).

(Careful: the samplers' λ in `modules.objectives.paths` is log(α/σ) = λ/2, the DPM-Solver convention
of Lu et al. 2022; here λ is the full log-SNR of Kingma et al.)

Why SNR is the right common axis. On any path, x_t = α·x0 + σ·ε gives

    x_t / α = x0 + e^{−λ/2}·ε,

so two paths at times with the same λ see the same observation up to the known factor α: the Bayes
denoiser E[x0 | x_t] and its error E‖E[x0 | x_t] − x0‖² depend on λ only. This is the argument behind
Kingma et al. 2021 §5 (the continuous-time loss depends on the schedule only through its end points)
and Karras et al. 2022 (EDM §2, where a denoiser is indexed by the noise level σ/α alone). A trained
network's x0 estimate at that λ is therefore scored on an identical task whatever path, time density
or parametrisation (ε, v, velocity) it was trained with.

What this file computes, for a grid of log-SNRs λ_1..λ_L:

1. `time_for_log_snr`: on the objective's own path, the time t_l with λ(t_l) = λ_l, by bisection.
   Every shipped path has α strictly decreasing and σ strictly increasing in t (`LinearPath`;
   `VPPath` checks α' < 0 and sets σ = sqrt(1 − α²)), so λ(t) = 2·(log α − log σ) is strictly
   decreasing from +∞ (or λ(0)) to −∞ (or λ(1)) and the root is unique; the result is checked
   (|λ(t_l) − λ_l| ≤ 1e-6), so a path that is not monotone fails loudly instead of silently.
2. `matched_snr_x0_error`: x_t = α(t_l)·x0 + σ(t_l)·ε with ε from a fixed generator, the network's
   probability-flow velocity v = ``objective.velocity(net, x_t, t_l, cond)`` (whatever it predicts
   internally), its x0 reading

       x̂0 = (σ'·x_t − σ·v) / (α·σ' − σ·α')        (`paths.predictions_from_velocity`),

   and the mean squared error mean((x̂0 − x0)²) over all elements, per λ_l.

For data x0 ~ N(μ, Σ) the Bayes error is closed form: Cov[x0 | x_t] = (Σ⁻¹ + SNR·I)⁻¹ (Bishop 2006
§2.3.3), so the per-element error is (1/d)·Σ_i l_i / (1 + SNR·l_i) over the eigenvalues l_i of Σ;
tests/test_denoising_eval.py checks that RectifiedFlow and Diffusion (ε and v) with the exact
posterior as network reach it at every λ. No Lightning here (DESIGN.md: eval/ is metric maths).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from modules.conditioning import Conditioning
from modules.objectives.paths import Path, interpolate, predictions_from_velocity

DEFAULT_LOG_SNRS: tuple[float, ...] = (-4.0, -2.0, 0.0, 2.0, 4.0)
LOG_SNR_TOLERANCE = 1e-6


def log_snr(path: Path, t: Tensor) -> Tensor:
    """λ(t) = log(α²/σ²) = 2·(log α − log σ) in float64, shaped like t; +∞ where σ = 0, −∞ where α = 0."""
    alpha, sigma = path.alpha_sigma(t.to(torch.float64))
    alpha, sigma = alpha.to(torch.float64), sigma.to(torch.float64)
    return 2 * (alpha.log() - sigma.log())


def time_for_log_snr(path: Path, log_snrs: Sequence[float] | Tensor, iterations: int = 80,
                     tolerance: float = LOG_SNR_TOLERANCE) -> Tensor:
    """The times t (L,) float64 in [0, 1] with log-SNR λ(t) = ``log_snrs`` (L,) on ``path``.

    Bisection on [0, 1] for the root of λ(t) − λ_l, which is strictly decreasing in t on every
    monotone path (module docstring): each step halves the bracket, so ``iterations`` = 80 reaches
    float64 resolution in t (2⁻⁸⁰ < 1e-16 · t for t ≥ 1e-8). Raises ValueError when a λ_l lies
    outside [λ(1), λ(0)] (e.g. λ = −12 on DDPM's linear schedule, whose last step has λ ≈ −10) or
    when the root found misses λ_l by more than ``tolerance`` (a path that is not monotone).
    """
    target = torch.as_tensor(log_snrs, dtype=torch.float64).flatten()
    ends = log_snr(path, torch.tensor([0.0, 1.0], dtype=torch.float64))
    high, low = float(ends[0]), float(ends[1])
    outside = (target >= high) | (target <= low)
    if outside.any():
        raise ValueError(f"log-SNR {target[outside].tolist()} outside this path's range ({low:.4g}, {high:.4g})")
    lo = torch.zeros_like(target)  # λ(lo) > target
    hi = torch.ones_like(target)  # λ(hi) < target
    for _ in range(iterations):
        mid = (lo + hi) / 2
        above = log_snr(path, mid) > target
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    t = (lo + hi) / 2
    miss = (log_snr(path, t) - target).abs()
    if (miss > tolerance).any():
        raise ValueError(
            f"bisection missed log-SNR {target.tolist()} by {miss.tolist()}: is α/σ monotone in t on this path?"
        )
    return t


@torch.no_grad()
def matched_snr_x0_error(
    objective: Any,
    net: Any,
    x0: Tensor,
    cond: Conditioning,
    log_snrs: Sequence[float] | Tensor = DEFAULT_LOG_SNRS,
    generator: torch.Generator | None = None,
    per_sample: bool = False,
) -> Tensor:
    """Mean squared x0 error of ``net`` trained with ``objective`` at each log-SNR (module docstring).

    objective: anything with ``path`` (α, σ and derivatives) and ``velocity(net, x_t, t, cond)``
    (every vidlab objective); net: the backbone, called by the objective; x0 (B, ...) clean latents;
    cond: their conditioning (B rows); log_snrs (L,) λ = log(α²/σ²); generator: a CPU generator for
    ε ~ N(0, I) (B, ...), drawn once and reused at every λ (common random numbers: the λ curve and
    every objective see the same ε; with a fresh generator of the same seed, every arm does).

    Times are found in float64 and then cast to x0's dtype, and x_t is formed at that rounded t, so
    the network, x_t and the x0 reading all use one t; its λ differs from λ_l by |dλ/dt|·ulp(t)
    (≈ 1e-6 in float32). Returns (L,) float64, or with ``per_sample`` (L, B): the mean over the
    non-batch elements of (x̂0 − x0)², per sample.
    """
    path = objective.path
    times = time_for_log_snr(path, log_snrs)  # (L,) float64
    B = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)  # (B, ...) as generate() does
    dtype = torch.promote_types(x0.dtype, torch.float32)
    errors = []
    for t_l in times.tolist():
        t = torch.full((B,), t_l, dtype=x0.dtype, device=x0.device)  # (B,)
        x_t = interpolate(path, x0, noise, t)
        v = objective.velocity(net, x_t, t, cond)
        x0_hat, _ = predictions_from_velocity(path, x_t.to(dtype), t.to(dtype), v.to(dtype))
        err = (x0_hat - x0.to(dtype)).pow(2).reshape(B, -1).mean(1)  # (B,)
        errors.append(err.to(torch.float64).cpu())
    out = torch.stack(errors)  # (L, B)
    return out if per_sample else out.mean(1)


def metric_name(log_snr_value: float, prefix: str = "eval/") -> str:
    """``eval/x0_mse_lsnr-4``, ``eval/x0_mse_lsnr0``, ``eval/x0_mse_lsnr2.5``: the per-λ metric name."""
    return f"{prefix}x0_mse_lsnr{float(log_snr_value):g}"
