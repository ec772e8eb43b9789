"""The cadence every evaluation callback shares: run every N training steps and once at train end,
never twice at the same global step (the last step is often both), with the EMA weights when the
module keeps an average."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import lightning as L


class EveryNSteps(L.Callback):
    """Calls ``run(trainer, module)`` after every ``every_n_steps``-th training step (0: not during
    training) and at train end, at most once per global step. Subclasses implement ``run``."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps
        self._last_step = -1

    def run(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        raise NotImplementedError

    def _run_once(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        # a generator with ``ema.enabled`` is evaluated with its averaged weights (modules/ema.py)
        with getattr(module, "averaged_weights", nullcontext)():
            self.run(trainer, module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self._run_once(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._run_once(trainer, module)
