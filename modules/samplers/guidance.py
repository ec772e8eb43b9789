"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a velocity function:
v = v_null + scale·(v_cond − v_null), with both branches in one batched forward."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from modules.conditioning import Conditioning


def _expand(cond: Conditioning, batch: int) -> Conditioning:
    """Broadcast a batch-1 conditioning (e.g. the encoded empty prompt) to `batch` rows."""
    if len(cond) == batch:
        return cond
    if len(cond) != 1:
        raise ValueError(f"null_cond has batch {len(cond)}, expected 1 or {batch}")
    context = None if cond.context is None else cond.context.expand(batch, *cond.context.shape[1:])
    return Conditioning(cond.tokens.expand(batch, -1, -1), cond.mask.expand(batch, -1), context)


def classifier_free_guidance(
    velocity: Callable[[Tensor, Tensor, Conditioning], Tensor],
    cond: Conditioning,
    null_cond: Conditioning,
    scale: float,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Return v(x, t) for a sampler: x (B, ...), t (B,).

    velocity(x, t, cond) is e.g. `functools.partial(objective.velocity, net)`. null_cond has
    batch B or 1; text lengths may differ from cond's (padded with mask False). scale == 1
    skips the null branch: only the conditional forward runs.
    """
    if scale == 1.0:
        return lambda x, t: velocity(x, t, cond)
    both = Conditioning.cat(cond, _expand(null_cond, len(cond)))  # (2B, L_max, D)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        v = velocity(torch.cat([x, x]), torch.cat([t, t]), both)  # (2B, ...)
        v_cond, v_null = v.chunk(2)  # each (B, ...)
        return v_null + scale * (v_cond - v_null)

    return guided
