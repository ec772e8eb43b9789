"""Validation loss at fixed time buckets (eval/timestep_loss.py) and its callback (callbacks/timestep_loss.py).

References written out here, independently of the objectives' code: x_t = α·x0 + σ·ε with the
rectified-flow / OT path (α = 1 − t, σ = σ_min + (1 − σ_min)·t, target (1 − σ_min)·ε − x0) and the DDPM
table on its grid (α = sqrt(ᾱ_i), σ = sqrt(1 − ᾱ_i) at t = i/N, targets ε and α·ε − σ·x0, min-SNR
weights), in float64 with the same ε; and the quantiles of known time densities (uniform,
logit-normal through scipy's Φ⁻¹, the SD3 shift, DDPM's uniform grid).
"""

from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy.stats import norm

from eval.timestep_loss import loss_at_times, metric_name, time_quantiles
from experiments.config import compose
from experiments.fit import run_fit
from experiments.tracking import tracking_uri
from modules.objectives.diffusion import Diffusion
from modules.objectives.flow import RectifiedFlow

F64 = torch.float64
SHAPE = (3, 2, 3, 2, 2)  # (B, C, T, H, W)
Q8 = [(k + 0.5) / 8 for k in range(8)]


def toy_net(x_t, t_scaled, cond):
    """A fixed non-linear 'network' that uses both inputs: 0.3·x_t·cos(t_scaled/1000) + 0.1·t_scaled/1000."""
    t = t_scaled / 1000
    t = t[:, None, :, None, None] if t.dim() == 2 else t.reshape(-1, *([1] * (x_t.dim() - 1)))  # (B, T) per frame
    return 0.3 * x_t * torch.cos(t) + 0.1 * t


def data(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=F64)


def reference_flow(x0, noise, t, sigma_min=0.0):
    alpha, sigma = 1 - t, sigma_min + (1 - sigma_min) * t
    out = toy_net(alpha * x0 + sigma * noise, torch.full((x0.shape[0],), t * 1000, dtype=F64), None)
    return ((out - ((1 - sigma_min) * noise - x0)) ** 2).reshape(x0.shape[0], -1).mean(1)  # (B,)


def reference_diffusion(objective, x0, noise, i, prediction, gamma=None):
    abar = objective.alphas_cumprod[i - 1]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    t_scaled = torch.full((x0.shape[0],), i / objective.num_steps * 1000, dtype=F64)
    out = toy_net(alpha * x0 + sigma * noise, t_scaled, None)
    target = noise if prediction == "eps" else alpha * noise - sigma * x0
    snr = abar / (1 - abar)
    w = 1.0 if gamma is None else (min(snr, gamma) / snr if prediction == "eps" else min(snr, gamma) / (snr + 1))
    return (w * (out - target) ** 2).reshape(x0.shape[0], -1).mean(1)  # (B,)


# ----------------------------------------------------------------------------- loss at fixed times


@pytest.mark.parametrize("sigma_min", [0.0, 1e-2])
def test_flow_loss_at_times_equals_hand_formula_with_the_same_noise(sigma_min):
    x0, times = data(), [0.05, 0.3, 0.5, 0.97]
    objective = RectifiedFlow("logit_normal", sigma_min=sigma_min, shift=3.0)  # density and shift play no part
    got = loss_at_times(objective, toy_net, x0, None, times, torch.Generator().manual_seed(7), per_sample=True)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=F64)  # one draw, every t
    expected = torch.stack([reference_flow(x0, noise, t, sigma_min) for t in times])  # (K, B)
    assert got.shape == (4, SHAPE[0]) and got.dtype == F64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("prediction,gamma", [("eps", None), ("eps", 5.0), ("v", 5.0)])
def test_diffusion_loss_at_times_equals_hand_formula_on_the_grid(prediction, gamma):
    objective = Diffusion("cosine", prediction, "uniform" if gamma is None else "min_snr", gamma or 5.0)
    x0, steps = data(), [10, 250, 600, 999]
    got = loss_at_times(objective, toy_net, x0, None, [i / 1000 for i in steps], torch.Generator().manual_seed(3),
                        per_sample=True)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=F64)
    expected = torch.stack([reference_diffusion(objective, x0, noise, i, prediction, gamma) for i in steps])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=0)
    torch.testing.assert_close(loss_at_times(objective, toy_net, x0, None, [i / 1000 for i in steps],
                                             torch.Generator().manual_seed(3)), expected.mean(1))


def test_same_noise_at_every_bucket_and_every_call():
    x0, objective = data(), RectifiedFlow()
    def run(net, seed):
        return loss_at_times(objective, net, x0, None, Q8, torch.Generator().manual_seed(seed))

    # a zero net: L(t) = mean((ε − x0)²) does not depend on t, so equal buckets mean equal ε
    zero = run(lambda x, t, c: torch.zeros_like(x), 0)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(zero, ((noise - x0) ** 2).mean().expand(8), rtol=1e-12, atol=0)
    assert torch.equal(run(toy_net, 0), run(toy_net, 0)) and not torch.equal(run(toy_net, 0), run(toy_net, 1))
    # the generator is left advanced by exactly one draw of ε: consecutive chunks get fresh noise
    g = torch.Generator().manual_seed(0)
    loss_at_times(objective, toy_net, x0, None, Q8, g)
    second = loss_at_times(objective, toy_net, x0, None, [0.5], g, per_sample=True)[0]
    g2 = torch.Generator().manual_seed(0)
    torch.randn(SHAPE, generator=g2, dtype=F64)
    torch.testing.assert_close(second, reference_flow(x0, torch.randn(SHAPE, generator=g2, dtype=F64), 0.5))


def test_given_t_overrides_drawing_and_keeps_the_draw_order_otherwise():
    x0, objective = data(), RectifiedFlow()
    drawn = objective.loss(toy_net, x0, None, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = objective.sample_t(SHAPE[0], x0.device, g)  # t first, then ε from the same generator: training's order
    fixed = objective.loss(toy_net, x0, None, g, t=t)
    assert torch.equal(drawn.per_sample, fixed.per_sample) and torch.equal(drawn.t, fixed.t)
    per_frame = torch.rand(SHAPE[0], SHAPE[2], dtype=F64, generator=g)  # (B, T)
    assert objective.loss(toy_net, x0, None, g, t=per_frame).t.shape == (SHAPE[0], SHAPE[2])
    with pytest.raises(ValueError, match=r"\(B,\) or \(B, T\)"):
        objective.loss(toy_net, x0, None, g, t=torch.rand(1))
    flat = x0.reshape(SHAPE[0], -1)  # (B, d) data, as in tests/exact.py: t (B,) still works
    assert objective.loss(lambda x, t, c: 0 * x, flat, None, g, t=t).per_sample.shape == (SHAPE[0],)


# ----------------------------------------------------------------------------- buckets


def test_uniform_time_quantiles_are_the_bucket_midpoints():
    t = time_quantiles(RectifiedFlow("uniform"), 8)
    assert t.shape == (8,) and t.dtype == F64
    torch.testing.assert_close(t, torch.tensor(Q8, dtype=F64), rtol=0, atol=3e-3)
    assert torch.equal(t, time_quantiles(RectifiedFlow("uniform"), 8))  # a fixed generator: same buckets


def test_logit_normal_quantiles_and_the_resolution_shift():
    m, s = 0.3, 0.8
    base = torch.tensor([1 / (1 + math.exp(-(m + s * norm.ppf(q)))) for q in Q8], dtype=F64)  # σ(m + s·Φ⁻¹(q))
    torch.testing.assert_close(time_quantiles(RectifiedFlow("logit_normal", m, s), 8), base, rtol=0, atol=3e-3)
    # s_eff = shift·sqrt(tokens/reference) = 2 at 4× the reference tokens; t' = 2t/(1 + t) is monotone
    shifted = RectifiedFlow("logit_normal", m, s, shift_reference_tokens=64)
    torch.testing.assert_close(time_quantiles(shifted, 8, tokens=256), 2 * base / (1 + base), rtol=0, atol=3e-3)
    torch.testing.assert_close(time_quantiles(shifted, 8), base, rtol=0, atol=3e-3)  # no tokens: no shift


def test_diffusion_quantiles_are_training_grid_times():
    t = time_quantiles(Diffusion(num_steps=1000), 8, tokens=1024)  # tokens ignored: sample_t takes none
    torch.testing.assert_close(t, torch.tensor(Q8, dtype=F64), rtol=0, atol=3e-3)
    torch.testing.assert_close(t * 1000, (t * 1000).round(), rtol=0, atol=1e-4)  # drawn values i/N


def test_metric_names():
    names = [metric_name(t) for t in (0.0625, 0.5, 0.9375)]
    assert names == ["val/loss_t0.062", "val/loss_t0.500", "val/loss_t0.938"]


# ----------------------------------------------------------------------------- the callback


def test_callback_logs_bucket_losses_to_mlflow(out_dir):
    overrides = ["trainer.max_steps=2", "callbacks.samples.every_n_steps=0", "data.num_videos=8",
                 "callbacks.timestep_loss.num_clips=5", "callbacks.timestep_loss.batch_size=3",
                 "callbacks.timestep_loss.data.num_videos=5", "callbacks.timestep_loss.every_n_steps=1"]
    composed = compose("smoke", overrides)
    result = run_fit(composed)
    client = MlflowClient(tracking_uri(composed.cfg))
    metrics = client.get_run(result.run_id).data.metrics
    buckets = {k: v for k, v in metrics.items() if k.startswith("val/loss_t")}
    # smoke: uniform rectified flow, so the buckets sit at (k + 1/2)/8 (names carry t to 3 decimals)
    times = sorted(float(k.removeprefix("val/loss_t")) for k in buckets)
    torch.testing.assert_close(torch.tensor(times, dtype=F64), torch.tensor(Q8, dtype=F64), rtol=0, atol=3e-3)
    assert all(math.isfinite(v) and v > 0 for v in buckets.values())
    assert metrics["val/loss"] == pytest.approx(sum(buckets.values()) / 8, rel=1e-9)
    history = client.get_metric_history(result.run_id, "val/loss")
    assert sorted(m.step for m in history) == [1, 2]  # every step, and not twice at the end
