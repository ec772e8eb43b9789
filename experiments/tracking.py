"""MLflow wiring: where the store is, and what every run records about itself.

Default store: an embedded SQLite database ``<output_dir>/mlflow.db`` with artifacts in
``<output_dir>/mlartifacts``; ``tracking.uri`` in the config or ``MLFLOW_TRACKING_URI`` overrides it.
Every run gets its resolved config (flattened params and a ``config.yaml`` artifact), the git commit
(``mlflow.source.git.commit``, the tag the MLflow UI shows) and whether the tree was dirty.
A tracking server that does not answer at start is an error naming it, or, with
``tracking.fallback_local: true``, a warning and the local store (`tracking_uri`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from experiments.config import ConfigError, flatten, to_yaml

log = logging.getLogger("vidlab.tracking")
_PROBLEMS: dict[str, str | None] = {}  # uri -> why it does not answer (None: it does)
_WARNED: set[str] = set()

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


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
