"""Checkpoints are written atomically (experiments/checkpoint_io.py) and a fit uses that writer."""

from __future__ import annotations

import pytest
import torch

from experiments.checkpoint_io import AtomicCheckpointIO


def test_a_write_that_dies_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(4.0)}, path)
    before = path.read_bytes()

    real_save = torch.save

    def dies_halfway(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.truncate(handle.tell() // 2)  # half the bytes on disk, then the process "dies"
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(10_000)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before  # untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no torn or temporary file
    assert io.load_checkpoint(path)["step"] == 1  # Lightning's reader: weights_only loading
    io.save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3


def test_fit_writes_through_the_atomic_writer(out_dir):
    from experiments.config import compose
    from experiments.fit import run_fit

    saved = []
    original = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        saved.append(str(path))
        return original(self, checkpoint, path, storage_options)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
        result = run_fit(compose("smoke", ["trainer.max_steps=4", "checkpoint.every_n_steps=2", "checkpoint.keep_last=1",
                                           "callbacks.samples=null", "callbacks.timestep_loss=null"]))
    assert any(p.endswith("last.ckpt") for p in saved) and any("step000004" in p for p in saved)
    folder = result.checkpoint.parent
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step000004.ckpt"]  # keep_last=1
