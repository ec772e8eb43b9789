"""The backbone contract as reusable checks: each takes a built model (or a zero-argument `build`
function, for checks that need fresh instances or the meta device) and `Inputs`, and raises
AssertionError naming what broke. Checks that do not apply call `pytest.skip` with the reason.

A plugin's CI (docs/plugins.md):

    from tests.contracts.backbone_contract import check_backbone
    check_backbone(lambda: MyBackbone(in_channels=4, text_dim=32, dim=64), in_channels=4, text_dim=32)

Conventions a backbone may declare (class attributes or properties):

- ``identity_at_init: bool`` — True: after ``init_weights()`` every entry of ``blocks`` returns its
  first input (the residual stream) unchanged, as AdaLN-Zero blocks do (DiT, Peebles & Xie 2023).
  Undeclared: checked when the model contains an AdaLN module (class name containing "AdaLN").
  False: not checked.
- an empty batch (B = 0) works and gives zero gradients (`TimestepExperts` relies on it under
  DDP / FSDP2).
- ``grad_checkpointing: bool`` — switching it on recomputes blocks in backward and changes neither
  outputs nor gradients.
- ``init_weights()`` — (re)initialises every parameter and buffer in place, so that a model built on
  the meta device, moved with ``to_empty`` and initialised works (FSDP2's way to build large models).
- ``flops(x_shape, text_len) -> int`` — analytic forward FLOPs (multiply-add = 2), within 10 % of
  `FlopCounterMode`.
- ``per_frame_time: bool`` — True: forward also takes one time per frame, t (B, T) (the objective
  then trains it with diffusion forcing); t (B,) means every frame at that time, and a frame's time
  changes the output of that frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from torch import Tensor, nn

from modules.backbones.base import Denoiser
from modules.backbones.card import measure_forward_flops
from modules.conditioning import Conditioning
from .common import add_noise_, parameter_count, reloaded_pair, run_checks

Build = Callable[[], nn.Module]
CPU_PARAM_LIMIT = 50_000_000  # larger presets are checked on the meta device only
TIME_SCALE = 1000.0  # the objective's default scale of t (RectifiedFlow.time_scale)


@dataclass
class Inputs:
    """x (B, C, T, H, W); t (B,) already scaled by the objective; cond with text (B, L, D)."""

    x: Tensor
    t: Tensor
    cond: Conditioning

    def to(self, device: torch.device | str) -> Inputs:
        return Inputs(self.x.to(device), self.t.to(device), self.cond.to(device))


def make_inputs(
    in_channels: int,
    text_dim: int,
    grid: tuple[int, int, int] = (4, 16, 16),
    batch: int = 4,
    text_len: int = 6,
    time_scale: float = TIME_SCALE,
    seed: int = 0,
) -> Inputs:
    """Random inputs: x (batch, in_channels, *grid); t = linspace(0.05, 0.95)·time_scale, so both
    ends of the noise range (and every expert of a timestep-routed MoE) are visited; the last
    sample's text has two padding tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, *grid, generator=g)
    t = torch.linspace(0.05, 0.95, batch) * time_scale  # (B,)
    tokens = torch.randn(batch, text_len, text_dim, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[-1, text_len - 2 :] = False
    return Inputs(x, t, Conditioning(tokens, mask))


def perturb_(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Add N(0, std²) to every parameter (see `add_noise_`)."""
    return add_noise_(model, std, torch.Generator().manual_seed(seed))


def meta_parameter_count(build: Build) -> int:
    """Parameters of the model `build` makes, counted on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return parameter_count(build())


def _forward(model: nn.Module, inputs: Inputs) -> Tensor:
    return model(inputs.x, inputs.t, inputs.cond)


def _grads(model: nn.Module) -> dict[str, Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _backward(model: nn.Module, inputs: Inputs, seed: int = 0) -> Tensor:
    """Forward, MSE against a fixed random target, backward; returns the output (detached)."""
    model.zero_grad(set_to_none=True)
    out = _forward(model, inputs)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    (out - target).pow(2).mean().backward()
    return out.detach()


# -- checks -----------------------------------------------------------------------------------------


def check_denoiser(model: nn.Module) -> None:
    """Satisfies the `Denoiser` protocol, with a non-empty ``blocks`` ModuleList."""
    assert isinstance(model, Denoiser), f"{type(model).__name__} does not satisfy Denoiser (forward, blocks)"
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) > 0, "blocks must be a non-empty ModuleList"


def check_output_shape(model: nn.Module, inputs: Inputs) -> None:
    """forward(x, t, cond) returns a tensor shaped like x."""
    with torch.no_grad():
        out = _forward(model.eval(), inputs)
    assert out.shape == inputs.x.shape, f"output {tuple(out.shape)} != input {tuple(inputs.x.shape)}"


def check_deterministic(model: nn.Module, inputs: Inputs) -> None:
    """Two eval-mode forwards of the same inputs are bit-identical."""
    perturb_(model)
    with torch.no_grad():
        a, b = _forward(model.eval(), inputs), _forward(model, inputs)
    assert torch.isfinite(a).all(), "non-finite output"
    assert torch.equal(a, b), f"two forwards differ by {(a - b).abs().max().item():.3g}"


def check_finite_gradients(model: nn.Module, inputs: Inputs) -> None:
    """After one backward every trainable parameter has a finite gradient, and some are non-zero."""
    perturb_(model)
    _backward(model.train(), inputs)
    grads = _grads(model)
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient (parameter unused in forward?): {missing[:10]}"
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, f"non-finite gradients: {bad[:10]}"
    assert any(g.abs().sum() > 0 for g in grads.values()), "every gradient is zero"


def check_empty_batch(model: nn.Module, inputs: Inputs) -> None:
    """A batch of 0 samples gives a (0, C, T, H, W) output, and its backward gives every trainable
    parameter a zero gradient. `TimestepExperts` runs an expert that no sample of a training batch
    uses on an empty sub-batch, so that every rank's DDP reducer and FSDP2 reduce-scatter see the
    same parameters."""
    perturb_(model).train()
    model.zero_grad(set_to_none=True)
    none = torch.zeros(0, dtype=torch.long)
    try:
        out = model(inputs.x[none], inputs.t[none], inputs.cond.select(none))
        out.sum().backward()
    except RuntimeError as exc:
        raise AssertionError(f"forward/backward on an empty batch fails: {str(exc).splitlines()[0]}") from exc
    assert out.shape == (0, *inputs.x.shape[1:]), f"empty batch gives {tuple(out.shape)}"
    grads = _grads(model)
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient on an empty batch (parameter skipped?): {missing[:10]}"
    assert not any(g.any() for g in grads.values()), "an empty batch gives non-zero gradients"


def check_grad_checkpointing(model: nn.Module, inputs: Inputs) -> None:
    """``grad_checkpointing = True`` recomputes blocks in backward (more block calls) and leaves
    outputs and gradients unchanged (up to float rounding)."""
    if not hasattr(model, "grad_checkpointing"):
        pytest.skip(f"{type(model).__name__} has no grad_checkpointing switch")
    perturb_(model).train()
    calls = [0]

    def count(*_: Any) -> None:
        calls[0] += 1

    # a checkpointed module's own hook does not fire on recompute, its submodules' hooks do
    hooks = [m.register_forward_hook(count) for m in model.blocks.modules() if m is not model.blocks]
    before = model.grad_checkpointing
    results = []
    try:
        for flag in (False, True):
            model.grad_checkpointing = flag
            calls[0] = 0
            out = _backward(model, inputs)
            results.append((out, _grads(model), calls[0]))
    finally:
        model.grad_checkpointing = before
        for hook in hooks:
            hook.remove()
    (out_a, grads_a, calls_a), (out_b, grads_b, calls_b) = results
    assert calls_b > calls_a, f"grad_checkpointing=True did not recompute any block ({calls_a} vs {calls_b} module calls)"
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def check_per_frame_time(model: nn.Module, inputs: Inputs) -> None:
    """For ``per_frame_time`` backbones: t (B,) equals t repeated over the T frames, bit for bit,
    and changing the last frame's time changes the last frame's output."""
    if not getattr(model, "per_frame_time", False):
        pytest.skip(f"{type(model).__name__} takes one time per sample (no per_frame_time)")
    perturb_(model).eval()
    frames = inputs.x.shape[2]
    t_frames = inputs.t[:, None].repeat(1, frames)  # (B, T)
    with torch.no_grad():
        a, b = _forward(model, inputs), model(inputs.x, t_frames, inputs.cond)
        t_frames[:, -1] = t_frames[:, -1] * 0.5 + 0.1 * TIME_SCALE
        c = model(inputs.x, t_frames, inputs.cond)
    assert torch.equal(a, b), f"t (B,) and t repeated to (B, T) differ by {(a - b).abs().max().item():.3g}"
    assert not torch.equal(c[:, :, -1], a[:, :, -1]), "the last frame's time does not reach its output"


def declares_identity_at_init(model: nn.Module) -> bool:
    """The ``identity_at_init`` convention: the declared value, or, when undeclared (None), whether
    the model contains an AdaLN module."""
    declared = getattr(model, "identity_at_init", None)
    if declared is not None:
        return bool(declared)
    return any("adaln" in type(m).__name__.lower() for m in model.modules())


def check_identity_at_init(build: Build, inputs: Inputs) -> None:
    """After ``init_weights()`` every block that runs returns its first input exactly."""
    model = build()
    if not declares_identity_at_init(model):
        pytest.skip(f"{type(model).__name__} declares identity_at_init = False (or has no AdaLN)")
    if hasattr(model, "init_weights"):
        model.init_weights()
    seen: list[tuple[int, Tensor, Any]] = []

    def record(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            first = args[0] if args else next(iter(kwargs.values()))
            seen.append((index, first, output[0] if isinstance(output, tuple) else output))

        return hook

    hooks = [b.register_forward_hook(record(i), with_kwargs=True) for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            _forward(model.eval(), inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen, "no entry of blocks ran in forward"
    for index, first, output in seen:
        assert torch.equal(output, first), (
            f"blocks[{index}] is not the identity at init (max change {(output - first).abs().max().item():.3g}); "
            "zero its residual gates in init_weights() or declare identity_at_init = False"
        )


def check_meta_init(build: Build, inputs: Inputs) -> None:
    """Built on the meta device, ``to_empty(device="cpu")`` and ``init_weights()`` give a working
    model: every parameter and floating buffer is set by init_weights (storage is pre-filled with
    NaN to prove it) and the output is finite and shaped like x."""
    with torch.device("meta"):
        model = build()
    not_meta = [n for n, p in model.named_parameters() if not p.is_meta]
    assert not not_meta, f"parameters created off the meta device inside build(): {not_meta[:5]}"
    assert hasattr(model, "init_weights"), f"{type(model).__name__} has no init_weights(); meta-device builds need it"
    model.to_empty(device="cpu")
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for tensor in tensors.values():
            if tensor.is_floating_point() or tensor.is_complex():
                tensor.fill_(math.nan)
    model.init_weights()
    unset = [n for n, t in tensors.items() if (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all()]
    assert not unset, f"init_weights() left these uninitialised: {unset[:10]}"
    with torch.no_grad():
        out = _forward(model.eval(), inputs)
    assert out.shape == inputs.x.shape and torch.isfinite(out).all(), "meta-built model gives a bad output"


def check_state_dict_round_trip(build: Build, inputs: Inputs) -> None:
    """torch.save(state_dict) → torch.load(weights_only=True) into a fresh instance → same output."""
    source, fresh = reloaded_pair(build, perturb_)
    with torch.no_grad():
        a, b = _forward(source, inputs), _forward(fresh, inputs)
    assert torch.equal(a, b), f"reloaded model differs by {(a - b).abs().max().item():.3g}"


def check_meta_only(build: Build, inputs: Inputs) -> int:
    """For models too large for CPU: built on meta, ``init_weights()`` runs there, ``to_empty`` keeps
    it there and a meta forward gives x's shape. Returns the parameter count."""
    with torch.device("meta"):
        model = build()
    check_denoiser(model)
    assert hasattr(model, "init_weights"), f"{type(model).__name__} has no init_weights(); meta-device builds need it"
    model.init_weights()
    model.to_empty(device="meta")
    with torch.no_grad():
        out = _forward(model, inputs.to("meta"))
    assert out.shape == inputs.x.shape, f"meta forward gives {tuple(out.shape)}, expected {tuple(inputs.x.shape)}"
    return parameter_count(model)


def check_flops(build: Build, x_shape: tuple[int, ...], text_len: int, text_dim: int, rel: float = 0.10) -> None:
    """``flops(x_shape, text_len)`` is within ``rel`` of `FlopCounterMode` on the meta device."""
    with torch.device("meta"):
        model = build()
    if not hasattr(model, "flops"):
        pytest.skip(f"{type(model).__name__} has no flops(x_shape, text_len)")
    try:
        analytic = int(model.flops(tuple(x_shape), text_len))
    except NotImplementedError as exc:
        pytest.skip(f"{type(model).__name__}.flops not available: {exc}")
    measured = measure_forward_flops(model, tuple(x_shape), text_len, text_dim)
    assert measured > 0, "FlopCounterMode counted nothing"
    assert abs(analytic - measured) <= rel * measured, (
        f"flops{tuple(x_shape)} = {analytic:.4g}, FlopCounterMode = {measured:.4g} "
        f"({100 * (analytic / measured - 1):+.1f} %)"
    )


def check_backbone(build: Build, in_channels: int, text_dim: int, inputs: Inputs | None = None) -> list[str]:
    """Every check in turn (the one call a plugin's CI needs); models over `CPU_PARAM_LIMIT`
    parameters get the meta-device checks only. Failures raise; checks that do not apply are
    collected and returned as their skip reasons."""
    inputs = inputs or make_inputs(in_channels, text_dim)
    if meta_parameter_count(build) > CPU_PARAM_LIMIT:
        check_meta_only(build, inputs)
        return [f"{meta_parameter_count(build)} parameters > {CPU_PARAM_LIMIT}: meta-device checks only"]
    x_shape, text_len = tuple(inputs.x.shape), inputs.cond.tokens.shape[1]

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return build()

    checks: list[Callable[[], Any]] = [
        lambda: check_denoiser(fresh()),
        lambda: check_output_shape(fresh(), inputs),
        lambda: check_deterministic(fresh(), inputs),
        lambda: check_finite_gradients(fresh(), inputs),
        lambda: check_empty_batch(fresh(), inputs),
        lambda: check_grad_checkpointing(fresh(), inputs),
        lambda: check_per_frame_time(fresh(), inputs),
        lambda: check_identity_at_init(fresh, inputs),
        lambda: check_meta_init(fresh, inputs),
        lambda: check_state_dict_round_trip(fresh, inputs),
        lambda: check_flops(fresh, x_shape, text_len, text_dim),
    ]
    return run_checks(checks)
