"""Every sampler against closed forms: Gaussian and Gaussian-mixture data, whose optimal velocity on
any path α(t), σ(t) is known exactly (tests/exact.py), stand in for a perfectly trained network.

What is checked (paths: rectified flow, σ_min = 1e-3 flow matching, a cosine VP path, and the
objectives' `VPPath` when it exists):

- distribution: every sampler maps N(0, I) to the data law — mean and covariance of a 3-D
  correlated Gaussian (2-Wasserstein and entrywise), and the weights and MMD of a 2-D mixture;
- convergence order: the RMS distance to the exact ODE solution at t = 0 (closed form for a
  Gaussian, the limit of infinitely many steps) falls as steps^−p with p ≈ 1 for Euler and DDIM
  (η = 0), 2 for Heun and UniPC, and 2 up to a log factor for DPM-Solver++(2M);
- identities: DDIM (η = 0) is Euler on affine paths; DDIM (η = 1) is DDPM draw for draw; our
  DPM-Solver++(2M), UniPC and Euler equal diffusers' schedulers on the same sigmas;
- contract: samplers needing the path say so, no sampler evaluates v at t = 0, ``nfe`` counts the
  evaluations, seeds and per-sample generators reproduce, video-shaped tensors work, every
  configs/sampler preset builds and runs;
- guidance: scale 1 is the conditional velocity, batched CFG is two passes, and with a guidance
  interval the velocity outside it is the conditional one exactly and CFG inside.

Tiny tensors: the module runs torch single-threaded (thread start-up costs more than the work).
"""

from __future__ import annotations

import math
from pathlib import Path as FilePath

import numpy as np
import pytest
import torch

from exact import GaussianMixture, gaussian_w2, mmd2, moments, whitened_normal
from modules.conditioning import Conditioning
from modules.objectives.paths import LinearPath
from modules.samplers.base import Sampler
from modules.samplers.ddim import DDIMSampler
from modules.samplers.ddpm import DDPMSampler
from modules.samplers.dpm_solver import DPMSolverPlusPlus2MSampler
from modules.samplers.euler import EulerSampler
from modules.samplers.guidance import classifier_free_guidance, expert_cfg_scale
from modules.samplers.heun import HeunSampler
from modules.samplers.timesteps import flow_timesteps
from modules.samplers.unipc import UniPCSampler

try:  # the objectives' VP path (a spline through a DDPM ᾱ table), when present
    from modules.objectives.paths import VPPath
except ImportError:  # pragma: no cover
    VPPath = None


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CosineVPPath:
    """α = cos(πt/2), σ = sin(πt/2): variance preserving, α(1) = 0 up to rounding, σ(0) = 0."""

    def alpha_sigma(self, t):
        return torch.cos(math.pi / 2 * t), torch.sin(math.pi / 2 * t)

    def derivatives(self, t):
        return -math.pi / 2 * torch.sin(math.pi / 2 * t), math.pi / 2 * torch.cos(math.pi / 2 * t)


class ScaledLinearPath:
    """α = 1 − c·t, σ = c·t: the linear path on [0, c], so every λ on the grid is finite (c < 1)."""

    def __init__(self, c: float) -> None:
        self.c = c

    def alpha_sigma(self, t):
        return 1 - self.c * t, self.c * t

    def derivatives(self, t):
        return torch.full_like(t, -self.c), torch.full_like(t, self.c)


def cosine_table_path(n: int = 1000, s: float = 0.008):
    """VPPath through ᾱ_i = f(i/n)/f(0), f(u) = cos²((u + s)/(1 + s)·π/2) (Nichol & Dhariwal 2021)."""
    u = torch.arange(1, n + 1, dtype=torch.float64) / n
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return VPPath(f(u) / f(torch.zeros(1, dtype=torch.float64)))


PATHS = {"rectified_flow": LinearPath(), "sigma_min": LinearPath(1e-3), "cosine_vp": CosineVPPath()}
if VPPath is not None:
    PATHS["vp_table"] = cosine_table_path()

# name -> (factory(steps), steps for the Gaussian test, its W2 / entrywise tolerance, steps for the mixture)
SAMPLERS = {
    "euler": (lambda n: EulerSampler(n), 200, 1e-2, 50),
    "heun": (lambda n: HeunSampler(n), 20, 1e-2, 15),
    "ddim": (lambda n: DDIMSampler(n, eta=0.0), 200, 1e-2, 50),
    "ddim_eta0.5": (lambda n: DDIMSampler(n, eta=0.5, seed=0), 150, 4e-2, 50),
    "ddpm": (lambda n: DDPMSampler(n, seed=0), 150, 4e-2, 50),
    "dpmpp_2m": (lambda n: DPMSolverPlusPlus2MSampler(n), 20, 1e-2, 15),
    "unipc": (lambda n: UniPCSampler(n), 20, 1e-2, 15),
}
STOCHASTIC = {"ddim_eta0.5", "ddpm"}

A = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.2, 0.5]], dtype=torch.float64)
GAUSSIAN = GaussianMixture.gaussian([1.0, -2.0, 0.5], A @ A.T / 2)


def _rotation(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


MIXTURE = GaussianMixture(
    [0.2, 0.3, 0.5],
    [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]],
    torch.stack([
        _rotation(a) @ torch.diag(torch.tensor(d, dtype=torch.float64)) @ _rotation(a).T
        for a, d in [(0.3, [0.09, 0.25]), (1.2, [0.04, 0.36]), (0.0, [0.16, 0.16])]
    ]),
)


# ---------------------------------------------------------------- the data laws are reproduced


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("name", SAMPLERS)
def test_gaussian_mean_and_covariance(name, path_name):
    """Deterministic samplers: 4096 whitened noise draws (sample moments exactly 0 and I); the
    sampler is then an affine map of them, so the output moments carry the discretisation error
    alone. Stochastic ones: 20000 draws, the tolerance covers the Monte-Carlo error too."""
    make, steps, tol, _ = SAMPLERS[name]
    path = PATHS[path_name]
    n = 20000 if name in STOCHASTIC else 4096
    z = whitened_normal(n, GAUSSIAN.dim, torch.Generator().manual_seed(11))  # not the samplers' seed 0
    m, c = moments(make(steps).sample(GAUSSIAN.velocity(path), z, path=path))
    target = GAUSSIAN.marginal(path, 0.0)  # the data, plus σ(0)²·I for σ_min > 0
    m_star, c_star = target.means[0], target.covs[0]
    assert (m - m_star).abs().max() < tol, (m, m_star)
    assert (c - c_star).abs().max() < tol, (c, c_star)
    assert gaussian_w2(m, c, m_star, c_star) < tol


@pytest.fixture(scope="module")
def mixture_reference():
    return MIXTURE.sample(2000, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("name", SAMPLERS)
def test_mixture_weights_and_mmd(name, path_name, mixture_reference):
    """2-D mixture of three anisotropic Gaussians: the mean posterior responsibility of the samples
    estimates each weight without bias (E_p[r_k] = w_k); MMD² against 2000 exact draws (unbiased,
    Gaussian kernel of width 1; two exact sets of 2000 give |MMD²| < 1.3e-3, 10 Euler steps 3e-3)."""
    make, _, _, steps = SAMPLERS[name]
    path = PATHS[path_name]
    n = 2000
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    x = make(steps).sample(MIXTURE.velocity(path), noise, path=path)
    weights = MIXTURE.responsibilities(x).mean(0)
    w = MIXTURE.weights
    assert ((weights - w).abs() < 4 * (w * (1 - w) / n).sqrt() + 0.01).all(), (weights, w)
    assert mmd2(x, mixture_reference, bandwidth=1.0) < 2e-3


# ---------------------------------------------------------------- convergence orders

ORDER_CASES = [
    # sampler, path, step counts, slope bounds
    *[(s, p, [16, 32, 64, 128], 0.9, 1.1) for s in ("euler", "ddim") for p in ("rectified_flow", "sigma_min", "cosine_vp")],
    *[("heun", p, [16, 32, 64, 128], 1.9, 2.15) for p in ("rectified_flow", "sigma_min", "cosine_vp")],
    # on the objectives' VP table path σ ∝ √t near t = 0: x̂0-based solvers drop to order 1 at the
    # end (modules/samplers/dpm_solver.py), the t-steppers keep theirs
    *[(s, "vp_table", [16, 32, 64, 128], lo, hi) for s, lo, hi in (("euler", 0.9, 1.1), ("heun", 1.9, 2.15))
      if "vp_table" in PATHS],
    ("unipc", "rectified_flow", [128, 256, 512, 1024], 1.85, 2.15),
    ("unipc", "cosine_vp", [128, 256, 512, 1024], 1.85, 2.15),
    # log(N)/N² on a uniform-t grid (modules/samplers/dpm_solver.py): the slope nears 2 from below
    ("dpmpp_2m", "rectified_flow", [128, 256, 512, 1024], 1.65, 2.05),
    ("dpmpp_2m", "cosine_vp", [128, 256, 512, 1024], 1.6, 2.05),
]


@pytest.mark.parametrize("name,path_name,steps,lo,hi", ORDER_CASES, ids=[f"{c[0]}-{c[1]}" for c in ORDER_CASES])
def test_convergence_order(name, path_name, steps, lo, hi):
    path = PATHS[path_name]
    z = whitened_normal(64, GAUSSIAN.dim, torch.Generator().manual_seed(3))
    exact = GAUSSIAN.flow_map(path, z)  # the ODE solution at t = 0: the limit of a fine reference
    v = GAUSSIAN.velocity(path)
    make = SAMPLERS[name][0]
    errors = [(make(n).sample(v, z, path=path) - exact).pow(2).sum(1).mean().sqrt().item() for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert lo < slope < hi, (slope, errors)


# ---------------------------------------------------------------- identities


@pytest.mark.parametrize("path", [LinearPath(), LinearPath(1e-3)], ids=["rectified_flow", "sigma_min"])
def test_ddim_eta0_is_euler_on_affine_paths(path):
    """x_s = α_s·x̂0 + σ_s·ε̂ and x_t = α_t·x̂0 + σ_t·ε̂ differ by (s − t)·(α'·x̂0 + σ'·ε̂) when α, σ are affine."""
    z = torch.randn(256, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = GAUSSIAN.velocity(path)
    ddim = DDIMSampler(7, shift=3.0).sample(v, z, path=path)
    torch.testing.assert_close(ddim, EulerSampler(7, shift=3.0).sample(v, z), rtol=0, atol=1e-12)


@pytest.mark.parametrize("path_name", ["rectified_flow", "cosine_vp"])
def test_ddim_eta1_is_ddpm(path_name):
    """With η = 1 the DDIM step has the posterior's variance and, given (x̂0, ε̂), its mean too."""
    path = PATHS[path_name]
    z = torch.randn(128, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = GAUSSIAN.velocity(path)
    ddim = DDIMSampler(12, eta=1.0).sample(v, z, path=path, generator=torch.Generator().manual_seed(5))
    ddpm = DDPMSampler(12).sample(v, z, path=path, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-10)


def _run_diffusers(scheduler, velocity, sigmas: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Drive a diffusers flow scheduler over the grid ``sigmas`` (N + 1,) with the exact velocity."""
    scheduler.set_timesteps(len(sigmas) - 1)
    scheduler.sigmas = sigmas.clone()
    x = z.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        v = velocity(x, torch.full((x.shape[0],), float(sigmas[i]), dtype=torch.float64))
        x = scheduler.step(v, timestep, x).prev_sample
    return x


@pytest.mark.parametrize("steps,shift", [(6, 1.0), (20, 3.0)])
@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_multistep_matches_diffusers(name, steps, shift):
    """Same exact velocity, same sigma grid: σ_k = c·t_k on the flow path (diffusers' flow sigmas are
    α = 1 − σ, σ), which our samplers see as the path α = 1 − c·t, σ = c·t on the grid t_k. c < 1 keeps
    λ finite at the first point, as diffusers' own flow grids do (σ_max < 1)."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    c = 0.999
    path, z = ScaledLinearPath(c), whitened_normal(32, 3, torch.Generator().manual_seed(0))
    sigmas = c * flow_timesteps(steps, shift)
    common = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0, solver_order=2)
    if name == "dpmpp_2m":
        ours = DPMSolverPlusPlus2MSampler(steps, shift)
        theirs = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", final_sigmas_type="zero", **common)
        atol = 1e-5  # diffusers' DPM-Solver steps in float32
    else:
        ours = UniPCSampler(steps, shift)
        theirs = UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, lower_order_final=True, **common)
        atol = 1e-10
    expected = _run_diffusers(theirs, GAUSSIAN.velocity(LinearPath()), sigmas, z)
    torch.testing.assert_close(ours.sample(GAUSSIAN.velocity(path), z, path=path), expected, rtol=0, atol=atol)


def test_euler_matches_diffusers_flow_match_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    z = whitened_normal(32, 3, torch.Generator().manual_seed(0))
    sigmas = flow_timesteps(10, 3.0)
    v = GAUSSIAN.velocity(LinearPath())
    expected = _run_diffusers(FlowMatchEulerDiscreteScheduler(shift=1.0), v, sigmas, z)
    torch.testing.assert_close(EulerSampler(10, 3.0).sample(v, z), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- the sampler contract


@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpmpp_2m", "unipc"])
def test_path_is_required_with_a_clear_error(name):
    with pytest.raises(ValueError, match=r"path=objective\.path"):
        SAMPLERS[name][0](4).sample(lambda x, t: x, torch.zeros(2, 3))


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_velocity_samplers_need_no_path(name):
    out = SAMPLERS[name][0](4).sample(lambda x, t: -x, torch.ones(2, 3))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", SAMPLERS)
def test_time_grid_nfe_and_no_evaluation_at_t0(name):
    """Velocities are asked at t ∈ (0, 1] only (the VP path's σ'(0) is infinite), first at t = 1,
    ``nfe`` times, in float64 for float64 noise, with a (B,) time per sample."""
    seen = []

    def v(x, t):
        assert t.shape == (x.shape[0],) and t.dtype == x.dtype
        seen.append(t[0].item())
        return GAUSSIAN.velocity(PATHS["rectified_flow"])(x, t)

    sampler = SAMPLERS[name][0](9)
    sampler.sample(v, torch.randn(4, 3, dtype=torch.float64), path=PATHS["rectified_flow"])
    assert len(seen) == sampler.nfe and seen[0] == 1.0 and min(seen) > 0.0


@pytest.mark.parametrize("name", ["ddim_eta0.5", "ddpm"])
def test_stochastic_samplers_reproduce_from_seeds_and_generators(name):
    make = SAMPLERS[name][0]
    path, z = LinearPath(), torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = GAUSSIAN.velocity(path)
    a, b = make(8).sample(v, z, path=path), make(8).sample(v, z, path=path)  # seed 0 in the factory
    assert torch.equal(a, b)
    other = make(8).sample(v, z, path=path, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, other)
    # one generator per sample: a row depends on its own generator only, not on its batch
    rows = make(8).sample(v, z, path=path, generator=[torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    alone = make(8).sample(v, z[2:], path=path, generator=[torch.Generator().manual_seed(9)])
    torch.testing.assert_close(rows[2:], alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", SAMPLERS)
def test_video_shaped_float32(name):
    x = torch.randn(2, 4, 3, 5, 5, generator=torch.Generator().manual_seed(0))  # (B, C, T, H, W)
    out = SAMPLERS[name][0](5).sample(lambda x, t: x - 0.5 * t.reshape(-1, 1, 1, 1, 1), x, path=LinearPath())
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


SAMPLER_PRESETS = sorted((FilePath(__file__).resolve().parents[1] / "configs" / "sampler").glob("*.yaml"))


@pytest.mark.parametrize("preset", SAMPLER_PRESETS, ids=lambda p: p.stem)
def test_every_sampler_preset_builds_and_samples(preset):
    """Each preset starts with a comment header, its class takes its keys, and it samples with a path.
    (tests/test_config.py also builds every preset inside the smoke experiment.)"""
    import importlib

    import yaml

    text = preset.read_text()
    assert text.startswith("#"), "each preset starts with a comment header"
    node = yaml.safe_load(text)
    module, _, cls = node.pop("_target_").rpartition(".")
    sampler = getattr(importlib.import_module(module), cls)(**node)
    path = LinearPath()
    out = sampler.sample(GAUSSIAN.velocity(path), torch.randn(8, 3, dtype=torch.float64), path=path)
    assert out.shape == (8, 3) and torch.isfinite(out).all() and sampler.nfe >= sampler.steps
    assert isinstance(sampler, Sampler)


# ---------------------------------------------------------------- guidance


def _cfg_case():
    g = torch.Generator().manual_seed(0)
    f64 = dict(generator=g, dtype=torch.float64)
    cond = Conditioning(torch.randn(4, 5, 8, **f64), torch.ones(4, 5, dtype=torch.bool))
    null = Conditioning(torch.randn(1, 2, 8, **f64), torch.ones(1, 2, dtype=torch.bool))
    weight = torch.randn(8, **f64)
    calls = []

    def velocity(x, t, c):
        calls.append(x.shape[0])
        m = c.mask[..., None].to(x.dtype)
        feat = ((c.tokens * m).sum(1) / m.sum(1)) @ weight  # (B,)
        return x * feat[:, None] + t[:, None]

    null_b = Conditioning(null.tokens.expand(4, -1, -1), null.mask.expand(4, -1))
    return velocity, cond, null, null_b, torch.randn(4, 3, **f64), calls


def test_cfg_scale_one_is_the_conditional_velocity():
    velocity, cond, null, _, x, calls = _cfg_case()
    t = torch.full((4,), 0.5, dtype=torch.float64)
    expected = velocity(x, t, cond)
    calls.clear()
    assert torch.equal(classifier_free_guidance(velocity, cond, null, 1.0)(x, t), expected)
    assert calls == [4]


def test_batched_cfg_equals_two_passes():
    velocity, cond, null, null_b, x, calls = _cfg_case()
    t = torch.rand(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v_c, v_n = velocity(x, t, cond), velocity(x, t, null_b)
    calls.clear()
    out = classifier_free_guidance(velocity, cond, null, 4.5)(x, t)
    torch.testing.assert_close(out, v_n + 4.5 * (v_c - v_n), rtol=0, atol=1e-12)
    assert calls == [8]


@pytest.mark.parametrize("scale", [5.0, expert_cfg_scale([0.875], [4.0, 3.0])], ids=["number", "per_expert"])
def test_guidance_interval(scale):
    """Kynkäänniemi et al. 2024: CFG for t in [start, stop], the conditional velocity elsewhere —
    exactly, with the null branch not even run when no sample of the step is inside."""
    velocity, cond, null, null_b, x, calls = _cfg_case()
    guided = classifier_free_guidance(velocity, cond, null, scale, interval=(0.2, 0.9))
    plain = classifier_free_guidance(velocity, cond, null, scale)
    for t_value in (0.0, 0.1, 0.95, 1.0):  # outside
        t = torch.full((4,), t_value, dtype=torch.float64)
        calls.clear()
        assert torch.equal(guided(x, t), velocity(x, t, cond))
        assert calls == [4, 4]  # the guided call and the reference: conditional rows only
    for t_value in (0.2, 0.5, 0.9):  # inside, ends included
        t = torch.full((4,), t_value, dtype=torch.float64)
        torch.testing.assert_close(guided(x, t), plain(x, t), rtol=0, atol=0)
    t = torch.tensor([0.05, 0.5, 0.88, 0.95], dtype=torch.float64)  # a batch across the boundaries
    out, v_c = guided(x, t), velocity(x, t, cond)
    torch.testing.assert_close(out[[0, 3]], v_c[[0, 3]], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[[1, 2]], plain(x, t)[[1, 2]], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="interval"):
        classifier_free_guidance(velocity, cond, null, scale, interval=(0.9, 0.2))
