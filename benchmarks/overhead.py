"""Harness overhead: vidlab's Lightning training step against a plain PyTorch loop, same run.

Both sides train an identical copy of the same model (same init, same batches in memory, same AdamW,
same gradient clipping, same LR schedule, same caption dropout) for the same number of steps, with
no logger and no progress bar on either side; the first steps of each
are warm-up and are not timed. The plain loop is what a researcher would write by hand: encode
captions, draw t and noise, interpolate, regress the velocity, step. The rounds alternate between
the two so that drift in machine speed hits both alike; the ratio is the median over rounds.

    python benchmarks/overhead.py [--steps 30] [--rounds 3] [EXPERIMENT overrides...]

Prints ``name: value`` lines; ``overhead_ratio`` = harness time / plain time (target <= 1.03).
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from experiments.build import build_datamodule, build_system
from experiments.config import compose


class StepTimer(L.Callback):
    """Wall time from the start of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.end = time.perf_counter()


def fresh_system(composed, seed: int):
    torch.manual_seed(seed)
    return build_system(composed)


def harness_seconds(composed, batches, warmup: int, clip: float) -> float:
    system = fresh_system(composed, 0)
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=len(batches), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=clip,
        callbacks=[timer], log_every_n_steps=composed.cfg["trainer"]["log_every_n_steps"],
    )
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    torch.manual_seed(1)
    trainer.fit(system, train_dataloaders=loader)
    return timer.end - timer.start


def plain_seconds(composed, batches, warmup: int, clip: float) -> float:
    system = fresh_system(composed, 0)
    backbone, text, time_scale = system.backbone, system.encode_text, system.objective.time_scale
    params = [p for p in system.parameters() if p.requires_grad]
    optim = system.configure_optimizers()
    opt, schedule = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    dropout = system.guidance.cond_dropout
    system.train()
    torch.manual_seed(1)
    start = 0.0
    for step, batch in enumerate(batches):
        if step == warmup:
            start = time.perf_counter()
        keep = torch.rand(len(batch["caption"])) >= dropout
        cond = text([c if k else "" for c, k in zip(batch["caption"], keep.tolist())])
        x0 = batch["video"]
        t = torch.rand(x0.shape[0])
        noise = torch.randn_like(x0)
        tb = t.view(-1, 1, 1, 1, 1)
        x_t = (1 - tb) * x0 + tb * noise
        loss = F.mse_loss(backbone(x_t, t * time_scale, cond), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        schedule.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="?", default="shapes")
    parser.add_argument("overrides", nargs="*", default=["text=tiny"])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    composed = compose(args.experiment, args.overrides)
    datamodule = build_datamodule(composed)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    batches = []
    while len(batches) < args.steps + args.warmup:
        batches.extend(loader)
    batches = batches[: args.steps + args.warmup]
    clip = float(composed.cfg["trainer"].get("gradient_clip_val") or 0.0) or float("inf")

    ratios, harness, plain = [], [], []
    for _ in range(args.rounds):
        p = plain_seconds(composed, batches, args.warmup, clip)
        h = harness_seconds(composed, batches, args.warmup, clip)
        plain.append(p / args.steps)
        harness.append(h / args.steps)
        ratios.append(h / p)
    print(f"experiment: {args.experiment} {' '.join(args.overrides)}")
    print(f"plain_step_ms: {1000 * statistics.median(plain):.1f}")
    print(f"harness_step_ms: {1000 * statistics.median(harness):.1f}")
    print(f"overhead_ratio: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
