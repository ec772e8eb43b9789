"""The autoencoder contract over every autoencoder preset: vidlab's configs/vae/*.yaml and the
preset folders of installed plugins (entry-point group ``vidlab.configs``), found at run time.

Each preset is built with `experiments.build.instantiate` from its YAML file. Presets with a
mandatory ``???`` value (a folder of pretrained weights, a checkpoint) are skipped unless the
value is given in ``VIDLAB_VAE_SET``, shell-quoted ``preset.key=value`` items, e.g.

    VIDLAB_VAE_SET="diffusers_wan.path=/models/Wan2.1-T2V-1.3B-Diffusers" pytest tests/contracts/test_vaes.py

Presets over `CPU_PARAM_LIMIT` parameters are checked on the meta device only. A preset's
``compile: true`` (a speed switch: torch.compile of some layers) is turned off here: the contract
checks the function, and each preset would otherwise pay a cold compile per graph (~50 s on 2 cores);
tests/test_compile.py checks vidlab's compiled forms against eager.
"""

from __future__ import annotations

import copy
import functools
import os
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch

from experiments.build import instantiate
from experiments.config import ConfigError, compose, groups, load_yaml, parse_override

from .vae_contract import (
    CPU_PARAM_LIMIT,
    Build,
    check_deterministic,
    check_encode_shape,
    check_gradients,
    check_latent_shape_rejects_bad_sizes,
    check_meta_only,
    check_normalisation,
    check_protocol,
    check_reconstruction_shape,
    check_state_dict_round_trip,
    clip_shape,
    make_clip,
    meta_parameter_count,
)

PRESETS: dict[str, Path] = groups().get("vae", {})
NAMES = sorted(PRESETS)
SET_VARIABLE = "VIDLAB_VAE_SET"


def given_values() -> dict[str, list[str]]:
    """``VIDLAB_VAE_SET`` as {preset: ["key=value", ...]}."""
    out: dict[str, list[str]] = {}
    for item in shlex.split(os.environ.get(SET_VARIABLE, "")):
        preset, _, rest = item.partition(".")
        out.setdefault(preset, []).append(rest)
    return out


def mandatory(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is OmegaConf's mandatory ``???``."""
    if isinstance(node, dict):
        return [key for k, v in node.items() for key in mandatory(v, f"{prefix}{k}.")]
    if isinstance(node, list):
        return [key for i, v in enumerate(node) for key in mandatory(v, f"{prefix}{i}.")]
    return [prefix[:-1]] if node == "???" else []


@functools.lru_cache(maxsize=None)
def _node(name: str) -> dict[str, Any]:
    """The preset's YAML with the values given in ``VIDLAB_VAE_SET``; composed inside the smoke
    experiment when it interpolates other keys (``${...}``)."""
    items = given_values().get(name, [])
    node = load_yaml(PRESETS[name])
    if node.get("compile") is True:
        node["compile"] = False  # see the module docstring
    if "${" in repr(node):
        return compose("smoke", [f"vae={name}", *(f"vae.{item}" for item in items)]).cfg["vae"]
    for item in items:
        key, value = parse_override(item)
        *parents, leaf = key.split(".")
        target = node
        for part in parents:
            target = target[part]
        target[leaf] = value
    return node


def builder(name: str) -> Build:
    """A zero-argument function building preset ``name``; a skip when a mandatory value is unset."""
    node = _node(name)
    unset = mandatory(node)
    if unset:
        example = " ".join(f"{name}.{key}=..." for key in unset)
        pytest.skip(f"{PRESETS[name].name} needs {', '.join(unset)} (mandatory ???); set {SET_VARIABLE}='{example}'")

    def build() -> torch.nn.Module:
        try:
            return instantiate(copy.deepcopy(node), f"{PRESETS[name]} [vae]")
        except ConfigError as exc:  # e.g. trained_*: the checkpoint `vidlab fit vae_*` writes is not here
            if isinstance(exc.__cause__, FileNotFoundError):
                pytest.skip(f"{PRESETS[name].name} loads a file that does not exist here: {exc.__cause__}")
            raise

    return build


@functools.lru_cache(maxsize=None)
def parameters(name: str) -> int:
    return meta_parameter_count(builder(name))


def cpu_builder(name: str) -> Build:
    """The builder, or a skip for presets too large to run on CPU."""
    build = builder(name)
    count = parameters(name)
    if count > CPU_PARAM_LIMIT:
        pytest.skip(f"{count / 1e6:,.0f} M parameters > {CPU_PARAM_LIMIT / 1e6:.0f} M: meta device only (test_meta_build)")
    return build


@functools.lru_cache(maxsize=None)
def _clip(name: str) -> torch.Tensor:
    return make_clip(clip_shape(built(name)))


def built(name: str) -> Any:
    build = cpu_builder(name)
    torch.manual_seed(0)
    return build()


def test_presets_found():
    assert "identity" in PRESETS, f"configs/vae/identity.yaml not found among {NAMES}"


@pytest.mark.parametrize("name", NAMES)
def test_meta_build(name):
    """Presets too large for CPU: meta build, protocol, meta encode shape."""
    count = parameters(name)
    if count <= CPU_PARAM_LIMIT:
        pytest.skip(f"{count / 1e6:,.1f} M parameters: checked on CPU")
    assert check_meta_only(builder(name)) == count


@pytest.mark.parametrize("name", NAMES)
def test_protocol(name):
    check_protocol(built(name))


@pytest.mark.parametrize("name", NAMES)
def test_latent_shape_rejects_bad_sizes(name):
    check_latent_shape_rejects_bad_sizes(built(name))


@pytest.mark.parametrize("name", NAMES)
def test_encode_shape(name):
    check_encode_shape(built(name), _clip(name))


@pytest.mark.parametrize("name", NAMES)
def test_reconstruction_shape(name):
    check_reconstruction_shape(built(name), _clip(name))


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name):
    check_deterministic(built(name), _clip(name))


@pytest.mark.parametrize("name", NAMES)
def test_normalisation(name):
    check_normalisation(built(name), _clip(name))


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    check_state_dict_round_trip(cpu_builder(name), _clip(name))


@pytest.mark.parametrize("name", NAMES)
def test_gradients(name):
    check_gradients(built(name), _clip(name))
