"""Model card (modules/backbones/card.py): parameter counts, checkpoint bytes and FLOPs against hand
arithmetic (tests/dit_arithmetic.py), and the FLOP counter it checks analytic FLOPs with."""

from __future__ import annotations

import json

import pytest
import torch

from dit_arithmetic import dit_forward_flops, dit_parameters
from experiments.build import build_parts, instantiate
from experiments.config import compose
from modules.backbones.card import measure_forward_flops, model_card, state_numel

X_SHAPE = (4, 3, 4, 16, 16)  # smoke: batch 4, pixels as latents (3 channels), 4 frames of 16 x 16
TEXT_LEN, STEPS = 24, 4


@pytest.fixture
def dit_tiny(out_dir):
    """dit_tiny as the smoke experiment builds it: in_channels 3 (identity VAE), text_dim 128."""
    composed = compose("smoke")
    return build_parts(composed).backbone, composed.cfg["backbone"], composed.cfg["text"]["dim"]


def test_card_of_dit_tiny_matches_hand_arithmetic(dit_tiny):
    model, preset, text_dim = dit_tiny
    total = dit_parameters(3, text_dim, preset["dim"], preset["depth"], preset["heads"], tuple(preset["patch"]),
                           preset["mlp_ratio"], preset["qk_norm"])
    assert total == 570_672  # about 0.6 M, the preset's comment
    card = model_card(model, X_SHAPE, TEXT_LEN, STEPS, cfg=True)
    json.dumps(card)  # JSON-ready
    assert card["backbone"] == "modules.backbones.dit.DiT"
    assert card["params"] == {"total": total, "trainable": total, "active": total}
    assert state_numel(model) == total  # the DiT has no persistent buffers
    assert card["checkpoint_bytes"] == {"fp32": 2_282_688, "bf16": 1_141_344, "int8": 570_672}
    assert card["adamw_state_bytes"] == 8 * total
    model.requires_grad_(False)
    model.final_layer.requires_grad_(True)
    assert model_card(model, X_SHAPE, TEXT_LEN, STEPS, cfg=True)["params"]["trainable"] == 96 * 48 + 48 + 2 * 96  # Linear + (shift, scale) table


def test_card_flops_are_3x_forward_to_train_and_2x_to_sample_with_cfg(dit_tiny):
    model, preset, text_dim = dit_tiny
    forward = dit_forward_flops(X_SHAPE, TEXT_LEN, text_dim, preset["dim"], preset["depth"], tuple(preset["patch"]))
    assert forward == 244_310_016
    assert model.flops(X_SHAPE, TEXT_LEN) == forward  # the DiT's own analytic count, full attention
    card = model_card(model, X_SHAPE, TEXT_LEN, STEPS, cfg=True)
    flops = card["flops"]
    assert flops["source"] == "backbone.flops (analytic)" and flops["forward"] == forward
    assert flops["train_step"] == 3 * forward
    assert flops["sampling_step"] == 2 * forward and flops["sampling_total"] == STEPS * 2 * forward
    no_cfg = model_card(model, X_SHAPE, TEXT_LEN, None, cfg=False)["flops"]
    assert no_cfg["sampling_step"] == forward and no_cfg["sampling_total"] is None
    assert model_card(model, None, None, STEPS, cfg=True)["flops"]["forward"] is None


def test_card_without_analytic_flops_says_so():
    class NoFlops(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
            self.register_buffer("table", torch.zeros(10))  # persistent: in the checkpoint
            self.register_buffer("cache", torch.zeros(100), persistent=False)  # not in the checkpoint

    card = model_card(NoFlops(), X_SHAPE, TEXT_LEN, STEPS, cfg=True)
    assert card["params"]["total"] == 20 and card["checkpoint_bytes"]["fp32"] == 4 * 30
    flops = card["flops"]
    assert flops["source"] is None and flops["forward"] is None and flops["train_step"] is None


def test_flop_counter_on_meta_matches_hand_count_of_dit_tiny(dit_tiny):
    """FlopCounterMode on meta counts every Linear and both attentions exactly (on CPU it would
    miss scaled_dot_product_attention); the model itself stays on CPU."""
    model, preset, text_dim = dit_tiny
    expected = dit_forward_flops(X_SHAPE, TEXT_LEN, text_dim, preset["dim"], preset["depth"], tuple(preset["patch"]))
    assert measure_forward_flops(model, X_SHAPE, TEXT_LEN, text_dim) == expected
    assert next(model.parameters()).device.type == "cpu"


def test_card_of_experts_counts_one_expert_as_active(out_dir, monkeypatch):
    experts = build_parts(compose("smoke", ["backbone=experts_tiny"])).backbone
    one = sum(p.numel() for p in experts.experts[0].parameters())
    card = model_card(experts, X_SHAPE, TEXT_LEN, STEPS, cfg=True)
    assert card["params"] == {"total": 2 * one, "trainable": 2 * one, "active": one}
    assert card["checkpoint_bytes"]["bf16"] == 4 * one
    assert card["flops"]["forward"] == experts.experts[0].flops(X_SHAPE, TEXT_LEN)  # one expert per sample
    monkeypatch.setattr(experts.experts[1], "flops", lambda x_shape, text_len: 10**12)
    assert model_card(experts, X_SHAPE, TEXT_LEN, STEPS, cfg=True)["flops"]["forward"] == 10**12  # the costlier


def test_card_of_wan22_a14b_on_meta(out_dir):
    """27B-class numbers cost nothing on the meta device; bytes are 4 / 2 / 1 per parameter."""
    node = compose("smoke", ["backbone=experts_wan22_a14b"]).cfg["backbone"]
    with torch.device("meta"):
        model = instantiate(node, "experts_wan22_a14b", in_channels=16, text_dim=4096)
    x_shape = (1, 16, 21, 60, 104)  # Wan 480p: 81 frames, 480 x 832 through a 4x8x8 VAE
    card = model_card(model, x_shape, 512, 40, cfg=True)
    total, active = card["params"]["total"], card["params"]["active"]
    assert total == 2 * active and card["checkpoint_bytes"] == {"fp32": 4 * total, "bf16": 2 * total, "int8": total}
    measured = measure_forward_flops(model, x_shape, 512, 4096)
    tokens = 21 * 30 * 52
    assert measured > 2 * tokens * active  # at least the weight matmuls; attention adds the rest
