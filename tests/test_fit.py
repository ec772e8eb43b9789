"""The whole path on CPU: smoke.yaml fits, logs to MLflow, checkpoints, and samples again."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from datamodules.mp4 import read_mp4
from experiments.cli import main
from experiments.config import compose
from experiments.fit import run_fit
from experiments.sample import load_system
from experiments.tracking import tracking_uri
from conftest import output_dir_at


@pytest.fixture(scope="module")
def module_out(tmp_path_factory):
    """One output folder (and MLflow store) for the whole module: the smoke fit runs once."""
    out = tmp_path_factory.mktemp("fit") / "outputs"
    with output_dir_at(out):
        yield out


@pytest.fixture(scope="module")
def smoke_run(module_out):
    composed = compose("smoke")
    start = time.perf_counter()
    result = run_fit(composed)
    seconds = time.perf_counter() - start
    assert seconds < 60, f"smoke.yaml must fit in under 60 s on CPU, took {seconds:.1f} s"
    return composed, result


@pytest.fixture
def out_dir(module_out):
    return module_out


def test_smoke_fit_logs_params_metrics_config_and_playable_mp4(smoke_run, out_dir):
    composed, result = smoke_run
    client = MlflowClient(tracking_uri(composed.cfg))
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert tracking_uri(composed.cfg) == f"sqlite:///{out_dir / 'mlflow.db'}"
    # flattened resolved config as params, presets and git commit as tags
    assert run.data.params["backbone.dim"] == str(composed.cfg["backbone"]["dim"])
    assert run.data.params["optim.lr"] == str(composed.cfg["optim"]["lr"])
    assert run.data.tags["vidlab.preset.backbone"] == "dit_tiny"
    assert len(run.data.tags.get("mlflow.source.git.commit", "x" * 40)) == 40
    # losses: one point every log_every_n_steps, all finite
    history = client.get_metric_history(result.run_id, "train/loss")
    max_steps, every = composed.cfg["trainer"]["max_steps"], composed.cfg["trainer"]["log_every_n_steps"]
    assert len(history) == max_steps // every
    assert all(math.isfinite(m.value) for m in history)
    # config.yaml artifact recomposes to the same config
    local = Path(client.download_artifacts(result.run_id, "config.yaml"))
    assert compose(local).cfg == composed.cfg
    # sample videos: every N steps and at the end, H.264 mp4 that decord reads
    steps = sorted(a.path for a in client.list_artifacts(result.run_id, "samples"))
    assert steps == ["samples/step_000010", "samples/step_000020"]
    files = client.list_artifacts(result.run_id, "samples/step_000020")
    prompt = composed.cfg["callbacks"]["samples"]["prompts"][0]
    assert [Path(f.path).name for f in files] == [f"{prompt}-0.mp4"]
    video = read_mp4(client.download_artifacts(result.run_id, files[0].path))
    scale = composed.cfg["callbacks"]["samples"]["display_scale"]
    assert video.shape == (4, 16 * scale, 16 * scale, 3) and video.dtype == np.uint8
    assert (Path(result.samples[0]).read_bytes()[4:8]) == b"ftyp"


def test_smoke_fit_logs_model_card(smoke_run):
    """callbacks/model_card.py: model_card.json and model/* metrics at fit start, from the built model."""
    from dit_arithmetic import dit_parameters

    composed, result = smoke_run
    client = MlflowClient(tracking_uri(composed.cfg))
    card = json.loads(Path(client.download_artifacts(result.run_id, "model_card.json")).read_text())
    backbone = composed.cfg["backbone"]
    total = dit_parameters(3, composed.cfg["text"]["dim"], backbone["dim"], backbone["depth"], backbone["heads"],
                           tuple(backbone["patch"]), backbone["mlp_ratio"])
    data = composed.cfg["data"]
    assert card["params"] == {"total": total, "trainable": total, "active": total}
    assert card["checkpoint_bytes"] == {"fp32": 4 * total, "bf16": 2 * total, "int8": total}
    assert card["x_shape"] == [data["batch_size"], 3, data["num_frames"], data["height"], data["width"]]
    assert card["text_len"] == composed.cfg["text"]["max_length"]
    assert card["flops"]["cfg"] is True and card["flops"]["sampling_steps"] == composed.cfg["sampler"]["steps"]
    metrics = client.get_run(result.run_id).data.metrics
    assert metrics["model/params_total"] == total and metrics["model/checkpoint_bytes_bf16"] == 2 * total
    if card["flops"]["forward"] is not None:
        assert metrics["model/flops_train_step"] == 3 * card["flops"]["forward"]


def test_checkpoint_loads_without_pickle_and_samples_deterministically(smoke_run, out_dir, tmp_path):
    composed, result = smoke_run
    ckpt = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["vidlab_config"] == composed.cfg
    system = load_system(result.checkpoint)
    prompts, seeds = ["a red circle moving left on a black background"] * 2, [0, 1]
    a = system.generate(prompts, seeds, 4, 16, 16)
    b = system.generate(prompts, seeds, 4, 16, 16)
    assert a.shape == (2, 3, 4, 16, 16)
    assert torch.equal(a, b)  # same prompt and seed, same video
    assert not torch.equal(a[0], a[1])  # another seed, another video
    assert a.abs().max() <= 1.0
    # the trained weights are the checkpoint's: the backbone output is not the zero-init identity
    assert any(p.abs().sum() > 0 for n, p in system.backbone.named_parameters() if "final" in n or "out" in n)


def test_cli_sample_from_run_id_writes_mp4(smoke_run, tmp_path):
    _, result = smoke_run
    out = tmp_path / "cli-samples"
    code = main(["sample", result.run_id, "--prompt", "a blue square moving up on a gray background",
                 "--seed", "0", "--seed", "5", "--out", str(out)])
    assert code == 0
    names = sorted(p.name for p in out.glob("*.mp4"))
    assert names == ["a blue square moving up on a gray background-0.mp4",
                     "a blue square moving up on a gray background-5.mp4"]
    assert read_mp4(out / names[0]).shape[0] == 4


def test_fit_from_run_reruns_the_logged_config(smoke_run, out_dir):
    composed, result = smoke_run
    code = main(["fit", "--from-run", result.run_id, "trainer.max_steps=5", "callbacks.samples.every_n_steps=0"])
    assert code == 0
    client = MlflowClient(tracking_uri(composed.cfg))
    runs = client.search_runs([client.get_run(result.run_id).info.experiment_id],
                              filter_string=f"tags.`vidlab.from_run` = '{result.run_id}'")
    assert len(runs) == 1
    params, original = runs[0].data.params, client.get_run(result.run_id).data.params
    assert params["trainer.max_steps"] == "5"
    assert {k: v for k, v in params.items() if not k.startswith(("trainer.max_steps", "callbacks.samples.every"))} == {
        k: v for k, v in original.items() if not k.startswith(("trainer.max_steps", "callbacks.samples.every"))}


def test_cli_reports_config_errors_with_nearest_key(out_dir, capsys):
    assert main(["fit", "smoke", "trainer.max_step=3"]) == 2
    assert "did you mean 'trainer.max_steps'" in capsys.readouterr().err
