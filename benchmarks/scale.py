"""FSDP2 vs DDP memory, and DDP's speed-up, on CPU processes (gloo).

Prints, as ``name: value``:

- ``fsdp_memory_ratio``: per-rank bytes of trainable parameters + AdamW state after one step,
  FSDP2 (`modules.parallel.parallelize`, the path ``trainer.strategy: fsdp`` takes) over DDP
  (`torch.nn.parallel.DistributedDataParallel`, what ``ddp`` wraps), 2 processes. Target ≤ 0.55:
  FSDP2 keeps 1/2 of every sharded tensor per rank; DDP keeps all of it.
- ``ddp_speedup``: samples per second of 2 DDP processes over 1 process at the same per-process
  batch, each process given an equal share of the machine's cores (1 of 2 here: the single process
  gets 2 threads, each DDP rank 1). 2.0 would be perfect scaling.

The model is the ``shapes`` experiment's backbone (dit_small) trained on its objective with random
latents and a trainable text encoder of ``text=tiny``, so every trainable tensor is exercised.

    python benchmarks/scale.py [--steps 6] [--batch 4]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OVERRIDES = ["text=tiny", "callbacks.samples=null"]


def _build(seed: int = 0):
    from experiments.build import build_system
    from experiments.config import compose

    torch.manual_seed(seed)
    return build_system(compose("shapes", OVERRIDES))


class _TrainStep(torch.nn.Module):
    """The trainable parts and the loss in one forward, so DDP's reducer sees every parameter."""

    def __init__(self, system) -> None:
        super().__init__()
        self.backbone, self.text_encoder = system.backbone, system.text_encoder
        self.objective = system.objective

    def forward(self, x0: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.objective.loss(self.backbone, x0, self.text_encoder(prompts)).loss


def _local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def _worker(rank: int, world: int, port: int, mode: str, steps: int, batch: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    system = _build()
    if mode == "fsdp":
        from modules.parallel import ParallelConfig, parallelize

        mesh = dist.device_mesh.init_device_mesh("cpu", (world,))
        parallelize(system.backbone, system.text_encoder, ParallelConfig(), mesh)
    model = _TrainStep(system)
    if mode == "ddp" and world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(rank)
    shape = system.vae.latent_shape(8, 32, 32)
    prompts = ["a red circle moving left on a black background"] * batch

    def step() -> None:
        loss = model(torch.randn(batch, *shape, generator=gen), prompts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up, creates the AdamW state
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    memory = _local_bytes(params) + _local_bytes(state)
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if world > 1:
        dist.barrier()
    seconds = (time.perf_counter() - start) / steps
    if rank == 0:
        torch.save({"memory": memory, "seconds": seconds}, out)
    if world > 1:
        dist.destroy_process_group()


def measure(mode: str, world: int, steps: int, batch: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.start_processes(_worker, args=(world, port, mode, steps, batch, out), nprocs=world, join=True,
                           start_method="spawn")
        return torch.load(out, weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4, help="per process")
    args = parser.parse_args()
    single = measure("ddp", 1, args.steps, args.batch)
    ddp = measure("ddp", 2, args.steps, args.batch)
    fsdp = measure("fsdp", 2, args.steps, args.batch)
    print(f"ddp_bytes_per_rank: {ddp['memory']}")
    print(f"fsdp_bytes_per_rank: {fsdp['memory']}")
    print(f"fsdp_memory_ratio: {fsdp['memory'] / ddp['memory']:.3f}")
    print(f"step_seconds_single: {single['seconds']:.3f}  step_seconds_ddp: {ddp['seconds']:.3f}  "
          f"step_seconds_fsdp: {fsdp['seconds']:.3f}")
    print(f"ddp_speedup: {(2 * args.batch / ddp['seconds']) / (args.batch / single['seconds']):.3f}")


if __name__ == "__main__":
    main()
