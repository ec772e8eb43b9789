"""Distributed training on CPU (gloo): `vidlab fit` with ``trainer.devices=2`` and ``trainer.strategy``
``ddp`` or ``fsdp`` (FSDP2 via modules/parallel.py), against the single-process run of the same YAML
with the same global batch. Each run is a real ``vidlab fit`` subprocess; Lightning's launcher starts
the second rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments.config import compose
from experiments.build import build_system
from modules.parallel import ParallelConfig, parallelize

STEPS = 16
COMMON = ["data.num_videos=32", f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1",
          "callbacks.timestep_loss=null", "callbacks.model_card=null", "checkpoint.every_n_steps=1000",
          "optim.lr=1e-3", "ema.enabled=true", "ema.decay=0.9"]
NO_SAMPLES = "callbacks.samples=null"
# the two-rank runs sample with the EMA weights every 5 steps: if a swap were not undone on every
# rank, DDP and FSDP2 would stop agreeing after step 5
SAMPLES = ["callbacks.samples.every_n_steps=5", "callbacks.samples.prompts=[a red circle moving left on a black background]"]


def _fit(out: Path, name: str, *overrides: str, torchrun: bool = False) -> list[float]:
    """Run ``vidlab fit smoke`` in a subprocess (or under torchrun, 2 processes on localhost); return
    rank 0's train/loss per step from MLflow."""
    env = {**os.environ, "VIDLAB_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] if torchrun
                else [sys.executable])
    cmd = [*launcher, "-m", "experiments.cli", "fit", "smoke", f"name={name}", *COMMON, *overrides]
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vidlab").experiment_id],
                              filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, f"expected one MLflow run named {name}, got {len(runs)} (a rank made its own?)"
    RUNS[name] = runs[0]
    history = sorted(client.get_metric_history(runs[0].info.run_id, "train/loss"), key=lambda m: m.step)
    return [m.value for m in history]


RUNS: dict = {}  # run name -> the MLflow run of `_fit`


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel") / "outputs"
    single = _fit(out, "single", "data.batch_size=4", NO_SAMPLES)
    ddp = _fit(out, "ddp", "data.batch_size=2", "trainer.devices=2", "trainer.strategy=ddp", *SAMPLES)
    fsdp = _fit(out, "fsdp", "data.batch_size=2", "trainer.devices=2", "trainer.strategy=fsdp", *SAMPLES)
    torchrun = _fit(out, "torchrun", "data.batch_size=2", "trainer.devices=2", "trainer.strategy=ddp", NO_SAMPLES,
                    torchrun=True)
    return single, ddp, fsdp, torchrun


def test_ddp_and_fsdp2_agree_step_by_step(curves):
    """Same data split, same per-rank draws (seed + rank), gradients averaged over the same two
    ranks: DDP's all-reduce and FSDP2's reduce-scatter give the same updates up to summation order."""
    _, ddp, fsdp, _ = curves
    assert len(ddp) == len(fsdp) == STEPS
    diff = max(abs(a - b) / abs(a) for a, b in zip(ddp, fsdp))
    assert diff < 1e-4, (ddp, fsdp)


def test_two_processes_follow_the_single_process_curve(curves):
    """Global batch 4 either way: the curves differ per step (other clips and draws per step) but
    fall alike; the mean of the second half agrees within 15 %."""
    single, ddp, _, _ = curves
    assert len(single) == STEPS
    half = STEPS // 2

    def mean(x: list[float]) -> float:
        return sum(x[half:]) / len(x[half:])

    for curve in (single, ddp):
        assert mean(curve) < sum(curve[:3]) / 3  # it learns
    assert abs(mean(ddp) - mean(single)) / mean(single) < 0.15, (single, ddp)


def test_parallelize_wraps_blocks_without_a_mesh():
    """Activation checkpointing per block on one process: the same output and the same gradients."""
    composed = compose("smoke")
    torch.manual_seed(0)
    plain = build_system(composed)
    torch.manual_seed(0)
    wrapped = build_system(composed)
    parallelize(wrapped.backbone, None, ParallelConfig(activation_checkpointing=True))
    assert all(type(b).__name__ == "CheckpointWrapper" for b in wrapped.backbone.blocks)
    video = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    with torch.no_grad():  # one conditioning for both backbones (no graph through the text encoder)
        cond = plain.encode_text(["a red circle moving left on a black background", ""])
        x = plain.vae.encode(video)
    t = torch.tensor([0.3, 0.8])
    out_a, out_b = plain.backbone(x, t, cond), wrapped.backbone(x, t, cond)
    assert torch.equal(out_a, out_b)
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    for (name, a), (_, b) in zip(plain.backbone.named_parameters(), wrapped.backbone.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_torchrun_launch_is_the_same_run_as_lightnings_launcher(curves):
    """torchrun starts both ranks itself (rank 1 learns the MLflow run id from rank 0's file): one
    run, and the same per-step losses as the DDP run Lightning's launcher started."""
    _, ddp, _, torchrun = curves
    assert torchrun == pytest.approx(ddp, rel=1e-6)


def test_fsdp_checkpoint_is_sharded_and_exports_to_one_safetensors_file(curves):
    """The FSDP2 run leaves a torch.distributed.checkpoint folder (one shard file per rank) and a
    safetensors export, which the run's vidlab.checkpoint names: it loads into a one-process model
    with exactly the gathered weights, and samples."""
    from experiments.export import is_sharded, read_checkpoint
    from experiments.sample import load_system

    tags = RUNS["fsdp"].data.tags
    sharded, export = Path(tags["vidlab.checkpoint_sharded"]), Path(tags["vidlab.checkpoint"])
    assert is_sharded(sharded) and len(list(sharded.glob("*.distcp"))) == 2
    assert export.suffix == ".safetensors" and export.parent == sharded.parent
    full = read_checkpoint(sharded)
    assert full["global_step"] == STEPS
    system = load_system(export, averaged=False)
    state = system.state_dict()
    assert set(full["state_dict"]) == set(state)
    for key, value in full["state_dict"].items():
        assert torch.equal(state[key], value), key
    with torch.no_grad():
        video = system.generate(["a red circle moving left on a black background"], [0], 4, 16, 16)
    assert video.shape == (1, 3, 4, 16, 16) and torch.isfinite(video).all()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_evaluation_callback_shards_unequal_work_across_ranks(tmp_path, strategy):
    """5 videos on 2 ranks (3 and 2): every rank generates its share (padded to equal sampler calls,
    which FSDP2's collective forwards need), the features are gathered, rank 0 logs the scores of
    all 5 and nothing hangs."""
    import json

    out = tmp_path / "outputs"
    overrides = ["text=tiny", "backbone=dit_tiny", "data.num_videos=32", "data.batch_size=2", "sampler.steps=2",
                 "trainer.devices=2", f"trainer.strategy={strategy}", "callbacks.samples=null",
                 "callbacks.timestep_loss=null", "callbacks.evaluation.num_videos=5", "callbacks.evaluation.batch_size=2",
                 "callbacks.evaluation.num_reference=16", "callbacks.evaluation.reference.num_videos=16",
                 "callbacks.evaluation.probe.steps=20"]
    env = {**os.environ, "VIDLAB_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "experiments.cli", "fit", "shapes", "name=evaluated", "trainer.max_steps=2", *overrides]
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("vidlab").experiment_id])[0]
    assert {"eval/probe_acc_joint", "eval/fvd_probe"} <= set(run.data.metrics)
    protocol = json.loads(Path(client.download_artifacts(run.info.run_id, "eval/protocol.json")).read_text())
    assert protocol["num_generated"] == 5
    folder = out / "eval" / run.info.run_id / "step_000002"
    assert sorted(int(p.stem.rpartition("-")[2]) for p in folder.glob("*.mp4")) == [0, 1, 2, 3, 4]  # both ranks wrote


def test_ema_under_fsdp2_stays_sharded_and_equals_the_ddp_average(curves, tmp_path):
    """Each rank stored only its half of every EMA tensor (two chunks per tensor in the sharded
    checkpoint's metadata, written by two ranks): nothing was gathered. Gathered afterwards, the
    FSDP2 averages equal DDP's (same updates up to summation order). The last sample of the FSDP2
    run was drawn with those averaged weights: a one-process model given the export's averages
    draws the same video, and with its raw weights a different one."""
    from torch.distributed.checkpoint import FileSystemReader

    from callbacks.samples import save_videos
    from experiments.export import read_checkpoint
    from experiments.sample import load_system
    import decord

    tags = RUNS["fsdp"].data.tags
    metadata = FileSystemReader(tags["vidlab.checkpoint_sharded"]).read_metadata().state_dict_metadata
    ema_keys = [k for k in metadata if ".ema." in k and not k.endswith("num_updates")]
    assert ema_keys
    for key in ema_keys:
        chunks = metadata[key].chunks
        if metadata[key].size[0] >= 2:
            assert len(chunks) == 2 and sum(c.sizes[0] for c in chunks) == metadata[key].size[0], key
    fsdp = read_checkpoint(tags["vidlab.checkpoint_sharded"])["state_dict"]
    ddp = read_checkpoint(RUNS["ddp"].data.tags["vidlab.checkpoint"])["state_dict"]
    averages = [k for k in ddp if k.startswith("ema.") and k != "ema.num_updates"]
    assert sorted(averages) == sorted(k for k in fsdp if k.startswith("ema.") and k != "ema.num_updates")
    assert int(fsdp["ema.num_updates"]) == int(ddp["ema.num_updates"]) == STEPS
    # AdamW moves each weight by at most lr = 1e-3 per step: 5e-5 is 5 % of one step's update
    for key in averages:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=5e-5, msg=key)
    total = sum(float((fsdp[k] - ddp[k]).square().sum()) for k in averages) ** 0.5
    assert total <= 1e-4 * sum(float(ddp[k].square().sum()) for k in averages) ** 0.5

    prompt = "a red circle moving left on a black background"
    run_id = RUNS["fsdp"].info.run_id
    logged = Path(tags["vidlab.checkpoint"]).parents[2] / "samples" / run_id / f"step_{STEPS:06d}" / f"{prompt}-0.mp4"

    def frames(path: Path) -> torch.Tensor:
        reader = decord.VideoReader(str(path))
        return torch.from_numpy(reader.get_batch(list(range(len(reader)))).asnumpy()).float()  # (T, H, W, 3)

    errors = {}
    for averaged in (True, False):  # drawn and written as the callback does (H.264 is lossy: compare decoded)
        system = load_system(Path(tags["vidlab.checkpoint"]), averaged=averaged)
        video = system.generate([prompt], [0], 4, 16, 16)
        path = save_videos(video, [prompt], [0], tmp_path / str(averaged), fps=8, display_scale=4)[0]
        errors[averaged] = (frames(path) - frames(logged)).abs().mean().item()
    assert errors[True] < 0.5 and errors[False] > 20, errors


def test_fsdp2_gradient_accumulation_and_clipping_follow_ddp(tmp_path):
    """2 micro-batches per optimizer step and a clipping norm of 1e-6: FSDP2 must accumulate its
    sharded gradients and clip by the norm over all shards, so its losses follow DDP's step by step.
    AdamW's update barely depends on the gradient's scale, except where the scaled gradient falls
    below its eps (1e-8): clipped to norm 1e-6, each of the 0.6 M gradient entries is ~1e-9, the
    updates shrink with the clipping factor, and a wrong (e.g. per-shard) norm would show."""
    out = tmp_path / "outputs"
    base = ["data.batch_size=1", "trainer.devices=2", "trainer.accumulate_grad_batches=2", "trainer.max_steps=6",
            NO_SAMPLES]
    ddp = _fit(out, "ddp_accumulate", *base, "trainer.gradient_clip_val=1e-6", "trainer.strategy=ddp")
    fsdp = _fit(out, "fsdp_accumulate", *base, "trainer.gradient_clip_val=1e-6", "trainer.strategy=fsdp")
    assert len(ddp) == len(fsdp) >= 6
    assert max(abs(a - b) / abs(a) for a, b in zip(ddp, fsdp)) < 1e-4, (ddp, fsdp)
    unclipped = _fit(out, "ddp_unclipped", *base, "trainer.gradient_clip_val=1e9", "trainer.strategy=ddp")
    assert max(abs(a - b) / abs(a) for a, b in zip(ddp, unclipped)) > 1e-3, (ddp, unclipped)  # clipping acted
