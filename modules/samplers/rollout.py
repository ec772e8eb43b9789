"""Frame-by-frame generation for frame-autoregressive backbones (`modules.backbones.frame_ar`).

The clip is cut into chunks of `backbone.chunk` frames. Each chunk is integrated from noise (t = 1)
to data (t = 0) by the ordinary sampler, conditioned on the chunks already generated, which sit at
t = 0. Two ways to give the network that past, computing the same thing:

- cached (default): the past lives in the backbone's `KVCache`; after a chunk is finished one
  forward at t = 0 with ``commit=True`` adds its keys and values, so each sampler step costs one
  chunk's forward, and with a sliding window (`backbone.context`) the cost per chunk stays flat;
- recompute: every sampler step runs the backbone on [past frames at t = 0, current chunk at t],
  the reference the cache is tested against, and what one would do without a cache.

Guidance wraps the velocity as for any sampler (`guide`, e.g. classifier-free guidance); the cache
then holds the conditional and the null rows together, since guidance evaluates both in one batch.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor

from modules.conditioning import Conditioning

Velocity = Callable[[Tensor, Tensor, Conditioning], Tensor]  # v(x, t, cond)
Guide = Callable[[Velocity], Callable[[Tensor, Tensor], Tensor]]  # velocity -> v(x, t) for a sampler


@torch.no_grad()
def frame_rollout(
    backbone, objective, sampler, guide: Guide, noise: Tensor, cached: bool = True, **sample_options
) -> Tensor:
    """noise (B, C, T, H, W) -> x0 (B, C, T, H, W), `backbone.chunk` frames at a time, without
    gradients (as every sampler; the KV cache is written in place).

    objective: gives ``velocity(net, x, t, cond)`` (t per sample (B,) or per frame (B, T));
    sampler: ``sample(v(x, t), noise, **sample_options) -> x0`` (e.g. ``path=objective.path``, a
    generator); guide: turns a velocity(x, t, cond) into the v(x, t) the sampler integrates, e.g.
    ``lambda v: classifier_free_guidance(v, cond, null, scale)``.
    """
    B, T = noise.shape[0], noise.shape[2]
    done: list[Tensor] = []
    cache = backbone.new_cache() if cached else None
    for start in range(0, T, backbone.chunk):
        z = noise[:, :, start : start + backbone.chunk]  # (B, C, Tc, H, W)
        if cached:
            net = partial(backbone, cache=cache)
            x0 = sampler.sample(guide(partial(objective.velocity, net)), z, **sample_options)
            # one forward of the clean chunk at t = 0 adds its keys and values; t = 0 is 0 on every
            # objective's network scale, and the output is not used
            commit = guide(lambda x, t, c: backbone(x, torch.zeros_like(t), c, cache=cache, commit=True))
            commit(x0, torch.zeros(B, dtype=x0.dtype, device=x0.device))
        else:
            past = torch.cat(done, 2) if done else None
            x0 = sampler.sample(guide(partial(_with_past, objective, backbone, past)), z, **sample_options)
        done.append(x0)
    return torch.cat(done, dim=2)


def _with_past(objective, backbone, past: Tensor | None, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """Velocity of the chunk x (B', C, Tc, H, W) at times t (B',), recomputed over [past; x] with
    the past frames at t = 0. B' may be a multiple of the past's batch (guidance stacks the
    conditional and null rows), and the past is repeated to match."""
    if past is None:
        return objective.velocity(backbone, x, t, cond)
    past = past.repeat(x.shape[0] // past.shape[0], 1, 1, 1, 1)  # (B', C, T_past, H, W)
    Tp, Tc = past.shape[2], x.shape[2]
    t_frames = torch.cat([torch.zeros_like(t)[:, None].expand(-1, Tp), t[:, None].expand(-1, Tc)], dim=1)  # (B', Tp + Tc)
    return objective.velocity(backbone, torch.cat([past, x], dim=2), t_frames, cond)[:, :, Tp:]
