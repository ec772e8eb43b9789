"""Rectified flow + Euler sampler + time shift + CFG, checked against closed forms and diffusers.

Reference case: 1-D Gaussian data x0 ~ N(μ, σ²), noise ~ N(0, 1), x_t = (1 − t)·x0 + t·noise.
(x_t, u = noise − x0) is jointly Gaussian with
    E[x_t] = (1 − t)μ,  V(t) = Var x_t = (1 − t)²σ² + t²,  E[u] = −μ,
    Cov(u, x_t) = t − (1 − t)σ²,  Var u = 1 + σ²,
so the optimal velocity is v*(x, t) = −μ + Cov/V·(x − (1 − t)μ) and the irreducible loss is
Var(u | x_t) = (1 + σ²) − Cov²/V = σ² / V(t), whose mean over t ~ U(0, 1) is σ·π/2.
The exact ODE maps noise z to μ + σ·z.
"""

import functools
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from modules.conditioning import Conditioning
from modules.objectives.base import LossOutput
from modules.objectives.flow import RectifiedFlow
from modules.samplers.euler import EulerSampler
from modules.samplers.guidance import classifier_free_guidance
from modules.samplers.timesteps import flow_timesteps, shift_time

MU, SIGMA = 2.0, 0.5
TIME_SCALE = 1000.0


def optimal_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v*(x, t) = E[noise − x0 | x_t = x] for x0 ~ N(MU, SIGMA²); x (B, ...), t (B,)."""
    t = t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    var = (1 - t) ** 2 * SIGMA**2 + t**2
    cov = t - (1 - t) * SIGMA**2
    return -MU + cov / var * (x - (1 - t) * MU)


def optimal_net(x_t, t_scaled, cond):
    """The exact minimiser as a 'network': it receives t·time_scale like a backbone does."""
    return optimal_velocity(x_t, t_scaled / TIME_SCALE)


def test_interpolate_endpoints_exact():
    flow = RectifiedFlow()
    x0, noise = torch.randn(3, 4, 2, 5, 5), torch.randn(3, 4, 2, 5, 5)
    assert torch.equal(flow.interpolate(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(flow.interpolate(x0, noise, torch.ones(3)), noise)


def test_target_is_time_derivative_of_interpolate():
    flow = RectifiedFlow()
    x0 = torch.randn(4, 3, 2, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)
    h = 1e-6
    fd = (flow.interpolate(x0, noise, t + h) - flow.interpolate(x0, noise, t - h)) / (2 * h)
    torch.testing.assert_close(fd, flow.target(x0, noise), rtol=0, atol=1e-8)


def test_velocity_passes_scaled_time():
    seen = {}

    def net(x, t, cond):
        seen["t"] = t
        return x

    RectifiedFlow(time_scale=1000.0).velocity(net, torch.zeros(2, 1), torch.tensor([0.25, 1.0]), None)
    torch.testing.assert_close(seen["t"], torch.tensor([250.0, 1000.0]))


def test_unknown_time_sampling_lists_valid_names():
    with pytest.raises(ValueError, match="uniform.*logit_normal"):
        RectifiedFlow(time_sampling="cosine")


def test_logit_normal_time_distribution():
    flow = RectifiedFlow(time_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    t = flow.sample_t(50000, torch.device("cpu"), torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 0.02 and abs(logit.std().item() - 0.8) < 0.02


def test_euler_maps_noise_to_gaussian_data():
    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = EulerSampler(steps=200).sample(optimal_velocity, noise)
    n = noise.shape[0]
    assert abs(x.mean().item() - MU) < 5 * SIGMA / math.sqrt(n)
    assert abs(x.std().item() - SIGMA) < 5 * SIGMA / math.sqrt(2 * (n - 1))
    # stronger, deterministic: the exact flow map is z -> MU + SIGMA·z
    assert ((x - (MU + SIGMA * noise)).abs() / (1 + noise.abs())).max() < 5e-3


def test_euler_error_is_first_order():
    noise = torch.randn(4096, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = EulerSampler(steps=1000).sample(optimal_velocity, noise)
    steps = np.array([4, 8, 16, 32, 64])
    errors = []
    for n in steps:
        x = EulerSampler(steps=int(n)).sample(optimal_velocity, noise)
        errors.append(abs(x.mean() - reference.mean()).item() + abs(x.std() - reference.std()).item())
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert 0.85 < slope < 1.15, (slope, errors)


def test_loss_with_exact_net_equals_analytic_minimum():
    analytic, _ = quad(lambda t: SIGMA**2 / ((1 - t) ** 2 * SIGMA**2 + t**2), 0.0, 1.0, epsabs=1e-12)
    # closed form of the same integral: σ·(arctan(1/σ) + arctan(σ)) = σ·π/2
    assert abs(analytic - SIGMA * math.pi / 2) < 1e-10
    g = torch.Generator().manual_seed(0)
    n = 200000
    x0 = MU + SIGMA * torch.randn(n, 1, generator=g, dtype=torch.float64)
    out = RectifiedFlow(time_scale=TIME_SCALE).loss(optimal_net, x0, None, generator=g)
    assert isinstance(out, LossOutput)
    assert out.t.shape == (n,) and out.per_sample.shape == (n,) and out.loss.dim() == 0
    stderr = out.per_sample.std().item() / math.sqrt(n)
    assert abs(out.loss.item() - analytic) < 4 * stderr, (out.loss.item(), analytic, stderr)
    # a worse net (ignores x) has a higher loss: the exact net really is the minimiser
    worse = RectifiedFlow(time_scale=TIME_SCALE).loss(lambda x, t, c: torch.full_like(x, -MU), x0, None,
                                                       generator=torch.Generator().manual_seed(0))
    assert worse.loss.item() > analytic + 10 * stderr


def test_flow_timesteps_grid():
    ts = flow_timesteps(10, shift=3.0)
    assert ts.shape == (11,) and ts[0] == 1.0 and ts[-1] == 0.0
    assert (ts[1:] < ts[:-1]).all()


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("steps", [10, 50])
def test_shift_time_matches_diffusers(shift, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=1000)
    sched.set_timesteps(steps)
    # diffusers: base grid linspace(sigma_max, sigma_min, N) (sigma_min = shift(1/1000), not 0),
    # then shifted, then a final 0 appended. Shift the same base grid with ours.
    base = torch.from_numpy(np.linspace(sched.sigma_max, sched.sigma_min, steps))
    ours = shift_time(base, shift)
    theirs = sched.sigmas[:-1].double()
    assert sched.sigmas[-1] == 0
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- classifier-free guidance

def make_cfg_case():
    g = torch.Generator().manual_seed(0)
    f64 = dict(generator=g, dtype=torch.float64)
    cond = Conditioning(torch.randn(3, 5, 8, **f64), torch.ones(3, 5, dtype=torch.bool))
    null = Conditioning(torch.randn(1, 2, 8, **f64), torch.ones(1, 2, dtype=torch.bool))
    weight = torch.randn(8, **f64)
    calls = []

    def velocity(x, t, c):
        """Depends on x, t and the masked mean of the text tokens, per sample."""
        calls.append(x.shape[0])
        m = c.mask[..., None].to(x.dtype)
        pooled = (c.tokens * m).sum(1) / m.sum(1)  # (B, D)
        feat = (pooled @ weight).reshape(-1, *([1] * (x.dim() - 1)))
        return x * feat + t.reshape(-1, *([1] * (x.dim() - 1)))

    x = torch.randn(3, 2, 2, 4, 4, **f64)
    t = torch.rand(3, **f64)
    return velocity, cond, null, x, t, calls


def test_cfg_scale_one_is_conditional_with_one_forward():
    velocity, cond, null, x, t, calls = make_cfg_case()
    expected = velocity(x, t, cond)
    calls.clear()
    out = classifier_free_guidance(velocity, cond, null, 1.0)(x, t)
    assert torch.equal(out, expected)
    assert calls == [3]


def test_cfg_batched_equals_two_passes():
    velocity, cond, null, x, t, calls = make_cfg_case()
    null_b = Conditioning(null.tokens.expand(3, -1, -1), null.mask.expand(3, -1))
    v_c, v_n = velocity(x, t, cond), velocity(x, t, null_b)
    calls.clear()
    for scale in (0.0, 4.5):
        out = classifier_free_guidance(velocity, cond, null, scale)(x, t)
        torch.testing.assert_close(out, v_n + scale * (v_c - v_n), rtol=0, atol=1e-6)
    assert calls == [6, 6]  # one batched forward per call
    out0 = classifier_free_guidance(velocity, cond, null, 0.0)(x, t)
    torch.testing.assert_close(out0, v_n, rtol=0, atol=1e-6)


def test_cfg_batched_equals_two_passes_through_dit():
    """A real backbone: padding the shorter text with mask False must not change either branch."""
    from modules.backbones.dit import DiT

    torch.manual_seed(0)
    net = DiT(in_channels=2, text_dim=8, dim=16, depth=1, heads=2).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    _, cond, null, x, t, _ = make_cfg_case()
    flow = RectifiedFlow()
    velocity = functools.partial(flow.velocity, net)
    null_b = Conditioning(null.tokens.expand(3, -1, -1), null.mask.expand(3, -1))
    with torch.no_grad():
        v_c, v_n = velocity(x, t, cond), velocity(x, t, null_b)
        out = classifier_free_guidance(velocity, cond, null, 5.0)(x, t)
    assert (v_c - v_n).abs().max() > 1e-3
    torch.testing.assert_close(out, v_n + 5.0 * (v_c - v_n), rtol=0, atol=1e-6)


def test_cfg_with_objective_and_sampler_runs():
    velocity, cond, null, x, t, _ = make_cfg_case()
    flow = RectifiedFlow()
    fn = classifier_free_guidance(functools.partial(flow.velocity, lambda x, t, c: -x), cond, null, 3.0)
    out = EulerSampler(steps=4, shift=3.0).sample(fn, x)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_conditioning_cat_pads_shorter_with_false():
    a = Conditioning(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool))
    b = Conditioning(torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool))
    c = Conditioning.cat(a, b)
    assert len(c) == 3 and c.tokens.shape == (3, 5, 8)
    assert c.mask[2].tolist() == [True, True, True, False, False]
    assert torch.equal(c.tokens[2, :3], b.tokens[0]) and torch.equal(c.tokens[:2], a.tokens)
