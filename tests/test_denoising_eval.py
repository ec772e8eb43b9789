"""The matched-SNR denoising error (eval/denoising.py) and its callback (callbacks/denoising.py).

Reference case: Gaussian data x0 ~ N(μ, Σ) in d dimensions with the exact posterior as network
(tests/exact.py). At log-SNR λ, SNR = e^λ, the posterior covariance is (Σ⁻¹ + SNR·I)⁻¹ (Bishop 2006
§2.3.3), so the per-element Bayes error is

    mse*(λ) = (1/d)·Σ_i l_i / (1 + e^λ·l_i)        (l_i the eigenvalues of Σ),

the same number on every path: rectified flow, VP diffusion with ε or v prediction. With one
generator seed the objectives see the same x0 and ε, and x_t/α = x0 + e^{−λ/2}·ε is then the same
observation, so their errors agree to rounding; each agrees with mse*(λ) within Monte-Carlo error.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins.precision import Precision
from mlflow.tracking import MlflowClient

from callbacks.denoising import DenoisingError
from eval.denoising import log_snr, matched_snr_x0_error, metric_name, time_for_log_snr
from exact import GaussianMixture
from experiments.build import build_callbacks, build_datamodule, build_system, instantiate
from experiments.config import REPO_CONFIGS, compose, load_yaml
from experiments.fit import run_fit
from experiments.tracking import tracking_uri
from modules.objectives.conversions import from_x0_eps
from modules.objectives.diffusion import Diffusion
from modules.objectives.paths import LinearPath, velocity_from_predictions

F64 = torch.float64
LOG_SNRS = [-4.0, -2.0, 0.0, 2.0, 4.0]
ABLATION_OBJECTIVES = ["diffusion_eps", "diffusion_v", "rectified_flow", "rectified_flow_lognorm", "flow_ot"]


def preset(name: str):
    return instantiate(load_yaml(REPO_CONFIGS / "objective" / f"{name}.yaml"), f"objective/{name}.yaml")


def all_paths():
    paths = {"linear": LinearPath(), "ot_1e-5": LinearPath(1e-5)}
    for schedule in ("linear", "scaled_linear", "cosine"):
        for zt in (False, True):
            paths[f"vp_{schedule}{'_ztsnr' if zt else ''}"] = Diffusion(schedule, "v", zero_terminal_snr=zt).path
    return paths


def gaussian() -> GaussianMixture:
    q = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=F64))[0]
    eig = torch.tensor([0.05, 0.3, 1.0, 2.5], dtype=F64)
    return GaussianMixture.gaussian([1.0, -0.5, 0.0, 2.0], q @ torch.diag(eig) @ q.T)


def exact_net(objective, data: GaussianMixture, x0_of=None):
    """A 'network' for ``objective``: receives t·time_scale, returns the objective's prediction made
    from (x̂0, ε̂) = the exact posterior means, or from ``x0_of(x_t, α)`` when given (a fixed
    estimator, with ε̂ = (x_t − α·x̂0)/σ its consistent noise reading)."""
    path = objective.path

    def net(x_t, t_scaled, cond):
        t = t_scaled / objective.time_scale
        alpha, sigma = (a[:, None] for a in path.alpha_sigma(t))
        if x0_of is None:
            x0, eps = data.posterior_means(path, x_t, t)
        else:
            x0 = x0_of(x_t, alpha)
            eps = (x_t - alpha * x0) / sigma
        if objective.prediction == "velocity":
            return velocity_from_predictions(path, t, x0, eps)
        return from_x0_eps(objective.prediction, x0, eps, alpha, sigma)

    return net


# ----------------------------------------------------------------------------- the bisection


@pytest.mark.parametrize("name", list(all_paths()))
def test_bisection_finds_requested_log_snr(name):
    path = all_paths()[name]
    lo, hi = (float(v) for v in log_snr(path, torch.tensor([1.0, 0.0], dtype=F64)))
    grid = [lam for lam in (-9.0, -6.0, *LOG_SNRS, 6.0, 7.0) if lo < lam < hi]
    assert set(LOG_SNRS) <= set(grid), f"{name} does not cover the default grid ({lo:.2f}, {hi:.2f})"
    t = time_for_log_snr(path, grid)
    assert (log_snr(path, t) - torch.tensor(grid, dtype=F64)).abs().max() < 1e-6
    assert (t.diff() < 0).all() and ((t > 0) & (t < 1)).all()  # λ decreasing in t


def test_bisection_matches_rectified_flow_closed_form():
    # α = 1 − t, σ = t: λ = 2·log((1 − t)/t)  ⇒  t = 1 / (1 + e^{λ/2})
    t = time_for_log_snr(LinearPath(), LOG_SNRS)
    expected = torch.tensor([1 / (1 + math.exp(lam / 2)) for lam in LOG_SNRS], dtype=F64)
    torch.testing.assert_close(t, expected, rtol=0, atol=1e-12)


def test_log_snr_outside_the_path_is_an_error():
    eps = preset("diffusion_eps")  # linear β, no zero terminal SNR: λ(1) ≈ −10.1
    with pytest.raises(ValueError, match="outside this path's range"):
        time_for_log_snr(eps.path, [-12.0, 0.0])


# ----------------------------------------------------------------------------- the exact denoiser


def _errors(name: str, data: GaussianMixture, n: int, x0_of=None) -> torch.Tensor:
    objective = preset(name)
    x0 = data.sample(n, torch.Generator().manual_seed(0))  # (n, d) float64
    return matched_snr_x0_error(objective, exact_net(objective, data, x0_of), x0, None, LOG_SNRS,
                                torch.Generator().manual_seed(1), per_sample=True)  # (L, n)


def test_exact_gaussian_posterior_error_is_the_posterior_variance_for_every_objective():
    data, n = gaussian(), 20000
    eig = data.eigvals[0]  # (d,)
    analytic = torch.tensor([(eig / (1 + math.exp(lam) * eig)).mean().item() for lam in LOG_SNRS], dtype=F64)
    per_objective = {name: _errors(name, data, n) for name in ABLATION_OBJECTIVES}
    reference = per_objective["rectified_flow"].mean(1)
    for name, err in per_objective.items():
        mean, stderr = err.mean(1), err.std(1) / math.sqrt(n)
        assert ((mean - analytic).abs() < 4 * stderr).all(), f"{name}: {mean.tolist()} vs {analytic.tolist()}"
        # same x0, same ε, same λ: the same observation x_t/α, hence the same number up to rounding
        torch.testing.assert_close(mean, reference, rtol=1e-8, atol=0)


def test_exact_mixture_error_agrees_across_objectives():
    # bimodal data: E[x0 | x_t] is non-linear in x_t, and still depends on λ alone
    data = GaussianMixture([0.3, 0.7], [[-2.0, 0.0], [1.5, 1.0]], torch.stack([torch.eye(2) * 0.1, torch.eye(2) * 0.4]))
    errors = {name: _errors(name, data, 4000).mean(1) for name in ABLATION_OBJECTIVES}
    for name, err in errors.items():
        torch.testing.assert_close(err, errors["rectified_flow"], rtol=1e-8, atol=0, msg=name)
    err = errors["rectified_flow"]
    assert (err.diff() < 0).all()  # more signal, less error
    assert err[0] < data.cov().diagonal().mean()  # better than the prior mean, even at λ = −4


def test_a_fixed_estimator_scores_the_same_through_every_parametrisation():
    # x̂0 = the data mean whatever x_t: the error is tr(Σ)/d at every λ, once read back through the
    # objective's own prediction (ε, v, velocity) and `predictions_from_velocity`
    data, n = gaussian(), 4000
    mean = data.mean()
    errors = {name: _errors(name, data, n, x0_of=lambda x_t, a: mean.expand_as(x_t)) for name in ABLATION_OBJECTIVES}
    expected = ((data.sample(n, torch.Generator().manual_seed(0)) - mean) ** 2).mean()
    for name, err in errors.items():
        torch.testing.assert_close(err.mean(1), expected.expand(len(LOG_SNRS)), rtol=1e-8, atol=1e-10, msg=name)


def test_same_generator_seed_same_numbers_other_seed_other_numbers():
    data = gaussian()
    objective = preset("diffusion_v")
    x0 = data.sample(64, torch.Generator().manual_seed(0))
    net = exact_net(objective, data)
    run = lambda seed: matched_snr_x0_error(objective, net, x0, None, LOG_SNRS, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


def test_metric_names():
    assert [metric_name(v) for v in (-4.0, 0.0, 2.5)] == ["eval/x0_mse_lsnr-4", "eval/x0_mse_lsnr0",
                                                          "eval/x0_mse_lsnr2.5"]


# ----------------------------------------------------------------------------- the callback


def test_callback_logs_matched_snr_errors_to_mlflow(out_dir):
    overrides = ["callbacks=ablation", "trainer.max_steps=2", "callbacks.samples.every_n_steps=0",
                 "data.num_videos=8", "callbacks.denoising.num_clips=6", "callbacks.denoising.batch_size=4",
                 "callbacks.denoising.data.num_videos=6", "callbacks.denoising.every_n_steps=1"]
    composed = compose("smoke", overrides)
    result = run_fit(composed)
    run = MlflowClient(tracking_uri(composed.cfg)).get_run(result.run_id)
    names = [metric_name(v) for v in LOG_SNRS] + ["eval/x0_mse"]
    assert set(names) <= set(run.data.metrics)
    assert all(math.isfinite(run.data.metrics[k]) and run.data.metrics[k] > 0 for k in names)
    history = MlflowClient(tracking_uri(composed.cfg)).get_metric_history(result.run_id, "eval/x0_mse")
    assert sorted(m.step for m in history) == [1, 2]  # every step, and not twice at the end


def test_callback_is_deterministic_and_uses_held_out_clips(out_dir):
    composed = compose("smoke", ["callbacks=ablation", "callbacks.denoising.num_clips=4",
                                 "callbacks.denoising.data.num_videos=4"])
    system = build_system(composed)
    callback = next(cb for cb in build_callbacks(composed) if isinstance(cb, DenoisingError))
    datamodule = build_datamodule(composed)
    datamodule.prepare_data()
    datamodule.setup("fit")
    trainer = SimpleNamespace(precision_plugin=Precision(), datamodule=datamodule)  # what the callback reads

    first, second = callback.evaluate(trainer, system), callback.evaluate(trainer, system)
    assert first == second and set(first) == {*(metric_name(v) for v in LOG_SNRS), "eval/x0_mse"}
    videos, captions = callback.clips(trainer)
    assert videos.shape == (4, 3, 4, 16, 16) and len(captions) == 4
    assert callback.data.dataset.root != datamodule.dataset.root  # rendered with its own seed
    assert not any(torch.equal(videos[0], datamodule.dataset[i]["video"]) for i in range(len(datamodule.dataset)))
