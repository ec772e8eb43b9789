"""An MLflow server that does not answer at start: a clear error naming it, or the local store with
``tracking.fallback_local: true`` (tagged on the run); nothing is written to a half-open store."""

from __future__ import annotations

import socket

import pytest
from mlflow.tracking import MlflowClient

from experiments.cli import main
from experiments.config import ConfigError, compose
from experiments.fit import run_fit
from experiments.tracking import local_uri, server_problem, tracking_uri


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
