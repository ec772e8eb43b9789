"""Backbone speed: our DiT's training step (configs/backbone/dit_bench.yaml) against diffusers'
`WanTransformer3DModel` of equal size, same run, CPU fp32; then the frame-autoregressive model's
KV-cache scaling (`benchmarks/ar_rollout.py`, whose docstring describes that measurement).

Both: dim 384 = 6 heads x 64, FFN 1536 (GELU-tanh), 6 layers, patch (1, 2, 2), QK-norm, 3D RoPE,
16 latent channels, latent (16, 5, 16, 16) = 320 tokens per sample, batch 4, 16 text tokens of width
384. One step = forward + MSE loss + backward + AdamW (the same `torch.optim.AdamW(fused=True)` for
both; the per-parameter for-loop AdamW costs ~3x more on CPU for either model). Steps of the
models alternate (each goes first in turn) after warm-up, so drifts of
machine speed hit both alike; the speed ratio is the median over rounds of the paired ratios.

The two compute the same function: `tests/test_dit.py::test_same_function_as_diffusers_wan_transformer`
loads diffusers' weights into our DiT and matches its output; the parameter counts are equal.
FLOPs are analytic (`DiT.flops`: every matmul, attention included, 2 per multiply-add; a training
step is 3x forward); the two models run the same matmuls, so the same count serves both.

MFU is measured against the fp32 matmul rate of the same moment: every round also times three 2048^3
`torch.mm` next to the two steps, and a round's MFU is its step FLOP/s over that round's matmul
FLOP/s; `dit_mfu` is the median over rounds. On a shared machine whose speed drifts by 10-20 % within
minutes this pairing cancels the drift, as the alternation does for the speed ratio.
`dit_mfu_vs_best_peak` is the stricter figure: the median step over the best matmul rate seen at any
moment of the run (before, during or after the rounds).

    python benchmarks/backbones.py [--rounds 20] [--warmup 3] [--threads 2] [--compile] [--no-ar]

`--compile` adds a third arm, our DiT as `parallel.compile: true` builds it (each block through
`torch.compile`, same weights), and prints `dit_compiled_vs_diffusers` and `dit_compiled_mfu`; it first
spends a few minutes compiling.

Prints `name: value` lines: `dit_vs_diffusers` (their step time / ours, target >= 1.1) with the
quartiles of the per-round ratios, `dit_mfu` (target >= 0.60), `diffusers_mfu`,
`matmul_peak_gflops` (the best rate seen) and per-step ms; then `ar_kv_scaling` (time to generate 2F
frames over F frames with the cache, target <= 2.3) and its companions, about 4 minutes more
(`--no-ar` leaves them out).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from experiments.build import instantiate
from experiments.config import REPO_CONFIGS, load_yaml
from modules.conditioning import Conditioning
from modules.parallel import ParallelConfig, parallelize

from ar_rollout import ar_scaling  # benchmarks/ar_rollout.py: this script's directory is on sys.path

BATCH, CHANNELS, LATENT, TEXT_LEN, TEXT_DIM = 4, 16, (5, 16, 16), 16, 384
PRESET = REPO_CONFIGS / "backbone" / "dit_bench.yaml"


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an n^3 fp32 `torch.mm` over `repeats` tries (after one untimed)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def diffusers_wan(cfg: dict) -> torch.nn.Module:
    """diffusers' Wan transformer with the size of our preset (their defaults otherwise:
    cross_attn_norm, RMSNorm QK-norm across heads, eps 1e-6)."""
    from diffusers import WanTransformer3DModel

    head_dim = cfg["dim"] // cfg["heads"]
    return WanTransformer3DModel(
        patch_size=tuple(cfg["patch"]), num_attention_heads=cfg["heads"], attention_head_dim=head_dim,
        in_channels=CHANNELS, out_channels=CHANNELS, text_dim=TEXT_DIM, freq_dim=256,
        ffn_dim=round(cfg["dim"] * cfg["mlp_ratio"]), num_layers=cfg["depth"],
    )


def train_step(forward: Callable[[], torch.Tensor], target: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
    """Seconds for one forward + MSE + backward + optimizer step."""
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    F.mse_loss(forward(), target).backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="timed steps of each model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each model first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time our DiT with every block compiled")
    parser.add_argument("--no-ar", action="store_true", help="skip the frame-autoregressive KV-cache scaling")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_yaml(PRESET)
    torch.manual_seed(0)
    ours = instantiate(cfg, str(PRESET), in_channels=CHANNELS, text_dim=TEXT_DIM)
    theirs = diffusers_wan(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, CHANNELS, *LATENT, generator=g)
    t = torch.rand(BATCH, generator=g) * 1000  # both embed t on the 1000-step scale
    text = torch.randn(BATCH, TEXT_LEN, TEXT_DIM, generator=g)
    cond = Conditioning(text, torch.ones(BATCH, TEXT_LEN, dtype=torch.bool))
    target = torch.randn(x.shape, generator=g)
    models = {
        "dit": (lambda: ours(x, t, cond), torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)),
        "diffusers": (
            lambda: theirs(x, t, text, return_dict=False)[0],
            torch.optim.AdamW(theirs.parameters(), lr=1e-4, fused=True),
        ),
    }
    if args.compile:
        compiled = copy.deepcopy(ours)
        parallelize(compiled, None, ParallelConfig(compile=True))
        models["dit_compiled"] = (lambda: compiled(x, t, cond), torch.optim.AdamW(compiled.parameters(), lr=1e-4, fused=True))
    assert ours(x, t, cond).shape == theirs(x, t, text, return_dict=False)[0].shape == x.shape

    matmul = [matmul_flops()]  # FLOP/s: before, in every round, after
    for _ in range(args.warmup):
        for forward, optimizer in models.values():
            train_step(forward, target, optimizer)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(args.rounds):
        order = list(models)[round_ % len(models):] + list(models)[:round_ % len(models)]  # rotate who goes first
        for name in order:
            forward, optimizer = models[name]
            seconds[name].append(train_step(forward, target, optimizer))
        matmul.append(matmul_flops(repeats=3))
    matmul.append(matmul_flops())
    peak = max(matmul)
    rounds_matmul = matmul[1:-1]

    train_flops = 3 * ours.flops(tuple(x.shape), TEXT_LEN)
    step = {name: statistics.median(s) for name, s in seconds.items()}
    ratios = sorted(d / o for d, o in zip(seconds["diffusers"], seconds["dit"]))
    ratio = statistics.median(ratios)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("dit", ours), ("diffusers", theirs))}
    if args.compile:
        compiled_ratios = sorted(d / o for d, o in zip(seconds["diffusers"], seconds["dit_compiled"]))
    print(f"shape: batch {BATCH} x latent ({CHANNELS}, {', '.join(map(str, LATENT))}), {TEXT_LEN} text tokens")
    print(f"dit_params_m: {params['dit'] / 1e6:.2f}")
    print(f"diffusers_params_m: {params['diffusers'] / 1e6:.2f}")
    print(f"train_step_gflop: {train_flops / 1e9:.1f}")
    print(f"matmul_peak_gflops: {peak / 1e9:.1f}")
    print(f"dit_step_ms: {1000 * step['dit']:.0f}")
    print(f"diffusers_step_ms: {1000 * step['diffusers']:.0f}")
    print(f"dit_vs_diffusers: {ratio:.3f}")
    print(f"dit_vs_diffusers_quartiles: {ratios[len(ratios) // 4]:.3f} {ratios[3 * len(ratios) // 4]:.3f}")
    if args.compile:
        print(f"dit_compiled_step_ms: {1000 * step['dit_compiled']:.0f}")
        print(f"dit_compiled_vs_diffusers: {statistics.median(compiled_ratios):.3f}")
    for name in models:
        mfu = sorted(train_flops / s / m for s, m in zip(seconds[name], rounds_matmul))
        print(f"{name}_mfu: {statistics.median(mfu):.3f}")
        print(f"{name}_mfu_quartiles: {mfu[len(mfu) // 4]:.3f} {mfu[3 * len(mfu) // 4]:.3f}")
        print(f"{name}_mfu_vs_best_peak: {train_flops / step[name] / peak:.3f}")
    if not args.no_ar:
        for name, value in ar_scaling().items():
            print(f"{name}: {value:.3f}")


if __name__ == "__main__":
    main()
