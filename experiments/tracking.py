"""MLflow wiring: where the store is, and what every run records about itself.

Default store: an embedded SQLite database ``<output_dir>/mlflow.db`` with artifacts in
``<output_dir>/mlartifacts``; ``tracking.uri`` in the config or ``MLFLOW_TRACKING_URI`` overrides it.
Every run gets:

- its resolved config (flattened params and a ``config.yaml`` artifact), the git commit
  (``mlflow.source.git.commit``, the tag the MLflow UI shows) and whether the tree was dirty;
- its environment (`log_environment`): ``environment/requirements.txt`` (``pip freeze``, read from
  the package metadata), ``environment/versions.json`` and ``vidlab.env.*`` tags (Python, torch,
  CUDA, GPUs);
- its training data as an MLflow dataset input (`dataset_input`): name, digest, source folder, schema
  and a profile (videos, frames, resolution, clip settings), context ``train``;
- system metrics (`SystemMetrics`): MLflow's own monitor, ``system/*`` every 10 s while it trains
  and once at the end.

`RunRecord` is the Lightning callback that logs the last three for `experiments.fit.run_fit`.

A tracking server that does not answer at start is an error naming it, or, with
``tracking.fallback_local: true``, a warning and the local store (`tracking_uri`).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities import Dataset, DatasetInput, InputTag, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from datamodules.digest import json_digest, video_set_digest
from experiments.config import ConfigError, flatten, to_yaml

log = logging.getLogger("vidlab.tracking")
_PROBLEMS: dict[str, str | None] = {}  # uri -> why it does not answer (None: it does)
_WARNED: set[str] = set()

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
SYSTEM_METRICS_INTERVAL = 10.0  # seconds between system metric samples (tracking.system_metrics_interval)
DIGEST_CHARS = 16  # of a dataset digest shown in MLflow (its column holds 36); the profile has all 64


def requested_uri(cfg: dict[str, Any] | None = None) -> str:
    """Config ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded SQLite store."""
    configured = (cfg or {}).get("tracking", {}).get("uri")
    if configured:
        return str(configured)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return local_uri(cfg)


def local_uri(cfg: dict[str, Any] | None = None) -> str:
    """``sqlite:///<output_dir>/mlflow.db`` (the folder is created)."""
    out = Path((cfg or {}).get("output_dir") or os.environ.get("VIDLAB_OUTPUT_DIR", "outputs")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'mlflow.db'}"


def server_problem(uri: str, timeout: float = 5.0) -> str | None:
    """Why an http(s) tracking server does not answer its ``/health`` endpoint, or None (it answers,
    or the store is local). Checked once per URI per process."""
    if not uri.startswith(("http://", "https://")):
        return None
    if uri not in _PROBLEMS:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                _PROBLEMS[uri] = None
        except urllib.error.HTTPError:  # it answered, with an HTTP status: reachable
            _PROBLEMS[uri] = None
        except (OSError, ValueError) as exc:  # refused, unknown host, timeout
            _PROBLEMS[uri] = str(getattr(exc, "reason", exc))
    return _PROBLEMS[uri]


def tracking_uri(cfg: dict[str, Any] | None = None) -> str:
    """`requested_uri`, checked: a server that does not answer is a ConfigError naming it, or with
    ``tracking.fallback_local: true`` the local store instead (a warning; the run is tagged
    ``vidlab.tracking_fallback_from``)."""
    uri = requested_uri(cfg)
    problem = server_problem(uri)
    if problem is None:
        return uri
    local = local_uri(cfg)
    if not (cfg or {}).get("tracking", {}).get("fallback_local"):
        raise ConfigError(f"MLflow tracking server {uri} does not answer ({problem}). Start it, fix tracking.uri "
                          f"or MLFLOW_TRACKING_URI, or set tracking.fallback_local=true to log to {local} instead")
    if uri not in _WARNED:
        log.warning("MLflow tracking server %s does not answer (%s): logging to %s (tracking.fallback_local)",
                    uri, problem, local)
        _WARNED.add(uri)
    return local


def artifact_location(cfg: dict[str, Any], uri: str) -> str | None:
    """Artifacts beside the embedded store; a remote server decides for itself (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()


def git_state() -> dict[str, str]:
    """The commit and dirty flag of the vidlab checkout, or nothing outside a git checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"mlflow.source.git.commit": sha, "vidlab.git_dirty": str(bool(dirty)).lower()}


def client(cfg: dict[str, Any] | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri(cfg))


def experiment_id(cfg: dict[str, Any]) -> str:
    """The id of ``tracking.experiment``, created (with the default artifact folder) if needed."""
    uri = tracking_uri(cfg)
    mlflow_client = MlflowClient(uri)
    name = cfg["tracking"]["experiment"]
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=artifact_location(cfg, uri))


def make_logger(cfg: dict[str, Any], run_id: str | None = None, tags: dict[str, str] | None = None) -> MLFlowLogger:
    """A Lightning MLFlowLogger on the configured store; ``run_id`` continues an existing run."""
    uri = tracking_uri(cfg)
    if uri != requested_uri(cfg):
        tags = {**(tags or {}), "vidlab.tracking_fallback_from": requested_uri(cfg)}
    experiment_id(cfg)  # create with our artifact location before Lightning would create it without
    return MLFlowLogger(
        experiment_name=cfg["tracking"]["experiment"],
        run_name=cfg.get("name"),
        tracking_uri=uri,
        tags={**git_state(), **(tags or {})},
        run_id=run_id,
    )


def log_config(mlflow_client: MlflowClient, run_id: str, cfg: dict[str, Any]) -> None:
    """Flattened config as params (in batches of 100, MLflow's limit) and ``config.yaml``."""
    params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in sorted(flatten(cfg).items())]
    for i in range(0, len(params), 100):
        mlflow_client.log_batch(run_id, params=params[i : i + 100])
    mlflow_client.log_text(run_id, to_yaml(cfg), "config.yaml")


def run_config(mlflow_client: MlflowClient, run_id: str) -> str:
    """The ``config.yaml`` a run was started with (for ``vidlab fit --from-run``)."""
    local = mlflow_client.download_artifacts(run_id, "config.yaml")
    return Path(local).read_text()


# -- environment ------------------------------------------------------------------------------------


def installed_packages() -> list[str]:
    """``name==version`` of every installed distribution, sorted by name: what ``pip freeze`` lists,
    read from the package metadata (importlib.metadata) so it needs no pip subprocess and works in
    environments without pip. The first of two copies of one name wins, as on ``sys.path``."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(name.lower().replace("_", "-"), f"{name}=={dist.version}")
    return [found[key] for key in sorted(found)]


def runtime_versions() -> dict[str, Any]:
    """What the numbers of a run may depend on beyond the package list: interpreter, platform, torch
    and its CUDA / cuDNN build, and the GPUs this process sees (none on a CPU build)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = [torch.cuda.get_device_name(i) for i in range(count)]
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,  # None: a CPU build
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpus": gpus,
        "lightning": L.__version__,
        "mlflow": importlib.metadata.version("mlflow"),
    }


def log_environment(mlflow_client: MlflowClient, run_id: str) -> dict[str, Any]:
    """``environment/requirements.txt`` and ``environment/versions.json`` (`runtime_versions`) as
    artifacts, and the versions one compares runs by as ``vidlab.env.{python,torch,cuda,gpu}`` tags
    (sortable columns in the UI). A resumed run gets the environment of its latest attempt."""
    versions = runtime_versions()
    mlflow_client.log_text(run_id, "\n".join(installed_packages()) + "\n", "environment/requirements.txt")
    mlflow_client.log_dict(run_id, versions, "environment/versions.json")
    tags = {"python": versions["python"], "torch": versions["torch"], "cuda": versions["cuda"] or "none",
            "gpu": ", ".join(versions["gpus"]) or "none"}
    for key, value in tags.items():
        mlflow_client.set_tag(run_id, f"vidlab.env.{key}", value)
    return versions


# -- dataset input ----------------------------------------------------------------------------------


def _first_video(path: str) -> dict[str, Any]:
    """Height, width, frame rate and codec from a video's header (PyAV; nothing is decoded)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate
        return {"height": stream.height, "width": stream.width, "fps": float(rate) if rate else None,
                "codec": stream.codec_context.name}


def _video_set_dataset(datamodule: Any) -> Dataset:
    """A `VideoDataset`-backed datamodule (Shapes, video folders) as an MLflow dataset, source the
    dataset folder. What a run trains on is the files and how clips are cut from them, so the digest
    covers `video_set_digest` (names, sizes, captions), the clip settings and the train/val split:
    MLflow keeps one profile per (name, digest) in an experiment, and arms that cut other clips from
    the same files must not share one."""
    from mlflow.types import ColSpec, DataType, Schema

    d = datamodule.dataset
    first = _first_video(d.paths[0])
    clip = {"num_frames": d.num_frames, "frame_stride": list(d.stride_range),
            "size": list(d.size) if d.size is not None else [first["height"], first["width"]],
            "crop": d.crop, "seed": d.seed}
    train, val = getattr(datamodule, "train_dataset", None), getattr(datamodule, "val_dataset", None)
    split = {"train": len(d.paths) if train is None else len(train), "val": 0 if val is None else len(val)}
    videos = video_set_digest(d.root, d.paths, d.captions)
    digest = json_digest({"videos": videos, "clip": clip, "split": split})
    cls = type(datamodule)
    profile = {
        "datamodule": f"{cls.__module__}.{cls.__qualname__}",
        "num_videos": len(d.paths),
        "num_train": split["train"],
        "num_val": split["val"],
        "skipped_videos": len(d.skipped),
        "frames_total": int(sum(d.lengths)),
        "frames_per_video": {"min": min(d.lengths), "max": max(d.lengths)},
        "first_video": first,
        "clip": clip,
        "videos_sha256": videos,
        "sha256": digest,
    }
    schema = Schema([ColSpec(DataType.string, "video"), ColSpec(DataType.string, "caption")])
    return Dataset(name=Path(d.root).name, digest=digest[:DIGEST_CHARS], source_type="local",
                   source=json.dumps({"uri": Path(d.root).resolve().as_uri()}),
                   schema=json.dumps({"mlflow_colspec": schema.to_dict()}), profile=json.dumps(profile))


def _latent_cache_dataset(datamodule: Any) -> Dataset:
    """A `LatentCacheDataModule` as an MLflow dataset: its manifest's fingerprint (autoencoder, text
    encoder, every video's content, clip settings) is the digest, the cache folder the source."""
    import numpy as np
    from mlflow.types import Schema, TensorSpec

    manifest, folder = datamodule.manifest, Path(datamodule.folder)
    profile = {key: manifest.get(key) for key in ("count", "latent_shape", "text_shape", "dtype", "clip",
                                                  "source_root", "skipped", "fixed_draws")}
    profile.update(num_videos=manifest.get("count"), fingerprint=manifest["fingerprint"], parts=manifest.get("parts"))
    try:
        dtype = np.dtype(str(manifest.get("dtype", "float32")).removeprefix("torch."))
    except TypeError:  # bfloat16 has no numpy dtype: described as float32
        dtype = np.dtype("float32")
    schema = Schema([TensorSpec(dtype, (-1, *manifest["latent_shape"]), "latent"),
                     TensorSpec(np.dtype("float32"), (-1, *manifest["text_shape"]), "text")])
    return Dataset(name=f"latents-{folder.name}", digest=manifest["fingerprint"][:DIGEST_CHARS], source_type="local",
                   source=json.dumps({"uri": folder.resolve().as_uri()}),
                   schema=json.dumps({"mlflow_tensorspec": schema.to_dict()}), profile=json.dumps(profile, default=str))


def dataset_input(datamodule: Any, context: str = "train") -> DatasetInput | None:
    """The datamodule's data as an MLflow `DatasetInput` (tag ``mlflow.data.context``), after its
    ``setup``: a latent cache by its manifest, a `VideoDataset` by its files; None for a datamodule
    that is neither (nothing is logged for it)."""
    if getattr(datamodule, "manifest", None) and getattr(datamodule, "folder", None):
        dataset = _latent_cache_dataset(datamodule)
    elif getattr(getattr(datamodule, "dataset", None), "paths", None):
        dataset = _video_set_dataset(datamodule)
    else:
        log.debug("no dataset input for %s: neither a latent cache nor a VideoDataset", type(datamodule).__name__)
        return None
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


# -- system metrics ---------------------------------------------------------------------------------


class SystemMetrics:
    """MLflow's own system metrics monitor (``system/cpu_utilization_percentage``, memory, disk,
    network; GPU utilisation and memory when ``nvidia-ml-py`` is installed) on one run, as a context
    manager: a daemon thread samples every ``interval`` seconds (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``
    overrides it) and stops on leaving the block, whatever ended it.

    MLflow's thread drops the samples of its last unfinished interval when stopped, so a run shorter
    than ``interval`` would get none: on stop one more sample is taken and published with them, and
    every run ends with at least one point. ``resume`` continues the steps of an earlier attempt.
    ``interval`` None or 0: nothing is started.
    """

    def __init__(self, run_id: str, uri: str, interval: float | None = SYSTEM_METRICS_INTERVAL,
                 resume: bool = False) -> None:
        self.run_id, self.uri, self.interval, self.resume = run_id, uri, interval, resume
        self._monitor: Any = None

    def __enter__(self) -> "SystemMetrics":
        return self.start()

    def start(self) -> "SystemMetrics":
        """Start sampling (a daemon thread); nothing when ``interval`` is None or 0."""
        if not self.interval or self._monitor is not None:
            return self
        import psutil
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        psutil.cpu_percent()  # the first call only starts psutil's CPU-time window (it returns 0.0)
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start / stop lines per run
        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.interval,
                                             resume_logging=self.resume, tracking_uri=self.uri)
        self._monitor.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the thread (joined) and publish its pending samples plus one taken now."""
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        monitor.finish()
        try:
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as exc:  # noqa: BLE001 - system metrics must never fail a finished training run
            log.warning("could not log the last system metrics of run %s: %s", self.run_id, exc)


def system_metrics_interval(cfg: dict[str, Any]) -> float | None:
    """Seconds between system metric samples: ``tracking.system_metrics_interval`` (default
    `SYSTEM_METRICS_INTERVAL`; null or 0: off)."""
    return cfg.get("tracking", {}).get("system_metrics_interval", SYSTEM_METRICS_INTERVAL)


class RunRecord(L.Callback):
    """What a fit records about itself besides its config, on global rank 0: at setup
    `log_environment`, the training data as a dataset input (`dataset_input`) and the start of
    `SystemMetrics`, which stop at teardown or on an exception, so no monitor outlives its fit.

    A setup hook because only then has Lightning set up the datamodule (the dataset's files are
    listed) and the devices (the GPUs are named without initialising CUDA before a launcher forks).
    ``resume``: system metric steps continue the run's earlier attempt.
    """

    def __init__(self, cfg: dict[str, Any], resume: bool = False) -> None:
        self.cfg, self.resume = cfg, resume
        self._monitor: SystemMetrics | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        run_id = getattr(trainer.logger, "run_id", None)
        if stage != "fit" or not trainer.is_global_zero or not run_id:
            return
        mlflow_client = trainer.logger.experiment
        try:
            log_environment(mlflow_client, run_id)
            data = dataset_input(trainer.datamodule) if trainer.datamodule is not None else None
            if data is not None:
                mlflow_client.log_inputs(run_id, datasets=[data])
        except Exception as exc:  # noqa: BLE001 - a description that cannot be made must not stop training
            log.warning("could not record the environment or dataset of run %s: %s", run_id, exc)
        interval = system_metrics_interval(self.cfg)
        self._monitor = SystemMetrics(run_id, tracking_uri(self.cfg), interval, self.resume).start()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop()

    def _stop(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.stop()
