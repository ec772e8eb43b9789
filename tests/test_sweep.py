"""A sweep is one parent run with a child per arm; a killed sweep resumes without redoing arms."""

from __future__ import annotations

import copy
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from rich.console import Console

from experiments.arms import identity_alive, is_distributed, process_identity
from experiments.config import ConfigError, compose
from experiments.fit import run_fit
from experiments.sweep import SweepBusyError, load_ablation, run_sweep
from experiments.tracking import tracking_uri

ABLATION = """
name: tiny
experiment: smoke
overrides: [trainer.max_steps=2, callbacks.samples.every_n_steps=0, data.num_videos=8]
grid:
  objective: [rectified_flow, rectified_flow_lognorm]
  optim.lr: [0.001]
seeds: [0]
"""


def test_arms_are_the_grid_times_seeds(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(ABLATION.replace("seeds: [0]", "seeds: [0, 1]"))
    arms = load_ablation(path).arms()
    assert [a.key for a in arms] == [
        "objective=rectified_flow,optim.lr=0.001,seed=0", "objective=rectified_flow,optim.lr=0.001,seed=1",
        "objective=rectified_flow_lognorm,optim.lr=0.001,seed=0",
        "objective=rectified_flow_lognorm,optim.lr=0.001,seed=1",
    ]
    assert arms[1].overrides[-3:] == ["objective=rectified_flow", "optim.lr=0.001", "seed=1"]


def test_zipped_axes_go_together_and_cross_the_grid(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(ABLATION.replace("  optim.lr: [0.001]\n", "") + "zip:\n  vae: [identity, identity]\n  data.num_frames: [4, 8]\n")
    arms = load_ablation(path).arms()
    assert [a.key for a in arms] == [
        "vae=identity,data.num_frames=4,objective=rectified_flow,seed=0",
        "vae=identity,data.num_frames=4,objective=rectified_flow_lognorm,seed=0",
        "vae=identity,data.num_frames=8,objective=rectified_flow,seed=0",
        "vae=identity,data.num_frames=8,objective=rectified_flow_lognorm,seed=0",
    ]
    assert compose("smoke", arms[3].overrides).cfg["data"]["num_frames"] == 8
    path.write_text(ABLATION + "zip:\n  vae: [identity]\n  data.num_frames: [4, 8]\n")
    with pytest.raises(ConfigError, match="one length"):
        load_ablation(path)


def test_ablation_typo_names_nearest_key(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(ABLATION.replace("seeds:", "seed:"))
    with pytest.raises(ConfigError, match=r"unknown key 'seed'; did you mean 'seeds'"):
        load_ablation(path)


def test_interrupted_sweep_resumes_without_redoing_arms(tmp_path, out_dir):
    path = tmp_path / "tiny.yaml"
    path.write_text(ABLATION)
    calls: list[str] = []

    def killed_after_first_arm(composed, run_id=None, tags=None):
        if calls:
            raise KeyboardInterrupt  # as if the process were stopped during the second arm
        calls.append(tags["vidlab.arm"])
        return run_fit(composed, run_id=run_id, tags=tags)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(path, fit=killed_after_first_arm)
    assert calls == ["objective=rectified_flow,optim.lr=0.001,seed=0"]

    resumed: list[str] = []

    def counting(composed, run_id=None, tags=None):
        resumed.append(tags["vidlab.arm"])
        return run_fit(composed, run_id=run_id, tags=tags)

    results = run_sweep(path, fit=counting)
    assert resumed == ["objective=rectified_flow_lognorm,optim.lr=0.001,seed=0"]
    assert [r.status for r in results] == ["SKIPPED", "FINISHED"]

    client = MlflowClient(tracking_uri(compose("smoke").cfg))
    parents = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                 filter_string="tags.`vidlab.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([parents[0].info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    by_status = sorted((c.data.tags["vidlab.arm"], c.info.status) for c in children)
    assert by_status == [
        ("objective=rectified_flow,optim.lr=0.001,seed=0", "FINISHED"),
        ("objective=rectified_flow_lognorm,optim.lr=0.001,seed=0", "FINISHED"),
        ("objective=rectified_flow_lognorm,optim.lr=0.001,seed=0", "KILLED"),
    ]
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert {c.data.tags["vidlab.axis.objective"] for c in finished} == {"rectified_flow", "rectified_flow_lognorm"}
    assert all(c.data.params["trainer.max_steps"] == "2" for c in finished)
    assert all(len(c.data.tags.get("mlflow.source.git.commit", "")) == 40 for c in finished), "child runs lack the commit"


def test_failed_arm_is_recorded_and_others_continue(tmp_path, out_dir):
    path = tmp_path / "fail.yaml"
    path.write_text(ABLATION)

    def first_fails(composed, run_id=None, tags=None):
        if tags["vidlab.axis.objective"] == "rectified_flow":
            raise RuntimeError("boom")
        return run_fit(composed, run_id=run_id, tags=tags)

    results = run_sweep(path, fit=first_fails)
    assert [r.status for r in results] == ["FAILED", "FINISHED"]
    assert results[0].error == "RuntimeError: boom"
    client = MlflowClient(tracking_uri(compose("smoke").cfg))
    assert client.get_run(results[0].run_id).data.tags["vidlab.error"] == "RuntimeError: boom"


# -- per-arm overrides ------------------------------------------------------------------------------

FAST = ("[trainer.max_steps=2, trainer.log_every_n_steps=1, callbacks.samples=null, callbacks.timestep_loss=null, "
        "callbacks.model_card=null, data.num_videos=8]")
PER_ARM = f"""
name: per_arm
experiment: smoke
overrides: {FAST}
grid:
  objective: [rectified_flow, rectified_flow_lognorm]
  optim.lr: [0.001, 0.002]
per_arm:
  - match: {{objective: rectified_flow_lognorm}}
    overrides: [data.batch_size=2]
  - match: {{objective: rectified_flow_lognorm, optim.lr: 2e-3}}   # 2e-3 is the axis value 0.002
    overrides: [data.batch_size=1, optim.warmup_steps=1]
"""


def _children(client: MlflowClient, results) -> list:
    parent = client.get_run(results[0].run_id).data.tags["mlflow.parentRunId"]
    return client.search_runs([client.get_run(parent).info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def test_per_arm_overrides_land_in_the_matching_arms(tmp_path, out_dir):
    path = tmp_path / "per_arm.yaml"
    path.write_text(PER_ARM.replace("trainer.max_steps=2", "trainer.max_steps=1"))
    results = run_sweep(path)
    assert [r.status for r in results] == ["FINISHED"] * 4
    client = MlflowClient(tracking_uri(compose("smoke").cfg))
    params = {c.data.tags["vidlab.arm"]: (c.data.params["data.batch_size"], c.data.params["optim.warmup_steps"],
                                          c.data.tags.get("vidlab.arm_overrides"))
              for c in _children(client, results)}
    assert params == {  # the later entry wins where both match; an arm's key is its axis values only
        "objective=rectified_flow,optim.lr=0.001,seed=0": ("4", "0", None),
        "objective=rectified_flow,optim.lr=0.002,seed=0": ("4", "0", None),
        "objective=rectified_flow_lognorm,optim.lr=0.001,seed=0": ("2", "0", "data.batch_size=2"),
        "objective=rectified_flow_lognorm,optim.lr=0.002,seed=0":
            ("1", "1", "data.batch_size=2 data.batch_size=1 optim.warmup_steps=1"),
    }


@pytest.mark.parametrize("entry, message", [
    ("- match: {objective: rectified_flow}\n    overide: [data.batch_size=2]",
     r"per_arm\[0\]: unknown key 'overide'; did you mean 'overrides'\?"),
    ("- match: {objectiv: rectified_flow}\n    overrides: [data.batch_size=2]",
     r"per_arm\[0\]: match key 'objectiv' is not an axis of this ablation; did you mean 'objective'\?"),
    ("- match: {objective: rectified_flw}\n    overrides: [data.batch_size=2]",
     r"per_arm\[0\]: axis 'objective' has no value 'rectified_flw'; did you mean 'rectified_flow'\?"),
    ("- match: {objective: rectified_flow}\n    overrides: data.batch_size=2",
     r"per_arm\[0\]: 'overrides' must be a non-empty list of key=value strings"),
], ids=["entry_key", "axis", "value", "not_a_list"])
def test_per_arm_mistakes_name_the_entry_and_the_nearest_valid_word(tmp_path, entry, message):
    path = tmp_path / "a.yaml"
    path.write_text(PER_ARM.split("per_arm:")[0] + "per_arm:\n  " + entry + "\n")
    with pytest.raises(ConfigError, match=message):
        load_ablation(path)


def test_per_arm_entry_matching_no_arm_and_bad_override_stop_before_any_run(tmp_path, out_dir):
    path = tmp_path / "a.yaml"
    zipped = "zip:\n  vae: [identity, identity]\n  data.num_frames: [4, 8]\n"
    path.write_text(ABLATION + zipped + "per_arm:\n  - match: {data.num_frames: 4, objective: rectified_flow}\n"
                    "    overrides: [optim.lr=0.01]\n")
    assert [a.extra for a in load_ablation(path).arms()] == [["optim.lr=0.01"], [], [], []]
    path.write_text(ABLATION + "jobs: 0\n")
    with pytest.raises(ConfigError, match="'jobs' .* must be a positive integer, got 0"):
        load_ablation(path)
    path.write_text(PER_ARM.replace("data.batch_size=1", "data.batch_sise=1"))
    arm = "objective=rectified_flow_lognorm,optim.lr=0.002,seed=0"
    with pytest.raises(ConfigError, match=re.escape(f"{path}: arm [{arm}]: unknown key 'data.batch_sise'")):
        run_sweep(path, fit=_no_fit)
    assert not out_dir.exists()  # composed every arm before creating anything


def _no_fit(*args, **kwargs):
    raise AssertionError("no arm may train in this process")


# -- arms as processes: N at a time, failures, re-runs ----------------------------------------------

JOBS = f"""
name: jobs
experiment: smoke
overrides: {FAST}
grid:
  objective: [rectified_flow, rectified_flow_lognorm, diffusion_eps]
per_arm:
  - match: {{objective: rectified_flow_lognorm}}
    overrides: [data.batch_size=2]
  - match: {{objective: diffusion_eps}}          # composes, but the class does not exist: fails when built
    overrides: [backbone._target_=modules.backbones.nope.Nope]
"""
RF, LOGNORM, EPS = (f"objective={o},seed=0" for o in ("rectified_flow", "rectified_flow_lognorm", "diffusion_eps"))


def _store(out: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{out / 'mlflow.db'}")


def _losses(client: MlflowClient, results) -> dict[str, float]:
    return {r.arm.key: client.get_run(r.run_id).data.metrics["train/loss"] for r in results if r.status == "FINISHED"}


def test_two_arms_at_a_time_as_processes_with_a_failing_arm_and_a_rerun(tmp_path, monkeypatch):
    path = tmp_path / "jobs.yaml"
    path.write_text(JOBS)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    # the same arms one after another in this process: the reference losses
    monkeypatch.setenv("VIDLAB_OUTPUT_DIR", str(tmp_path / "sequential"))
    sequential = run_sweep(path)
    assert [r.status for r in sequential] == ["FINISHED", "FINISHED", "FAILED"]
    assert all(r.log_file is None for r in sequential)

    out = tmp_path / "parallel"
    monkeypatch.setenv("VIDLAB_OUTPUT_DIR", str(out))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # Lightning's MLFlowLogger exported the first store
    shown = io.StringIO()
    results = run_sweep(path, fit=_no_fit, jobs=2, console=Console(file=shown, width=400))
    assert [r.status for r in results] == ["FINISHED", "FINISHED", "FAILED"]
    client = _store(out)
    runs = {r.arm.key: client.get_run(r.run_id) for r in results}
    # the first two ran at once: each started before the other ended
    rf, lognorm = runs[RF].info, runs[LOGNORM].info
    assert rf.start_time < lognorm.end_time and lognorm.start_time < rf.end_time
    assert _losses(client, results) == pytest.approx(_losses(_store(tmp_path / "sequential"), sequential), rel=1e-6)
    assert runs[LOGNORM].data.params["data.batch_size"] == "2"
    # the failed arm: its error from inside its process, its log on disk and in the run
    failed = runs[EPS]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["vidlab.error"].startswith("ConfigError: ")
    assert "No module named 'modules.backbones.nope'" in failed.data.tags["vidlab.error"]
    assert results[2].error == failed.data.tags["vidlab.error"]
    for r in results:
        log = Path(r.log_file)
        assert log.parent == out / "sweeps" / f"jobs-{load_ablation(path).fingerprint}" and log.is_file()
        assert runs[r.arm.key].data.tags["vidlab.log_file"] == str(log)
        assert [a.path for a in client.list_artifacts(r.run_id, "logs")] == [f"logs/{log.name}"]
        assert runs[r.arm.key].data.tags["vidlab.threads"] == "1"  # min(cores // 2, OMP_NUM_THREADS=1)
        assert runs[r.arm.key].data.tags["vidlab.arm"] == r.arm.key
        assert runs[r.arm.key].info.run_name == f"jobs[{r.arm.key}]"
    assert "No module named" in Path(results[2].log_file).read_text()
    # progress: arm k of N, elapsed, and an ETA once an arm has finished
    text = shown.getvalue()
    assert f"arm 1 of 3: {RF} · started · elapsed 0:00 · ETA ?" in text
    assert re.search(rf"arm 3 of 3: {EPS} · started · elapsed \d+:\d\d · ETA \d+:\d\d", text), text
    assert re.search(rf"arm 3 of 3 FAILED in \d+:\d\d: {EPS} · ConfigError", text), text

    # re-running runs only the failed arm, into a new child run; the failed one stays as it was
    again = run_sweep(path, fit=_no_fit, jobs=2, console=Console(file=io.StringIO()))
    assert [r.status for r in again] == ["SKIPPED", "SKIPPED", "FAILED"]
    assert [r.run_id for r in again[:2]] == [r.run_id for r in results[:2]]
    children = _children(client, results)
    assert sorted((c.data.tags["vidlab.arm"], c.info.status) for c in children) == sorted(
        [(RF, "FINISHED"), (LOGNORM, "FINISHED"), (EPS, "FAILED"), (EPS, "FAILED")])
    assert again[2].run_id != results[2].run_id


def test_killed_arm_with_a_checkpoint_continues_in_its_own_run(tmp_path, out_dir):
    """An arm interrupted after step 1 (its last.ckpt written) continues from that checkpoint into the
    same child run on re-run: step 1 is not trained again, and there is no second child run. A child
    left RUNNING counts as interrupted once the process that trained it is gone, not before."""
    path = tmp_path / "resume.yaml"
    path.write_text(f"name: resume\nexperiment: smoke\noverrides: {FAST}\ngrid:\n  objective: [rectified_flow]\n")

    def killed_after_step_1(composed, run_id=None, tags=None, resume=False):
        short = copy.deepcopy(composed)
        short.cfg["trainer"]["max_steps"] = 1
        run_fit(short, run_id=run_id, tags=tags)
        raise KeyboardInterrupt  # as if stopped right after the checkpoint of step 1

    with pytest.raises(KeyboardInterrupt):
        run_sweep(path, fit=killed_after_step_1)
    client = MlflowClient(tracking_uri(compose("smoke").cfg))
    (killed,) = client.search_runs([client.get_experiment_by_name("vidlab").experiment_id],
                                   filter_string="tags.`vidlab.arm` = 'objective=rectified_flow,seed=0'")
    assert killed.info.status == "KILLED"
    assert (out_dir / "checkpoints" / killed.info.run_id / "last.ckpt").is_file()

    # as if the sweep had died with SIGKILL: the child left RUNNING, tagged with a process that still lives
    client.update_run(killed.info.run_id, status="RUNNING")
    stand_in = subprocess.Popen(["sleep", "60"])
    try:
        client.set_tag(killed.info.run_id, "vidlab.process", process_identity(stand_in.pid))
        with pytest.raises(SweepBusyError, match="objective=rectified_flow,seed=0 is still running in process"):
            run_sweep(path, fit=_no_fit)
    finally:
        stand_in.kill()
        stand_in.wait()
    # ... and now that process is gone: the RUNNING child is unfinished and continues from its checkpoint
    calls = []

    def recording(composed, run_id=None, tags=None, resume=False):
        calls.append((run_id, resume))
        return run_fit(composed, run_id=run_id, tags=tags, resume=resume)

    results = run_sweep(path, fit=recording)
    assert calls == [(killed.info.run_id, True)]
    assert [(r.run_id, r.status) for r in results] == [(killed.info.run_id, "FINISHED")]
    assert len(_children(client, results)) == 1
    steps = sorted(m.step for m in client.get_metric_history(killed.info.run_id, "train/loss"))
    assert steps == [0, 1]  # one point per step (MLflow step = global_step - 1): step 1 not trained again


DDP = f"""
name: ddp
experiment: smoke
overrides: {FAST[:-1]}, data.batch_size=2, trainer.devices=2, trainer.strategy=ddp]
grid:
  objective: [rectified_flow, rectified_flow_lognorm]
jobs: 2                      # distributed arms run alone all the same
"""


def test_distributed_arms_run_alone_as_processes_each_into_its_child_run(tmp_path, out_dir):
    """Two 2-process DDP arms (CPU, gloo): each a `vidlab fit --run-id` process whose second rank
    Lightning's launcher starts; one MLflow run per arm, both ranks' work in it, one arm at a time."""
    path = tmp_path / "ddp.yaml"
    path.write_text(DDP)
    results = run_sweep(path, fit=_no_fit, console=Console(file=io.StringIO()))
    assert [r.status for r in results] == ["FINISHED", "FINISHED"], [r.error for r in results]
    client = _store(out_dir)
    every = client.search_runs([client.get_experiment_by_name("vidlab").experiment_id])
    assert len(every) == 3  # the parent and one child per arm: no rank made a run of its own
    first, second = (client.get_run(r.run_id) for r in results)
    assert first.info.end_time <= second.info.start_time  # alone, although the file says jobs: 2
    for r, run in zip(results, (first, second)):
        assert run.data.params["trainer.devices"] == "2" and run.data.params["trainer.strategy"] == "ddp"
        assert "vidlab.threads" not in run.data.tags  # a distributed arm's threads are Lightning's choice
        assert sorted(m.step for m in client.get_metric_history(r.run_id, "train/loss")) == [0, 1]
        assert "MEMBER: 2/2" in Path(r.log_file).read_text()  # rank 1 ran, its output in the arm's log
        ckpt = torch.load(out_dir / "checkpoints" / r.run_id / "last.ckpt", map_location="cpu", weights_only=True)
        (state,) = [s for s in ckpt["callbacks"].values() if isinstance(s, dict) and "rng" in s]
        assert len(state["rng"]) == 2 and state["global_step"] == 2  # both ranks wrote into the arm's checkpoint


def test_killed_sweep_records_its_running_arms_killed_and_a_rerun_trains_them(tmp_path, out_dir):
    """``kill PID`` of a ``vidlab sweep --jobs 2`` (the sweep only): it stops both arm processes and
    records them and the parent KILLED; re-running the file trains an arm killed before its first
    checkpoint into a fresh child run (the usual case here: the kill comes while they start) and one
    killed after it on in its own run."""
    path = tmp_path / "killed.yaml"
    path.write_text(f"name: killed\nexperiment: smoke\noverrides: {FAST}\ngrid:\n"
                    "  objective: [rectified_flow, rectified_flow_lognorm]\njobs: 2\n")
    env = {**os.environ, "VIDLAB_OUTPUT_DIR": str(out_dir), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with (tmp_path / "sweep.out").open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "experiments.cli", "sweep", str(path)], env=env, stdout=sink,
                                stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
                                start_new_session=True)
    deadline = time.time() + 120
    while len(list(out_dir.glob("sweeps/*/*.log"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # both arm processes are starting (importing torch: no checkpoint yet)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130, (tmp_path / "sweep.out").read_text()[-3000:]
    client = _store(out_dir)
    (parent,) = client.search_runs([client.get_experiment_by_name("vidlab").experiment_id],
                                   filter_string="tags.`vidlab.role` = 'sweep'")
    assert parent.info.status == "KILLED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.status for c in children) == ["KILLED", "KILLED"]
    assert not any(identity_alive(c.data.tags["vidlab.process"]) for c in children)  # no arm left running
    # an arm that got far (the first one launched has a head start of the second's MLflow setup) may
    # have checkpointed step 1 before the kill: whether it did is timing, what the rerun does with it is not
    checkpointed = {c.info.run_id for c in children
                    if (out_dir / "checkpoints" / c.info.run_id / "last.ckpt").exists()}

    results = run_sweep(path, jobs=1, console=Console(file=io.StringIO()))  # here: in this process
    assert [r.status for r in results] == ["FINISHED", "FINISHED"]
    assert {r.run_id for r in results} & {c.info.run_id for c in children} == checkpointed
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert len(_children(client, results)) == 4 - len(checkpointed)
    print(f"{len(checkpointed)} of 2 arms had a checkpoint when the sweep was killed")


@pytest.mark.parametrize("trainer, distributed", [
    ({"devices": 1, "strategy": "auto"}, False), ({"devices": 2, "strategy": "ddp"}, True),
    ({"devices": 1, "strategy": "fsdp"}, True), ({"devices": -1}, True), ({"devices": "auto"}, True),
    ({"devices": [0, 1]}, True), ({"devices": 1, "num_nodes": 2}, True), ({"devices": "1"}, False),
])
def test_which_arms_are_distributed(trainer, distributed):
    assert is_distributed({"trainer": trainer}) is distributed
