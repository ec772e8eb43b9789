"""optim.schedule: warm-up then constant, cosine or linear decay over trainer.max_steps, checked
against torch's own schedulers (CosineAnnealingLR's closed form, LinearLR) and through a real fit."""

from __future__ import annotations

import math

import pytest
import torch

from experiments.config import ConfigError, compose
from experiments.fit import run_fit
from modules.system import OptimConfig, lr_schedule


def _lrs(cfg: OptimConfig, total: int, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    schedule = lr_schedule(opt, cfg, total)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    return out


@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_cosine_equals_torch_cosine_annealing(floor):
    """Same lr at every step as CosineAnnealingLR (no warm-up), and the floor after the end."""
    cfg = OptimConfig(lr=2e-3, schedule="cosine", min_lr_ratio=floor)
    total = 37
    ours = _lrs(cfg, total, total + 5)  # past the end it stays at the floor
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=floor * cfg.lr)
    theirs = []
    for _ in range(total + 1):  # torch's recursive form; its period ends at T_max
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert ours[: total + 1] == pytest.approx(theirs, rel=1e-9, abs=1e-15)
    assert ours[total:] == pytest.approx([floor * cfg.lr] * 5, abs=1e-15)


def test_linear_equals_torch_linear_lr():
    cfg = OptimConfig(lr=1e-3, schedule="linear", min_lr_ratio=0.25)
    total = 20
    ours = _lrs(cfg, total, total + 3)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    ref = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.25, total_iters=total)
    theirs = []
    for _ in range(total + 3):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert ours == pytest.approx(theirs, rel=1e-9)


def test_warmup_then_cosine_piecewise():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine")
    total = 14
    ours = _lrs(cfg, total, total + 1)
    expected = [(s + 1) / 5 for s in range(4)] + [0.5 * (1 + math.cos(math.pi * (s - 4) / 10)) for s in range(4, 15)]
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-15)
    constant = _lrs(OptimConfig(lr=1.0, warmup_steps=4), -1, 8)  # the schedule before decays existed
    assert constant == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0])


def test_decay_needs_max_steps_and_known_names():
    with pytest.raises(ValueError, match=r"optim.schedule must be one of constant \| cosine \| linear, got 'cosin'"):
        OptimConfig(schedule="cosin")
    with pytest.raises(ValueError, match=r"optim.min_lr_ratio must be in \[0, 1\], got 1.5"):
        OptimConfig(min_lr_ratio=1.5)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match="trainer.max_steps = -1"):
        lr_schedule(opt, OptimConfig(schedule="linear"), -1)


def test_autoencoder_fit_ends_at_the_floor(out_dir):
    """A real `vidlab fit` (manual optimisation, two schedulers' worth of plumbing): the generator
    optimiser's lr in the final checkpoint, after max_steps scheduler steps, is the floor."""
    composed = compose("vae_smoke", ["optim.schedule=cosine", "optim.min_lr_ratio=0.2", "optim.warmup_steps=2",
                                     "callbacks.reconstructions=null", "callbacks.latent_stats=null"])
    result = run_fit(composed)
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    assert state["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.2 * 1e-3, rel=1e-9)
    # the lr_monitor callback logs, under step s, the lr of step s + 1 (log_every_n_steps 2: s = 1, 3, 5)
    _assert_logged_lrs(composed, result.run_id, OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine",
                                                            min_lr_ratio=0.2), total=6)


def test_generator_fit_logs_the_lr_of_every_step(out_dir):
    composed = compose("smoke", ["optim.schedule=linear", "optim.warmup_steps=3", "trainer.max_steps=8",
                                 "trainer.log_every_n_steps=1", "callbacks.samples=null",
                                 "callbacks.timestep_loss=null", "callbacks.model_card=null"])
    result = run_fit(composed)
    _assert_logged_lrs(composed, result.run_id, OptimConfig(lr=composed.cfg["optim"]["lr"], warmup_steps=3,
                                                            schedule="linear"), total=8)


def _assert_logged_lrs(composed, run_id: str, cfg: OptimConfig, total: int) -> None:
    """MLflow's `train/lr` at step s (s optimizer steps done) is the lr of the next optimizer step: the
    closed form of `lr_schedule` at s."""
    from mlflow.tracking import MlflowClient

    from experiments.tracking import tracking_uri

    history = MlflowClient(tracking_uri(composed.cfg)).get_metric_history(run_id, "train/lr")
    logged = {m.step: m.value for m in history}
    every = composed.cfg["trainer"]["log_every_n_steps"]
    assert sorted(logged) == list(range(every - 1, total, every)), sorted(logged)
    expected = _lrs(cfg, total, total)
    assert [logged[s] for s in sorted(logged)] == pytest.approx([expected[s] for s in sorted(logged)], rel=1e-6)


def test_decay_without_max_steps_is_a_config_error(out_dir):
    with pytest.raises(ConfigError, match=r"\[optim\]: optim.schedule: cosine decays over trainer.max_steps, which "
                                          r"must be set and exceed optim.warmup_steps; got trainer.max_steps = -1"):
        run_fit(compose("vae_smoke", ["optim.schedule=cosine", "trainer.max_steps=-1", "trainer.max_time=00:00:01:00"]))
    assert not out_dir.exists()  # refused before anything was written
