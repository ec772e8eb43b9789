"""Parallelism applied from outside the model (DESIGN.md): FSDP2 per block, activation checkpointing,
per-block ``torch.compile``. `GeneratorSystem.configure_model` calls `parallelize`; the model code
knows nothing of it (torchtitan's and lingua's split).

``trainer.strategy: fsdp`` builds `FSDP2Strategy`, Lightning's `ModelParallelStrategy` with the whole
world as one data-parallel mesh dimension (no tensor parallelism). Lightning's own ``fsdp`` strategy
(FSDP1) refuses CPUs; this one runs on CPU with gloo, which is how the tests exercise it.

What `parallelize` does, in order (the order FSDP2 expects: wrap, then shard from the leaves up):

1. activation checkpointing (``checkpoint_wrapper``) around each entry of ``backbone.blocks``;
2. ``torch.compile`` of each block (optional);
3. with a mesh: ``fully_shard`` of each block, then of the backbone (the root: embeddings, final
   layer), then of a trainable text encoder. Every trainable parameter must end up in a sharded
   module, or its gradients would not be reduced across ranks: anything else raises.

Mixed precision under FSDP2 (``MixedPrecisionPolicy``): parameters gathered and computed in bf16,
gradients reduced in fp32, fp32 master weights — on CUDA; on CPU everything stays fp32 (bf16
matmuls are much slower than fp32 on the CPUs here, REFERENCE.md).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:  # torch >= 2.6 exports FSDP2 here; 2.4-2.5 under _composable
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

from lightning.pytorch.strategies import ModelParallelStrategy


WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.")  # torch.compile / checkpoint_wrapper


def plain_name(name: str) -> str:
    """A parameter name without the prefixes that per-block compile or checkpointing insert: the
    name the same weight has with any ``parallel:`` settings (checkpoints, exports, EMA)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@dataclass
class ParallelConfig:
    """The ``parallel:`` section of an experiment.

    activation_checkpointing: recompute each block's activations in backward (memory for compute);
    compile: ``torch.compile`` each block; mixed_precision: "auto" (bf16 params/compute with fp32
    gradient reduction under FSDP2 on CUDA, fp32 elsewhere), "bf16" or "fp32"; reshard_after_forward:
    FSDP2's ZeRO-3 (True) or ZeRO-2-like (False) behaviour for the blocks.
    """

    activation_checkpointing: bool = False
    compile: bool = False
    mixed_precision: str = "auto"
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"parallel.mixed_precision must be auto, bf16 or fp32, got {self.mixed_precision!r}")


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` with data parallel size = world size and tensor parallel size 1: the
    device mesh has one dimension, ``data_parallel``, over every process of every node."""

    strategy_name = "vidlab_fsdp2"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Lightning's sharded save, made safe against a kill mid-write: every rank writes its shard
        into ``<name>.partial/``; once all have (barrier), rank 0 moves the previous folder to
        ``<name>.old/``, the new one into place, and deletes the old. A kill at any point leaves a
        complete checkpoint under ``<name>`` or, between the two renames, ``<name>.old``
        (`recover_sharded_checkpoint` puts it back)."""
        path = Path(self.broadcast(str(filepath)))
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, path, storage_options)
        partial, old = path.with_name(path.name + ".partial"), path.with_name(path.name + ".old")
        if self.global_rank == 0 and partial.exists():
            shutil.rmtree(partial)  # left by a run killed mid-write
        self.barrier("vidlab_ckpt_clean")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("vidlab_ckpt_written")
        if self.global_rank == 0:
            recover_sharded_checkpoint(path)
            if path.exists():
                path.rename(old)
            partial.rename(path)
            if old.exists():
                shutil.rmtree(old)
        self.barrier("vidlab_ckpt_moved")


def recover_sharded_checkpoint(path: str | Path) -> None:
    """Put back ``<path>.old`` if a kill came between `FSDP2Strategy.save_checkpoint`'s two renames."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        old.rename(path)


def mixed_precision_policy(config: ParallelConfig, device: torch.device) -> MixedPrecisionPolicy | None:
    """bf16 parameters and compute with fp32 gradient reduction, or None (fp32 throughout)."""
    bf16 = config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and device.type == "cuda")
    if not bf16:
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _wrap_blocks(backbone: nn.Module, config: ParallelConfig) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = backbone.blocks
    for i, block in enumerate(blocks):
        if config.activation_checkpointing:
            block = checkpoint_wrapper(block)
        if config.compile:
            block = torch.compile(block)
        blocks[i] = block


def parallelize(backbone: nn.Module, text_encoder: nn.Module | None, config: ParallelConfig,
                mesh: Any | None = None, device: torch.device | None = None) -> None:
    """Apply ``config`` to ``backbone`` in place (see the module docstring); with a 1-D ``mesh``
    (the data-parallel dimension) shard it, and a trainable ``text_encoder``, with FSDP2."""
    if not hasattr(backbone, "blocks"):
        raise TypeError(f"{type(backbone).__name__} has no 'blocks': the units FSDP2 shards and checkpointing wraps")
    _wrap_blocks(backbone, config)
    if mesh is None:
        return
    options: dict[str, Any] = {"mesh": mesh}
    policy = mixed_precision_policy(config, device or torch.device("cpu"))
    if policy is not None:
        options["mp_policy"] = policy
    for block in backbone.blocks:
        fully_shard(block, reshard_after_forward=config.reshard_after_forward, **options)
    fully_shard(backbone, **options)
    if text_encoder is not None and any(p.requires_grad for p in text_encoder.parameters()):
        fully_shard(text_encoder, **options)


def unsharded_trainable(module: nn.Module) -> list[str]:
    """Names of trainable parameters that are plain tensors, i.e. outside every FSDP2 unit."""
    from torch.distributed.tensor import DTensor

    return [n for n, p in module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
