"""Timestep-routed experts (Wan2.2 A14B) and per-expert classifier-free guidance."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from dit_arithmetic import dit_parameters
from experiments.build import build_parts, build_system, instantiate
from experiments.config import ConfigError, compose
from modules.backbones.dit import DiT
from modules.backbones.experts import TimestepExperts
from modules.conditioning import Conditioning
from modules.samplers.guidance import classifier_free_guidance, expert_cfg_scale
from modules.samplers.timesteps import interval_index
from modules.system import GuidanceConfig

C, TEXT_DIM = 2, 8


class Constant(nn.Module):
    """Outputs `value` everywhere (times a parameter that starts at 1, so gradients reach it)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.weight = nn.Parameter(torch.ones(()))
        self.blocks = nn.ModuleList([nn.Identity()])

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return torch.full_like(x, self.value) * self.weight


def inputs(t: list[float], seed: int = 0) -> tuple[Tensor, Tensor, Conditioning]:
    g = torch.Generator().manual_seed(seed)
    B = len(t)
    x = torch.randn(B, C, 2, 4, 4, generator=g)
    cond = Conditioning(torch.randn(B, 3, TEXT_DIM, generator=g), torch.ones(B, 3, dtype=torch.bool))
    return x, torch.tensor(t), cond


def dit_experts(run_unused_experts: bool = True) -> TimestepExperts:
    torch.manual_seed(0)
    experts = [DiT(C, TEXT_DIM, dim=16, depth=1, heads=2, patch=(1, 2, 2)) for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # break the zero init so the experts differ and every path carries signal
        for p in (p for e in experts for p in e.parameters()):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return TimestepExperts(experts, boundaries=[0.875], time_scale=1000.0, run_unused_experts=run_unused_experts)


# -- routing --------------------------------------------------------------------------------------


def test_interval_index_boundary_goes_to_higher_noise():
    t = torch.tensor([1.0, 0.875, 0.8749, 0.5, 0.25, 0.0])
    assert interval_index(t, [0.875]).tolist() == [0, 0, 1, 1, 1, 1]
    assert interval_index(t, [0.875, 0.5, 0.2]).tolist() == [0, 0, 1, 1, 2, 3]
    with pytest.raises(ValueError, match="descending"):
        interval_index(t, [0.2, 0.5])


def test_routing_sends_each_sample_to_its_expert():
    model = TimestepExperts([Constant(1.0), Constant(2.0), Constant(3.0)], boundaries=[0.875, 0.3], time_scale=1000.0)
    x, t, cond = inputs([1000.0, 875.0, 874.0, 300.0, 299.0, 0.0])  # already t·time_scale, as the objective gives
    assert model.expert_index(t).tolist() == [0, 0, 1, 1, 2, 2]
    out = model(x, t, cond)
    assert out.shape == x.shape
    assert [row.unique().tolist() for row in out] == [[1.0], [1.0], [2.0], [2.0], [3.0], [3.0]]


def test_boundaries_are_compared_on_the_objective_time_scale():
    model = TimestepExperts([Constant(1.0), Constant(2.0)], boundaries=[0.875], time_scale=1.0)
    x, t, cond = inputs([0.9, 0.5])
    assert model(x, t, cond)[:, 0, 0, 0, 0].tolist() == [1.0, 2.0]


def test_whole_batch_in_one_expert_equals_running_it_directly():
    model = dit_experts().eval()
    for t_values, k in (([950.0, 990.0, 875.0], 0), ([10.0, 500.0, 874.0], 1)):
        x, t, cond = inputs(t_values)
        with torch.no_grad():
            assert torch.equal(model(x, t, cond), model.experts[k](x, t, cond))


def test_mixed_batch_equals_each_expert_on_its_samples():
    model = dit_experts().eval()
    x, t, cond = inputs([950.0, 100.0, 900.0, 600.0])
    with torch.no_grad():
        out = model(x, t, cond)
        direct = [model.experts[k](x, t, cond) for k in (0, 1)]
    assert (direct[0] - direct[1]).abs().max() > 1e-3  # the experts really differ
    for row, k in enumerate([0, 1, 0, 1]):
        torch.testing.assert_close(out[row], direct[k][row], rtol=1e-5, atol=1e-6)


def test_gradients_reach_only_the_used_expert():
    x, t, cond = inputs([100.0, 500.0])  # both samples low noise: expert 1 only
    skipping = dit_experts(run_unused_experts=False).train()
    skipping(x, t, cond).square().mean().backward()
    assert all(p.grad is None for p in skipping.experts[0].parameters())
    assert all(p.grad is not None for p in skipping.experts[1].parameters())
    assert sum(p.grad.abs().sum() for p in skipping.experts[1].parameters()) > 0

    syncing = dit_experts(run_unused_experts=True).train()  # the default: DDP / FSDP2 safe
    syncing(x, t, cond).square().mean().backward()
    assert all(p.grad is not None and not p.grad.any() for p in syncing.experts[0].parameters())
    for a, b in zip(syncing.experts[1].parameters(), skipping.experts[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_mixed_batch_gradients_equal_each_expert_on_its_own_samples():
    model = dit_experts().train()
    x, t, cond = inputs([950.0, 100.0, 900.0, 600.0])
    model(x, t, cond).square().sum().backward()
    routed = [[p.grad.clone() for p in e.parameters()] for e in model.experts]
    model.zero_grad(set_to_none=True)
    for k, rows in ((0, [0, 2]), (1, [1, 3])):
        idx = torch.tensor(rows)
        model.experts[k](x[idx], t[idx], cond.select(idx)).square().sum().backward()
    for k in (0, 1):
        for a, b in zip(routed[k], (p.grad for p in model.experts[k].parameters())):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_blocks_concatenate_the_experts_blocks_and_switches_reach_experts():
    model = dit_experts()
    assert isinstance(model.blocks, nn.ModuleList)
    assert list(model.blocks) == [*model.experts[0].blocks, *model.experts[1].blocks]
    assert len(model.state_dict()) == sum(len(e.state_dict()) for e in model.experts)  # no duplicate keys
    model.grad_checkpointing = True
    assert all(e.grad_checkpointing for e in model.experts) and model.grad_checkpointing


def test_constructor_errors():
    with pytest.raises(ValueError, match="1 boundaries need 2 experts"):
        TimestepExperts([Constant(1.0)], boundaries=[0.875])
    with pytest.raises(ValueError, match="descending"):
        TimestepExperts([Constant(1.0)] * 3, boundaries=[0.3, 0.8])
    with pytest.raises(TypeError, match="not a built module"):
        TimestepExperts([{"_target_": "modules.backbones.dit.DiT"}, Constant(1.0)])


# -- presets and parameter counts -----------------------------------------------------------------


def test_experts_tiny_preset_builds_nested_experts_with_injected_sizes(out_dir):
    composed = compose("smoke", ["backbone=experts_tiny"])
    parts = build_parts(composed)
    model = parts.backbone
    assert isinstance(model, TimestepExperts) and model.expert_names == ["high_noise", "low_noise"]
    assert model.time_scale == composed.cfg["objective"]["time_scale"]
    one = dit_parameters(3, 128, dim=96, depth=3, heads=4, patch=(1, 4, 4))  # in_channels 3 (pixels), text 128
    assert one == 570_672
    assert model.total_parameters() == sum(p.numel() for p in model.parameters()) == 2 * one
    assert model.active_parameters() == one


def test_nested_key_typo_names_the_expert(out_dir):
    composed = compose("smoke", ["backbone=experts_tiny"])
    composed.cfg["backbone"]["experts"]["low_noise"]["dimm"] = 8
    with pytest.raises(ConfigError, match=r"\[backbone\.experts\.low_noise\]: unknown key 'dimm'.*'dim'"):
        build_system(composed)


def test_wan22_a14b_counts_on_meta(out_dir):
    """Two Wan-14B-shaped experts (in 16, umT5 text 4096): total = 2 × active = 2 × one DiT."""
    node = compose("smoke", ["backbone=experts_wan22_a14b"]).cfg["backbone"]
    with torch.device("meta"):
        model = instantiate(node, "experts_wan22_a14b", in_channels=16, text_dim=4096)
    one = dit_parameters(16, 4096, dim=5120, depth=40, heads=40, patch=(1, 2, 2), mlp_ratio=2.7)
    assert model.experts[0].blocks[0].mlp.fc1.out_features == 13824
    assert model.active_parameters() == one
    assert model.total_parameters() == 2 * one
    assert one == 14_288_491_584  # Wan2.2 A14B: 14 B active, 27 B (here 28.6 B) in total; = diffusers' Wan 14B


# -- per-expert guidance --------------------------------------------------------------------------


def test_expert_cfg_scale_is_wan22():
    scale = expert_cfg_scale([0.875], [4.0, 3.0])
    assert scale(torch.tensor([1.0, 0.875, 0.87, 0.0])).tolist() == [4.0, 4.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="1 boundaries need 2 scales"):
        expert_cfg_scale([0.875], [4.0])
    with pytest.raises(ValueError, match=r"times in \(0, 1\)"):
        expert_cfg_scale([875.0], [4.0, 3.0])


def test_cfg_with_a_time_dependent_scale_is_per_sample():
    calls: list[int] = []

    def velocity(x: Tensor, t: Tensor, c: Conditioning) -> Tensor:
        calls.append(x.shape[0])
        return x * c.tokens.mean((1, 2)).reshape(-1, 1, 1, 1, 1) + t.reshape(-1, 1, 1, 1, 1)

    x, _, cond = inputs([0.0, 0.0])
    null = Conditioning(torch.zeros(1, 1, TEXT_DIM), torch.ones(1, 1, dtype=torch.bool))
    t = torch.tensor([0.95, 0.5])
    guided = classifier_free_guidance(velocity, cond, null, expert_cfg_scale([0.875], [4.0, 3.0]))(x, t)
    null_b = Conditioning(null.tokens.expand(2, -1, -1), null.mask.expand(2, -1))
    v_c, v_n = velocity(x, t, cond), velocity(x, t, null_b)
    torch.testing.assert_close(guided[0], v_n[0] + 4.0 * (v_c[0] - v_n[0]))
    torch.testing.assert_close(guided[1], v_n[1] + 3.0 * (v_c[1] - v_n[1]))
    assert calls[0] == 4  # one batched forward of cond and null


def test_guidance_config_cfg_scales(out_dir):
    assert GuidanceConfig().scale() == 4.0
    with pytest.raises(ValueError, match="need 2 scales"):
        GuidanceConfig(cfg_scales=[4.0], cfg_boundaries=[0.875])
    equal = build_system(compose("smoke", ["guidance.cfg_scales=[3.0,3.0]", "guidance.cfg_boundaries=[0.875]"]))
    assert callable(equal.guidance.scale())
    plain = build_system(compose("smoke", ["guidance.cfg_scale=3.0"]))
    plain.load_state_dict(equal.state_dict())
    args = (["a red circle moving left on a black background"], [0], 4, 16, 16)
    torch.manual_seed(0)
    with torch.no_grad():  # give the zero-initialised final layer some output
        for p in equal.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    plain.load_state_dict(equal.state_dict())
    assert torch.equal(equal.generate(*args), plain.generate(*args))  # [s, s] is the constant s
    split = build_system(compose("smoke", ["guidance.cfg_scales=[4.0,3.0]", "guidance.cfg_boundaries=[0.875]"]))
    split.load_state_dict(equal.state_dict())
    assert not torch.equal(split.generate(*args), plain.generate(*args))
