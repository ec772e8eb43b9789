"""Compare the arms of a finished sweep: statistics over seeds, and a winner only where they separate.

``vidlab compare PARENT_RUN_ID | EXPERIMENT | SWEEP_NAME`` reads the child runs that
`experiments.sweep` created and groups them into *arms*: runs that share every ``vidlab.axis.*`` tag
except ``vidlab.axis.seed``. For every metric, the final value of each run (MLflow's latest: highest
step, then newest timestamp) is one observation. Per arm and metric:

- mean and sample standard deviation (ddof = 1; one run has no standard deviation, shown as "—");
- a 95 % percentile-bootstrap interval of the mean (`summarize`): draw the arm's n values with
  replacement ``resamples`` times (numpy ``default_rng(seed)``, re-seeded for every interval so a
  report is reproducible and independent of metric order), average each draw, and take the 2.5 and
  97.5 percentiles of those means (``np.quantile``, linear).

The interval is coarse with few seeds, and we say so rather than hide it: for n ≤ 3 the chance that
a draw repeats the smallest value n times (1/nⁿ ≥ 1/27) exceeds 2.5 %, so the 95 % interval *is* the
seeds' min–max range (on normal data about 0.75 of the range at n = 4, 0.6 at 5, 0.45 at 8). It
describes the seeds that ran; it is not a calibrated test.

A winner is named for a metric (`judge`) only when the metric's direction is known (`direction`),
every arm has at least two runs, and one arm's interval lies entirely on the better side of every
other arm's. Otherwise the verdict says why not. ``model/*`` metrics (the model card: parameters,
bytes, FLOPs) are properties of the configuration, not outcomes: they are tabled once, never judged.

Plots and the markdown/HTML report are `experiments.report`; `run_compare` ties the two together
and logs the report to the sweep's parent run under ``report/``.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from experiments.config import ConfigError, nearest

LOWER, HIGHER = "lower", "higher"
# Which way is better, by metric name (lower-cased, fnmatch); the first match wins. A metric that
# matches nothing has no direction and never gets a winner: add its pattern here, not at call sites.
DIRECTIONS: tuple[tuple[str, str], ...] = (
    ("*acc*", HIGHER), ("*psnr*", HIGHER), ("*ssim*", HIGHER), ("*vbench*", HIGHER),
    ("*loss*", LOWER), ("*fvd*", LOWER), ("*error*", LOWER), ("*mse*", LOWER), ("*lpips*", LOWER),
    ("*/l1", LOWER), ("*/rec", LOWER), ("*/perceptual", LOWER),
)
CONSTANTS = ("model/*",)  # the model card: tabled once, never judged
IGNORED = ("epoch", "system/*")  # Lightning's epoch counter, MLflow's CPU/memory monitor: not results
AXIS_TAG = "vidlab.axis."
SAMPLE_FOLDERS = ("samples", "eval")  # artifact folders holding step_NNNNNN/*.mp4, in order of preference


# -- statistics ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bootstrap:
    """How `summarize` draws its interval; recorded in the report so a number can be re-derived."""

    confidence: float = 0.95
    resamples: int = 10_000
    seed: int = 0


@dataclass(frozen=True)
class Summary:
    """One arm's values of one metric (one per run) and what they say about the mean."""

    values: tuple[float, ...]
    mean: float
    std: float  # ddof = 1; nan for a single run
    low: float  # bootstrap interval of the mean
    high: float

    @property
    def n(self) -> int:
        return len(self.values)

    def text(self) -> str:
        """``mean ± std [low, high] n=k``, the cell format of every table."""
        return f"{fmt(self.mean)} ± {fmt(self.std)} [{fmt(self.low)}, {fmt(self.high)}] n={self.n}"


def fmt(x: float) -> str:
    """Four significant digits; "—" for a missing number (nan)."""
    return "—" if not math.isfinite(x) else f"{x:.4g}"


def safe_name(name: str) -> str:
    """A file-name-safe version of a metric, arm or experiment name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


def summarize(values: Sequence[float], bootstrap: Bootstrap = Bootstrap()) -> Summary:
    """Mean, sample std and the percentile-bootstrap interval of the mean of ``values`` (n,).

    Efron & Tibshirani (1993), ch. 13: the interval is the ((1 − c)/2, (1 + c)/2) quantiles of the
    means of ``resamples`` draws of n values with replacement. See the module docstring for why it
    equals the min–max range for n ≤ 3.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"summarize: expected a non-empty list of numbers, got shape {x.shape}")
    rng = np.random.default_rng(bootstrap.seed)
    draws = rng.integers(0, x.size, size=(bootstrap.resamples, x.size))  # (R, n) indices
    means = x[draws].mean(axis=1)  # (R,)
    tail = (1.0 - bootstrap.confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    std = float(x.std(ddof=1)) if x.size > 1 else float("nan")
    return Summary(tuple(float(v) for v in x), float(x.mean()), std, float(low), float(high))


def direction(metric: str) -> str | None:
    """``"lower"`` or ``"higher"`` (is better) from `DIRECTIONS`, or None when unknown."""
    name = metric.lower()
    return next((better for pattern, better in DIRECTIONS if fnmatch.fnmatchcase(name, pattern)), None)


@dataclass(frozen=True)
class Verdict:
    direction: str | None
    winner: str | None  # an arm label, or None
    reason: str

    def text(self) -> str:
        return f"{self.winner} wins ({self.reason})" if self.winner else self.reason


# losses in the objective's own units: a flow and a diffusion loss (or two weightings) are different
# numbers for the same model, so no winner across arms whose objectives differ (docs/results.md)
OBJECTIVE_UNITS = ("train/loss*", "val/loss*")


def objectives_differ(arms: Sequence["ArmRuns"]) -> bool:
    """Some axis of the sweep sets the objective (``objective`` or an ``objective.*`` key) and the
    arms do not all share its value."""
    keys = {k for arm in arms for k in arm.axes if k == "objective" or k.startswith("objective.")}
    return any(len({arm.axes.get(k) for arm in arms}) > 1 for k in keys)


def judge(metric: str, summaries: dict[str, Summary], objectives_differ: bool = False) -> Verdict:
    """Name the arm whose interval is disjoint from, and better than, every other arm's; else none.

    Disjoint intervals, not a difference of means: with a handful of seeds, a gap smaller than
    the seed-to-seed spread is not evidence. An arm with one run has a zero-width interval, which
    would separate trivially, so every arm needs two runs before anything is named.
    """
    better = direction(metric)
    if better is None:
        return Verdict(None, None, "direction unknown: no winner named")
    if objectives_differ and any(fnmatch.fnmatchcase(metric, p) for p in OBJECTIVE_UNITS):
        return Verdict(better, None, "not comparable across objectives: no winner named")
    if len(summaries) < 2:
        return Verdict(better, None, "only one arm has it")
    few = [arm for arm, s in summaries.items() if s.n < 2]
    if few:
        return Verdict(better, None, f"no winner: fewer than 2 runs in {', '.join(few)}")
    for arm, s in summaries.items():
        others = [o for other, o in summaries.items() if other != arm]
        if (better == LOWER and all(s.high < o.low for o in others)) or \
                (better == HIGHER and all(s.low > o.high for o in others)):
            return Verdict(better, arm, "intervals separate")
    return Verdict(better, None, "no separation")


@dataclass(frozen=True)
class Band:
    """A history (e.g. train/loss) across an arm's runs: per step the mean and the min–max."""

    steps: np.ndarray  # (S,)
    mean: np.ndarray  # (S,)
    low: np.ndarray  # (S,)
    high: np.ndarray  # (S,)
    runs: int


def band(histories: Sequence[tuple[np.ndarray, np.ndarray]]) -> Band | None:
    """Combine per-run (steps, values) into a `Band`; each step over the runs that logged it."""
    histories = [(s, v) for s, v in histories if len(s)]
    if not histories:
        return None
    steps = np.unique(np.concatenate([s for s, _ in histories]))
    at_step = [[v[s == step][-1] for s, v in histories if (s == step).any()] for step in steps]
    return Band(steps, np.array([np.mean(a) for a in at_step]), np.array([np.min(a) for a in at_step]),
                np.array([np.max(a) for a in at_step]), len(histories))


# -- gathering from MLflow ----------------------------------------------------------------------


@dataclass
class RunRecord:
    run_id: str
    sweep: str
    axes: dict[str, str]  # axis -> value, seed excluded, in the ablation's order
    seed: str
    metrics: dict[str, float]  # final values
    start_time: int


@dataclass
class ArmRuns:
    label: str  # the axes that differ between arms, e.g. "objective=rectified_flow"
    sweep: str
    axes: dict[str, str]
    runs: list[RunRecord]

    @property
    def seeds(self) -> list[str]:
        return [r.seed for r in self.runs]


@dataclass
class Comparison:
    title: str
    source: str  # what the user typed
    experiment: str
    parent_run_id: str | None  # where the report is logged; None for a whole experiment
    arms: list[ArmRuns]
    summaries: dict[str, dict[str, Summary]]  # metric -> arm label -> Summary (arms that logged it)
    verdicts: dict[str, Verdict]
    constants: dict[str, dict[str, tuple[float, ...]]]  # model/* metric -> arm label -> values
    bootstrap: Bootstrap
    folder: str  # report folder name: the parent run id, or the experiment name
    notes: list[str] = field(default_factory=list)

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the summary table (metric × arm), shared by the CLI and the report."""
        header = ["metric", "better", *(a.label for a in self.arms), "verdict"]
        rows = []
        for metric, per_arm in self.summaries.items():
            verdict = self.verdicts[metric]
            cells = [per_arm[a.label].text() if a.label in per_arm else "—" for a in self.arms]
            rows.append([metric, verdict.direction or "?", *cells, verdict.text()])
        return header, rows


@dataclass(frozen=True)
class Source:
    """What the user named, resolved: the experiment, and the parent run if there is one."""

    experiment_id: str
    experiment: str
    parent_run_id: str | None
    title: str
    folder: str  # report folder name under <output_dir>/reports/


def resolve_source(client: MlflowClient, source: str) -> Source:
    """A parent run id (or an arm's run id: its parent), else an experiment name, else a sweep name
    (its newest parent run). Raises ConfigError naming ``source`` and the store when none matches."""
    try:
        run = client.get_run(source)
    except MlflowException:
        run = None
    if run is not None:
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent and run.data.tags.get("vidlab.role") != "sweep":  # an arm's run: compare its sweep
            return resolve_source(client, parent)
        name = client.get_experiment(run.info.experiment_id).name
        sweep = run.data.tags.get("vidlab.sweep") or run.info.run_name or source
        return Source(run.info.experiment_id, name, run.info.run_id, f"sweep {sweep} (run {source[:8]})", source)
    experiment = client.get_experiment_by_name(source)
    if experiment is not None:
        return Source(experiment.experiment_id, source, None, f"experiment {source} (every sweep)", safe_name(source))
    if "'" not in source:
        found = client.search_runs(
            [e.experiment_id for e in client.search_experiments()], max_results=1,
            filter_string=f"tags.`vidlab.role` = 'sweep' and tags.`vidlab.sweep` = '{source}'",
            order_by=["attributes.start_time DESC"])
        if found:
            return resolve_source(client, found[0].info.run_id)
    raise ConfigError(f"vidlab compare: {source!r} is not a run id, an experiment or a sweep name in the "
                      f"MLflow store {client.tracking_uri}")


def _child_runs(client: MlflowClient, src: Source) -> list[Run]:
    """The parent's children, or the children of every sweep parent in the experiment."""
    if src.parent_run_id:
        parents = [src.parent_run_id]
    else:
        parents = [r.info.run_id for r in client.search_runs(
            [src.experiment_id], filter_string="tags.`vidlab.role` = 'sweep'", max_results=5000)]
    runs: list[Run] = []
    for parent in parents:
        runs += client.search_runs([src.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
                                   max_results=5000)
    return runs


def _record(run: Run) -> RunRecord:
    tags = run.data.tags
    arm_key = tags.get("vidlab.arm", "")  # "objective=rf,seed=0": gives the ablation's axis order
    axes = {k[len(AXIS_TAG):]: v for k, v in tags.items() if k.startswith(AXIS_TAG)}

    def position(axis: str) -> tuple[int, str]:
        found = arm_key.find(f"{axis}=")
        return (found if found >= 0 else len(arm_key), axis)

    axes = {k: axes[k] for k in sorted(axes, key=position)}
    seed = axes.pop("seed", "?")
    if not axes:  # not a sweep child: one arm per name
        axes = {"run": arm_key or run.info.run_name or run.info.run_id}
    return RunRecord(run.info.run_id, tags.get("vidlab.sweep", "?"), axes, seed, dict(run.data.metrics),
                     run.info.start_time or 0)


def _records(runs: list[Run], notes: list[str]) -> list[RunRecord]:
    """Finished runs only; of two finished runs for the same arm and seed, the newer one."""
    unfinished = Counter(r.info.status for r in runs if r.info.status != "FINISHED")
    if unfinished:
        notes.append("left out child runs that did not finish: "
                     + ", ".join(f"{n} {status}" for status, n in sorted(unfinished.items())))
    latest: dict[tuple, RunRecord] = {}
    for run in sorted((r for r in runs if r.info.status == "FINISHED"), key=lambda r: r.info.start_time or 0):
        record = _record(run)
        key = (record.sweep, tuple(sorted(record.axes.items())), record.seed)
        if key in latest:
            notes.append(f"run {latest[key].run_id[:8]} (seed {record.seed}) is superseded by the newer "
                         f"run {record.run_id[:8]} of the same arm and seed")
        latest[key] = record
    return list(latest.values())


def _seed_order(seed: str) -> tuple[int, float, str]:
    try:
        return (0, float(seed), seed)
    except ValueError:
        return (1, 0.0, seed)


def group_arms(records: list[RunRecord]) -> list[ArmRuns]:
    """Arms in the order their first run started; labelled by the axes that differ between arms
    (prefixed by the sweep name when several sweeps are compared)."""
    groups: dict[tuple, list[RunRecord]] = {}
    for record in sorted(records, key=lambda r: r.start_time):
        groups.setdefault((record.sweep, tuple(sorted(record.axes.items()))), []).append(record)
    arms = [ArmRuns("", runs[0].sweep, runs[0].axes, sorted(runs, key=lambda r: _seed_order(r.seed)))
            for runs in groups.values()]
    names = list(dict.fromkeys(k for arm in arms for k in arm.axes))
    varying = {k for k in names if len({arm.axes.get(k) for arm in arms}) > 1}
    several_sweeps = len({arm.sweep for arm in arms}) > 1
    for arm in arms:
        label = ",".join(f"{k}={v}" for k, v in arm.axes.items() if k in varying or len(arms) == 1)
        arm.label = f"{arm.sweep}: {label or 'all'}" if several_sweeps else (label or "all")
    if len({arm.label for arm in arms}) < len(arms):  # cannot happen with distinct axes; be safe
        for arm in arms:
            arm.label = f"{arm.sweep}: " + ",".join(f"{k}={v}" for k, v in arm.axes.items())
    return arms


def _select(names: set[str], patterns: Sequence[str] | None) -> list[str]:
    """Metrics to compare: every one logged (minus `IGNORED`), or those matching ``patterns``."""
    if not patterns:
        return sorted(n for n in names if not any(fnmatch.fnmatchcase(n, i) for i in IGNORED))
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in sorted(names) if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ConfigError(f"vidlab compare: no run logged a metric matching {pattern!r}; {nearest(pattern, names)}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def compare(client: MlflowClient, source: str, metrics: Sequence[str] | None = None,
            bootstrap: Bootstrap = Bootstrap()) -> Comparison:
    """Gather the finished child runs of ``source`` and summarise ``metrics`` (names or fnmatch
    patterns; default every metric) per arm. Raises ConfigError naming an unknown source."""
    src = resolve_source(client, source)
    notes: list[str] = []
    records = _records(_child_runs(client, src), notes)
    if not records:
        raise ConfigError(f"vidlab compare: {source!r} ({src.title}) has no finished sweep runs (child runs "
                          f"of a parent tagged vidlab.role=sweep, as `vidlab sweep` creates them)")
    arms = group_arms(records)
    summaries: dict[str, dict[str, Summary]] = {}
    verdicts: dict[str, Verdict] = {}
    constants: dict[str, dict[str, tuple[float, ...]]] = {}
    for metric in _select(set().union(*(r.metrics for r in records)), metrics):
        per_arm: dict[str, list[float]] = {}
        for arm in arms:
            values = [r.metrics[metric] for r in arm.runs if metric in r.metrics]
            finite = [v for v in values if math.isfinite(v)]
            if len(finite) < len(values):
                notes.append(f"{metric}: {len(values) - len(finite)} non-finite value(s) left out in {arm.label}")
            if finite:
                per_arm[arm.label] = finite
        if any(fnmatch.fnmatchcase(metric, c) for c in CONSTANTS):
            constants[metric] = {arm: tuple(v) for arm, v in per_arm.items()}
        elif per_arm:
            summaries[metric] = {arm: summarize(v, bootstrap) for arm, v in per_arm.items()}
            verdicts[metric] = judge(metric, summaries[metric], objectives_differ(arms))
    if not src.parent_run_id:
        notes.append("an experiment has no single parent run: the report is written to disk only")
    return Comparison(src.title, source, src.experiment, src.parent_run_id, arms, summaries, verdicts,
                      constants, bootstrap, src.folder, notes)


def histories(client: MlflowClient, arm: ArmRuns, key: str = "train/loss") -> list[tuple[np.ndarray, np.ndarray]]:
    """Per run of ``arm``: the (steps, values) of ``key``, ordered by step (the last value per step)."""
    out = []
    for run in arm.runs:
        by_step = {m.step: m.value for m in sorted(client.get_metric_history(run.run_id, key),
                                                   key=lambda m: (m.step, m.timestamp))}
        steps = np.array(sorted(by_step), dtype=np.int64)
        out.append((steps, np.array([by_step[s] for s in steps], dtype=np.float64)))
    return out


def _latest_step_folder(client: MlflowClient, run_id: str) -> str | None:
    """``samples/step_NNNNNN`` with the highest N that holds mp4s (else the same under ``eval/``)."""
    for prefix in SAMPLE_FOLDERS:
        steps = [a.path for a in client.list_artifacts(run_id, prefix)
                 if a.is_dir and re.fullmatch(r"step_\d+", Path(a.path).name)]
        for folder in sorted(steps, key=lambda p: int(Path(p).name[5:]), reverse=True):
            if any(a.path.endswith(".mp4") for a in client.list_artifacts(run_id, folder)):
                return folder
    return None


@contextmanager
def _quiet_downloads() -> Iterator[None]:
    """MLflow draws a progress bar per downloaded file; for a handful of small mp4s it is noise."""
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"]
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous


def download_samples(client: MlflowClient, arm: ArmRuns, dst: Path, max_videos: int = 4) -> list[tuple[str, Path]]:
    """Up to ``max_videos`` mp4s from the latest sample step of the arm's runs (seed order), as
    (row label, local path); the same prompts in every arm, so contact sheets line up."""
    out: list[tuple[str, Path]] = []
    for run in arm.runs:
        folder = _latest_step_folder(client, run.run_id)
        if folder is None:
            continue
        for artifact in sorted(a.path for a in client.list_artifacts(run.run_id, folder) if a.path.endswith(".mp4")):
            if len(out) == max_videos:
                return out
            target = dst / run.run_id
            target.mkdir(parents=True, exist_ok=True)
            with _quiet_downloads():
                local = Path(client.download_artifacts(run.run_id, artifact, str(target)))
            out.append((f"seed {run.seed}, {Path(folder).name}: {Path(artifact).stem}", local))
    return out


# -- the command --------------------------------------------------------------------------------


@dataclass
class CompareResult:
    comparison: Comparison
    report_dir: Path
    logged_to: str | None  # the parent run id the report was logged to (under report/)


def default_report_dir(comparison: Comparison) -> Path:
    """``<output_dir>/reports/<parent run id or experiment>/`` (output_dir: $VIDLAB_OUTPUT_DIR or outputs)."""
    return Path(os.environ.get("VIDLAB_OUTPUT_DIR", "outputs")).resolve() / "reports" / comparison.folder


def run_compare(source: str, out: str | Path | None = None, metrics: Sequence[str] | None = None,
                bootstrap: Bootstrap = Bootstrap(), curve: str = "train/loss", max_videos: int = 4,
                client: MlflowClient | None = None) -> CompareResult:
    """Compare ``source``, write the report (plots, report.md, report.html) to ``out`` (default
    `default_report_dir`) and log that folder to the parent run under ``report/``."""
    from experiments import report  # matplotlib is only needed here
    from experiments.tracking import tracking_uri

    client = client or MlflowClient(tracking_uri())
    comparison = compare(client, source, metrics, bootstrap)
    folder = Path(out) if out else default_report_dir(comparison)
    curves = {arm.label: band(histories(client, arm, curve)) for arm in comparison.arms}
    with tempfile.TemporaryDirectory(prefix="vidlab-compare-") as tmp:
        samples = {arm.label: download_samples(client, arm, Path(tmp) / str(i), max_videos)
                   for i, arm in enumerate(comparison.arms)}
        report.write_report(comparison, folder, curves, samples, curve)
    if comparison.parent_run_id:
        client.log_artifacts(comparison.parent_run_id, str(folder), artifact_path="report")
    return CompareResult(comparison, folder, comparison.parent_run_id)
