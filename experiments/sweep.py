"""Run an ablation: a grid over config keys × seeds, one MLflow parent run with a child run per arm.

An ablation file (``configs/ablation/*.yaml``)::

    experiment: smoke                 # the experiment every arm starts from
    overrides: [trainer.max_steps=50] # applied to every arm (optional)
    grid:                             # cartesian product; a group name picks presets
      backbone: [dit_tiny, dit_small]
      objective.time_sampling: [uniform, logit_normal]
    zip:                              # optional: lists of equal length taken together (one axis),
      vae: [trained_causal3d, trained_tae]   # crossed with the grid
      data.num_frames: [9, 8]
    seeds: [0, 1]

Re-running the same file finds its parent run (by a fingerprint of the file) and skips arms whose
child run finished; an arm that failed is recorded as FAILED and the others go on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mlflow.tracking import MlflowClient

from experiments.config import Composed, ConfigError, compose, load_yaml, nearest
from experiments.fit import FitResult, run_fit
from experiments.tracking import experiment_id, git_state, tracking_uri

ABLATION_KEYS = {"experiment", "overrides", "grid", "zip", "seeds", "name", "description"}


@dataclass
class Arm:
    key: str  # "backbone=dit_tiny,seed=0": identifies the arm across re-runs
    values: dict[str, Any]  # axis -> value, seed included
    overrides: list[str]


@dataclass
class ArmResult:
    arm: Arm
    run_id: str
    status: str  # FINISHED | FAILED | SKIPPED (finished in an earlier invocation)
    final_loss: float | None = None
    samples_dir: str | None = None
    error: str | None = None


@dataclass
class Ablation:
    path: Path
    experiment: str
    overrides: list[str]
    grid: dict[str, list[Any]]
    seeds: list[int]
    name: str
    fingerprint: str = field(default="")
    zipped: dict[str, list[Any]] = field(default_factory=dict)

    def arms(self) -> list[Arm]:
        axes = list(self.grid)
        n_zip = len(next(iter(self.zipped.values()))) if self.zipped else 1
        zipped = [{k: v[i] for k, v in self.zipped.items()} for i in range(n_zip)]
        out = []
        for together in zipped:
            for combo in itertools.product(*(self.grid[a] for a in axes)):
                for seed in self.seeds:
                    values = {**together, **dict(zip(axes, combo)), "seed": seed}
                    key = ",".join(f"{k}={format_axis_value(v)}" for k, v in values.items())
                    out.append(Arm(key, values, [*self.overrides, *(f"{k}={format_axis_value(v)}" for k, v in values.items())]))
        return out


def format_axis_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def load_ablation(path: str | Path) -> Ablation:
    """Read and check an ablation file; unknown keys name the nearest valid one."""
    path = Path(path)
    raw = load_yaml(path)
    for key in raw:
        if key not in ABLATION_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r}; {nearest(key, ABLATION_KEYS)}")
    if "experiment" not in raw:
        raise ConfigError(f"{path}: 'experiment' (the experiment every arm starts from) is required")
    grid = raw.get("grid") or {}
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid axis {axis!r} must be a non-empty list, got {values!r}")
    zipped = raw.get("zip") or {}
    lengths = {axis: len(values) if isinstance(values, list) else -1 for axis, values in zipped.items()}
    if any(n < 1 for n in lengths.values()) or len(set(lengths.values())) > 1:
        raise ConfigError(f"{path}: 'zip' needs non-empty lists of one length, got lengths {lengths}")
    fingerprint = hashlib.sha1(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Ablation(
        path=path, experiment=str(raw["experiment"]), overrides=[str(o) for o in raw.get("overrides") or []],
        grid=grid, seeds=[int(s) for s in raw.get("seeds") or [0]], name=str(raw.get("name") or path.stem),
        fingerprint=fingerprint, zipped=zipped,
    )


def _parent_run(client: MlflowClient, exp_id: str, ablation: Ablation) -> str:
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`vidlab.sweep_fingerprint` = '{ablation.fingerprint}' and tags.`vidlab.role` = 'sweep'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    tags = {"vidlab.role": "sweep", "vidlab.sweep": ablation.name, "vidlab.sweep_fingerprint": ablation.fingerprint,
            "vidlab.ablation_file": str(ablation.path), **git_state()}
    run = client.create_run(exp_id, run_name=f"sweep:{ablation.name}", tags=tags)
    client.log_text(run.info.run_id, ablation.path.read_text(), "ablation.yaml")
    return run.info.run_id


def _finished_children(client: MlflowClient, exp_id: str, parent: str) -> dict[str, Any]:
    runs = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=5000)
    return {r.data.tags["vidlab.arm"]: r for r in runs if r.info.status == "FINISHED" and "vidlab.arm" in r.data.tags}


def run_sweep(path: str | Path, fit: Callable[..., FitResult] = run_fit) -> list[ArmResult]:
    """Run every unfinished arm of the ablation in ``path``, one after another, in this process."""
    ablation = load_ablation(path)
    arms = ablation.arms()
    composed: dict[str, Composed] = {arm.key: compose(ablation.experiment, arm.overrides) for arm in arms}
    first = composed[arms[0].key].cfg
    if len({c.cfg["tracking"]["experiment"] for c in composed.values()}) > 1:
        raise ConfigError(f"{ablation.path}: every arm must log to the same tracking.experiment")
    client = MlflowClient(tracking_uri(first))
    exp_id = experiment_id(first)
    parent = _parent_run(client, exp_id, ablation)
    done = _finished_children(client, exp_id, parent)

    results: list[ArmResult] = []
    try:
        for arm in arms:
            if arm.key in done:
                run = done[arm.key]
                results.append(ArmResult(arm, run.info.run_id, "SKIPPED", run.data.metrics.get("train/loss"),
                                         run.data.tags.get("vidlab.samples_dir")))
                continue
            results.append(_run_arm(client, exp_id, parent, ablation, arm, composed[arm.key], fit))
    except BaseException:
        client.set_terminated(parent, status="KILLED")
        raise
    failed = any(r.status == "FAILED" for r in results)
    client.set_terminated(parent, status="FAILED" if failed else "FINISHED")
    return results


def _run_arm(client: MlflowClient, exp_id: str, parent: str, ablation: Ablation, arm: Arm,
             composed: Composed, fit: Callable[..., FitResult]) -> ArmResult:
    composed.cfg["name"] = f"{ablation.name}[{arm.key}]"
    tags = {"mlflow.parentRunId": parent, "vidlab.arm": arm.key, "vidlab.sweep": ablation.name,
            **{f"vidlab.axis.{k}": format_axis_value(v) for k, v in arm.values.items()}}
    child = client.create_run(exp_id, run_name=composed.cfg["name"], tags=tags).info.run_id
    try:
        result = fit(composed, run_id=child, tags=tags)
    except Exception as exc:  # noqa: BLE001 - one failed arm must not stop the sweep
        client.set_terminated(child, status="FAILED")
        client.set_tag(child, "vidlab.error", f"{type(exc).__name__}: {exc}"[:5000])
        return ArmResult(arm, child, "FAILED", error=f"{type(exc).__name__}: {exc}")
    except BaseException:
        client.set_terminated(child, status="KILLED")
        raise
    client.set_terminated(child, status="FINISHED")
    samples_dir = str(result.samples[0].parent) if result.samples else None
    return ArmResult(arm, child, "FINISHED", result.final_loss, samples_dir)
