"""Frame-by-frame generation cost: how the time to generate grows with the number of frames, with
the KV cache (`frame_rollout(cached=True)`) and without it (recomputing the past at every step).

Model: configs/backbone/frame_ar_bench.yaml (16 M parameters, chunks of one latent frame, unlimited
context), batch 4, 16 latent channels, 16 x 16 latent frames (64 tokens each), 8 Euler steps per
chunk, classifier-free guidance (both branches in one batch), CPU fp32. The same noise prefix is used
for F and 2F frames. `ar_kv_scaling` = time(2F frames) / time(F frames) with the cache: 2 would be
perfectly linear; the attention over a growing cache adds the rest. Without the cache every step
re-runs all earlier frames, so the same ratio approaches 4 (quadratic).

    python benchmarks/ar_rollout.py [--frames 5] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from experiments.build import instantiate
from experiments.config import REPO_CONFIGS, load_yaml
from modules.conditioning import Conditioning
from modules.objectives.flow import RectifiedFlow
from modules.samplers.euler import EulerSampler
from modules.samplers.guidance import classifier_free_guidance
from modules.samplers.rollout import frame_rollout

PRESET = REPO_CONFIGS / "backbone" / "frame_ar_bench.yaml"
BATCH, CHANNELS, SIZE, TEXT_LEN, TEXT_DIM, STEPS = 4, 16, 16, 16, 384, 8


def rollout_seconds(model, noise: torch.Tensor, guide, cached: bool, repeats: int) -> float:
    """Median wall time of `frame_rollout` over `repeats` runs."""
    flow, euler = RectifiedFlow(), EulerSampler(steps=STEPS)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        frame_rollout(model, flow, euler, guide, noise, cached=cached)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ar_scaling(frames: int = 5, repeats: int = 3) -> dict[str, float]:
    """{'ar_kv_scaling', 'ar_recompute_scaling', 'ar_kv_ms_per_frame', 'ar_kv_speedup_2f'}."""
    torch.manual_seed(0)
    model = instantiate(load_yaml(PRESET), str(PRESET), in_channels=CHANNELS, text_dim=TEXT_DIM).eval()
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(BATCH, TEXT_LEN, TEXT_DIM, generator=g), torch.ones(BATCH, TEXT_LEN, dtype=torch.bool))
    null = Conditioning(torch.zeros(1, 1, TEXT_DIM), torch.ones(1, 1, dtype=torch.bool))
    guide = partial(classifier_free_guidance, cond=cond, null_cond=null, scale=4.0)
    noise = torch.randn(BATCH, CHANNELS, 2 * frames, SIZE, SIZE, generator=g)
    with torch.no_grad():
        frame_rollout(model, RectifiedFlow(), EulerSampler(steps=1), guide, noise[:, :, :2])  # warm-up
        kv = [rollout_seconds(model, noise[:, :, :n], guide, True, repeats) for n in (frames, 2 * frames)]
        full = [rollout_seconds(model, noise[:, :, :n], guide, False, repeats) for n in (frames, 2 * frames)]
    return {
        "ar_kv_scaling": kv[1] / kv[0],
        "ar_recompute_scaling": full[1] / full[0],
        "ar_kv_ms_per_frame": 1000 * kv[1] / (2 * frames),
        "ar_kv_speedup_2f": full[1] / kv[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=5, help="F: compare generating F and 2F frames")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name, value in ar_scaling(args.frames, args.repeats).items():
        print(f"{name}: {value:.3f}")


if __name__ == "__main__":
    main()
