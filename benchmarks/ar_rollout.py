"""Frame-by-frame generation cost: how the time to generate grows with the number of frames, with
the KV cache (`frame_rollout(cached=True)`) and without it (recomputing the past at every step).

Model: configs/backbone/frame_ar_bench.yaml (16 M parameters, chunks of one latent frame, unlimited
context), batch 4, 16 latent channels, 16 x 16 latent frames (64 tokens each), 8 Euler steps per
chunk, classifier-free guidance (both branches in one batch), CPU fp32. The same noise prefix is used
for F and 2F frames. `ar_kv_scaling` = time(2F frames) / time(F frames) with the cache: 2 would be
perfectly linear; the attention over a growing cache adds the rest. Without the cache every step
re-runs all earlier frames, so the same ratio approaches 4 (quadratic).

The F- and 2F-frame rollouts are timed in pairs, one right after the other (which goes first
alternates), and a scaling is the median of the per-pair ratios: this machine's speed drifts by
10-30 % within minutes, and timing all F-frame runs before all 2F-frame runs exposed the ratio to any
drift between the two halves (two such runs ten minutes apart gave 1.94 and 2.40).

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


def rollout_seconds(model, noise: torch.Tensor, guide, cached: bool) -> float:
    """Wall time of one `frame_rollout` of all frames of `noise`."""
    start = time.perf_counter()
    frame_rollout(model, RectifiedFlow(), EulerSampler(steps=STEPS), guide, noise, cached=cached)
    return time.perf_counter() - start


def paired_scaling(model, noise: torch.Tensor, guide, cached: bool, repeats: int) -> tuple[float, float]:
    """(median over `repeats` pairs of time(all frames of `noise`) / time(its first half),
    median time of all frames): the two rollouts of a pair run back to back, alternating order."""
    half = noise[:, :, : noise.shape[2] // 2]
    ratios, full_times = [], []
    for i in range(repeats):
        order = (half, noise) if i % 2 == 0 else (noise, half)
        seconds = {n.shape[2]: rollout_seconds(model, n, guide, cached) for n in order}
        ratios.append(seconds[noise.shape[2]] / seconds[half.shape[2]])
        full_times.append(seconds[noise.shape[2]])
    return statistics.median(ratios), statistics.median(full_times)


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
        kv_scaling, kv_seconds = paired_scaling(model, noise, guide, True, repeats)
        full_scaling, full_seconds = paired_scaling(model, noise, guide, False, repeats)
    return {
        "ar_kv_scaling": kv_scaling,
        "ar_recompute_scaling": full_scaling,
        "ar_kv_ms_per_frame": 1000 * kv_seconds / (2 * frames),
        "ar_kv_speedup_2f": full_seconds / kv_seconds,
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
