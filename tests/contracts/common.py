"""Helpers both contract suites (backbones, autoencoders) use."""

from __future__ import annotations

import io
from typing import Callable

import pytest

import torch
from torch import nn


def add_noise_(model: nn.Module, std: float, generator: torch.Generator) -> nn.Module:
    """Add N(0, std²) to every parameter in place: zero-initialised gates and output layers would
    hide the paths a check is meant to exercise."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * std)
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def reloaded_pair(build: Callable[[], nn.Module], perturb: Callable[..., nn.Module]) -> tuple[nn.Module, nn.Module]:
    """(source, fresh): two differently perturbed instances in eval mode, the second loaded from the
    first's state dict through torch.save → torch.load(weights_only=True)."""
    torch.manual_seed(1)
    source = perturb(build(), seed=1).eval()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(2)
    fresh = perturb(build(), seed=2).eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return source, fresh


def run_checks(checks: list[Callable[[], None]]) -> list[str]:
    """Run every check; failures raise, and the reasons of the ones that skipped are returned."""
    skipped = []
    for check in checks:
        try:
            check()
        except pytest.skip.Exception as exc:
            skipped.append(str(exc))
    return skipped
