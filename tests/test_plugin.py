"""An out-of-tree backbone works with no edit to vidlab (docs/plugins.md): a throwaway package with a
backbone class and a preset folder registered under the entry-point group ``vidlab.configs`` is
pip-installed, then ``vidlab fit smoke backbone=mybackbone_tiny`` trains it into MLflow and vidlab's
contract suite checks it, both in fresh processes as a plugin's CI would run them.

The package is installed with ``pip install --target`` into a temporary folder put on PYTHONPATH of
the child processes: a real wheel build and install whose ``*.dist-info/entry_points.txt`` is what
`importlib.metadata` reads, while the shared virtual environment is never modified (nothing to
uninstall, nothing left behind if the test is killed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]

PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "my-vidlab-plugin"
version = "0.1.0"
dependencies = ["torch"]

[project.entry-points."vidlab.configs"]
mybackbones = "my_plugin:CONFIG_DIR"

[tool.setuptools.packages.find]
include = ["my_plugin*"]

[tool.setuptools.package-data]
"*" = ["*.yaml"]
"""

INIT = """\
from pathlib import Path

CONFIG_DIR = str(Path(__file__).parent / "configs")  # configs/<group>/<preset>.yaml
"""

BACKBONE = '''\
"""A per-voxel gated MLP: the smallest module that satisfies vidlab's Denoiser contract."""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, dim)

    def forward(self, h, c):
        return h + self.gate(c)[:, None] * torch.tanh(self.fc(self.norm(h)))


class MyBackbone(nn.Module):
    identity_at_init = True  # the gates start at zero

    def __init__(self, in_channels, text_dim, dim=32, depth=2):
        super().__init__()
        self.embed = nn.Linear(in_channels, dim)
        self.cond = nn.Linear(text_dim + 1, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.out = nn.Linear(dim, in_channels)
        self.init_weights()

    def init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        for block in self.blocks:
            nn.init.zeros_(block.gate.weight)

    def forward(self, x, t, cond):
        B, C, T, H, W = x.shape
        m = cond.mask[..., None].to(x.dtype)
        text = (cond.tokens * m).sum(1) / m.sum(1).clamp(min=1)
        c = self.cond(torch.cat([text, t[:, None].to(x.dtype) / 1000], dim=-1))
        h = self.embed(x.flatten(2).transpose(1, 2))
        for block in self.blocks:
            h = block(h, c)
        return self.out(h).transpose(1, 2).reshape(B, C, T, H, W)

    def flops(self, x_shape, text_len):
        B, C, T, H, W = x_shape
        N, D = T * H * W, self.embed.out_features
        per_sample = N * C * D + self.cond.in_features * D + len(self.blocks) * (N * D * D + D * D) + N * D * C
        return 2 * B * per_sample
'''


def plugin_parameters(in_channels: int, text_dim: int, dim: int = 32, depth: int = 2) -> int:
    """embed + cond + depth × (LayerNorm, fc, gate) + out."""
    linear = lambda i, o: i * o + o  # noqa: E731
    return linear(in_channels, dim) + linear(text_dim + 1, dim) + depth * (2 * dim + 2 * linear(dim, dim)) + linear(
        dim, in_channels
    )


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    """Build and install the package into a fresh --target folder; returns that folder."""
    root = tmp_path_factory.mktemp("plugin")
    src = root / "src"
    (src / "my_plugin" / "configs" / "backbone").mkdir(parents=True)
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "my_plugin" / "__init__.py").write_text(INIT)
    (src / "my_plugin" / "backbone.py").write_text(BACKBONE)
    (src / "my_plugin" / "configs" / "backbone" / "mybackbone_tiny.yaml").write_text(
        "_target_: my_plugin.backbone.MyBackbone\ndim: 32\ndepth: 2\n"
    )
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--target", str(target), str(src)],
        check=True, capture_output=True, text=True,
    )
    assert (target / "my_plugin" / "configs" / "backbone" / "mybackbone_tiny.yaml").is_file()
    assert "vidlab.configs" in next(target.glob("my_vidlab_plugin-*.dist-info")).joinpath("entry_points.txt").read_text()
    return target


def child_env(target: Path, out: Path) -> dict[str, str]:
    """The plugin and this vidlab checkout on PYTHONPATH, outputs and MLflow store under ``out``."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(target), str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["VIDLAB_OUTPUT_DIR"] = str(out)
    return env


def vidlab_command() -> list[str]:
    script = Path(sys.executable).parent / "vidlab"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "experiments.cli"]


def test_vidlab_fit_trains_a_plugin_backbone(plugin, tmp_path):
    out = tmp_path / "outputs"
    proc = subprocess.run(
        [*vidlab_command(), "fit", "smoke", "backbone=mybackbone_tiny", "trainer.max_steps=3",
         "callbacks.samples.every_n_steps=0"],
        cwd=tmp_path, env=child_env(plugin, out), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vidlab").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["backbone._target_"] == "my_plugin.backbone.MyBackbone"
    assert run.data.tags["vidlab.preset.backbone"] == "mybackbone_tiny"
    assert run.data.metrics["model/params_total"] == plugin_parameters(3, 128)  # pixels in, tiny text 128-d
    assert run.data.metrics["model/flops_train_step"] > 0  # the plugin's flops() reached the model card


def test_vidlab_contract_suite_runs_on_the_plugin_preset(plugin, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(REPO / "tests" / "contracts" / "test_backbones.py"),
         "-k", "mybackbone_tiny", "-q", "-p", "no:cacheprovider", "-rs"],
        cwd=tmp_path, env=child_env(plugin, tmp_path / "outputs"), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "10 passed, 2 skipped" in proc.stdout, proc.stdout[-3000:]
    assert "no grad_checkpointing switch" in proc.stdout  # the two checks that do not apply
    assert "no per_frame_time" in proc.stdout
