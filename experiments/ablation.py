"""The ablation file: which arms a sweep runs and the overrides of each. No MLflow, no training here
(`experiments.sweep` runs the arms).

An ablation file (``configs/ablation/*.yaml``)::

    name: backbones                   # the sweep's name in MLflow (default: the file's name)
    experiment: smoke                 # the experiment every arm starts from
    overrides: [trainer.max_steps=50] # applied to every arm (optional)
    grid:                             # cartesian product; a group name picks presets
      backbone: [dit_tiny, frame_ar_tiny]
      objective: [rectified_flow, rectified_flow_lognorm]
    zip:                              # optional: lists of equal length taken together (one axis),
      vae: [trained_causal3d, trained_tae]   # crossed with the grid
      data.num_frames: [9, 8]
    seeds: [0, 1]
    per_arm:                          # optional: extra overrides for the arms that match
      - match: {backbone: frame_ar_tiny}                     # every listed axis has this value
        overrides: [data.batch_size=2, trainer.max_steps=100]
      - match: {backbone: frame_ar_tiny, objective: rectified_flow_lognorm}
        overrides: [optim.lr=1e-4]
    jobs: 2                           # optional: arms at a time (``vidlab sweep --jobs N`` wins)

An arm's overrides are, in order: the file-wide ``overrides``, its axis values, then the overrides of
every matching ``per_arm`` entry in file order (a later one wins). Per-arm overrides come after the
axis values so they can change keys of the preset an axis chose (``backbone=frame_ar_tiny`` and then
``backbone.depth=2``). They do not change the arm's key (``backbone=frame_ar_tiny,...,seed=0``),
which identifies the arm across re-runs and in ``vidlab compare``.

``per_arm`` is a list of ``match``/``overrides`` pairs rather than a mapping keyed by
``backbone=frame_ar_tiny`` strings because axis values may be lists or contain commas
(``backbone.patch: [[1, 4, 4], [1, 2, 2]]``). A ``match`` names axes (grid or zip keys, or ``seed``)
and one value of each; a value is compared as the arm key writes it, so ``1e-3`` matches ``0.001``.
A key that is not an axis, a value the axis does not have, or an entry no arm matches is an error
(a typo would otherwise silently apply to nothing).

The fingerprint (`Ablation.fingerprint`) identifies the file's content across re-runs; ``jobs`` is
left out of it, since how many arms run at once does not change any arm's result.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.config import ConfigError, load_yaml, nearest

ABLATION_KEYS = {"experiment", "overrides", "grid", "zip", "seeds", "name", "description", "per_arm", "jobs"}
PER_ARM_KEYS = {"match", "overrides"}
NOT_FINGERPRINTED = {"jobs"}  # scheduling only: the same arms, the same results


@dataclass
class Arm:
    key: str  # "backbone=dit_tiny,seed=0": identifies the arm across re-runs
    values: dict[str, Any]  # axis -> value, seed included
    overrides: list[str]  # everything compose() gets: file-wide, axis values, per-arm
    extra: list[str] = field(default_factory=list)  # the per-arm part of `overrides` (tagged on the run)


@dataclass
class PerArm:
    """One ``per_arm`` entry: ``overrides`` for the arms whose axes have the ``match`` values."""

    match: dict[str, Any]
    overrides: list[str]

    def matches(self, values: dict[str, Any]) -> bool:
        return all(format_axis_value(values[axis]) == format_axis_value(v) for axis, v in self.match.items())


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
    per_arm: list[PerArm] = field(default_factory=list)
    jobs: int | None = None  # None: not set in the file

    def arms(self) -> list[Arm]:
        """Zip groups (outermost), then the grid in file order, then seeds (innermost)."""
        axes = list(self.grid)
        n_zip = len(next(iter(self.zipped.values()))) if self.zipped else 1
        zipped = [{k: v[i] for k, v in self.zipped.items()} for i in range(n_zip)]
        out = []
        for together in zipped:
            for combo in itertools.product(*(self.grid[a] for a in axes)):
                for seed in self.seeds:
                    values = {**together, **dict(zip(axes, combo)), "seed": seed}
                    key = ",".join(f"{k}={format_axis_value(v)}" for k, v in values.items())
                    extra = [o for entry in self.per_arm if entry.matches(values) for o in entry.overrides]
                    axis_overrides = [f"{k}={format_axis_value(v)}" for k, v in values.items()]
                    out.append(Arm(key, values, [*self.overrides, *axis_overrides, *extra], extra))
        return out

    def axis_values(self) -> dict[str, list[Any]]:
        """Every axis an arm key names, with its values (``seed`` included)."""
        return {**self.zipped, **self.grid, "seed": self.seeds}


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
    jobs = raw.get("jobs")
    if jobs is not None and (not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1):
        raise ConfigError(f"{path}: 'jobs' (arms at a time) must be a positive integer, got {jobs!r}")
    fingerprinted = {k: v for k, v in raw.items() if k not in NOT_FINGERPRINTED}
    fingerprint = hashlib.sha1(json.dumps(fingerprinted, sort_keys=True, default=str).encode()).hexdigest()[:12]
    ablation = Ablation(
        path=path, experiment=str(raw["experiment"]), overrides=[str(o) for o in raw.get("overrides") or []],
        grid=grid, seeds=[int(s) for s in raw.get("seeds") or [0]], name=str(raw.get("name") or path.stem),
        fingerprint=fingerprint, zipped=zipped, jobs=jobs,
    )
    ablation.per_arm = _per_arm(path, raw.get("per_arm"), ablation)
    return ablation


def _per_arm(path: Path, raw: Any, ablation: Ablation) -> list[PerArm]:
    """Check the ``per_arm`` entries against the axes and values the arms have."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: 'per_arm' must be a list of {{match: {{axis: value}}, overrides: [...]}}, "
                          f"got {raw!r}")
    axes = ablation.axis_values()
    entries = []
    for i, entry in enumerate(raw):
        where = f"{path}: per_arm[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping with 'match' and 'overrides', got {entry!r}")
        for key in entry:
            if key not in PER_ARM_KEYS:
                raise ConfigError(f"{where}: unknown key {key!r}; {nearest(key, PER_ARM_KEYS)}")
        match, overrides = entry.get("match"), entry.get("overrides")
        if not isinstance(match, dict) or not match:
            raise ConfigError(f"{where}: 'match' must map axes to values, e.g. {{backbone: dit_tiny}}, got {match!r}")
        if not isinstance(overrides, list) or not overrides or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"{where}: 'overrides' must be a non-empty list of key=value strings, got {overrides!r}")
        for axis, value in match.items():
            if axis not in axes:
                raise ConfigError(f"{where}: match key {axis!r} is not an axis of this ablation; "
                                  f"{nearest(str(axis), set(axes))}")
            known = [format_axis_value(v) for v in axes[axis]]
            if format_axis_value(value) not in known:
                raise ConfigError(f"{where}: axis {axis!r} has no value {format_axis_value(value)!r}; "
                                  f"{nearest(format_axis_value(value), set(known))}")
        entries.append(PerArm(dict(match), [str(o) for o in overrides]))
    ablation.per_arm = entries
    arms = ablation.arms()
    for i, entry in enumerate(entries):
        if not any(entry.matches(arm.values) for arm in arms):
            raise ConfigError(f"{path}: per_arm[{i}] matches no arm: no arm has "
                              + ", ".join(f"{k}={format_axis_value(v)}" for k, v in entry.match.items()))
    return entries
