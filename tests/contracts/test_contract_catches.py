"""The contract checks are not vacuous: a small well-behaved denoiser passes all of them (including
the FLOPs check), and each deliberately broken variant fails the check meant to catch it."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from modules.conditioning import Conditioning

from .backbone_contract import (
    check_backbone,
    check_deterministic,
    check_empty_batch,
    check_finite_gradients,
    check_flops,
    check_grad_checkpointing,
    check_identity_at_init,
    check_meta_init,
    check_output_shape,
    check_per_frame_time,
    check_state_dict_round_trip,
    make_inputs,
)

C, TEXT_DIM, DIM = 3, 8, 16
INPUTS = make_inputs(C, TEXT_DIM, grid=(2, 4, 4))


class GatedBlock(nn.Module):
    """h + gate(c)·Linear(h), the gate zero at init (AdaLN-Zero in miniature)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, dim)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        return h + self.gate(c)[:, None] * self.linear(h)


class ToyDenoiser(nn.Module):
    """Per-voxel tokens (B, T·H·W, C) -> Linear -> gated blocks -> Linear; `defect` breaks one rule."""

    identity_at_init = True

    def __init__(self, in_channels: int, text_dim: int, dim: int = DIM, depth: int = 2, defect: str | None = None):
        super().__init__()
        self.defect = defect
        self.grad_checkpointing = False
        self.per_frame_time = defect == "frame_t_ignored"  # claims per-frame times, then drops them
        self.embed = nn.Linear(in_channels, dim)
        self.time = nn.Linear(1, dim)
        self.text = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList(GatedBlock(dim) for _ in range(depth))
        self.out = nn.Linear(dim, in_channels)
        if defect == "unused":
            self.spare = nn.Linear(dim, dim)
        if defect == "unsaved":
            self.register_buffer("scale", torch.rand(in_channels), persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear) and not (self.defect == "init_forgets" and module is self.out):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            if self.defect != "not_identity":
                nn.init.zeros_(block.gate.weight)
            nn.init.zeros_(block.gate.bias)
        if self.defect == "unsaved":
            self.scale.uniform_()

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        B, C, T, H, W = x.shape
        if t.dim() == 2:
            t = t[:, 0]  # the "frame_t_ignored" defect: every frame gets the first frame's time
        mask = cond.mask[..., None].to(x.dtype)  # (B, L, 1)
        c = self.time(t[:, None] / 1000) + self.text((cond.tokens * mask).sum(1) / mask.sum(1))  # (B, dim)
        h = self.embed(x.flatten(2).transpose(1, 2))  # (B, N, dim)
        if self.defect == "empty":
            h = h.unflatten(0, (B, -1)).flatten(0, 1)  # ambiguous for B = 0
        for block in self.blocks:
            h = checkpoint(block, h, c, use_reentrant=False) if self.grad_checkpointing else block(h, c)
        out = self.out(h).transpose(1, 2).reshape(B, C, T, H, W)  # (B, C, T, H, W)
        if self.defect == "shape":
            out = out[:, :1]
        if self.defect == "random":
            out = out + 1e-3 * torch.rand_like(out)
        if self.defect == "ckpt" and self.grad_checkpointing:
            out = out * 1.01
        if self.defect == "unsaved":
            out = out * self.scale[:, None, None, None]
        return out

    def flops(self, x_shape: tuple[int, int, int, int, int], text_len: int) -> int:
        """Multiply-adds × 2 of every Linear (the pooled text costs one text_dim × dim product)."""
        B, C, T, H, W = x_shape
        N, D, depth = T * H * W, self.embed.out_features, len(self.blocks)
        per_sample = N * C * D + D + self.text.in_features * D + depth * (N * D * D + D * D) + N * D * C
        return 2 * B * per_sample * (2 if self.defect == "flops" else 1)


def build(defect: str | None = None):
    def make() -> ToyDenoiser:
        return ToyDenoiser(C, TEXT_DIM, defect=defect)

    return make


def test_a_good_backbone_passes_every_check():
    skipped = check_backbone(build(), C, TEXT_DIM, INPUTS)
    assert len(skipped) == 1 and "no per_frame_time" in skipped[0]  # the toy takes one t per sample


@pytest.mark.parametrize(
    "defect,check,message",
    [
        ("shape", lambda b: check_output_shape(b(), INPUTS), "output"),
        ("random", lambda b: check_deterministic(b(), INPUTS), "two forwards differ"),
        ("unused", lambda b: check_finite_gradients(b(), INPUTS), "no gradient.*spare"),
        ("empty", lambda b: check_empty_batch(b(), INPUTS), "empty batch fails"),
        ("ckpt", lambda b: check_grad_checkpointing(b(), INPUTS), "not close"),
        ("not_identity", lambda b: check_identity_at_init(b, INPUTS), r"blocks\[0\] is not the identity"),
        ("init_forgets", lambda b: check_meta_init(b, INPUTS), "left these uninitialised.*out"),
        ("unsaved", lambda b: check_state_dict_round_trip(b, INPUTS), "reloaded model differs"),
        ("flops", lambda b: check_flops(b, tuple(INPUTS.x.shape), 6, TEXT_DIM), r"\+100\.0 %"),
        ("frame_t_ignored", lambda b: check_per_frame_time(b(), INPUTS), "last frame's time does not reach"),
    ],
)
def test_each_defect_is_caught(defect, check, message):
    with pytest.raises(AssertionError, match=message):
        check(build(defect))
