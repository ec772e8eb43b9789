"""A sweep is one parent run with a child per arm; a killed sweep resumes without redoing arms."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from experiments.config import ConfigError, compose
from experiments.fit import run_fit
from experiments.sweep import load_ablation, run_sweep
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
