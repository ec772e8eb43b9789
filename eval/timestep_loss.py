"""Validation loss at fixed time buckets, with the same noise every time.

The training loss is an average over t drawn from the objective's time density p(t),

    L = E_{t~p} L(t),      L(t) = E_{x0, ε} w(t)·‖net(x_t, t) − target(x0, ε, t)‖²,
    x_t = α(t)·x0 + σ(t)·ε,

and the terms differ by orders of magnitude across noise levels (near t = 0 the velocity target
ε − x0 is dominated by the unpredictable ε, near t = 1 by x0). One number that mixes them, on a
fresh draw of t and ε every batch, is noisy and hides where the model learns: a drop at large t
(layout, motion) and one at small t (texture) look alike. Here L(t) is evaluated at K fixed times
t_1..t_K on fixed clips with fixed noise, so each curve moves only when the network does.

Buckets. `time_quantiles` places t_k at the quantile (k + 1/2)/K of the objective's own training
density: t_k = F⁻¹((k + 1/2)/K), F the CDF of ``objective.sample_t`` (estimated from many draws
with a fixed generator, ``torch.quantile`` with ``interpolation="nearest"`` in float64, so every
t_k is a time the objective really draws, e.g. a grid point i/N of DDPM). Each bucket is then
equally weighted in training, and mean_k L(t_k) is a K-point (midpoint-rule) estimate of the
training loss L. Flow objectives shift p(t) with the resolution (SD3 §5.3.2), so the latent
``tokens`` T·H·W are passed on where ``sample_t`` takes them. Explicit times may be given instead.

Noise. `loss_at_times` calls ``objective.loss(net, x0, cond, generator, t=t_k)``, which draws only
the noise ε ~ N(0, I) from ``generator``. The generator's state is saved before the first bucket
and restored before every other one, so every bucket sees the same ε; afterwards the generator has
advanced by one draw of ε, so consecutive chunks of clips get different noise while a generator
seeded afresh (the callback's) gives the same numbers at every evaluation. No Lightning here.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torch import Tensor

from modules.conditioning import Conditioning

DEFAULT_SAMPLES = 1_000_000


def time_quantiles(
    objective: Any,
    num_buckets: int = 8,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    tokens: int | None = None,
) -> Tensor:
    """Bucket centres t_k = F⁻¹((k + 1/2)/K), k = 0..K−1, of ``objective.sample_t``: (K,) float64.

    F is the empirical CDF of ``samples`` draws from a CPU generator seeded with ``seed`` (the
    same times at every call); the quantile error is about sqrt(q(1 − q)/samples)/p(t_k).
    ``tokens``: the latent positions T·H·W, passed to ``sample_t`` when it takes them (the
    resolution-dependent shift of flow objectives), ignored otherwise.
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be positive, got {num_buckets}")
    kwargs = {"tokens": tokens} if "tokens" in inspect.signature(objective.sample_t).parameters else {}
    generator = torch.Generator().manual_seed(seed)
    t = objective.sample_t(samples, torch.device("cpu"), generator, **kwargs).to(torch.float64)  # (samples,)
    q = (torch.arange(num_buckets, dtype=torch.float64) + 0.5) / num_buckets  # (K,)
    return torch.quantile(t, q, interpolation="nearest")


@torch.no_grad()
def loss_at_times(
    objective: Any,
    net: Any,
    x0: Tensor,
    cond: Conditioning,
    times: Sequence[float] | Tensor,
    generator: torch.Generator,
    per_sample: bool = False,
) -> Tensor:
    """The objective's training loss L(t_k) of ``net`` at each fixed time, the same noise for all.

    x0 (B, C, T, H, W) (or any (B, ...)) clean latents; cond: their conditioning (B rows); times
    (K,) in [0, 1] (t = 0 data); generator: on x0's device, its state restored before each bucket
    so that ε (B, ...) is the same at every t_k (module docstring), and left advanced by one draw.
    Returns (K,) float64 means over the batch, or with ``per_sample`` (K, B): per sample, the mean
    over non-batch elements of w(t_k)·(net output − target)², exactly ``objective.loss(...).per_sample``
    with t = t_k.
    """
    times = torch.as_tensor(times, dtype=torch.float64).flatten()
    B = x0.shape[0]
    state = generator.get_state()
    losses = []
    for t_k in times.tolist():
        generator.set_state(state)  # the same ε at every t_k
        t = torch.full((B,), t_k, dtype=x0.dtype, device=x0.device)  # (B,)
        losses.append(objective.loss(net, x0, cond, generator=generator, t=t).per_sample.to(torch.float64).cpu())
    out = torch.stack(losses)  # (K, B)
    return out if per_sample else out.mean(1)


def metric_name(t: float, prefix: str = "val/") -> str:
    """``val/loss_t0.062``: the per-bucket metric name, the bucket time to three decimals."""
    return f"{prefix}loss_t{float(t):.3f}"
