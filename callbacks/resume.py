"""What a checkpoint needs beyond Lightning's own state for a resumed run to repeat the interrupted
one exactly: the random number generators of every rank, and where in the epoch the data was.

Lightning's checkpoint already holds the model, optimizer, LR schedule, loop counters and callback
states; `ResumeState` adds (as its own callback state):

- ``rng``: per global rank, the states of torch's CPU generator (diffusion times, noise, caption
  dropout), CUDA's generators, numpy's and Python's, captured when the checkpoint is written;
- ``global_step``: the optimizer steps done, which with ``drop_last`` batches and no gradient
  accumulation also says how many batches of the current epoch were trained on.

On resume (``on_train_start``, after Lightning restored everything and before the first batch is
drawn) it restores this rank's generators and tells the train loader's `ClipSampler` to skip the
batches the epoch had already used, so step k + 1 sees the batch, times and noise it would have
seen without the interruption.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist


def rng_state() -> dict[str, Any]:
    """This process's generator states (tensors and plain values only: loads with weights_only)."""
    numpy_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "python": _python_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": list(internal), "gauss": gauss}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeState(L.Callback):
    """Saves every rank's RNG states and the step with each checkpoint; restores them on resume."""

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        own = rng_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, own)  # every rank writes the checkpoint's callback state
        else:
            states = [own]
        return {"rng": states, "global_step": self._step}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    @property
    def _step(self) -> int:
        trainer = getattr(self, "_trainer", None)
        return int(trainer.global_step) if trainer is not None else 0

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._loaded is None:
            return
        states = self._loaded["rng"]
        if len(states) != trainer.world_size:
            raise RuntimeError(f"the checkpoint holds RNG states of {len(states)} ranks, this run has "
                               f"{trainer.world_size}: resume with the same number of processes")
        loader = trainer.train_dataloader
        batches = len(loader) if loader is not None else 0
        done_in_epoch = self._loaded["global_step"] - trainer.current_epoch * batches if batches else 0
        sampler = getattr(getattr(loader, "sampler", None), "skip_once", None)
        if done_in_epoch > 0:
            if sampler is None:
                raise RuntimeError("resuming mid-epoch needs a train loader whose sampler has skip_once "
                                   "(datamodules.video.ClipSampler)")
            sampler(done_in_epoch * loader.batch_size)  # this rank's share (ClipSampler shards itself)
        set_rng_state(states[trainer.global_rank])
        self._loaded = None
