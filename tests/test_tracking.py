"""What MLflow holds for every run, read back through MlflowClient: the environment (``pip freeze``,
Python / torch / CUDA), the training data as a dataset input, system metrics, browser-playable sample
mp4s. And an MLflow server that does not answer at start: a clear error naming it, or the local store
with ``tracking.fallback_local: true`` (tagged on the run); nothing is written to a half-open store."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from experiments.cli import main
from experiments.config import ConfigError, compose
from experiments.fit import run_fit
from experiments.tracking import local_uri, server_problem, tracking_uri
from conftest import output_dir_at


def _closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_an_error_naming_it(out_dir, capsys):
    uri = f"http://127.0.0.1:{_closed_port()}"
    assert server_problem(uri) is not None
    with pytest.raises(ConfigError, match=rf"{uri} does not answer.*fallback_local=true"):
        tracking_uri({"tracking": {"uri": uri}, "output_dir": str(out_dir)})
    assert main(["fit", "smoke", f"tracking.uri={uri}", "trainer.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert uri in err and "tracking.fallback_local" in err
    assert not (out_dir / "checkpoints").exists()  # stopped before training


def test_fallback_logs_locally_and_tags_the_run(out_dir):
    uri = f"http://127.0.0.1:{_closed_port()}"
    composed = compose("smoke", [f"tracking.uri={uri}", "tracking.fallback_local=true", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
                                 "callbacks.samples=null", "callbacks.timestep_loss=null"])
    result = run_fit(composed)
    client = MlflowClient(local_uri(composed.cfg))
    run = client.get_run(result.run_id)
    assert run.data.tags["vidlab.tracking_fallback_from"] == uri
    assert "train/loss" in run.data.metrics
    assert server_problem(local_uri(composed.cfg)) is None  # a local store needs no server


# -- what every run holds: environment, dataset input, system metrics, playable samples -------------


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """One smoke fit of 4 steps (samples at the end) into its own store, shared by the tests below."""
    out = tmp_path_factory.mktemp("tracking") / "outputs"
    with output_dir_at(out):
        composed = compose("smoke", ["trainer.max_steps=4", "callbacks.samples.every_n_steps=0",
                                     "callbacks.timestep_loss=null", "data.num_videos=8"])
        result = run_fit(composed)
        yield composed, result, MlflowClient(local_uri(composed.cfg))


def _artifact_text(client: MlflowClient, run_id: str, path: str) -> str:
    return Path(client.download_artifacts(run_id, path)).read_text()


def test_run_records_its_environment(recorded_run):
    """``pip freeze`` as environment/requirements.txt, interpreter / torch / CUDA as JSON and tags."""
    import platform

    import torch

    from experiments.tracking import installed_packages

    _, result, client = recorded_run
    lines = _artifact_text(client, result.run_id, "environment/requirements.txt").splitlines()
    assert lines == installed_packages() and len(lines) > 20
    assert f"torch=={torch.__version__}" in lines and any(line.startswith("mlflow==") for line in lines)
    assert len({line.split("==")[0].lower() for line in lines}) == len(lines)  # one line per package
    versions = json.loads(_artifact_text(client, result.run_id, "environment/versions.json"))
    assert versions["python"] == platform.python_version() and versions["torch"] == torch.__version__
    assert versions["cuda"] == torch.version.cuda
    tags = client.get_run(result.run_id).data.tags
    assert tags["vidlab.env.torch"] == torch.__version__ and tags["vidlab.env.python"] == platform.python_version()
    assert tags["vidlab.env.cuda"] == (torch.version.cuda or "none")


def test_run_records_its_training_data_as_a_dataset_input(recorded_run):
    """The Shapes folder as an MLflow dataset: digest over files, clip settings and split; the folder
    as source; a profile that counts videos and frames and gives the resolution."""
    from datamodules.digest import json_digest, video_set_digest
    from datamodules.shapes import shapes_folder

    composed, result, client = recorded_run
    data = composed.cfg["data"]
    inputs = client.get_run(result.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    assert [(t.key, t.value) for t in inputs[0].tags] == [("mlflow.data.context", "train")]
    dataset = inputs[0].dataset
    folder = shapes_folder(data["root"], data["num_videos"], data["num_frames"], data["height"], data["width"],
                           data["seed"], data["two_object_prob"], data["fps"])
    assert dataset.name == folder.name and dataset.source_type == "local"
    assert json.loads(dataset.source) == {"uri": folder.resolve().as_uri()}
    assert [c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]] == ["video", "caption"]
    profile = json.loads(dataset.profile)
    videos = sorted(folder.glob("*.mp4"))
    captions = [json.loads(line)["caption"] for line in (folder / "captions.jsonl").read_text().splitlines()]
    assert profile["videos_sha256"] == video_set_digest(folder, [str(v) for v in videos], captions)
    clip = {"num_frames": data["num_frames"], "frame_stride": [1, 1], "size": [data["height"], data["width"]],
            "crop": "center", "seed": data["seed"]}
    split = {"train": data["num_videos"], "val": 0}
    assert profile["clip"] == clip and profile["sha256"] == json_digest(
        {"videos": profile["videos_sha256"], "clip": clip, "split": split})
    assert dataset.digest == profile["sha256"][:16]
    assert profile["num_videos"] == data["num_videos"] and profile["skipped_videos"] == 0
    assert profile["frames_total"] == data["num_videos"] * data["num_frames"]
    assert profile["first_video"] == {"height": data["height"], "width": data["width"], "fps": float(data["fps"]),
                                      "codec": "h264"}


def test_latent_cache_run_records_the_cache_as_its_dataset(out_dir):
    """Trained from a latent cache: the dataset input is the cache, its fingerprint the digest."""
    assert main(["cache-latents", "smoke_cached"]) == 0
    composed = compose("smoke_cached", ["trainer.max_steps=2", "callbacks.samples=null",
                                        "callbacks.timestep_loss=null"])
    result = run_fit(composed)
    (folder,) = (out_dir / "latents").iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    (data,) = MlflowClient(local_uri(composed.cfg)).get_run(result.run_id).inputs.dataset_inputs
    dataset = data.dataset
    assert dataset.name == f"latents-{folder.name}" and dataset.digest == manifest["fingerprint"][:16]
    assert json.loads(dataset.source) == {"uri": folder.resolve().as_uri()}
    profile = json.loads(dataset.profile)
    assert profile["fingerprint"] == manifest["fingerprint"] and profile["num_videos"] == manifest["count"] == 32
    assert profile["latent_shape"] == manifest["latent_shape"] and profile["clip"] == manifest["clip"]
    specs = json.loads(dataset.schema)["mlflow_tensorspec"]
    assert [(s["name"], s["tensor-spec"]["shape"]) for s in specs] == [
        ("latent", [-1, *manifest["latent_shape"]]), ("text", [-1, *manifest["text_shape"]])]


def test_dataset_digest_follows_the_files_and_the_clips(out_dir):
    """Same files and clips: same digest; another set of videos or another clip length: another."""
    from datamodules.shapes import ShapesDataModule
    from experiments.tracking import dataset_input

    def digest(**changes) -> str:
        kwargs = {"root": str(out_dir / "data"), "num_videos": 4, "num_frames": 4, "height": 16, "width": 16, **changes}
        datamodule = ShapesDataModule(**kwargs)
        datamodule.setup("fit")
        return dataset_input(datamodule).dataset.digest

    first = digest()
    assert digest() == first
    assert digest(num_videos=5) != first and digest(seed=1) != first
    datamodule = ShapesDataModule(root=str(out_dir / "data"), num_videos=4, num_frames=4, height=16, width=16)
    datamodule.setup("fit")
    datamodule.dataset.num_frames = 2  # the same files cut into shorter clips
    assert dataset_input(datamodule).dataset.digest != first
    assert dataset_input(object()) is None  # a datamodule it does not know: nothing logged


def test_system_metrics_are_logged_and_stop_with_the_run(recorded_run):
    """MLflow's monitor ran during the fit (at least its final sample) and no thread outlives it."""
    import threading

    _, result, client = recorded_run
    metrics = client.get_run(result.run_id).data.metrics
    assert 0.0 <= metrics["system/cpu_utilization_percentage"] <= 100.0
    assert metrics["system/system_memory_usage_megabytes"] > 0
    assert "system/disk_usage_percentage" in metrics
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor" and t.is_alive()]


def test_system_metrics_stop_when_training_fails(out_dir, monkeypatch):
    """A fit that raises mid-training still stops its monitor (Lightning's on_exception) and keeps
    what was sampled."""
    import threading

    from modules.system import GeneratorSystem

    def boom(self, batch, batch_idx):
        raise RuntimeError("boom")

    monkeypatch.setattr(GeneratorSystem, "training_step", boom)
    composed = compose("smoke", ["trainer.max_steps=2", "callbacks.samples=null", "callbacks.timestep_loss=null",
                                 "data.num_videos=4"])
    with pytest.raises(RuntimeError, match="boom"):
        run_fit(composed)
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor" and t.is_alive()]
    client = MlflowClient(local_uri(composed.cfg))
    (run,) = client.search_runs([client.get_experiment_by_name("vidlab").experiment_id])
    assert run.info.status == "FAILED" and "system/cpu_utilization_percentage" in run.data.metrics


def test_system_metrics_sample_at_the_interval_and_stop_on_exit(out_dir):
    """A 0.2 s interval over ~1 s: several points at increasing steps; nothing after the block."""
    import threading
    import time

    from experiments.tracking import SystemMetrics

    client = MlflowClient(local_uri({"output_dir": str(out_dir)}))
    run = client.create_run(client.create_experiment("system")).info.run_id
    with SystemMetrics(run, local_uri({"output_dir": str(out_dir)}), interval=0.2):
        time.sleep(1.0)
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor" and t.is_alive()]
    steps = [m.step for m in client.get_metric_history(run, "system/cpu_utilization_percentage")]
    assert len(steps) >= 3 and steps == sorted(set(steps)) and steps[0] == 0
    time.sleep(0.5)
    assert len(client.get_metric_history(run, "system/cpu_utilization_percentage")) == len(steps)
    with SystemMetrics(run, "unused", interval=0):  # off: nothing started, nothing logged
        pass


def test_sample_videos_are_browser_playable_h264_mp4(recorded_run):
    """The logged samples are H.264 (yuv420p) in an mp4 container with the index (moov) first, the
    type MLflow's artifact server sends as video/mp4 (the served header: tests/test_ui.py)."""
    import av
    from mlflow.utils.mime_type_utils import _guess_mime_type

    composed, result, client = recorded_run
    files = client.list_artifacts(result.run_id, "samples/step_000004")
    assert [Path(f.path).suffix for f in files] == [".mp4"]
    local = Path(client.download_artifacts(result.run_id, files[0].path))
    with av.open(str(local)) as container:
        stream = container.streams.video[0]
        assert "mp4" in container.format.name.split(",")
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert stream.frames == composed.cfg["data"]["num_frames"]
    raw = local.read_bytes()
    assert raw[4:8] == b"ftyp" and 0 < raw.find(b"moov") < raw.find(b"mdat")  # faststart: plays while loading
    assert _guess_mime_type(str(local)) == "video/mp4"
