"""Composition is strict and every shipped YAML composes and builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from contracts.backbone_contract import CPU_PARAM_LIMIT
from experiments.build import build_callbacks, build_datamodule, build_parts, build_system, trainer_kwargs
from experiments.config import REPO_CONFIGS, ConfigError, compose, flatten, groups, load_yaml, parse_override
from experiments.sweep import load_ablation

EXPERIMENTS = sorted(p.stem for p in (REPO_CONFIGS / "experiment").glob("*.yaml"))
ABLATIONS = sorted((REPO_CONFIGS / "ablation").glob("*.yaml"))
# (group, preset) for every preset that can be swapped into the smoke experiment as is (video_folder
# needs a root, latent_cache a source: smoke_cached builds it; autoencoders loaded from files, whose
# presets say `???` or load a trained checkpoint, are built by tests/test_diffusers_vae.py and
# tests/test_vae_system.py on files those tests write; the autoencoder callbacks belong to the vae_*
# experiments, which build them)
NOT_IN_SMOKE = {("data", "video_folder"), ("data", "latent_cache"), ("callbacks", "autoencoder")} | {
    ("vae", name) for name, path in groups()["vae"].items()
    if "???" in path.read_text() or "pretrained_autoencoder" in path.read_text()
}
PRESETS = [(g, name) for g, presets in groups().items() for name in presets if (g, name) not in NOT_IN_SMOKE]


def _build_all(composed):
    system = build_system(composed)
    build_datamodule(composed)
    build_callbacks(composed)
    trainer_kwargs(composed)
    return system


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_builds(name, out_dir):
    composed = compose(name)
    parts = {"vae", "data", "trainer"}
    if composed.cfg["task"] == "generator":
        parts |= {"backbone", "objective", "sampler", "text"}
    assert set(composed.presets) >= parts
    system = _build_all(composed)
    assert system.config == composed.cfg


@pytest.mark.parametrize("group,preset", PRESETS)
def test_every_preset_builds_inside_smoke(group, preset, out_dir):
    composed = compose("smoke", [f"{group}={preset}"])
    assert composed.presets[group] == preset
    if group == "backbone":  # a 27B preset cannot be built on CPU: the contract suite builds it on meta
        with torch.device("meta"):
            count = sum(p.numel() for p in build_parts(composed).backbone.parameters())
        if count > CPU_PARAM_LIMIT:
            pytest.skip(f"{count / 1e9:.1f} B parameters: built on the meta device by tests/contracts")
    _build_all(composed)


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_every_ablation_arm_composes(path, out_dir):
    ablation = load_ablation(path)
    arms = ablation.arms()
    assert len(arms) >= 2
    for arm in arms:
        compose(ablation.experiment, arm.overrides)


def test_video_folder_preset_builds_with_a_root(out_dir, tmp_path):
    experiment = tmp_path / "folder.yaml"
    experiment.write_text(
        "defaults: [{text: tiny}, {vae: identity}, {backbone: dit_tiny}, {objective: rectified_flow},"
        " {sampler: euler}, {data: video_folder}, {trainer: cpu}, {callbacks: default}]\n"
        "callbacks: {samples: {num_frames: 4, height: 16, width: 16}}\n"
    )
    with pytest.raises(ConfigError, match=r"data\.root"):
        compose(experiment)
    composed = compose(experiment, [f"data.root={tmp_path}"])
    assert composed.cfg["data"]["root"] == str(tmp_path)
    build_callbacks(composed)


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.max_step=3", r"command line: unknown key 'trainer\.max_step'; did you mean 'trainer\.max_steps'"),
        ("backbone=dit_tinny", r"unknown backbone preset 'dit_tinny'; did you mean 'dit_tiny'"),
        ("bakbone.dim=3", r"unknown key 'bakbone'; did you mean 'backbone'"),
        ("trainer.max_steps=ten", r"'trainer\.max_steps' expects int .* got 'ten'"),
        ("optim.lr=fast", r"'optim\.lr' expects float"),
        ("guidance=0.3", r"'guidance' is a section"),
        ("noequals", r"must look like key=value"),
    ],
)
def test_command_line_errors_name_key_and_nearest(override, message, out_dir):
    with pytest.raises(ConfigError, match=message):
        compose("smoke", [override])


def test_experiment_file_typo_names_file_and_nearest(tmp_path, out_dir):
    experiment = tmp_path / "typo.yaml"
    experiment.write_text((REPO_CONFIGS / "experiment" / "smoke.yaml").read_text() + "optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError) as err:
        compose(experiment)
    assert str(experiment) in str(err.value) and "'optim.weight_decy'" in str(err.value)
    assert "did you mean 'optim.weight_decay'" in str(err.value)


def test_constructor_key_typo_is_caught_at_build(out_dir):
    composed = compose("smoke")
    composed.cfg["backbone"]["dimm"] = 64  # as if the preset file carried the typo
    with pytest.raises(ConfigError) as err:
        build_system(composed)
    assert "unknown key 'dimm'" in str(err.value) and "did you mean 'dim'" in str(err.value)
    assert str(REPO_CONFIGS / "backbone" / "dit_tiny.yaml") in str(err.value)


def test_trainer_key_typo_names_lightning_parameter(out_dir, tmp_path):
    experiment = tmp_path / "t.yaml"
    experiment.write_text((REPO_CONFIGS / "experiment" / "smoke.yaml").read_text())
    composed = compose(experiment)
    composed.cfg["trainer"]["max_epoch"] = 3  # as if a preset carried the typo
    with pytest.raises(ConfigError, match=r"unknown key 'max_epoch'.*did you mean 'max_epochs'"):
        trainer_kwargs(composed)


def test_unknown_target_names_module_and_nearest(out_dir):
    composed = compose("smoke", ["sampler._target_=modules.samplers.euler.EulerSamplr"])
    with pytest.raises(ConfigError, match=r"has no 'EulerSamplr'; did you mean 'EulerSampler'"):
        build_system(composed)


def test_overrides_are_typed_and_interpolations_follow(out_dir):
    assert parse_override("optim.lr=1e-3") == ("optim.lr", 0.001)
    assert parse_override("data.frame_stride=[1,3]") == ("data.frame_stride", [1, 3])
    composed = compose("smoke", ["data.num_frames=6", "optim.lr=1e-3"])
    assert composed.cfg["optim"]["lr"] == pytest.approx(1e-3)
    assert composed.cfg["callbacks"]["samples"]["num_frames"] == 6  # ${data.num_frames}
    assert composed.cfg["data"]["root"] == str(Path(out_dir) / "data")  # ${output_dir}/data


def test_resolved_config_recomposes_to_itself(tmp_path, out_dir):
    from experiments.config import to_yaml

    composed = compose("smoke", ["backbone=dit_small", "seed=3"])
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(composed.cfg))
    again = compose(saved)
    assert again.cfg == composed.cfg
    preset = load_yaml(REPO_CONFIGS / "backbone" / "dit_small.yaml")
    assert flatten(again.cfg)["backbone.dim"] == preset["dim"] and again.cfg["seed"] == 3


def test_preset_extends_presets_of_its_group(tmp_path, monkeypatch):
    """callbacks/ablation.yaml = default.yaml + denoising - timestep_loss; loops and unknown bases
    are errors naming the file."""
    from experiments.config import load_preset

    composed = compose("smoke", ["callbacks=ablation"])
    callbacks = composed.cfg["callbacks"]
    assert {"samples", "model_card", "denoising"} <= set(callbacks) and callbacks["timestep_loss"] is None
    default = compose("smoke").cfg["callbacks"]
    assert callbacks["samples"] == default["samples"]  # inherited, then smoke.yaml's change applied to it
    presets = {n: tmp_path / f"{n}.yaml" for n in ("a", "b", "c")}
    presets["a"].write_text("defaults: [b]\nx: {_target_: X, k: 1}\n")
    presets["b"].write_text("defaults: [a]\n")
    with pytest.raises(ConfigError, match="loop"):
        load_preset(presets, "a", "test")
    presets["c"].write_text("defaults: [bb]\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*'bb'"):
        load_preset(presets, "c", "test")
    presets["b"].write_text("x: {_target_: X, k: 0, j: 2}\ny: 3\n")
    assert load_preset(presets, "a", "test") == {"x": {"_target_": "X", "k": 1, "j": 2}, "y": 3}
