"""Causal 3D VAE (configs/vae/causal3d_4x8x8.yaml: Wan 2.2's residual layout at a small width, mid
attention, 16 latent channels): chunked memory, chunked == one-shot, and speed against diffusers'
`AutoencoderKLWan` of the same widths. CPU fp32.

    python benchmarks/vaes.py [--rounds 5] [--threads 2] [--size 128] [--memory-repeats 3]
    python benchmarks/vaes.py --memory-case 129 [--one-shot]   # one memory measurement (see below)

`chunked_memory_ratio` (target <= 1.2): extra peak memory of a chunked encode of 129 frames over
that of 17 frames, at size x size (128: about 58 MiB per chunked encode of the CPU preset; at 64 the
extra peak is about 25 MiB and a few MiB of process noise move the ratio by 0.2). CPU tensors have no allocator statistics, so each case runs in a
fresh subprocess (`--memory-case N`) that builds the model and the input video, resets the kernel's
peak-RSS mark (`echo 5 > /proc/self/clear_refs`; where that is not allowed, `getrusage` ru_maxrss is
the peak instead), reads the RSS, encodes under `no_grad`, and reports peak RSS minus that RSS: the
memory the encode itself needed, the weights and the input excluded. Each chunked case is the median
of `--memory-repeats` processes (single runs scatter by about ±15 %: allocator and thread-pool
state). `oneshot_memory_ratio` is the same for the one-shot pass (one process each), for scale.

`chunked_max_abs_diff` (target <= 1e-5): max |chunked − one-shot| over the raw latents (posterior
mean) and the decoded video of a 17-frame clip.

`causal3d_vs_diffusers_wan` (target >= 1.0): diffusers' encode + decode time over ours, both
chunked (diffusers always encodes frame 0 then chunks of 4 and decodes one latent frame at a time,
with its feature cache, as our `chunked=True`), input 1 x 3 x 17 x size x size. The two networks
have the same layout and parameter count (tests/test_causal3d.py loads diffusers' weights into ours
and matches its outputs). Rounds alternate the order of the models after a warm-up; the ratio is the
median of the per-round ratios. `oneshot_vs_diffusers_wan` times our one-shot pass instead.
`causal3d_vs_diffusers_wan_default_backend` times our chunked pass with PyTorch's own choice of
convolution kernel (our `Conv3d` always picks oneDNN on CPU; PyTorch's heuristic gives small
batch-1 chunks to its slow reference kernel, which diffusers then uses).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from experiments.build import instantiate
from experiments.config import REPO_CONFIGS, load_yaml
from modules.vaes import causal3d

PRESET = REPO_CONFIGS / "vae" / "causal3d_4x8x8.yaml"
SHORT, LONG = 17, 129


def build(seed: int = 0) -> causal3d.CausalVAE3d:
    torch.manual_seed(seed)
    return instantiate({**load_yaml(PRESET), "compile": False}, str(PRESET)).eval()  # eager: the layer-for-layer comparison


def clip(frames: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_case(frames: int, size: int, chunked: bool) -> None:
    """Print the extra peak RSS (MiB) of one encode of ``frames`` frames (run in a fresh process)."""
    model, video = build(), clip(frames, size)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
    except OSError:
        pass
    before = rss_kib()
    with torch.no_grad():
        model.posterior(video, chunked=chunked)
    print(f"extra_peak_mib: {(peak_kib() - before) / 1024:.2f}")


def measure_memory(frames: int, size: int, threads: int, chunked: bool, repeats: int) -> float:
    """Median over ``repeats`` fresh processes of ``memory_case`` (MiB)."""
    cmd = [sys.executable, __file__, "--memory-case", str(frames), "--size", str(size), "--threads", str(threads)]
    cmd += [] if chunked else ["--one-shot"]
    runs = [subprocess.run(cmd, check=True, capture_output=True, text=True).stdout for _ in range(repeats)]
    return statistics.median(float(out.split("extra_peak_mib:")[1].split()[0]) for out in runs)


def diffusers_wan(preset: dict) -> nn.Module:
    """diffusers' Wan VAE with our preset's base width, multipliers, ResBlocks per level, temporal
    downsampling, latent channels and layout (``residual`` = their ``is_residual``, Wan 2.2; mid
    attention is always on in both)."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=preset["base_width"], dim_mult=list(preset["channel_mults"]),
        num_res_blocks=preset["num_res_blocks"], temperal_downsample=list(preset["temporal_downsample"]),
        z_dim=preset["latent_channels"], is_residual=bool(preset.get("residual", False)),
    ).eval()


def timed(fn: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed encode + decode of each model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=128, help="frame height and width")
    parser.add_argument("--memory-repeats", type=int, default=3, help="processes per chunked memory case")
    parser.add_argument("--memory-case", type=int, default=0, help="internal: measure one encode of N frames")
    parser.add_argument("--one-shot", action="store_true", help="internal: with --memory-case, not chunked")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_case:
        memory_case(args.memory_case, args.size, chunked=not args.one_shot)
        return

    mem = {
        (n, chunked): measure_memory(n, args.size, args.threads, chunked, args.memory_repeats if chunked else 1)
        for n in (SHORT, LONG)
        for chunked in (True, False)
    }

    ours, video = build(), clip(SHORT, args.size)
    theirs = diffusers_wan(load_yaml(PRESET))
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())
    with torch.no_grad():
        q = ours.posterior(video)
        diff_latent = (ours.posterior(video, chunked=True).mean - q.mean).abs().max().item()
        diff_video = (ours.decode_raw(q.mean, chunked=True) - ours.decode_raw(q.mean)).abs().max().item()

    def run_ours(chunked: bool) -> torch.Tensor:
        return ours.decode_raw(ours.posterior(video, chunked=chunked).mode(), chunked=chunked)

    def run_default_backend() -> torch.Tensor:
        fast = causal3d.Conv3d.forward
        causal3d.Conv3d.forward = nn.Conv3d.forward  # PyTorch's own kernel choice
        try:
            return run_ours(True)
        finally:
            causal3d.Conv3d.forward = fast

    runs = {
        "chunked": lambda: run_ours(True),
        "oneshot": lambda: run_ours(False),
        "default_backend": run_default_backend,
        "diffusers": lambda: theirs.decode(theirs.encode(video).latent_dist.mode()).sample,
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()  # warm-up
        for round_ in range(args.rounds):
            for name in list(runs) if round_ % 2 == 0 else list(runs)[::-1]:
                seconds[name].append(timed(runs[name]))

    def ratio(name: str) -> float:
        return statistics.median(d / o for d, o in zip(seconds["diffusers"], seconds[name]))

    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("causal3d", ours), ("diffusers", theirs))}
    print(f"shape: 1 x 3 x {SHORT} x {args.size} x {args.size}, threads {args.threads}, rounds {args.rounds}")
    print(f"causal3d_params_m: {params['causal3d'] / 1e6:.2f}")
    print(f"diffusers_params_m: {params['diffusers'] / 1e6:.2f}")
    for chunked, name in ((True, "chunked"), (False, "oneshot")):
        print(f"{name}_extra_peak_mib_{SHORT}: {mem[SHORT, chunked]:.1f}")
        print(f"{name}_extra_peak_mib_{LONG}: {mem[LONG, chunked]:.1f}")
    print(f"chunked_memory_ratio: {mem[LONG, True] / mem[SHORT, True]:.3f}")
    print(f"oneshot_memory_ratio: {mem[LONG, False] / mem[SHORT, False]:.3f}")
    print(f"chunked_max_abs_diff: {max(diff_latent, diff_video):.2e}")
    for name in runs:
        print(f"{name}_ms: {1000 * statistics.median(seconds[name]):.0f}")
    print(f"causal3d_vs_diffusers_wan: {ratio('chunked'):.3f}")
    print(f"oneshot_vs_diffusers_wan: {ratio('oneshot'):.3f}")
    print(f"causal3d_vs_diffusers_wan_default_backend: {ratio('default_backend'):.3f}")


if __name__ == "__main__":
    main()
