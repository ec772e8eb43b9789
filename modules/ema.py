"""Exponential moving average (EMA) of the trainable weights, kept shard by shard.

The average of parameter ``p`` after update ``k`` (k = 0, 1, ...) is

    ema_0 = p_0                         (the first update copies, as torch's AveragedModel does)
    ema_k = d_k * ema_{k-1} + (1 - d_k) * p_k,
    d_k   = min(decay, (1 + k) / (10 + k)) with ``warmup``, else ``decay``

(the warm-up of diffusers' EMAModel and timm's ModelEmaV2 keeps early averages from being dominated
by the random initial weights). Updates run after every ``every_n_steps``-th optimizer step.

Why not Lightning's ``EMAWeightAveraging``: it deep-copies the whole LightningModule (autoencoder and
text encoder included) into an ``AveragedModel`` built outside the strategy, so under FSDP2 every rank
would hold full, unsharded weights; its own docs say sharded models do not work. Here each average is
a buffer of the LightningModule with the same type and placement as its parameter: under FSDP2 a
DTensor sharded like the parameter, so each rank updates and stores only its own shard (no
all-gather, 1/world of the memory), and torch.distributed.checkpoint saves and reloads it sharded with
the rest of the state dict. Under DDP and on one process the buffers are plain tensors (DDP is told
not to broadcast them: every rank computes the same average). For the maths with no sharding,
Lightning's callback is the reference the tests compare against (tests/test_ema.py).

`swapped` exchanges weights and averages in place (one parameter's worth of scratch memory at a
time), which is how samples and evaluation use the averaged weights during training.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from modules.parallel import plain_name


@dataclass
class EMAConfig:
    """The ``ema:`` section. ``enabled`` turns it on; ``decay`` is the long-run d (0 < d < 1)."""

    enabled: bool = False
    decay: float = 0.9999
    warmup: bool = True
    every_n_steps: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"ema.decay must be in (0, 1), got {self.decay!r}")
        if self.every_n_steps < 1:
            raise ValueError(f"ema.every_n_steps must be >= 1, got {self.every_n_steps!r}")


def buffer_name(name: str) -> str:
    """``backbone.blocks.0.attn.qkv.weight`` -> ``backbone/blocks/0/attn/qkv/weight``: the `plain_name`
    (one name whatever ``parallel:`` wraps around the blocks), as a buffer name (no dots)."""
    return plain_name(name).replace(".", "/")


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view of its storage), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class ExponentialMovingAverage(nn.Module):
    """Averages of ``module``'s trainable parameters (except names starting with ``skip``) as buffers
    named by `buffer_name`.

    Built from the unsharded module (so a checkpoint's keys exist before it is loaded); call
    `match_placement` after FSDP2 has sharded the module, and `update` after each optimizer step.
    """

    def __init__(self, module: nn.Module, config: EMAConfig, skip: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.config = config
        self.names = [plain_name(n) for n, p in module.named_parameters()
                      if p.requires_grad and not n.startswith(skip)]
        for name, param in self._params(module):
            self.register_buffer(buffer_name(name), param.detach().clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def _params(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The averaged parameters of ``module`` (by their plain names), in a fixed order."""
        params = {plain_name(n): p for n, p in module.named_parameters()}
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"EMA: the module has no parameter(s) {missing[:3]} it was built with")
        return [(n, params[n]) for n in self.names]

    def _pairs(self, module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """(this rank's parameter shards, this rank's average shards), aligned."""
        params = [_local(p.detach()) for _, p in self._params(module)]
        averages = [_local(self.get_buffer(buffer_name(n))) for n in self.names]
        return params, averages

    def match_placement(self, module: nn.Module) -> None:
        """Make each average a copy of its parameter as it is now, with its type and placement: a
        DTensor shard after FSDP2's ``fully_shard``. Call before any update (the values are equal
        then) and before a checkpoint is loaded."""
        for name, param in self._params(module):
            setattr(self, buffer_name(name), param.detach().clone())

    def decay_at(self, k: int) -> float:
        """d_k of the module docstring."""
        if k == 0:
            return 0.0
        return min(self.config.decay, (1 + k) / (10 + k)) if self.config.warmup else self.config.decay

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One EMA step from ``module``'s current weights, shard by shard (no communication)."""
        params, averages = self._pairs(module)
        weight = 1.0 - self.decay_at(int(self.num_updates))
        torch._foreach_lerp_(averages, params, weight)  # ema += w * (p - ema), what AveragedModel uses
        self.num_updates += 1

    @torch.no_grad()
    def swap(self, module: nn.Module) -> None:
        """Exchange ``module``'s weights with the averages, in place."""
        for param, average in zip(*self._pairs(module)):
            scratch = param.clone()
            param.copy_(average)
            average.copy_(scratch)

    @contextmanager
    def swapped(self, module: nn.Module) -> Iterator[None]:
        """``module`` holds the averaged weights inside the block and its own weights again after.

        FSDP2 keeps the root module's gathered weights between an inference forward and the next
        forward; each swap first drops every gathered copy (``reshard``), so the next forward
        gathers what the shards now hold."""
        _reshard(module)
        self.swap(module)
        try:
            yield
        finally:
            _reshard(module)
            self.swap(module)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Overwrite ``module``'s weights with the averages (for inference from a checkpoint)."""
        _reshard(module)
        for param, average in zip(*self._pairs(module)):
            param.copy_(average)


def _reshard(module: nn.Module) -> None:
    """Free FSDP2's gathered parameters (a no-op without FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()
