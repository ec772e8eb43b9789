"""Variance-preserving diffusion (DDPM, Ho et al. 2020) in vidlab's time convention.

Ho et al. number the steps i = 1..N with ᾱ_i = Π_{j≤i} (1 − β_j) and x_i = sqrt(ᾱ_i)·x0 +
sqrt(1 − ᾱ_i)·ε; step 0 is the data. vidlab puts step i at t = i / N (DESIGN.md), so t = 0 is the
data (ᾱ = 1) and t = 1 the last step. diffusers stores the same table 0-based: ``alphas_cumprod[k]``
is ᾱ at step i = k + 1, i.e. **diffusers' timestep index k is our t = (k + 1) / N**. The cosine
schedule confirms it: its table telescopes to ᾱ(t) = f(t)/f(0) of Nichol & Dhariwal at t = (k + 1)/N.
Between steps the path is `paths.VPPath` (a C² spline of α = sqrt(ᾱ)), so samplers may evaluate any
t ∈ [0, 1].

Training draws i uniformly from {1, ..., N} (Ho et al. Algorithm 1), t = i / N, and the network sees
t·time_scale = i·time_scale / N: with N = time_scale = 1000 that is i = k + 1, one more than the index
a network trained with diffusers saw (to reuse such weights, subtract one step at the edge).

Schedules (β_j for j = 1..N, float64):
- "linear": β linear from 1e-4 to 0.02 (Ho et al. 2020 §4);
- "scaled_linear": sqrt(β) linear from sqrt(0.00085) to sqrt(0.012) (Stable Diffusion / LDM);
- "cosine": ᾱ(t) = f(t)/f(0), f(t) = cos²((t + s)/(1 + s)·π/2), s = 0.008, β_i = 1 − ᾱ(i/N)/ᾱ((i−1)/N)
  clipped at 0.999 (Nichol & Dhariwal 2021 eq. 17);
and ``zero_terminal_snr`` rescales sqrt(ᾱ) affinely so that ᾱ_N = 0 and ᾱ_1 is unchanged (Lin et al.
2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1); x_t at t = 1 is
then pure noise.

Predictions (modules/objectives/conversions.py): "eps", "v" = α·ε − σ·x0 (Salimans & Ho 2022; not
the flow velocity) and "x0". Loss weighting: "uniform" (the plain MSE of the prediction; Ho et al.'s
L_simple for "eps"), or "min_snr" (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy"): the x0-space weight min(SNR, γ), SNR = α²/σ², expressed per prediction as

    eps: min(SNR, γ)/SNR = min(1, γ/SNR),   v: min(SNR, γ)/(SNR + 1),   x0: min(SNR, γ),

since ‖ε̂ − ε‖² = SNR·‖x̂0 − x0‖² and ‖v̂ − v‖² = (SNR + 1)·‖x̂0 − x0‖² at fixed x_t on a VP
path.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from modules.conditioning import Conditioning
from modules.objectives.base import LossOutput
from modules.objectives.conversions import check_prediction, from_x0_eps, to_x0_eps
from modules.objectives.paths import VPPath, expand_like, interpolate, velocity_from_predictions


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """(N,) β linear in [beta_start, beta_end] (Ho et al. 2020)."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def scaled_linear_betas(num_steps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """(N,) β with sqrt(β) linear in [sqrt(beta_start), sqrt(beta_end)] (LDM / Stable Diffusion)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """(N,) β_i = min(1 − f(i/N)/f((i−1)/N), max_beta), f(t) = cos²((t + s)/(1 + s)·π/2)
    (Nichol & Dhariwal 2021 eq. 17; the clip keeps β_N < 1)."""
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2  # (N + 1,)
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Lin et al. 2024 Algorithm 1 on ᾱ (N,): with a = sqrt(ᾱ), a ← (a − a_N)·a_1/(a_1 − a_N), so
    that ᾱ_N = 0 (SNR 0 at the last step) and ᾱ_1 keeps its value; returns the new ᾱ (N,)."""
    a = alphas_cumprod.sqrt()
    a = (a - a[-1]) * a[0] / (a[0] - a[-1])
    return a**2


# name -> (β schedule, its default (beta_start, beta_end), or None when it takes no range)
SCHEDULES: dict[str, tuple[Callable[..., Tensor], tuple[float, float] | None]] = {
    "linear": (linear_betas, (1e-4, 0.02)),
    "scaled_linear": (scaled_linear_betas, (0.00085, 0.012)),
    "cosine": (cosine_betas, None),
}


def _min_snr_eps(snr: Tensor, gamma: float) -> Tensor:
    return (gamma / snr).clamp(max=1.0)  # = min(SNR, γ)/SNR, and 1 at SNR = 0


def _min_snr_v(snr: Tensor, gamma: float) -> Tensor:
    return snr.clamp(max=gamma) / (snr + 1)


def _min_snr_x0(snr: Tensor, gamma: float) -> Tensor:
    return snr.clamp(max=gamma)


MIN_SNR_WEIGHTS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "eps": _min_snr_eps, "v": _min_snr_v, "x0": _min_snr_x0,
}
WEIGHTINGS = ("uniform", "min_snr")


class Diffusion:
    """DDPM-style VP diffusion objective, no parameters; see the module docstring for the maths.

    schedule: "linear" | "scaled_linear" | "cosine"; beta_start / beta_end override the linear
    schedules' range; zero_terminal_snr: Lin et al. 2024 rescaling (needs prediction "v" or "x0":
    ε says nothing about x0 at SNR 0, Lin et al. §3.2); prediction: "eps" | "v" | "x0"; weighting:
    "uniform" | "min_snr" with min_snr_gamma (Hang et al. use γ = 5); num_steps: N; time_scale: the
    network sees t·time_scale.

    Attributes: ``path`` (`VPPath`), ``alphas_cumprod`` (N,) float64 ᾱ_i at t = i/N, i = 1..N.
    """

    def __init__(
        self,
        schedule: str = "linear",
        prediction: str = "eps",
        weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        num_steps: int = 1000,
        zero_terminal_snr: bool = False,
        beta_start: float | None = None,
        beta_end: float | None = None,
        time_scale: float = 1000.0,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        self.prediction = check_prediction(prediction)
        if zero_terminal_snr and prediction == "eps":
            raise ValueError("zero_terminal_snr needs prediction 'v' or 'x0': at SNR 0, eps does not determine x0")
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
        make_betas, default_range = SCHEDULES[schedule]
        if default_range is None:
            if beta_start is not None or beta_end is not None:
                raise ValueError(f"schedule {schedule!r} takes no beta_start / beta_end")
            betas = make_betas(num_steps)
        else:
            start = default_range[0] if beta_start is None else beta_start
            end = default_range[1] if beta_end is None else beta_end
            betas = make_betas(num_steps, start, end)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # (N,)
        if zero_terminal_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
        self.schedule = schedule
        self.weighting = weighting
        self.min_snr_gamma = min_snr_gamma
        self.num_steps = num_steps
        self.zero_terminal_snr = zero_terminal_snr
        self.time_scale = time_scale
        self.alphas_cumprod = alphas_cumprod
        self.path = VPPath(alphas_cumprod)

    def sample_t(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None, frames: int | None = None
    ) -> Tensor:
        """Training times t = i / N, i uniform on {1, ..., N}, float32: (batch,) or (batch, frames)."""
        shape = (batch,) if frames is None else (batch, frames)
        steps = torch.randint(1, self.num_steps + 1, shape, generator=generator, device=device)
        return steps.float() / self.num_steps

    def weight(self, t: Tensor) -> Tensor:
        """Loss weight per time, shaped like t: 1, or the min-SNR weight of ``prediction``."""
        return self._weight(*self.path.alpha_sigma(t))

    def _weight(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        if self.weighting == "uniform":
            return torch.ones_like(alpha)
        return MIN_SNR_WEIGHTS[self.prediction]((alpha / sigma) ** 2, self.min_snr_gamma)

    def velocity(self, net, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """Probability-flow velocity dx_t/dt = α'·x̂0 + σ'·ε̂ of the path, where (x̂0, ε̂) is the reading
        of the network's prediction at (x_t, t); t (B,) or per frame (B, T), in (0, 1] (at t = 0 the
        VP path has σ' = ∞, see `VPPath`). Computed in at least float32, returned in the net's dtype."""
        out = net(x_t, t * self.time_scale, cond)
        dtype = torch.promote_types(out.dtype, torch.float32)
        alpha, sigma = (expand_like(a, x_t).to(dtype) for a in self.path.alpha_sigma(t))
        x0, eps = to_x0_eps(self.prediction, out.to(dtype), x_t.to(dtype), alpha, sigma)
        return velocity_from_predictions(self.path, t, x0, eps).to(out.dtype)

    def loss(
        self,
        net,
        x0: Tensor,
        cond: Conditioning,
        generator: torch.Generator | None = None,
        per_frame: bool = False,
        t: Tensor | None = None,
    ) -> LossOutput:
        """Draw t, then noise ~ N(0, I) (in that order from ``generator``); regress the network output
        on the ``prediction`` target with the ``weighting``.

        t is (B,), or with ``per_frame`` (B, T) for x0 (B, C, T, H, W) (diffusion forcing, Chen et
        al. 2024). A given ``t`` ((B,) or (B, T), in (0, 1]) is used instead of drawing one
        (``per_frame`` is then ignored) and only the noise is drawn, so one generator state gives the
        same noise at every t (eval/timestep_loss.py). per_sample: (B,) mean over all non-batch
        elements of w(t)·(output − target)²; loss: its mean.
        """
        B = x0.shape[0]
        if t is None:
            frames = x0.shape[2] if per_frame else None
            t = self.sample_t(B, x0.device, generator, frames)  # (B,) or (B, T)
        elif t.shape not in ((B,), (B, *x0.shape[2:3])):  # (B, T) per frame for x0 (B, C, T, H, W)
            raise ValueError(f"t must be (B,) or (B, T) for x0 {tuple(x0.shape)}, got {tuple(t.shape)}")
        t = t.to(device=x0.device, dtype=x0.dtype)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = interpolate(self.path, x0, noise, t)
        out = net(x_t, t * self.time_scale, cond)
        dtype = torch.promote_types(x0.dtype, torch.float32)
        alpha, sigma = (a.to(dtype) for a in self.path.alpha_sigma(t))  # (B,) or (B, T)
        w = expand_like(self._weight(alpha, sigma), x0)
        alpha, sigma = expand_like(alpha, x0), expand_like(sigma, x0)
        target = from_x0_eps(self.prediction, x0.to(dtype), noise.to(dtype), alpha, sigma)
        per_sample = (w * (out.to(dtype) - target).pow(2)).reshape(B, -1).mean(1)  # (B,)
        return LossOutput(loss=per_sample.mean(), t=t, per_sample=per_sample)
