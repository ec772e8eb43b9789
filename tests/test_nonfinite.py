"""``optim.nonfinite``: a NaN/Inf loss or gradient stops training (weights and checkpoints of the last
finite step kept) or skips the batch (weights untouched, counted in ``train/nonfinite_skipped``).

The smoke experiment is trained through `experiments.fit.run_fit` as is; the tests only wrap the built
backbone so that its output (or the gradient flowing into it) is NaN at chosen global steps, and add
a callback that snapshots the weights before every step."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from mlflow.tracking import MlflowClient

import experiments.fit as fit
from experiments.build import build_system
from experiments.cli import main
from experiments.config import ConfigError, compose
from experiments.tracking import tracking_uri
from modules.system import NonFiniteLossError

REPO = Path(__file__).resolve().parents[1]
QUIET = ["callbacks.samples=null", "callbacks.timestep_loss=null", "callbacks.model_card=null"]


def poison(system: L.LightningModule, steps: dict[int, str], rank: int | None = None) -> None:
    """Make the training forward of ``system.backbone`` NaN at global step k (``"loss"``), or its
    gradient NaN with a finite loss (``"grad"``); only on global rank ``rank`` when given."""
    forward = system.backbone.forward

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = forward(*args, **kwargs)
        kind = steps.get(system.global_step) if system.training and torch.is_grad_enabled() else None
        if kind is None or (rank is not None and system.global_rank != rank):
            return out
        if kind == "loss":
            return out * float("nan")
        out.register_hook(lambda g: g * float("nan"))
        return out

    system.backbone.forward = poisoned


class Snapshots(L.Callback):
    """The trainable weights before every training step: ``before[k]`` at global step k (and at the end)."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}

    def _take(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.before[trainer.global_step] = {
            n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self._take(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._take(trainer, module)


def _patch(monkeypatch: pytest.MonkeyPatch, steps: dict[int, str]) -> Snapshots:
    snapshots = Snapshots()

    def build_poisoned(composed: Any) -> L.LightningModule:
        system = build_system(composed)
        poison(system, steps)
        return system

    build_callbacks = fit.build_callbacks
    monkeypatch.setattr(fit, "build_system", build_poisoned)
    monkeypatch.setattr(fit, "build_callbacks", lambda composed: [*build_callbacks(composed), snapshots])
    return snapshots


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def _state_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t for n, t in state.items() if torch.is_floating_point(t)}


def test_skip_leaves_weights_untouched_and_counts(out_dir, monkeypatch, caplog):
    poisoned = {5: "loss", 8: "grad", 9: "loss"}  # 9: a step train/loss is logged at (every 5)
    snapshots = _patch(monkeypatch, poisoned)
    composed = compose("smoke", ["optim.nonfinite=skip", "trainer.max_steps=12", *QUIET])
    with caplog.at_level(logging.WARNING, logger="vidlab.train"):
        result = fit.run_fit(composed)

    client = MlflowClient(tracking_uri(composed.cfg))
    assert client.get_run(result.run_id).info.status == "FINISHED"
    history = sorted(client.get_metric_history(result.run_id, "train/nonfinite_skipped"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(5, 1.0), (8, 2.0), (9, 3.0)]
    losses = {m.step: m.value for m in client.get_metric_history(result.run_id, "train/loss")}
    assert sorted(losses) == [4, 9] and math.isnan(losses[9]) and math.isfinite(losses[4])  # logged as it was
    warnings = [r.getMessage() for r in caplog.records if r.name == "vidlab.train"]
    assert len(warnings) == 3
    assert "train/loss is nan at step 5" in warnings[0] and "skipped (optim.nonfinite=skip)" in warnings[0]
    assert "gradients are NaN/Inf" in warnings[1] and "at step 8" in warnings[1] and "backbone." in warnings[1]

    # every step ran; the poisoned ones changed nothing, the others did
    assert sorted(snapshots.before) == list(range(13))
    for k in range(12):
        assert _same(snapshots.before[k], snapshots.before[k + 1]) == (k in poisoned), k
    ckpt = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 12
    weights = _state_weights(ckpt["state_dict"])
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    # AdamW's moments and step count were not advanced by the skipped batches
    steps = {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert steps == {12.0 - len(poisoned)}


def test_stop_raises_naming_the_step_and_keeps_the_checkpoints(out_dir, monkeypatch):
    snapshots = _patch(monkeypatch, {12: "loss"})
    composed = compose("smoke", ["checkpoint.every_n_steps=5", "checkpoint.keep_last=2", *QUIET])
    assert composed.cfg["optim"]["nonfinite"] == "stop"  # the default
    with pytest.raises(NonFiniteLossError) as err:
        fit.run_fit(composed)

    message = str(err.value)
    ckpt_dir = next((out_dir / "checkpoints").iterdir())
    assert message.startswith("train/loss is nan at step 12 (batch 4 of epoch 1): stopped")
    assert f"the last checkpoint is {ckpt_dir / 'last.ckpt'}" in message
    assert "optim.nonfinite=skip" in message
    assert max(snapshots.before) == 12  # no step after the poisoned one

    client = MlflowClient(tracking_uri(composed.cfg))
    run = client.get_run(ckpt_dir.name)
    assert run.info.status == "FAILED"
    assert run.data.metrics["train/nonfinite_skipped"] == 1.0

    # the checkpoints written before are intact: finite, and the weights of their step
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt", "step000005.ckpt", "step000010.ckpt"]
    for path, step in [("step000005.ckpt", 5), ("step000010.ckpt", 10), ("last.ckpt", 10)]:
        ckpt = torch.load(ckpt_dir / path, map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == step, path
        weights = _state_weights(ckpt["state_dict"])
        assert all(torch.isfinite(t).all() for t in weights.values()), path
        assert _same({n: weights[n] for n in snapshots.before[step]}, snapshots.before[step]), path


def test_invalid_choice_is_a_config_error_naming_the_key(out_dir, capsys):
    composed = compose("smoke", ["optim.nonfinite=ignore"])
    with pytest.raises(ConfigError, match=r"\[optim\].*optim\.nonfinite must be one of stop \| skip, got 'ignore'"):
        build_system(composed)
    assert main(["fit", "smoke", "optim.nonfinite=ignore"]) == 2
    assert "optim.nonfinite must be one of stop | skip" in capsys.readouterr().err


SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
import experiments.fit as fit
from experiments.config import compose
from test_nonfinite import poison

build = fit.build_system

def build_poisoned(composed):
    system = build(composed)
    poison(system, {{3: "loss"}}, rank=1)  # one rank only: every rank must still act together
    return system

fit.build_system = build_poisoned
fit.run_fit(compose("smoke", sys.argv[1:]))
"""


@pytest.mark.parametrize("strategy,mode", [("ddp", "skip"), ("fsdp", "stop")])
def test_two_ranks_decide_together(tmp_path, strategy, mode):
    """A NaN loss on rank 1 only: with skip both ranks skip (no hang, finite weights), with stop both
    ranks stop at that step."""
    out = tmp_path / "outputs"
    script = tmp_path / "poisoned_fit.py"
    script.write_text(SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests")))
    env = {**os.environ, "VIDLAB_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [f"name={strategy}", f"optim.nonfinite={mode}", "trainer.max_steps=6", "trainer.devices=2",
            f"trainer.strategy={strategy}", "data.batch_size=2", "data.num_videos=16", *QUIET]
    proc = subprocess.run([sys.executable, str(script), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("vidlab").experiment_id])
    assert run.data.metrics["train/nonfinite_skipped"] == 1.0, log
    # rank 0's own loss was finite: it acted on rank 1's flag
    assert "train/loss is NaN/Inf on 1 of 2 ranks (this rank: " in proc.stderr, log
    ckpt_dir = out / "checkpoints" / run.info.run_id
    if mode == "skip":
        assert proc.returncode == 0, log
        assert run.info.status == "FINISHED"
        ckpt = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == 6
        assert all(torch.isfinite(t).all() for t in _state_weights(ckpt["state_dict"]).values())
    else:
        assert proc.returncode != 0, log
        assert "NonFiniteLossError: train/loss is nan on 1 of 2 ranks at step 3" in proc.stderr, log
        assert run.info.status == "FAILED"
        assert not (ckpt_dir / "last.ckpt").exists()  # none written before step 3 (every_n_steps 10)
