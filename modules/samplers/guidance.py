"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a velocity function:
v = v_null + s·(v_cond − v_null), with both branches in one batched forward.

The scale s is a number, or a function of the sampler's time t (t = 0 data, t = 1 noise), e.g. one
scale per expert of a timestep-routed MoE (Wan2.2 A14B: 4.0 for t ≥ 0.875, 3.0 below), built by
`expert_cfg_scale`.

Guidance interval (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves
Sample and Distribution Quality in Diffusion Models"): guidance applied only for noise levels in a
middle range [σ_lo, σ_hi] and the conditional velocity elsewhere,

    v(x, t) = v_null + s(t)·(v_cond − v_null)   if start ≤ t ≤ stop,     v_cond(x, t) otherwise,

written here on the sampler's time axis (the paper's interval is on EDM's σ = σ(t)/α(t), which maps
to t monotonically: EDM2-XXL's (0.28, 5.42] is t ∈ (0.22, 0.84] on the linear path, t = σ/(1 + σ)). High-noise guidance mostly collapses diversity, low-noise guidance does little;
outside the interval only the conditional forward runs.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from torch import Tensor

from modules.conditioning import Conditioning
from modules.samplers.timesteps import interval_index

Scale = Union[float, Callable[[Tensor], Union[float, Tensor]]]


def _expand(cond: Conditioning, batch: int) -> Conditioning:
    """Broadcast a batch-1 conditioning (e.g. the encoded empty prompt) to `batch` rows."""
    if len(cond) == batch:
        return cond
    if len(cond) != 1:
        raise ValueError(f"null_cond has batch {len(cond)}, expected 1 or {batch}")
    context = None if cond.context is None else cond.context.expand(batch, *cond.context.shape[1:])
    return Conditioning(cond.tokens.expand(batch, -1, -1), cond.mask.expand(batch, -1), context)


def expert_cfg_scale(boundaries: Sequence[float], scales: Sequence[float]) -> Callable[[Tensor], Tensor]:
    """A guidance scale per time interval: s(t) = scales[k] for b_k ≤ t < b_{k−1}.

    boundaries: descending, in (0, 1), on the sampler's time axis (t = 0 data, t = 1 noise);
    scales: len(boundaries) + 1 values, highest noise first. Wan2.2 A14B:
    ``expert_cfg_scale([0.875], [4.0, 3.0])``. Returns s(t): t (B,) -> (B,) in t's dtype.
    """
    if len(scales) != len(boundaries) + 1:
        raise ValueError(
            f"expert_cfg_scale: {len(boundaries)} boundaries need {len(boundaries) + 1} scales, got {list(scales)}"
        )
    if any(not 0.0 < b < 1.0 for b in boundaries):
        raise ValueError(f"expert_cfg_scale: boundaries are times in (0, 1), got {list(boundaries)}")
    values = torch.tensor([float(s) for s in scales], dtype=torch.float64)  # (K + 1,)
    bounds = [float(b) for b in boundaries]

    def scale(t: Tensor) -> Tensor:
        return values.to(t.device)[interval_index(t, bounds)].to(t.dtype)  # (B,)

    return scale


def classifier_free_guidance(
    velocity: Callable[[Tensor, Tensor, Conditioning], Tensor],
    cond: Conditioning,
    null_cond: Conditioning,
    scale: Scale,
    interval: Sequence[float] | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Return v(x, t) for a sampler: x (B, ...), t (B,) the sampler's time in [0, 1].

    velocity(x, t, cond) is e.g. `functools.partial(objective.velocity, net)`. null_cond has
    batch B or 1; text lengths may differ from cond's (padded with mask False). scale is a number
    or a function s(t) of the sampler's time returning a number or a (B,) tensor (see
    `expert_cfg_scale`). A number equal to 1 skips the null branch: only the conditional forward
    runs. interval: optional (start, stop), 0 ≤ start ≤ stop ≤ 1: guidance only for samples with
    start ≤ t ≤ stop, the conditional velocity for the others (Kynkäänniemi et al. 2024); a step whose
    samples all lie outside runs the conditional forward alone.
    """
    if interval is not None:
        if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
            raise ValueError(f"interval must be (start, stop) with 0 <= start <= stop <= 1, got {interval}")
        start, stop = float(interval[0]), float(interval[1])
    if not callable(scale) and scale == 1.0:
        return lambda x, t: velocity(x, t, cond)
    both = Conditioning.cat(cond, _expand(null_cond, len(cond)))  # (2B, L_max, D)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        inside = None
        if interval is not None:
            inside = (t >= start) & (t <= stop)  # (B,)
            if not bool(inside.any()):
                return velocity(x, t, cond)
        s = scale(t) if callable(scale) else scale
        if isinstance(s, Tensor):
            s = s.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))  # (B, 1, ..., 1)
        v = velocity(torch.cat([x, x]), torch.cat([t, t]), both)  # (2B, ...)
        v_cond, v_null = v.chunk(2)  # each (B, ...)
        out = v_null + s * (v_cond - v_null)
        if inside is not None and not bool(inside.all()):
            out = torch.where(inside.reshape(-1, *([1] * (x.dim() - 1))), out, v_cond)
        return out

    return guided
