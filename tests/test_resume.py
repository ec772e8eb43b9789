"""Kill -9 a training run at a random step, resume it with ``vidlab fit --resume``: the loss of every
step equals the uninterrupted run's bit for bit, so do the final EMA weights, and the metrics continue
in the same MLflow run; on one process, two DDP processes and two FSDP2 processes (CPU, gloo)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments.export import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
STEPS = 12  # smoke: 32 clips / batch 4 = 8 steps per epoch, so the runs cross an epoch boundary
ARGS = [f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=1",
        "callbacks.samples=null", "callbacks.timestep_loss=null", "callbacks.model_card=null",
        "ema.enabled=true", "ema.decay=0.9"]  # the EMA must survive the kill too


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "experiments.cli", *args]


def _env(out: Path) -> dict[str, str]:
    env = {**os.environ, "VIDLAB_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run(out: Path, name: str) -> MlflowClient:
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vidlab").experiment_id],
                              filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1
    return runs[0]


def _losses(out: Path, run_id: str) -> dict[int, float]:
    """The last logged train/loss of every step (a resumed run logs the steps after its checkpoint again)."""
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in history}


DDP = ["data.batch_size=2", "trainer.devices=2", "trainer.strategy=ddp"]  # the same global batch
FSDP = ["data.batch_size=2", "trainer.devices=2", "trainer.strategy=fsdp"]  # sharded checkpoints (folders)


@pytest.mark.parametrize("extra", [[], DDP, FSDP], ids=["one_process", "ddp_2_processes", "fsdp_2_processes"])
def test_kill_9_then_resume_repeats_the_uninterrupted_losses_exactly(tmp_path, extra):
    out = tmp_path / "outputs"
    args = [*ARGS, *extra]
    done = subprocess.run(_cmd("fit", "smoke", "name=whole", *args), env=_env(out), cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    whole = _losses(out, _run(out, "whole").info.run_id)
    assert sorted(whole) == list(range(1, STEPS + 1)) or len(whole) == STEPS

    # a different step on different runs (both epochs: 8 steps per epoch); VIDLAB_TEST_KILL_AT pins it
    kill_after = int(os.environ.get("VIDLAB_TEST_KILL_AT", 0)) or random.Random(os.getpid()).randint(3, 10)
    proc = subprocess.Popen(_cmd("fit", "smoke", "name=killed", *args), env=_env(out), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list(out.glob(f"checkpoints/*/step{kill_after:06d}.ckpt")):
            os.killpg(proc.pid, signal.SIGKILL)  # every rank of the job at once
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before step {kill_after} was checkpointed"
    killed = _run(out, "killed")
    assert killed.info.status == "RUNNING"  # died without finishing its MLflow run
    before = _losses(out, killed.info.run_id)
    assert max(before) < STEPS
    last = out / "checkpoints" / killed.info.run_id / "last.ckpt"
    resume_step = read_checkpoint(last)["global_step"]
    assert 1 <= resume_step < STEPS  # last.ckpt is written after step{k}.ckpt: a kill in between resumes from k - 1

    resumed = subprocess.run(_cmd("fit", "--resume", killed.info.run_id), env=_env(out), cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _losses(out, killed.info.run_id)
    assert after == whole, {s: (whole[s], after.get(s)) for s in whole if whole[s] != after.get(s)}
    # it continued from the checkpoint, not from step 0 (which, seeded, would log the same losses):
    # no step up to the checkpoint was trained again
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    logged = [m.step for m in client.get_metric_history(killed.info.run_id, "train/loss")]
    assert all(logged.count(step) == 1 for step in range(1, resume_step + 1)), sorted(logged)
    assert _run(out, "killed").info.status == "FINISHED"
    final = {name: read_checkpoint(out / "checkpoints" / _run(out, name).info.run_id / "last.ckpt")["state_dict"]
             for name in ("whole", "killed")}
    averages = [k for k in final["whole"] if k.startswith("ema.")]
    assert averages and all(torch.equal(final["whole"][k], final["killed"][k]) for k in averages)
    print(f"killed after step {kill_after}, resumed from step {resume_step} to {STEPS}")
