"""Every test writes under its own tmp folder: data cache, checkpoints and the MLflow store."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextmanager
def output_dir_at(out: Path) -> Iterator[Path]:
    """``VIDLAB_OUTPUT_DIR`` = ``out`` and ``MLFLOW_TRACKING_URI`` unset inside the block: what `out_dir`
    does, for module-scoped fixtures (pytest's ``monkeypatch`` fixture is per test)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VIDLAB_OUTPUT_DIR", str(out))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield out


@pytest.fixture
def out_dir(tmp_path, monkeypatch):
    """``VIDLAB_OUTPUT_DIR`` pointed at a fresh folder, ``MLFLOW_TRACKING_URI`` unset."""
    out = tmp_path / "outputs"
    monkeypatch.setenv("VIDLAB_OUTPUT_DIR", str(out))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return out


# One Shapes probe for the whole session (eval/probe.py; ~100 s to train), cached the way the
# evaluation callback and `vidlab eval` cache it, so tests can place it where those look.
PROBE_ARGS = {"steps": 1000, "num_frames": 8, "height": 32, "width": 32}


@pytest.fixture(scope="session")
def probe_cache(tmp_path_factory):
    """A folder holding the trained probe as `eval.probe.cached_probe` names it for PROBE_ARGS."""
    from eval.probe import cached_probe

    keep = os.environ.get("VIDLAB_TEST_PROBE_DIR")  # a developer's persistent copy between runs
    folder = Path(keep) if keep else tmp_path_factory.mktemp("probes")
    cached_probe(folder, **PROBE_ARGS)
    return folder


@pytest.fixture
def seeded_probe(out_dir, probe_cache):
    """The session probe copied to ``<output_dir>/eval/probes/``, where the callback and CLI look."""
    import shutil

    target = out_dir / "eval" / "probes"
    shutil.copytree(probe_cache, target, dirs_exist_ok=True)
    return target
