"""Every test writes under its own tmp folder: data cache, checkpoints and the MLflow store."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def out_dir(tmp_path, monkeypatch):
    """``VIDLAB_OUTPUT_DIR`` pointed at a fresh folder, ``MLFLOW_TRACKING_URI`` unset."""
    out = tmp_path / "outputs"
    monkeypatch.setenv("VIDLAB_OUTPUT_DIR", str(out))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return out
