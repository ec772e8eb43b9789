"""The autoencoder contract as reusable checks: each takes a built autoencoder (or a zero-argument
`build` function, for checks that need fresh instances or the meta device) and a clip, and raises
AssertionError naming what broke. Checks that do not apply call `pytest.skip` with the reason.

A plugin's CI (docs/plugins.md):

    from tests.contracts.vae_contract import check_vae
    check_vae(lambda: MyVAE(latent_channels=8))

What every autoencoder promises (DESIGN.md, Interfaces and Conventions):

- the `VideoAutoencoder` protocol: ``latent_channels``, ``compression = (r_t, r_h, r_w)``,
  ``encode``, ``decode``, ``latent_shape(T, H, W) -> (C, T', H', W')``;
- ``causal: bool`` (False when undeclared): a causal autoencoder takes ``1 + k·r_t`` frames, a
  non-causal one ``k·r_t``; frame sizes are multiples of ``(r_h, r_w)``; other sizes raise ValueError
  from ``latent_shape``;
- ``encode`` returns *normalised* latents, deterministic in eval mode, and ``decode`` maps them
  back to a video of the input's shape;
- a `LatentAutoencoder` keeps its statistics in saved buffers: after ``set_latent_stats(mean, std)``
  ``encode`` is ``(posterior(x).mode() − mean) / std`` and ``decode(encode(x))`` is unchanged;
- a trainable autoencoder gets a gradient on every parameter from a reconstruction loss (through
  ``encode(x, sample=True)`` when ``encode`` takes ``sample``, so the posterior's variance head
  is reached too).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import pytest
import torch
from torch import Tensor, nn

from modules.vaes.base import LatentAutoencoder, VideoAutoencoder
from .common import add_noise_, parameter_count, reloaded_pair, run_checks

Build = Callable[[], nn.Module]
CPU_PARAM_LIMIT = 50_000_000  # larger presets are checked on the meta device only


def clip_shape(vae: Any, batch: int = 2, latent_frames: int = 2, latent_size: tuple[int, int] = (1, 2)) -> tuple[int, ...]:
    """(B, 3, T, H, W) of a small valid clip: ``1 + (n − 1)·r_t`` frames for a causal autoencoder,
    ``n·r_t`` otherwise (n = ``latent_frames``), and a non-square frame of ``latent_size`` latent
    pixels (so a swapped H and W shows)."""
    rt, rh, rw = vae.compression
    frames = 1 + (latent_frames - 1) * rt if getattr(vae, "causal", False) else latent_frames * rt
    return (batch, 3, frames, latent_size[0] * rh, latent_size[1] * rw)


def make_clip(shape: tuple[int, ...], seed: int = 0, device: str | torch.device = "cpu") -> Tensor:
    """A random video, uniform in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) * 2 - 1
    return x.to(device)


def perturb_(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Add N(0, std²) to every parameter (zero-initialised output layers would hide paths), and
    give a `LatentAutoencoder` random positive latent statistics (so that a check also covers them)."""
    g = torch.Generator().manual_seed(seed)
    add_noise_(model, std, g)
    with torch.no_grad():
        if isinstance(model, LatentAutoencoder):
            c = model.latent_channels
            model.set_latent_stats(torch.randn(c, generator=g) * 0.1, torch.rand(c, generator=g) + 0.5)
    return model


def meta_parameter_count(build: Build) -> int:
    """Parameters of the autoencoder `build` makes, counted on the meta device (no memory, no init).
    A constructor that cannot run there (a loader of pretrained weights, which reads tensors) is
    counted on CPU instead."""
    try:
        with torch.device("meta"):
            return parameter_count(build())
    except (RuntimeError, NotImplementedError):
        return parameter_count(build())


def _takes_sample(vae: nn.Module) -> bool:
    return "sample" in inspect.signature(vae.encode).parameters


def _max_diff(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


# -- checks -----------------------------------------------------------------------------------------


def check_protocol(vae: Any) -> None:
    """Satisfies `VideoAutoencoder`: ``latent_channels`` a positive int, ``compression`` three
    positive ints, ``latent_shape`` of the smallest clip starts with ``latent_channels``."""
    assert isinstance(vae, VideoAutoencoder), f"{type(vae).__name__} does not satisfy VideoAutoencoder"
    assert isinstance(vae.latent_channels, int) and vae.latent_channels > 0, f"latent_channels = {vae.latent_channels!r}"
    comp = tuple(vae.compression)
    assert len(comp) == 3 and all(isinstance(r, int) and r >= 1 for r in comp), f"compression = {vae.compression!r}"
    shape = vae.latent_shape(*clip_shape(vae)[2:])
    assert len(shape) == 4 and shape[0] == vae.latent_channels, f"latent_shape gives {shape}"


def check_latent_shape_rejects_bad_sizes(vae: Any) -> None:
    """``latent_shape`` raises ValueError for a frame size off the spatial grid and, for a causal
    autoencoder with r_t > 1, for a frame count other than ``1 + k·r_t`` (a non-causal one may
    pad time, as the 2.5D TAE does)."""
    rt, rh, rw = vae.compression
    _, _, t, h, w = clip_shape(vae)
    bad = []
    if rh > 1:
        bad.append((t, h + 1, w))
    if rw > 1:
        bad.append((t, h, w + 1))
    if rt > 1 and getattr(vae, "causal", False):
        bad.append((t + 1, h, w))
    if not bad:
        pytest.skip(f"{type(vae).__name__}: compression {vae.compression} accepts every size")
    for size in bad:
        try:
            shape = vae.latent_shape(*size)
        except ValueError:
            continue
        raise AssertionError(f"latent_shape{size} gives {shape}: a size off the {vae.compression} grid must raise ValueError")


def check_encode_shape(vae: nn.Module, x: Tensor) -> None:
    """``encode(x)`` is (B, *latent_shape(T, H, W)), floating point and finite."""
    with torch.no_grad():
        z = vae.eval().encode(x)
    expected = (x.shape[0], *vae.latent_shape(*x.shape[2:]))
    assert tuple(z.shape) == expected, f"encode{tuple(x.shape)} gives {tuple(z.shape)}, latent_shape says {expected}"
    assert z.is_floating_point() and torch.isfinite(z).all(), "encode gives non-finite or non-float latents"


def check_reconstruction_shape(vae: nn.Module, x: Tensor) -> None:
    """``decode(encode(x))`` has x's shape, floating point and finite."""
    with torch.no_grad():
        out = vae.eval().decode(vae.encode(x))
    assert out.shape == x.shape, f"decode(encode(x)) gives {tuple(out.shape)}, input {tuple(x.shape)}"
    assert out.is_floating_point() and torch.isfinite(out).all(), "decode gives non-finite or non-float output"


def _assert_same_codec(a: nn.Module, b: nn.Module, x: Tensor, encodes: str, decodes: str) -> None:
    """``a`` and ``b`` encode ``x`` bit-identically, and decode ``a``'s latents bit-identically."""
    with torch.no_grad():
        za, zb = a.encode(x), b.encode(x)
        assert torch.equal(za, zb), f"{encodes} differ by {_max_diff(za, zb):.3g} (is encode sampling in eval mode?)"
        va, vb = a.decode(za), b.decode(za)
    assert torch.equal(va, vb), f"{decodes} differ by {_max_diff(va, vb):.3g}"


def check_deterministic(vae: nn.Module, x: Tensor) -> None:
    """In eval mode two encodes (the posterior mode) and two decodes are bit-identical."""
    vae.eval()
    _assert_same_codec(vae, vae, x, "two eval encodes", "two eval decodes")


def check_normalisation(vae: nn.Module, x: Tensor) -> None:
    """For a `LatentAutoencoder`: after ``set_latent_stats(mean, std)`` encode equals
    ``(posterior(x).mode() − mean) / std`` and ``decode(encode(x))`` is what it was before."""
    if not isinstance(vae, LatentAutoencoder):
        pytest.skip(f"{type(vae).__name__} is not a LatentAutoencoder (no set_latent_stats)")
    vae.eval()
    c = vae.latent_channels
    g = torch.Generator().manual_seed(3)
    mean, std = torch.randn(c, generator=g), torch.rand(c, generator=g) * 2 + 0.25
    saved = vae.latent_mean.clone(), vae.latent_std.clone()
    try:
        with torch.no_grad():
            before = vae.decode(vae.encode(x))
            raw = vae.posterior(x).mode()
            vae.set_latent_stats(mean.to(saved[0]), std.to(saved[1]))
            z = vae.encode(x)
            after = vae.decode(z)
    finally:
        vae.set_latent_stats(*saved)
    shape = (1, -1) + (1,) * (raw.dim() - 2)
    expected = (raw - mean.view(shape).to(raw)) / std.view(shape).to(raw)
    assert z.shape == expected.shape and torch.allclose(z, expected, rtol=1e-5, atol=1e-5), (
        f"encode after set_latent_stats is not (mode − mean) / std (max diff {_max_diff(z, expected):.3g})"
    )
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4), (
        f"decode(encode(x)) changed with the latent statistics by {_max_diff(after, before):.3g}: decode must undo them"
    )


def check_state_dict_round_trip(build: Build, x: Tensor) -> None:
    """torch.save(state_dict) → torch.load(weights_only=True) into a fresh instance → the same
    encode (and decode) outputs, latent statistics included."""
    source, fresh = reloaded_pair(build, perturb_)
    _assert_same_codec(source, fresh, x, "encodes of the reloaded autoencoder", "decodes of the reloaded autoencoder")


def check_gradients(vae: nn.Module, x: Tensor) -> None:
    """A reconstruction loss ‖decode(encode(x)) − x‖² in train mode gives every trainable parameter
    a finite gradient, some non-zero (``encode(x, sample=True)`` when encode takes ``sample``)."""
    trainable = {n: p for n, p in vae.named_parameters() if p.requires_grad}
    if not trainable:
        pytest.skip(f"{type(vae).__name__} has no trainable parameters (frozen)")
    perturb_(vae).train()
    vae.zero_grad(set_to_none=True)
    z = vae.encode(x, sample=True) if _takes_sample(vae) else vae.encode(x)
    assert z.requires_grad, "encode output does not require grad (encode under torch.no_grad?)"
    (vae.decode(z) - x).square().mean().backward()
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, f"no gradient from the reconstruction loss (parameter unused?): {missing[:10]}"
    bad = [n for n, p in trainable.items() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:10]}"
    assert any(p.grad.abs().sum() > 0 for p in trainable.values()), "every gradient is zero"


def check_meta_only(build: Build) -> int:
    """For autoencoders too large for CPU: built on the meta device, the protocol holds and a meta
    encode of the smallest clip has ``latent_shape`` (skipped for ops without a meta kernel).
    Returns the parameter count."""
    with torch.device("meta"):
        vae = build()
    check_protocol(vae)
    x = torch.empty(clip_shape(vae, batch=1), device="meta")
    try:
        with torch.no_grad():
            z = vae.eval().encode(x)
    except NotImplementedError as exc:
        pytest.skip(f"{type(vae).__name__}: meta encode not available ({str(exc).splitlines()[0]})")
    expected = (1, *vae.latent_shape(*x.shape[2:]))
    assert tuple(z.shape) == expected, f"meta encode gives {tuple(z.shape)}, latent_shape says {expected}"
    return parameter_count(vae)


def check_vae(build: Build, x: Tensor | None = None) -> list[str]:
    """Every check in turn (the one call a plugin's CI needs); autoencoders over `CPU_PARAM_LIMIT`
    parameters get the meta-device check only. Failures raise; checks that do not apply are
    collected and returned as their skip reasons."""
    count = meta_parameter_count(build)
    if count > CPU_PARAM_LIMIT:
        check_meta_only(build)
        return [f"{count} parameters > {CPU_PARAM_LIMIT}: meta-device checks only"]

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return build()

    clip = x if x is not None else make_clip(clip_shape(fresh()))
    checks: list[Callable[[], Any]] = [
        lambda: check_protocol(fresh()),
        lambda: check_latent_shape_rejects_bad_sizes(fresh()),
        lambda: check_encode_shape(fresh(), clip),
        lambda: check_reconstruction_shape(fresh(), clip),
        lambda: check_deterministic(fresh(), clip),
        lambda: check_normalisation(fresh(), clip),
        lambda: check_state_dict_round_trip(fresh, clip),
        lambda: check_gradients(fresh(), clip),
    ]
    return run_checks(checks)
