"""Model card: what a backbone costs to store and to run, from arithmetic over the built module.

Parameters: total, trainable, and active (one sample's path: `active_parameters()` of a
timestep-routed MoE, else all). Checkpoint bytes = numbers stored × bytes per number (fp32 4,
bf16 2, int8 1), over the model state only (parameters and persistent buffers, what
`state_dict()` holds): no optimizer state (AdamW keeps two fp32 moments per trainable
parameter, reported separately), no quantisation scales, no file-format overhead.

FLOPs are analytic, from the backbone's own `flops(x_shape, text_len)` when it has one
(multiply-adds count 2; matmuls and attention only): a training step is forward + backward
≈ 3 × forward; a sampling step with classifier-free guidance runs the conditional and the null
branch in one batch of 2B, i.e. 2 × forward. `measure_forward_flops` counts the same with
`torch.utils.flop_counter.FlopCounterMode` on the meta device, as a check.

Everything here works on a meta-device backbone, so the card of a 27B model costs nothing.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from modules.conditioning import Conditioning

BYTES_PER_NUMBER = {"fp32": 4, "bf16": 2, "int8": 1}
ADAMW_BYTES_PER_TRAINABLE = 8  # exp_avg and exp_avg_sq in fp32


def parameter_counts(backbone: nn.Module) -> dict[str, int]:
    """``{"total", "trainable", "active"}`` parameter counts (shared parameters counted once)."""
    params = list(backbone.parameters())
    total = sum(p.numel() for p in params)
    active = backbone.active_parameters() if hasattr(backbone, "active_parameters") else total
    return {"total": total, "trainable": sum(p.numel() for p in params if p.requires_grad), "active": int(active)}


def state_numel(backbone: nn.Module) -> int:
    """Numbers in ``state_dict()``: parameters plus persistent buffers, each tensor once."""
    seen: set[int] = set()
    total = 0
    for module in backbone.modules():
        tensors = list(module._parameters.values()) + [
            b for name, b in module._buffers.items() if name not in module._non_persistent_buffers_set
        ]
        for tensor in tensors:
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel()
    return total


def checkpoint_bytes(backbone: nn.Module) -> dict[str, int]:
    """Model-state bytes per storage precision: ``{"fp32", "bf16", "int8"}`` (see module docstring)."""
    numel = state_numel(backbone)
    return {precision: numel * size for precision, size in BYTES_PER_NUMBER.items()}


def analytic_forward_flops(backbone: nn.Module, x_shape: tuple[int, ...], text_len: int) -> int | None:
    """``backbone.flops(x_shape, text_len)``, or None when the backbone has no analytic count."""
    flops = getattr(backbone, "flops", None)
    if flops is None:
        return None
    try:
        return int(flops(tuple(int(s) for s in x_shape), int(text_len)))
    except NotImplementedError:
        return None


def model_card(
    backbone: nn.Module,
    x_shape: tuple[int, ...] | None,
    text_len: int | None,
    sampling_steps: int | None,
    cfg: bool,
) -> dict[str, Any]:
    """The card of ``backbone`` for latents x_shape (B, C, T, H, W) and text_len text tokens.

    Returns plain ints / strings (JSON-ready): ``params`` {total, trainable, active},
    ``checkpoint_bytes`` {fp32, bf16, int8} (model state only), ``adamw_state_bytes``,
    ``flops`` {forward, train_step = 3·forward, sampling_step = (2 if cfg else 1)·forward,
    sampling_total = steps·sampling_step}, each for the whole batch B; None without
    `backbone.flops` or without x_shape / text_len.
    """
    counts = parameter_counts(backbone)
    sized = x_shape is not None and text_len is not None
    forward = analytic_forward_flops(backbone, x_shape, text_len) if sized else None
    per_step = None if forward is None else forward * (2 if cfg else 1)
    return {
        "backbone": f"{type(backbone).__module__}.{type(backbone).__qualname__}",
        "x_shape": [int(s) for s in x_shape] if x_shape is not None else None,
        "text_len": None if text_len is None else int(text_len),
        "params": counts,
        "checkpoint_bytes": checkpoint_bytes(backbone),
        "checkpoint_note": "model state only (parameters + persistent buffers) x bytes per number; "
        "no optimizer state, quantisation scales or file overhead",
        "adamw_state_bytes": counts["trainable"] * ADAMW_BYTES_PER_TRAINABLE,
        "flops": {
            "source": None if forward is None else "backbone.flops (analytic)",
            "forward": forward,
            "train_step": None if forward is None else 3 * forward,
            "sampling_step": per_step,
            "cfg": bool(cfg),
            "sampling_steps": sampling_steps,
            "sampling_total": None if per_step is None or sampling_steps is None else per_step * int(sampling_steps),
        },
    }


def measure_forward_flops(backbone: nn.Module, x_shape: tuple[int, ...], text_len: int, text_dim: int) -> int:
    """Forward FLOPs counted by `FlopCounterMode` (matmuls, convolutions, attention) on the meta device.

    A backbone not on meta is deep-copied there first. Meta, because the counter has no formula
    for the CPU attention kernel (torch 2.13 counts 0 for F.scaled_dot_product_attention on CPU)
    and because meta tensors cost no compute. Inputs: x zeros(x_shape), t (B,) = 500, text
    (B, text_len, text_dim) with every token valid.
    """
    if any(p.device.type != "meta" for p in backbone.parameters()):
        backbone = copy.deepcopy(backbone).to("meta")
    B = int(x_shape[0])
    with torch.device("meta"):
        x = torch.zeros(tuple(int(s) for s in x_shape))
        t = torch.full((B,), 500.0)
        cond = Conditioning(torch.zeros(B, text_len, text_dim), torch.ones(B, text_len, dtype=torch.bool))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone(x, t, cond)
    return int(counter.get_total_flops())
