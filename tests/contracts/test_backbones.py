"""The backbone contract over every backbone preset: vidlab's configs/backbone/*.yaml and the
preset folders of installed plugins (entry-point group ``vidlab.configs``).

Each preset is composed inside the smoke experiment (so interpolations such as
``${objective.time_scale}`` resolve) and built through `experiments.build.instantiate` with
``in_channels`` and ``text_dim`` injected, as `build_parts` does. Presets over
`CPU_PARAM_LIMIT` parameters are checked on the meta device only.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from experiments.build import instantiate
from experiments.config import compose, groups

from .backbone_contract import (
    CPU_PARAM_LIMIT,
    Build,
    check_deterministic,
    check_denoiser,
    check_empty_batch,
    check_finite_gradients,
    check_flops,
    check_grad_checkpointing,
    check_identity_at_init,
    check_meta_init,
    check_meta_only,
    check_output_shape,
    check_per_frame_time,
    check_state_dict_round_trip,
    make_inputs,
    meta_parameter_count,
)

IN_CHANNELS, TEXT_DIM = 4, 32
PRESETS = sorted(groups().get("backbone", {}))
INPUTS = make_inputs(IN_CHANNELS, TEXT_DIM)
LONG_SHAPE = (1, IN_CHANNELS, 8, 32, 32)  # FLOPs at a longer sequence, where attention weighs more


@functools.lru_cache(maxsize=None)
def _node(name: str) -> dict:
    return compose("smoke", [f"backbone={name}"]).cfg["backbone"]


def builder(name: str) -> Build:
    """A zero-argument function building preset ``name`` (on the current default device)."""
    node = _node(name)

    def build() -> torch.nn.Module:
        return instantiate(copy.deepcopy(node), f"backbone preset {name!r}", in_channels=IN_CHANNELS, text_dim=TEXT_DIM)

    return build


@functools.lru_cache(maxsize=None)
def parameters(name: str) -> int:
    return meta_parameter_count(builder(name))


def cpu_builder(name: str) -> Build:
    """The builder, or a skip for presets too large to run on CPU."""
    count = parameters(name)
    if count > CPU_PARAM_LIMIT:
        pytest.skip(f"{count / 1e6:,.0f} M parameters > {CPU_PARAM_LIMIT / 1e6:.0f} M: meta device only (test_meta_build)")
    return builder(name)


def built(name: str) -> torch.nn.Module:
    build = cpu_builder(name)
    torch.manual_seed(0)
    return build()


@pytest.mark.parametrize("name", PRESETS)
def test_meta_build(name):
    """Every preset, however large: meta build, init_weights on meta, meta forward shape, count."""
    count = check_meta_only(builder(name), INPUTS)
    assert count == parameters(name) > 0


@pytest.mark.parametrize("name", PRESETS)
def test_output_shape(name):
    model = built(name)
    check_denoiser(model)
    check_output_shape(model, INPUTS)


@pytest.mark.parametrize("name", PRESETS)
def test_deterministic(name):
    check_deterministic(built(name), INPUTS)


@pytest.mark.parametrize("name", PRESETS)
def test_finite_gradients(name):
    check_finite_gradients(built(name), INPUTS)


@pytest.mark.parametrize("name", PRESETS)
def test_empty_batch(name):
    check_empty_batch(built(name), INPUTS)


@pytest.mark.parametrize("name", PRESETS)
def test_grad_checkpointing(name):
    check_grad_checkpointing(built(name), INPUTS)


@pytest.mark.parametrize("name", PRESETS)
def test_per_frame_time(name):
    check_per_frame_time(built(name), INPUTS)


@pytest.mark.parametrize("name", PRESETS)
def test_identity_at_init(name):
    check_identity_at_init(cpu_builder(name), INPUTS)


@pytest.mark.parametrize("name", PRESETS)
def test_meta_init(name):
    check_meta_init(cpu_builder(name), INPUTS)


@pytest.mark.parametrize("name", PRESETS)
def test_state_dict_round_trip(name):
    check_state_dict_round_trip(cpu_builder(name), INPUTS)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("x_shape", [tuple(INPUTS.x.shape), LONG_SHAPE], ids=["short", "long"])
def test_flops_match_flop_counter(name, x_shape):
    """Analytic FLOPs within 10 % of FlopCounterMode (on meta, so any size is free)."""
    check_flops(builder(name), x_shape, text_len=INPUTS.cond.tokens.shape[1], text_dim=TEXT_DIM)
