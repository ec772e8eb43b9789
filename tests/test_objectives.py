"""Objectives (flow matching, VP diffusion), their paths and prediction conversions, checked on exact
cases and against diffusers.

Reference case: Gaussian data x0 ~ N(μ, Σ) in D = 3 dimensions, Σ = Q·diag(λ)·Qᵀ, ε ~ N(0, I). On any
path x_t = α·x0 + σ·ε, (x0, ε, x_t) is jointly Gaussian with K = Cov x_t = α²Σ + σ²I, so

    E[x0 | x_t] = μ + α·Σ·K⁻¹·(x_t − α·μ),        E[ε | x_t] = σ·K⁻¹·(x_t − α·μ),

and every target y = a·x0 + b·ε (velocity: a = α', b = σ'; ε: (0, 1); x0: (1, 0); v: (−σ, α)) has
the exact minimiser E[y | x_t] with residual variance, per eigen-direction k,

    Var(y | x_t) = a²λ + b² − (a·α·λ + b·σ)² / (α²λ + σ²) = λ·(a·σ − b·α)² / (α²λ + σ²).

The training loss (mean over elements) of the exact model is therefore E_t[w(t)·mean_k Var_k(t)]:
a finite mean over the N steps for diffusion, an integral (scipy quad) over the time density for flow.
The "network" below is that exact model, written from the formulas above, in the objective's
prediction type.
"""

from __future__ import annotations

import inspect
import math
import numpy as np
import pytest
import torch
from scipy import stats
from scipy.integrate import quad

from experiments.build import instantiate
from experiments.config import REPO_CONFIGS, load_yaml
from modules.objectives.base import LossOutput
from modules.objectives.conversions import from_x0_eps, to_x0_eps
from modules.objectives.diffusion import Diffusion
from modules.objectives.flow import RectifiedFlow
from modules.objectives.paths import (
    LinearPath, Path, VPPath, interpolate, predictions_from_velocity, velocity_from_predictions,
)
from modules.samplers.timesteps import shift_time

F64 = torch.float64
PRESETS = sorted(p.stem for p in (REPO_CONFIGS / "objective").glob("*.yaml"))
MU = torch.tensor([2.0, -1.0, 0.5], dtype=F64)
LAM = torch.tensor([0.25, 1.0, 2.25], dtype=F64)  # eigenvalues of Σ
Q = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=F64))[0]
SCHEDULES = [(s, z) for s in ("linear", "scaled_linear", "cosine") for z in (False, True)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Elementwise work on ~1e5 numbers: one thread avoids oversubscribing the shared CPU (with two
    busy cores, two threads ran this file 3-4x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def preset(name: str):
    return instantiate(load_yaml(REPO_CONFIGS / "objective" / f"{name}.yaml"), f"objective/{name}.yaml")


def all_paths():
    paths = {"linear": LinearPath(), "ot_1e-5": LinearPath(1e-5)}
    for schedule, zt in SCHEDULES:
        paths[f"vp_{schedule}{'_ztsnr' if zt else ''}"] = Diffusion(schedule, "v", zero_terminal_snr=zt).path
    return paths


def gaussian_data(n: int, generator: torch.Generator) -> torch.Tensor:
    return MU + (torch.randn(n, 3, generator=generator, dtype=F64) * LAM.sqrt()) @ Q.T  # (n, 3) ~ N(μ, Σ)


def posterior(x_t, alpha, sigma):
    """(E[x0 | x_t], E[ε | x_t]) for the Gaussian data; x_t (n, 3), alpha and sigma (n, 1)."""
    y = (x_t - alpha * MU) @ Q  # eigen-coordinates of x_t − α·μ
    k = alpha**2 * LAM + sigma**2  # (n, 3) eigenvalues of K
    return MU + (alpha * LAM / k * y) @ Q.T, (sigma / k * y) @ Q.T


def exact_net(objective):
    """The exact minimiser as a network: receives t·time_scale, returns the objective's prediction."""
    def net(x_t, t_scaled, cond):
        t = t_scaled / objective.time_scale
        alpha, sigma = (a[:, None] for a in objective.path.alpha_sigma(t))
        d_alpha, d_sigma = (a[:, None] for a in objective.path.derivatives(t))
        x0, eps = posterior(x_t, alpha, sigma)
        return {"velocity": d_alpha * x0 + d_sigma * eps, "eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[
            objective.prediction]
    return net


def residual(objective, t: np.ndarray) -> np.ndarray:
    """w(t)·mean_k λ_k·(a·σ − b·α)²/(α²λ_k + σ²) at times t (module docstring), weights written out."""
    tt = torch.as_tensor(t, dtype=F64)
    alpha, sigma = objective.path.alpha_sigma(tt)
    d_alpha, d_sigma = objective.path.derivatives(tt)
    a, b = {"velocity": (d_alpha, d_sigma), "eps": (0, 1), "x0": (1, 0), "v": (-sigma, alpha)}[objective.prediction]
    alpha_, sigma_ = alpha[..., None], sigma[..., None]  # (n, 1) against the eigenvalues (3,)
    var = (LAM * ((a * sigma - b * alpha) ** 2)[..., None] / (alpha_**2 * LAM + sigma_**2)).mean(-1)
    weight = torch.ones_like(tt)
    if getattr(objective, "weighting", "uniform") == "min_snr":
        snr, g = (alpha / sigma) ** 2, objective.min_snr_gamma
        weight = {"eps": torch.minimum(snr, torch.full_like(snr, g)) / snr, "x0": snr.clamp(max=g),
                  "v": snr.clamp(max=g) / (snr + 1)}[objective.prediction]
    return (weight * var).numpy()


def f_mode(u, s):
    return 1 - u - s * (np.cos(np.pi / 2 * u) ** 2 - 1 + u)  # SD3 eq. 20


def shifted(t, s):
    return s * t / (1 + (s - 1) * t)


def expected_flow_loss(flow: RectifiedFlow, tokens: int) -> float:
    """E_t[residual] over the flow's time density, written from the papers, by quadrature."""
    s = flow.shift * (math.sqrt(tokens / flow.shift_reference_tokens) if flow.shift_reference_tokens else 1.0)
    f = lambda t: float(residual(flow, np.array([shifted(t, s)]))[0])  # noqa: E731
    if flow.time_sampling == "uniform":
        return quad(f, 0, 1, epsabs=1e-12, limit=200)[0]
    if flow.time_sampling == "mode":
        return quad(lambda u: f(f_mode(u, flow.mode_scale)), 0, 1, epsabs=1e-12, limit=200)[0]
    m, sd = flow.logit_mean, flow.logit_std
    return quad(lambda z: f(1 / (1 + math.exp(-(m + sd * z)))) * stats.norm.pdf(z), -12, 12, epsabs=1e-12, limit=200)[0]


# ----------------------------------------------------------------------------- (a) exact loss


@pytest.mark.parametrize("name", PRESETS)
def test_exact_model_loss_equals_analytic_minimum(name):
    objective = preset(name)
    g = torch.Generator().manual_seed(0)
    n = 100_000
    x0 = gaussian_data(n, g)
    out = objective.loss(exact_net(objective), x0, None, generator=g)
    assert isinstance(out, LossOutput) and out.t.shape == (n,) and out.per_sample.shape == (n,)
    if isinstance(objective, Diffusion):
        analytic = residual(objective, np.arange(1, objective.num_steps + 1) / objective.num_steps).mean()
    else:
        analytic = expected_flow_loss(objective, tokens=1)
    stderr = out.per_sample.std().item() / math.sqrt(n)
    assert abs(out.loss.item() - analytic) < 4 * stderr, (name, out.loss.item(), analytic, stderr)
    # the exact model is the minimiser: halving its prediction costs more than 10 stderr
    half = lambda *a: 0.5 * exact_net(objective)(*a)  # noqa: E731
    worse = objective.loss(half, x0, None, generator=torch.Generator().manual_seed(0))
    assert worse.loss.item() > analytic + 10 * stderr


def test_flow_quadrature_matches_closed_form():
    """The quadrature the flow cases rely on, against rectified flow's closed form for 1-D data of
    variance λ under uniform t: ∫ λ/((1 − t)²λ + t²) dt = sqrt(λ)·π/2."""
    flow = RectifiedFlow()
    expected = (LAM.sqrt() * math.pi / 2).mean().item()
    assert abs(expected_flow_loss(flow, tokens=1) - expected) < 1e-9


def test_min_snr_weights_agree_across_predictions():
    """Hang et al.: the min-SNR weight is min(SNR, γ) on the x0 error, so one x0 estimate, expressed
    as ε, v or x0, gives the same weighted loss under each prediction's weight."""
    g = torch.Generator().manual_seed(1)
    x0 = gaussian_data(4096, g)
    losses = []
    for prediction in ("eps", "v", "x0"):
        objective = Diffusion("scaled_linear", prediction, "min_snr")

        def net(x_t, t_scaled, cond, objective=objective):
            alpha, sigma = (a[:, None] for a in objective.path.alpha_sigma(t_scaled / 1000))
            guess = 0.7 * x_t / alpha.clamp(min=0.1)  # any x0 estimate
            return from_x0_eps(objective.prediction, guess, (x_t - alpha * guess) / sigma, alpha, sigma)

        losses.append(objective.loss(net, x0, None, generator=torch.Generator().manual_seed(2)).loss.item())
    assert max(losses) - min(losses) < 1e-9 * max(losses), losses


# --------------------------------------------------------------------- (b) path end points


@pytest.mark.parametrize("name", PRESETS)
def test_end_points(name):
    objective = preset(name)
    x0, noise = torch.randn(2, 4, 3, 2, 2, dtype=F64), torch.randn(2, 4, 3, 2, 2, dtype=F64)
    (a0, a1), (s0, s1) = objective.path.alpha_sigma(torch.tensor([0.0, 1.0], dtype=F64))
    sigma_min = getattr(objective.path, "sigma_min", 0.0)
    assert (a0.item(), s0.item()) == (1.0, sigma_min)
    at = {t: interpolate(objective.path, x0, noise, torch.full((2,), t, dtype=F64)) for t in (0.0, 1.0)}
    if sigma_min == 0:
        assert torch.equal(at[0.0], x0)  # t = 0 is the data
    else:
        torch.testing.assert_close(at[0.0], x0 + sigma_min * noise, rtol=0, atol=1e-15)  # OT: σ(0) = σ_min
    if isinstance(objective, Diffusion) and not objective.zero_terminal_snr:
        assert a1 > 0 and abs(a1.item() - objective.alphas_cumprod[-1].sqrt().item()) < 1e-15  # plain VP: α(1) > 0
        assert a1.item() ** 2 + s1.item() ** 2 == pytest.approx(1.0, abs=1e-15)
    else:
        assert (a1.item(), s1.item()) == (0.0, 1.0) and torch.equal(at[1.0], noise)  # flow / ZTSNR: pure noise


# --------------------------------------------------------------------- (c) conversions


@pytest.mark.parametrize("vp", [True, False], ids=["vp", "general"])
def test_conversions_round_trip(vp):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 500, generator=g, dtype=F64)
    if vp:
        phi = torch.rand(500, generator=g, dtype=F64) * 1.5 + 0.03
        alpha, sigma = torch.cos(phi), torch.sin(phi)
    else:
        alpha, sigma = 0.05 + torch.rand(2, 500, generator=g, dtype=F64)
    x_t = alpha * x0 + sigma * eps
    preds = {k: from_x0_eps(k, x0, eps, alpha, sigma) for k in ("eps", "v", "x0")}
    torch.testing.assert_close(preds["v"], alpha * eps - sigma * x0, rtol=0, atol=1e-15)
    for source, pred in preds.items():
        back_x0, back_eps = to_x0_eps(source, pred, x_t, alpha, sigma)
        torch.testing.assert_close(back_x0, x0, rtol=0, atol=1e-10)
        torch.testing.assert_close(back_eps, eps, rtol=0, atol=1e-10)
        for dest in preds:  # ε → v → x0 and every other chain
            again = from_x0_eps(dest, back_x0, back_eps, alpha, sigma)
            torch.testing.assert_close(again, preds[dest], rtol=0, atol=1e-10)
    if vp:  # Salimans & Ho's v is dx/dφ for α = cos φ, σ = sin φ (not dx/dt)
        h = 1e-6
        x_of = lambda p: torch.cos(p) * x0 + torch.sin(p) * eps  # noqa: E731
        fd = (x_of(phi + h) - x_of(phi - h)) / (2 * h)
        torch.testing.assert_close(fd, preds["v"], rtol=0, atol=1e-8)


# --------------------------------------------------------------------- (d) against diffusers


@pytest.mark.parametrize("schedule,zt", SCHEDULES)
def test_alphas_cumprod_match_diffusers(schedule, zt):
    from diffusers import DDPMScheduler

    ours = Diffusion(schedule, "v", zero_terminal_snr=zt)
    ranges = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "cosine": (1e-4, 0.02)}
    theirs = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2" if schedule == "cosine" else schedule,
        beta_start=ranges[schedule][0], beta_end=ranges[schedule][1], rescale_betas_zero_snr=zt,
    ).alphas_cumprod.double()  # (1000,) float32 in diffusers
    torch.testing.assert_close(ours.alphas_cumprod, theirs, rtol=0, atol=1e-6)
    k = torch.arange(1000)
    alpha, sigma = ours.path.alpha_sigma((k + 1).to(F64) / 1000)  # diffusers index k is t = (k + 1)/N
    torch.testing.assert_close(alpha**2, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(sigma**2, 1 - theirs, rtol=0, atol=1e-6)
    assert ours.path.alpha_sigma(torch.zeros(1, dtype=F64))[0].item() == 1.0


def test_cosine_path_matches_closed_form_between_steps():
    """The cosine table telescopes to Nichol & Dhariwal's ᾱ(t) = f(t)/f(0) at t = (k + 1)/N, which pins
    the index mapping independently of diffusers; between steps the spline stays within 1e-9 of it
    (t ≤ 0.99: β_N is clipped at 0.999, so the table leaves the closed form in the last step)."""
    path = Diffusion("cosine").path
    off_grid = torch.rand(2000, generator=torch.Generator().manual_seed(0), dtype=F64) * 0.99
    t = torch.cat([torch.arange(991, dtype=F64) / 1000, off_grid])
    phase = (t + 0.008) / 1.008 * math.pi / 2
    norm = math.cos(0.008 / 1.008 * math.pi / 2)
    alpha, _ = path.alpha_sigma(t)
    d_alpha, _ = path.derivatives(t)
    torch.testing.assert_close(alpha, torch.cos(phase) / norm, rtol=0, atol=1e-9)
    torch.testing.assert_close(d_alpha, -math.pi / 2 / 1.008 * torch.sin(phase) / norm, rtol=0, atol=1e-6)


# --------------------------------------------------------------- (e, f) derivatives, inversion


@pytest.mark.parametrize("name,path", list(all_paths().items()))
def test_path_derivatives_equal_finite_differences(name, path):
    assert isinstance(path, Path)
    random = torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=F64) * 0.98 + 0.01
    t = torch.cat([torch.linspace(0.01, 0.99, 99, dtype=F64), random])
    h = 1e-6
    (a_hi, s_hi), (a_lo, s_lo) = path.alpha_sigma(t + h), path.alpha_sigma(t - h)
    d_alpha, d_sigma = path.derivatives(t)
    torch.testing.assert_close(d_alpha, (a_hi - a_lo) / (2 * h), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(d_sigma, (s_hi - s_lo) / (2 * h), rtol=1e-6, atol=1e-7)
    if isinstance(path, VPPath):  # decreasing α, variance preserving everywhere
        alpha, sigma = path.alpha_sigma(torch.linspace(0, 1, 10_001, dtype=F64))
        assert (alpha[1:] < alpha[:-1]).all() and (alpha**2 + sigma**2 - 1).abs().max() < 1e-14


@pytest.mark.parametrize("name,path", list(all_paths().items()))
def test_predictions_from_velocity_inverts_velocity(name, path):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 5, 2, 2, generator=g, dtype=F64)
    for t in (torch.tensor([0.01, 0.3, 0.77, 1.0], dtype=F64), 0.01 + 0.99 * torch.rand(4, 5, generator=g, dtype=F64)):
        x_t = interpolate(path, x0, eps, t)
        v = velocity_from_predictions(path, t, x0, eps)
        back_x0, back_eps = predictions_from_velocity(path, x_t, t, v)
        torch.testing.assert_close(back_x0, x0, rtol=0, atol=1e-9)
        torch.testing.assert_close(back_eps, eps, rtol=0, atol=1e-9)


# ---------------------------------------------------------------- (g) time sampling densities


def _ks(samples: torch.Tensor, cdf) -> float:
    return stats.kstest(samples.double().numpy(), cdf).pvalue


def test_logit_normal_and_mode_sampling_match_their_densities():
    g = torch.Generator().manual_seed(0)
    n = 20_000
    ln = RectifiedFlow(time_sampling="logit_normal", logit_mean=0.5, logit_std=0.8).sample_t(n, torch.device("cpu"), g)
    assert _ks(ln, lambda x: stats.norm.cdf((np.log(x / (1 - x)) - 0.5) / 0.8)) > 0.01
    for s in (1.29, -0.5):
        mode = RectifiedFlow(time_sampling="mode", mode_scale=s).sample_t(n, torch.device("cpu"), g)
        grid = np.linspace(0, 1, 200_001)
        u_of_t = lambda x: np.interp(x, f_mode(grid, s)[::-1], grid[::-1])  # f_mode decreasing  # noqa: E731
        assert _ks(mode, lambda x: 1 - u_of_t(x)) > 0.01  # P(f_mode(u) ≤ x) = 1 − f_mode⁻¹(x)
        assert _ks(mode, stats.uniform.cdf) < 1e-6  # and the test can tell it from uniform


def test_training_shift_density_and_resolution_factor():
    g = torch.Generator().manual_seed(1)
    flow = RectifiedFlow(shift=1.5, shift_reference_tokens=256)
    assert flow.training_shift(1024) == pytest.approx(3.0) and flow.training_shift(None) == 1.5  # 1.5·sqrt(4)
    t = flow.sample_t(20_000, torch.device("cpu"), g, tokens=1024)
    assert _ks(t, lambda x: shifted(x, 1 / 3.0)) > 0.01  # P(t' ≤ x) = P(t ≤ shift⁻¹(x)); shift⁻¹: shift by 1/s
    u = torch.rand(1000, dtype=F64, generator=g)
    torch.testing.assert_close(shift_time(shift_time(u, 1.5), 2.0), shift_time(u, 3.0), rtol=0, atol=1e-14)


def test_diffusion_draws_grid_times_uniformly():
    objective = Diffusion(num_steps=50, schedule="cosine")
    t = objective.sample_t(50_000, torch.device("cpu"), torch.Generator().manual_seed(0))
    steps = (t.double() * 50).round()
    assert (t.double() * 50 - steps).abs().max() < 1e-5 and steps.min() == 1 and steps.max() == 50
    assert stats.chisquare(torch.bincount(steps.long(), minlength=51)[1:].numpy()).pvalue > 0.01


# ---------------------------------------------------------------------- (h) per-frame times


@pytest.mark.parametrize("name", PRESETS)
def test_per_frame_loss_equals_hand_formula(name):
    objective = preset(name)
    B, C, T, H, W = 3, 2, 4, 2, 3
    x0 = torch.randn(B, C, T, H, W, dtype=F64, generator=torch.Generator().manual_seed(0))
    seen = {}

    def net(x, t_scaled, cond):  # acts on each frame alone, so per-frame velocities can be checked frame by frame
        seen.update(x=x, t=t_scaled)
        return 0.3 * x + 0.1 * t_scaled[:, None, :, None, None] / objective.time_scale

    out = objective.loss(net, x0, None, generator=torch.Generator().manual_seed(1), per_frame=True)
    assert out.t.shape == (B, T) and out.per_sample.shape == (B,) and out.loss.dim() == 0
    # the same draws, in the documented order: t, then noise
    g = torch.Generator().manual_seed(1)
    extra = {"tokens": T * H * W} if "tokens" in inspect.signature(objective.sample_t).parameters else {}
    t = objective.sample_t(B, x0.device, g, frames=T, **extra).to(F64)
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    assert torch.equal(out.t, t) and torch.allclose(seen["t"], t * objective.time_scale, rtol=0, atol=1e-12)
    expected = torch.zeros(B, dtype=F64)
    for b in range(B):
        for f in range(T):
            tf = t[b, f : f + 1]
            (alpha,), (sigma,) = objective.path.alpha_sigma(tf)
            (d_alpha,), (d_sigma,) = objective.path.derivatives(tf)
            x, e = x0[b, :, f], noise[b, :, f]
            torch.testing.assert_close(seen["x"][b, :, f], alpha * x + sigma * e, rtol=0, atol=1e-14)
            targets = {"velocity": d_alpha * x + d_sigma * e, "eps": e, "x0": x, "v": alpha * e - sigma * x}
            target = targets[objective.prediction]
            weight = 1.0
            if getattr(objective, "weighting", "uniform") == "min_snr":
                snr = (alpha / sigma) ** 2
                weight = min(snr, objective.min_snr_gamma) / {"eps": snr, "v": snr + 1, "x0": 1.0}[objective.prediction]
            expected[b] += weight * ((0.3 * (alpha * x + sigma * e) + 0.1 * tf - target) ** 2).sum() / (C * T * H * W)
    torch.testing.assert_close(out.per_sample, expected, rtol=1e-12, atol=0)
    # velocity with per-frame t equals the velocity of each frame on its own
    t_eval = 0.05 + 0.95 * torch.rand(B, T, dtype=F64, generator=g)
    x_t = seen["x"]
    v = objective.velocity(net, x_t, t_eval, None)
    assert v.shape == x0.shape and torch.isfinite(v).all()
    for f in range(T):
        v_f = objective.velocity(net, x_t[:, :, f : f + 1], t_eval[:, f : f + 1], None)
        torch.testing.assert_close(v[:, :, f : f + 1], v_f, rtol=0, atol=1e-12)


# ------------------------------------------------------- flow target, VP smoothness, contracts


def test_ot_target_is_time_derivative_of_path():
    flow = RectifiedFlow(sigma_min=1e-5)
    x0, noise = torch.randn(2, 4, 3, 2, 2, 2, dtype=F64)
    t = torch.tensor([0.1, 0.4, 0.9, 0.999], dtype=F64)
    fd = (flow.interpolate(x0, noise, t + 1e-6) - flow.interpolate(x0, noise, t - 1e-6)) / 2e-6
    torch.testing.assert_close(flow.target(x0, noise), (1 - 1e-5) * noise - x0, rtol=0, atol=1e-15)
    torch.testing.assert_close(fd, flow.target(x0, noise, t), rtol=0, atol=1e-8)


@pytest.mark.parametrize("kwargs,t_start", [
    (dict(schedule="linear"), 1.0),
    (dict(schedule="scaled_linear", zero_terminal_snr=True, prediction="v"), 1.0),
    (dict(schedule="cosine"), 0.99),  # the clipped last β is a kink of the table itself
])
def test_heun_on_vp_path_is_second_order(kwargs, t_start):
    """The spline between steps is smooth enough for a second-order solver: Heun on the exact
    probability-flow ODE of 1-D N(2, 0.25) data converges at order 2 to the exact transport map
    x(t) = α(t)·μ + sqrt(α²s² + σ²)(t)·z across many grid points."""
    path, mu, var = Diffusion(**kwargs).path, 2.0, 0.25

    def v(x, t):
        alpha, sigma = path.alpha_sigma(t)
        d_alpha, d_sigma = path.derivatives(t)
        k = alpha**2 * var + sigma**2
        return d_alpha * (mu + alpha * var / k * (x - alpha * mu)) + d_sigma * sigma / k * (x - alpha * mu)

    def spread(t):
        alpha, sigma = path.alpha_sigma(torch.tensor(t, dtype=F64))
        return alpha * mu, torch.sqrt(alpha**2 * var + sigma**2)

    x_start, t_end = torch.linspace(-3, 3, 61, dtype=F64), 0.05
    (m0, s0), (m1, s1) = spread(t_start), spread(t_end)
    exact = m1 + s1 * (x_start - m0) / s0
    errors = []
    for n in (10, 20, 40, 80, 160):
        ts, x = torch.linspace(t_start, t_end, n + 1, dtype=F64), x_start
        for a, b in zip(ts[:-1], ts[1:]):
            k1 = v(x, a.expand_as(x))
            k2 = v(x + (b - a) * k1, b.expand_as(x))
            x = x + (b - a) / 2 * (k1 + k2)
        errors.append((x - exact).abs().max().item())
    orders = -np.diff(np.log2(errors))
    assert (orders > 1.85).all() and (orders < 2.15).all(), (errors, orders)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_has_path_time_scale_and_prediction(name):
    objective = preset(name)
    assert isinstance(objective.path, Path) and objective.time_scale == 1000.0
    assert objective.prediction in ("velocity", "eps", "v", "x0")
    x = torch.randn(2, 4, 3, 2, 2)
    v = objective.velocity(lambda x, t, c: -x, x, torch.tensor([0.5, 1.0]), None)
    assert v.shape == x.shape and v.dtype == x.dtype and torch.isfinite(v).all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(schedule="quadratic"), "linear, scaled_linear, cosine"),
    (dict(prediction="score"), "eps, v, x0"),
    (dict(weighting="p2"), "uniform, min_snr"),
    (dict(zero_terminal_snr=True, prediction="eps"), "prediction 'v' or 'x0'"),
    (dict(schedule="cosine", beta_end=0.02), "takes no beta_start"),
    (dict(num_steps=50), "not strictly decreasing"),  # coarse linear-β table: β extrapolates below 0
])
def test_diffusion_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Diffusion(**kwargs)


def test_flow_rejects_bad_settings():
    with pytest.raises(ValueError, match="uniform, logit_normal, mode"):
        RectifiedFlow(time_sampling="cosmap")
    with pytest.raises(ValueError, match="mode_scale"):
        RectifiedFlow(time_sampling="mode", mode_scale=2.0)
