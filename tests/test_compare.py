"""`vidlab compare`: per-arm statistics over seeds, winners only where intervals separate, plots and
a report logged to the sweep's parent run.

Most tests build a finished sweep directly through MlflowClient (no training), with known metric
values, so every number in the report can be checked against numpy; one test runs a real tiny sweep.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from matplotlib.image import imread
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from rich.console import Console

from experiments import cli
from experiments.compare import Bootstrap, compare, direction, judge, run_compare, summarize
from experiments.config import ConfigError
from experiments.tracking import experiment_id, tracking_uri
from conftest import output_dir_at

CFG = {"tracking": {"experiment": "vidlab"}}  # the default experiment, in the out_dir store
RF, LOGNORM, V = "rectified_flow", "rectified_flow_lognorm", "diffusion_v"
# metric -> objective -> one final value per seed (0, 1, 2)
VALUES = {
    "eval/x0_mse": {RF: [0.10, 0.12, 0.11], LOGNORM: [0.20, 0.22, 0.21], V: [0.30, 0.32, 0.31]},  # separate
    "val/psnr": {RF: [0.10, 0.12, 0.11], LOGNORM: [0.20, 0.22, 0.21], V: [0.30, 0.32, 0.31]},  # same, higher
    "eval/probe_acc_joint": {RF: [0.5, 0.6, 0.7], LOGNORM: [0.55, 0.65, 0.75], V: [0.6, 0.7, 0.8]},  # overlap
    "custom/score": {RF: [1.0, 1.1, 1.2], LOGNORM: [5.0, 5.1, 5.2], V: [9.0, 9.1, 9.2]},  # no direction
}
PARAMS = {RF: 1000.0, LOGNORM: 1000.0, V: 2000.0}  # model/params_total: a constant per arm


def label(objective: str) -> str:
    return f"objective={objective}"


def red_square(num_frames: int = 4, size: int = 16) -> np.ndarray:
    """A red square moving right on black, ``uint8 (T, H, W, 3)``."""
    frames = np.zeros((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        frames[t, 4:10, 2 + 2 * t: 8 + 2 * t, 0] = 255
    return frames


def write_videos(folder: Path) -> tuple[Path, Path]:
    """An older all-green sample and the latest red-square sample, written as real H.264 mp4s."""
    from datamodules.mp4 import write_mp4

    old, new = folder / "old", folder / "new"
    old.mkdir(parents=True)
    new.mkdir(parents=True)
    green = np.zeros((4, 16, 16, 3), np.uint8)
    green[..., 1] = 255
    write_mp4(old / "a red square-0.mp4", green)
    write_mp4(new / "a red square-0.mp4", red_square())
    return old, new


def add_sweep(client: MlflowClient, exp: str, name: str, objectives: dict[str, dict[str, list[float]]],
              videos: tuple[Path, Path], start: int) -> str:
    """A finished parent run and one finished child per (objective, seed), as experiments/sweep.py tags them."""
    parent = client.create_run(exp, run_name=f"sweep:{name}", start_time=start,
                               tags={"vidlab.role": "sweep", "vidlab.sweep": name}).info.run_id
    old, new = videos
    t = start
    for objective, metrics in objectives.items():
        for seed in range(len(next(iter(metrics.values())))):
            t += 1000
            tags = {"mlflow.parentRunId": parent, "vidlab.arm": f"objective={objective},seed={seed}",
                    "vidlab.sweep": name, "vidlab.axis.objective": objective, "vidlab.axis.seed": str(seed)}
            run = client.create_run(exp, run_name=f"{name}[{objective},{seed}]", start_time=t, tags=tags).info.run_id
            base = {RF: 1.0, LOGNORM: 0.8, V: 0.6}.get(objective, 0.5)
            logged = [  # (name, value, step); one batch per run keeps the fixture fast on SQLite
                *((m, 99.0, 0) for m in metrics),  # an earlier value: only the final one counts
                *((m, per_seed[seed], 10) for m, per_seed in metrics.items()),
                ("model/params_total", PARAMS.get(objective, 1.0), 0), ("epoch", 0.0, 10),
                ("system/cpu_utilization_percentage", 50.0, 0),
                *(("train/loss", base * math.exp(-0.2 * step) + 0.01 * seed, step) for step in range(10)),
            ]
            client.log_batch(run, metrics=[Metric(m, v, t + i, step) for i, (m, v, step) in enumerate(logged)])
            client.log_artifact(run, str(old / "a red square-0.mp4"), "samples/step_000002")
            client.log_artifact(run, str(new / "a red square-0.mp4"), "samples/step_000004")
            client.set_terminated(run, "FINISHED", end_time=t + 500)
    client.set_terminated(parent, "FINISHED")
    return parent


@dataclass
class Store:
    client: MlflowClient
    parent: str  # sweep "fake": 3 arms x 3 seeds, plus a KILLED and a superseded run to leave out
    other: str  # sweep "other": a later sweep in the same experiment, 1 arm x 2 seeds


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Iterator[Store]:
    """One MLflow store for this file's tests (a fresh SQLite store costs ~6 s to create); a test that
    adds runs puts them in its own MLflow experiment, so the others' expectations hold in any order."""
    root = tmp_path_factory.mktemp("compare")
    with output_dir_at(root / "outputs"):
        client = MlflowClient(tracking_uri(CFG))
        exp = experiment_id(CFG)
        videos = write_videos(root / "videos")
        objectives = {o: {m: VALUES[m][o] for m in VALUES} for o in (RF, LOGNORM, V)}
        parent = add_sweep(client, exp, "fake", objectives, videos, start=1_000_000)
        for status, start in (("KILLED", 1_100_000), ("FINISHED", 1_000_500)):  # killed later; finished earlier
            tags = {"mlflow.parentRunId": parent, "vidlab.arm": f"objective={RF},seed=0", "vidlab.sweep": "fake",
                    "vidlab.axis.objective": RF, "vidlab.axis.seed": "0"}
            stale = client.create_run(exp, start_time=start, tags=tags).info.run_id
            client.log_metric(stale, "eval/x0_mse", 50.0)
            client.set_terminated(stale, status)
        other = add_sweep(client, exp, "other", {RF: {"eval/x0_mse": [0.5, 0.6]}}, videos, start=2_000_000)
        yield Store(client, parent, other)


def reference_interval(values: list[float], b: Bootstrap) -> tuple[float, float]:
    """The documented algorithm, written out one resample at a time."""
    rng = np.random.default_rng(b.seed)
    x = np.asarray(values)
    means = [x[rng.integers(0, len(x), len(x))].mean() for _ in range(b.resamples)]
    tail = (1 - b.confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def test_summary_is_numpy_mean_std_and_the_documented_bootstrap():
    values = [0.31, 0.27, 0.35, 0.29, 0.33]
    s = summarize(values)
    assert s.mean == pytest.approx(np.mean(values), abs=1e-15)
    assert s.std == pytest.approx(np.std(values, ddof=1), abs=1e-15)
    assert (s.low, s.high) == pytest.approx(reference_interval(values, Bootstrap()), abs=1e-15)
    assert min(values) < s.low < s.mean < s.high < max(values)  # 5 seeds: narrower than the range
    three = summarize([0.2, 0.5, 0.3])  # n ≤ 3: the interval is the min–max range (module docstring)
    assert (three.low, three.high) == pytest.approx((0.2, 0.5), abs=1e-15)
    one = summarize([0.7])
    assert math.isnan(one.std) and one.low == one.high == 0.7 and "—" in one.text()


def test_bootstrap_agrees_with_scipy_for_many_seeds():
    from scipy.stats import bootstrap

    x = np.random.default_rng(3).normal(1.0, 0.5, size=40)
    ours = summarize(x)
    theirs = bootstrap((x,), np.mean, n_resamples=10_000, method="percentile", confidence_level=0.95,
                       rng=np.random.default_rng(1)).confidence_interval
    tolerance = 0.1 * x.std(ddof=1) / math.sqrt(len(x))  # Monte Carlo noise of two 10k-resample runs
    assert ours.low == pytest.approx(theirs.low, abs=tolerance)
    assert ours.high == pytest.approx(theirs.high, abs=tolerance)


def test_directions():
    lower = ["train/loss", "val/loss_t0.0625", "eval/fvd", "eval/fvd_probe", "eval/x0_mse_lsnr-4", "val/l1",
             "eval/recon_error"]
    higher = ["eval/probe_acc_joint", "val/psnr", "val/ssim", "eval/vbench/total", "vbench/temporal_flickering"]
    assert [direction(m) for m in lower] == ["lower"] * len(lower)
    assert [direction(m) for m in higher] == ["higher"] * len(higher)
    assert direction("custom/score") is None and direction("latent/mean_c0") is None


def test_winner_only_where_intervals_separate():
    low, mid, high = summarize([0.10, 0.12, 0.11]), summarize([0.20, 0.22, 0.21]), summarize([0.115, 0.3, 0.2])
    assert judge("eval/fvd", {"a": low, "b": mid}).winner == "a"
    assert judge("val/psnr", {"a": low, "b": mid}).winner == "b"  # same numbers, the other direction
    overlapping = judge("eval/fvd", {"a": low, "b": mid, "c": high})  # c's interval reaches into a's
    assert overlapping.winner is None and overlapping.reason == "no separation"
    unknown = judge("custom/score", {"a": low, "b": mid})
    assert unknown.winner is None and "direction unknown" in unknown.reason
    single = judge("eval/fvd", {"a": low, "b": summarize([0.9])})  # a zero-width interval proves nothing
    assert single.winner is None and "fewer than 2 runs" in single.reason
    assert judge("train/loss", {"a": low, "b": mid}).winner == "a"  # one objective: comparable
    for metric in ("train/loss", "val/loss_t0.0625"):  # in the objective's own units
        across = judge(metric, {"a": low, "b": mid}, objectives_differ=True)
        assert across.winner is None and "not comparable across objectives" in across.reason
    assert judge("eval/x0_mse", {"a": low, "b": mid}, objectives_differ=True).winner == "a"


def test_compare_a_finished_sweep(store):
    client, parent = store.client, store.parent
    result = run_compare(parent, client=client)
    c = result.comparison
    arms = [label(o) for o in (RF, LOGNORM, V)]
    assert [a.label for a in c.arms] == arms  # the order the arms ran in
    assert all(a.seeds == ["0", "1", "2"] for a in c.arms)  # KILLED and superseded runs left out
    assert any("1 KILLED" in n for n in c.notes) and any("superseded" in n for n in c.notes)

    for metric, per_arm in VALUES.items():
        for objective, values in per_arm.items():
            s = c.summaries[metric][label(objective)]
            assert s.values == tuple(values)  # the final value of each run, not the earlier 99.0
            assert s.mean == pytest.approx(np.mean(values), abs=1e-12)
            assert s.std == pytest.approx(np.std(values, ddof=1), abs=1e-12)
            assert (s.low, s.high) == pytest.approx(reference_interval(values, c.bootstrap), abs=1e-12)
    final_loss = [c.summaries["train/loss"][label(o)].mean for o in (RF, LOGNORM, V)]
    assert final_loss == pytest.approx([b * math.exp(-1.8) + 0.01 for b in (1.0, 0.8, 0.6)])  # step 9, mean seed 1
    assert c.verdicts["eval/x0_mse"].winner == label(RF)  # lower is better
    assert c.verdicts["val/psnr"].winner == label(V)  # higher is better
    assert c.verdicts["eval/probe_acc_joint"].winner is None
    assert "not comparable across objectives" in c.verdicts["train/loss"].reason  # the arms' axis is the objective
    assert c.verdicts["eval/probe_acc_joint"].reason == "no separation"
    assert c.verdicts["custom/score"].winner is None
    assert "model/params_total" not in c.summaries and "model/params_total" not in c.verdicts
    assert c.constants["model/params_total"] == {label(o): (PARAMS[o],) * 3 for o in (RF, LOGNORM, V)}
    assert "epoch" not in c.summaries and "system/cpu_utilization_percentage" not in c.summaries

    folder = result.report_dir
    assert folder.parts[-2:] == ("reports", parent)
    md = (folder / "report.md").read_text()
    for name in [*arms, *VALUES, "model/params_total", "no separation", f"{label(RF)} wins"]:
        assert name in md, name
    pngs = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    assert len(pngs) == 1 + len(VALUES) + 1 + len(arms)  # curves, bars per metric (+ train/loss), sheet per arm
    for png in pngs:
        assert f"]({png})" in md
        image = imread(folder / png)
        assert image.ndim == 3 and image.shape[0] >= 200 and image.shape[1] >= 300, (png, image.shape)
    html = (folder / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(pngs) and "<table>" in html

    sheet = imread(folder / "samples/objective_rectified_flow.png")[..., :3]  # (H, W, 3) in [0, 1]
    assert (sheet.sum(-1) < 2.9).mean() > 0.2, "the contact sheet is mostly background"
    red = (sheet[..., 0] > 0.7) & (sheet[..., 1] < 0.2) & (sheet[..., 2] < 0.2)
    green = (sheet[..., 1] > 0.6) & (sheet[..., 0] < 0.3) & (sheet[..., 2] < 0.3)
    assert red.sum() > 100 and green.sum() == 0, "frames of the latest samples (red), not the older (green)"

    assert result.logged_to == parent
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/report.html", "report/train_loss.png", "report/metrics",
            "report/samples"} <= logged
    assert {f"report/{png}" for png in pngs if png.startswith("metrics/")} <= \
        {a.path for a in client.list_artifacts(parent, "report/metrics")}


def test_experiment_and_sweep_name_sources(store):
    client, parent = store.client, store.parent
    assert compare(client, "fake").parent_run_id == parent  # a sweep name: its newest parent run
    arm_run = compare(client, parent).arms[1].runs[0].run_id
    assert compare(client, arm_run).parent_run_id == parent  # an arm's run id: its sweep
    result = run_compare("vidlab", client=client, metrics=["eval/x0_mse"])
    c = result.comparison
    assert c.parent_run_id is None and result.logged_to is None
    assert [a.label for a in c.arms] == [f"fake: {label(o)}" for o in (RF, LOGNORM, V)] + [f"other: {label(RF)}"]
    assert list(c.summaries) == ["eval/x0_mse"] and not c.constants
    assert c.verdicts["eval/x0_mse"].winner == f"fake: {label(RF)}"
    assert result.report_dir.name == "vidlab" and (result.report_dir / "report.md").exists()
    assert any("written to disk only" in n for n in c.notes)
    assert not client.list_artifacts(store.other)
    with pytest.raises(ConfigError, match="no run logged a metric matching 'eval/fvd'"):
        compare(client, parent, metrics=["eval/fvd"])


def test_cli_prints_the_table_and_names_an_unknown_run(store, monkeypatch, tmp_path):
    parent = store.parent
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=400))
    monkeypatch.setattr(cli, "errors", Console(file=err, width=400))
    assert cli.main(["compare", parent, "--metrics", "eval/*,val/psnr", "--out", str(tmp_path / "report")]) == 0
    text = out.getvalue()
    for name in ["eval/x0_mse", "eval/probe_acc_joint", "val/psnr", *(label(o) for o in (RF, LOGNORM, V)),
                 f"{label(RF)} wins (intervals separate)", "report.md", f"logged to run {parent}"]:
        assert name in text, name
    assert "custom/score" not in text
    unknown = "0123456789abcdef0123456789abcdef"
    assert cli.main(["compare", unknown]) == 2
    assert unknown in err.getvalue() and "not a run id, an experiment or a sweep name" in err.getvalue()


TINY = """
name: tiny
experiment: smoke
overrides: [tracking.experiment=e2e, trainer.max_steps=2, trainer.log_every_n_steps=1,
            callbacks.samples.every_n_steps=0, data.num_videos=8, checkpoint.every_n_steps=0]
grid:
  objective: [rectified_flow, rectified_flow_lognorm]
seeds: [0, 1]
"""


def test_end_to_end_on_a_real_tiny_sweep(store, tmp_path):
    """Four 2-step runs of the smoke experiment (a few seconds each), then compare their parent run.
    They log to their own MLflow experiment in the shared store, so the tests above see no change."""
    from experiments.sweep import run_sweep

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    results = run_sweep(path)
    assert [r.status for r in results] == ["FINISHED"] * 4
    client = store.client
    parent = client.get_run(results[0].run_id).data.tags["mlflow.parentRunId"]
    result = run_compare(parent, client=client)
    c = result.comparison
    assert [a.label for a in c.arms] == [label(RF), label(LOGNORM)]
    assert all(s.n == 2 for s in c.summaries["train/loss"].values())
    assert any(m.startswith("val/loss_t") for m in c.summaries)  # the timestep-loss callback's metrics
    assert "model/params_total" in c.constants
    assert (result.report_dir / "train_loss.png").exists()
    assert len(list((result.report_dir / "samples").glob("*.png"))) == 2  # real sample mp4s decoded
    assert "report/report.html" in {a.path for a in client.list_artifacts(parent, "report")}
