"""Timestep-routed experts (Wan2.2 A14B, "Wan: Open and Advanced Large-Scale Video Generative
Models", 2025): several full denoisers, each serving one interval of the noise level.

Wan2.2 A14B has two 14B DiTs: the high-noise expert for t ≥ 0.875 (timestep ≥ 875 of 1000) lays out
the video, the low-noise expert below refines it; 27B parameters in total, 14B active per step.

Time. vidlab's t is in [0, 1] with t = 0 data and t = 1 noise, and the objective hands the network
t·time_scale (RectifiedFlow: time_scale = 1000). `boundaries` are given on the [0, 1] axis,
descending (highest noise first), and compared on the network's axis: expert k serves
b_k·time_scale ≤ t < b_{k−1}·time_scale (b_{−1} = ∞, b_K = −∞), so a sample at exactly the
boundary goes to the higher-noise expert, as in Wan2.2 (`t >= boundary`). The preset ties
`time_scale` to the objective's (``${objective.time_scale}``).

Batches. Each sample goes to its expert: samples are grouped by expert, each expert runs on its
sub-batch and the outputs are scattered back, so an expert's gradients come only from its samples.
With ``run_unused_experts`` (the default) an expert with no sample in a training batch still runs
on an empty sub-batch: its gradients are exact zeros rather than None, so every expert takes part
in every backward on every rank (DDP's reducer and FSDP2's reduce-scatter need that; a rank that
skipped an expert another rank used would hang). Set it to False on one process to leave .grad
None for unused experts.

Building. Experts arrive built (``nn.Module``): the one place that turns config into objects,
`experiments/build.py`, builds nested ``_target_`` nodes and injects ``in_channels`` / ``text_dim``
into each expert. modules/ never imports experiments/, and a second, weaker builder here would
duplicate its strict key checks and error messages.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from modules.conditioning import Conditioning
from modules.samplers.timesteps import interval_index


class TimestepExperts(nn.Module):
    """Route each sample to the expert of its time interval; satisfies `Denoiser`.

    experts: built denoisers, highest noise first, as a list or a name → module mapping (the
    preset names them ``high_noise`` / ``low_noise``); ``len(boundaries) + 1`` of them.
    boundaries: descending times in (0, 1) (t = 0 data). time_scale: the scale the objective
    applies to t before calling the network.
    forward(x (B, C, T, H, W), t (B,) already scaled, cond) -> (B, C_out, T, H, W).
    """

    def __init__(
        self,
        experts: Sequence[nn.Module] | Mapping[str, nn.Module],
        boundaries: Sequence[float] = (0.875,),
        time_scale: float = 1000.0,
        run_unused_experts: bool = True,
    ) -> None:
        super().__init__()
        named = dict(experts) if isinstance(experts, Mapping) else {str(i): e for i, e in enumerate(experts)}
        for name, expert in named.items():
            if not isinstance(expert, nn.Module):
                raise TypeError(
                    f"TimestepExperts: expert {name!r} is a {type(expert).__name__}, not a built module; "
                    "build it first (experiments.build.instantiate builds nested _target_ nodes)"
                )
        if len(named) != len(boundaries) + 1:
            raise ValueError(
                f"TimestepExperts: {len(boundaries)} boundaries need {len(boundaries) + 1} experts, got {len(named)}"
            )
        if any(not 0.0 < b < 1.0 for b in boundaries) or list(boundaries) != sorted(boundaries, reverse=True):
            raise ValueError(f"TimestepExperts: boundaries must be descending times in (0, 1), got {list(boundaries)}")
        self.expert_names = list(named)
        self.experts = nn.ModuleList(named.values())
        self.boundaries = [float(b) for b in boundaries]
        self.time_scale = float(time_scale)
        self.run_unused_experts = run_unused_experts

    # -- the Denoiser surface ----------------------------------------------------------------------

    @property
    def blocks(self) -> nn.ModuleList:
        """Every expert's blocks in order (a view: the modules live under ``experts``). Apply FSDP2,
        compile or checkpointing to them in place; replacing an entry here changes nothing."""
        return nn.ModuleList(block for expert in self.experts for block in expert.blocks)

    @property
    def grad_checkpointing(self) -> bool:
        """True when every expert that has the switch checkpoints its blocks; setting it sets all."""
        flags = [e.grad_checkpointing for e in self.experts if hasattr(e, "grad_checkpointing")]
        return bool(flags) and all(flags)

    @grad_checkpointing.setter
    def grad_checkpointing(self, value: bool) -> None:
        for expert in self.experts:
            if hasattr(expert, "grad_checkpointing"):
                expert.grad_checkpointing = value

    @property
    def identity_at_init(self) -> bool | None:
        """True if every expert declares it, False if one declares False, None (undeclared) else."""
        flags = [getattr(e, "identity_at_init", None) for e in self.experts]
        if any(f is False for f in flags):
            return False
        return True if all(f is True for f in flags) else None

    def init_weights(self) -> None:
        """Each expert's own `init_weights` (after a meta-device build and `to_empty`)."""
        for expert in self.experts:
            expert.init_weights()

    # -- routing -----------------------------------------------------------------------------------

    def expert_index(self, t: Tensor) -> Tensor:
        """t (B,) on the network's scale (t·time_scale) -> (B,) long, the expert of each sample."""
        return interval_index(t, [b * self.time_scale for b in self.boundaries])

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        B = x.shape[0]
        if t.dim() == 0:
            t = t.expand(B)
        if t.dim() != 1:
            raise NotImplementedError(
                f"TimestepExperts routes one time per sample, t of shape (B,); got {tuple(t.shape)}"
            )
        if x.device.type == "meta":  # shapes and FLOP counting only: no values to route on
            return self.experts[0](x, t, cond)
        index = self.expert_index(t)  # (B,)
        run_empty = self.run_unused_experts and torch.is_grad_enabled() and self.training
        out: Tensor | None = None
        outputs: list[tuple[Tensor, Tensor]] = []
        for k, expert in enumerate(self.experts):
            rows = (index == k).nonzero(as_tuple=True)[0]  # (B_k,)
            if rows.numel() == B and not run_empty:
                return expert(x, t, cond)
            if rows.numel() == 0 and not run_empty:
                continue
            outputs.append((rows, expert(x[rows], t[rows], cond.select(rows))))  # (B_k, C_out, T, H, W)
        for rows, y in outputs:
            if out is None:
                out = y.new_zeros((B, *y.shape[1:]))  # (B, C_out, T, H, W)
            out = out.index_copy(0, rows, y)
        assert out is not None
        return out

    # -- sizes -------------------------------------------------------------------------------------

    def total_parameters(self) -> int:
        """Every parameter once: all experts plus anything shared."""
        return sum(p.numel() for p in self.parameters())

    def active_parameters(self) -> int:
        """Parameters one sample passes through: the largest expert plus what no expert owns."""
        owned = {id(p) for e in self.experts for p in e.parameters()}
        shared = sum(p.numel() for p in self.parameters() if id(p) not in owned)
        return max(sum(p.numel() for p in e.parameters()) for e in self.experts) + shared

    def flops(self, x_shape: tuple[int, int, int, int, int], text_len: int) -> int:
        """Forward FLOPs for a batch x_shape (B, C, T, H, W): each sample runs one expert, so this
        is the costliest expert's `flops` (all experts of a preset have the same shape).
        Raises NotImplementedError when an expert has no `flops`."""
        missing = [n for n, e in zip(self.expert_names, self.experts) if not hasattr(e, "flops")]
        if missing:
            raise NotImplementedError(f"experts {missing} have no flops()")
        return max(int(e.flops(x_shape, text_len)) for e in self.experts)
