"""Causal 3D VAE (modules/vaes/causal3d.py) against independent references: a float64 F.conv3d with
explicit front padding, torch.distributions' KL, diffusers' AutoencoderKLWan with the same weights,
and the one-shot pass for the chunked (feature-cache) pass. Plus causality, shapes, gradients,
checkpoints, errors and the presets."""

from __future__ import annotations

import io
import re

import pytest
import torch
import torch.nn.functional as F

from experiments.build import instantiate
from experiments.config import REPO_CONFIGS, load_yaml
from modules.vaes.base import VideoAutoencoder
from modules.vaes.causal3d import CausalConv3d, CausalVAE3d, RMSNorm

PRESETS = ["causal3d_tiny", "causal3d_4x8x8", "causal3d_4x16x16", "causal3d_wan"]
H = W = 16  # tiny preset: latents 2x2


def build(name: str, **over) -> CausalVAE3d:
    path = REPO_CONFIGS / "vae" / f"{name}.yaml"
    return instantiate({**load_yaml(path), **over}, str(path))


def tiny(dtype: torch.dtype = torch.float32, seed: int = 0, **over) -> CausalVAE3d:
    torch.manual_seed(seed)
    return build("causal3d_tiny", **over).to(dtype).eval()


def video(frames: int, dtype: torch.dtype = torch.float32, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, frames, H, W, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


def latent_index(frame: int, rt: int = 4) -> int:
    """The latent frame whose receptive field first contains pixel frame ``frame``."""
    return 0 if frame == 0 else 1 + (frame - 1) // rt


def first_frame(latent: int, rt: int = 4) -> int:
    """The first pixel frame decoded from latent frame ``latent``."""
    return 0 if latent == 0 else 1 + rt * (latent - 1)


# -- CausalConv3d ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [(3, 3, 3), (3, 1, 1), (1, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_causal_conv_matches_front_padded_reference(kernel, dtype):
    torch.manual_seed(0)
    conv = CausalConv3d(4, 5, kernel).to(dtype)
    x = torch.randn(2, 4, 6, 7, 9, dtype=torch.float64)
    kt, kh, kw = kernel
    padded = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0))  # frames in front only
    ref = F.conv3d(padded, conv.weight.double(), conv.bias.double())
    out = conv(x.to(dtype), {})  # an empty cache: zeros in front
    assert out.shape == (2, 5, 6, 7, 9)
    torch.testing.assert_close(out.double(), ref, atol=1e-12 if dtype == torch.float64 else 1e-5, rtol=0)
    torch.testing.assert_close(conv(x.to(dtype)), out, atol=0, rtol=0)  # no cache == zero cache


def test_causal_conv_cache_carries_previous_frames():
    torch.manual_seed(0)
    conv = CausalConv3d(3, 4, 3).double()
    x = torch.randn(1, 3, 8, 5, 5, dtype=torch.float64)
    cache: dict = {}
    pieces = [conv(chunk, cache) for chunk in x.split([1, 1, 2, 4], dim=2)]
    torch.testing.assert_close(torch.cat(pieces, 2), conv(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(cache[conv], x[:, :, -2:])  # the last kernel_t - 1 input frames
    cache = {}
    conv(x[:, :, :2], cache), conv(x[:, :, 2:3], cache)  # a 1-frame chunk keeps one older frame
    torch.testing.assert_close(cache[conv], x[:, :, 1:3])


# -- the autoencoder -------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 5, 9, 17])
def test_shapes(frames):
    model = tiny()
    assert isinstance(model, VideoAutoencoder) and model.causal and model.compression == (4, 8, 8)
    with torch.no_grad():
        z = model.encode(video(frames, batch=2))
        assert z.shape == (2, 4, 1 + (frames - 1) // 4, H // 8, W // 8) == (2, *model.latent_shape(frames, H, W))
        assert model.decode(z).shape == (2, 3, frames, H, W)


@pytest.mark.parametrize("residual", [False, True], ids=["wan21", "wan22_residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("frames", [1, 5, 9, 17])
def test_chunked_equals_one_shot(frames, dtype, residual):
    model = tiny(dtype, residual=residual)
    x = video(frames, dtype, batch=2)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    with torch.no_grad():
        q_one, q_chunk = model.posterior(x), model.posterior(x, chunked=True)
        torch.testing.assert_close(q_chunk.mean, q_one.mean, atol=tol, rtol=0)
        torch.testing.assert_close(q_chunk.logvar, q_one.logvar, atol=tol, rtol=0)
        z = torch.randn(q_one.mean.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(model.decode_raw(z, chunked=True), model.decode_raw(z), atol=tol, rtol=0)
        chunked = tiny(dtype, chunked=True, residual=residual)  # the constructor flag drives encode / decode
        torch.testing.assert_close(chunked.encode(x), model.encode(x), atol=tol, rtol=0)
        torch.testing.assert_close(chunked.decode(z), model.decode(z), atol=tol, rtol=0)


@pytest.mark.parametrize("residual", [False, True], ids=["wan21", "wan22_residual"])
def test_chunked_gradients_equal_one_shot(residual):
    model = tiny(torch.float64, residual=residual)
    x = video(9, torch.float64).requires_grad_()
    grads = []
    for chunked in (False, True):
        z = model.posterior(x, chunked=chunked).mean
        (g,) = torch.autograd.grad(model.decode_raw(z, chunked=chunked).square().sum(), x)
        grads.append(g)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize("residual", [False, True], ids=["wan21", "wan22_residual"])
@pytest.mark.parametrize("chunked", [False, True])
def test_encoder_is_causal(chunked, residual):
    model = tiny(torch.float64, residual=residual)
    x = video(13, torch.float64)
    with torch.no_grad():
        base = model.posterior(x, chunked=chunked).mean
        for j in [0, 1, 4, 5, 8, 12]:
            bumped = x.clone()
            bumped[:, :, j] += 0.5
            z = model.posterior(bumped, chunked=chunked).mean
            k = latent_index(j)
            torch.testing.assert_close(z[:, :, :k], base[:, :, :k], atol=1e-12, rtol=0)
            assert (z[:, :, k] - base[:, :, k]).abs().max() > 1e-6, f"frame {j} must reach latent frame {k}"


@pytest.mark.parametrize("residual", [False, True], ids=["wan21", "wan22_residual"])
@pytest.mark.parametrize("chunked", [False, True])
def test_decoder_is_causal(chunked, residual):
    model = tiny(torch.float64, residual=residual)
    z = torch.randn(1, 4, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model.decode_raw(z, chunked=chunked)
        for i in range(4):
            bumped = z.clone()
            bumped[:, :, i] += 0.5
            out = model.decode_raw(bumped, chunked=chunked)
            f = first_frame(i)
            torch.testing.assert_close(out[:, :, :f], base[:, :, :f], atol=1e-12, rtol=0)
            assert (out[:, :, f] - base[:, :, f]).abs().max() > 1e-6, f"latent {i} must reach frame {f}"


def test_rms_norm_is_wans_normalize_and_keeps_the_autocast_dtype():
    """Wan's norm is F.normalize(x, dim=1)·√C·γ: ours equals it (values and gradients, float64, with
    an all-zero position where the 1e-12 floor acts) and under bf16 autocast stays in bf16, close to
    the float32 result."""
    torch.manual_seed(0)
    norm = RMSNorm(6).double()
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64)
    x[0, :, 1, 2, 3] = 0
    x.requires_grad_(True)
    ref = F.normalize(x, dim=1) * 6**0.5 * norm.gamma.view(-1, 1, 1, 1)
    w = torch.randn_like(ref)
    got = norm(x)
    torch.testing.assert_close(got, ref, atol=1e-14, rtol=1e-13)
    g_got = torch.autograd.grad((got * w).sum(), (x, norm.gamma))
    g_ref = torch.autograd.grad((ref * w).sum(), (x, norm.gamma))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    norm32, x32 = norm.float(), x.detach().float().to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm32(x32)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), norm32(x32.float()), atol=2e-2, rtol=1e-2)


def test_kl_matches_reference():
    model = tiny(torch.float64)
    x = video(5, torch.float64, batch=2)
    with torch.no_grad():
        mean, logvar = model.moments(x).chunk(2, dim=1)  # the encoder's raw [mean, logvar]
        q = model.posterior(x)
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (0.5 * logvar).exp()), prior)
    torch.testing.assert_close(q.kl(), ref.flatten(1).sum(1), atol=1e-10, rtol=1e-12)
    assert q.kl().shape == (2,)


def test_gradients_finite():
    model = tiny().train()
    x = video(5)
    q = model.posterior(x)
    loss = (model.decode_raw(q.sample(torch.Generator().manual_seed(0))) - x).abs().mean() + 1e-3 * q.kl().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads) >= 0.9 * len(grads)


def test_state_dict_round_trip():
    model = tiny()
    model.set_latent_stats(torch.linspace(-1, 1, 4), torch.linspace(0.5, 2, 4))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = tiny(seed=7)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    x = video(5)
    with torch.no_grad():
        torch.testing.assert_close(other.encode(x), model.encode(x), atol=0, rtol=0)
        torch.testing.assert_close(other.decode(model.encode(x)), model.decode(model.encode(x)), atol=0, rtol=0)


@pytest.mark.parametrize("frames", [0, 2, 4, 6, 8])
def test_wrong_frame_count_raises(frames):
    model = tiny()
    with pytest.raises(ValueError, match=rf"1 \+ k·4 frames, got {frames}\b"):
        model.encode(torch.zeros(1, 3, frames, H, W))


def test_bad_inputs_raise():
    model = tiny()
    with pytest.raises(ValueError, match="not divisible"):
        model.encode(torch.zeros(1, 3, 5, 12, 16))
    with pytest.raises(ValueError, match=r"expected video \(B, 3"):
        model.encode(torch.zeros(1, 4, 5, H, W))
    with pytest.raises(ValueError, match=r"expected latents \(B, 4"):
        model.decode_raw(torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="temporal_downsample"):
        CausalVAE3d(channel_mults=(1, 2), temporal_downsample=(True, True))


# -- presets and diffusers -------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_presets_build(name):
    with torch.device("meta"):  # the Wan preset has 127 M parameters: no memory, no init
        model = build(name)
    assert model.latent_channels == 16 or name == "causal3d_tiny"
    assert model.compression == ((4, 16, 16) if name == "causal3d_4x16x16" else (4, 8, 8))
    if name == "causal3d_wan":
        diffusers = pytest.importorskip("diffusers")
        with torch.device("meta"):
            theirs = diffusers.AutoencoderKLWan()
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert count == sum(p.numel() for p in theirs.parameters()) == 126_892_531


def diffusers_to_ours(key: str, num_res_blocks: int) -> str:
    """A diffusers AutoencoderKLWan state-dict key -> the CausalVAE3d key (decoder levels are flat)."""
    per_level = num_res_blocks + 2  # num_res_blocks + 1 ResBlocks and an Upsample
    key = re.sub(r"^quant_conv\.", "encoder.quant.", key)
    key = re.sub(r"^post_quant_conv\.", "decoder.post_quant.", key)
    for old, new in [("down_blocks.", "down."), ("resample.1.", "spatial."), ("conv_shortcut.", "shortcut."),
                     ("mid_block.resnets.0.", "mid.res1."), ("mid_block.resnets.1.", "mid.res2."),
                     ("mid_block.attentions.0.", "mid.attn."), ("to_qkv.", "qkv.")]:
        key = key.replace(old, new)
    key = re.sub(r"up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"up.{int(m[1]) * per_level + int(m[2])}.", key)
    return re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{int(m[1]) * per_level + per_level - 1}.", key)


def test_same_function_as_diffusers_wan():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1).eval()
    ours = tiny()
    own = ours.state_dict()
    converted = {diffusers_to_ours(k, 1): v for k, v in theirs.state_dict().items()}
    assert set(own) - set(converted) == {"latent_mean", "latent_std"} and set(converted) <= set(own)
    ours.load_state_dict({k: v.reshape(own[k].shape) for k, v in converted.items()}, strict=False)
    x = video(9)
    z = torch.randn(1, 4, 3, 2, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # diffusers always runs chunked; it clamps its decoded video to [-1, 1]
        torch.testing.assert_close(ours.moments(x), theirs._encode(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.decode_raw(z).clamp(-1, 1), theirs.decode(z).sample, atol=1e-5, rtol=0)


def diffusers_residual_to_ours(key: str) -> str:
    """A diffusers AutoencoderKLWan(is_residual=True) key -> the CausalVAE3d(residual=True) key (one
    stage module per level: ``down.i.res.j``, ``down.i.resample``, ``up.i.res.j``, ``up.i.resample``)."""
    key = re.sub(r"^quant_conv\.", "encoder.quant.", key)
    key = re.sub(r"^post_quant_conv\.", "decoder.post_quant.", key)
    for old, new in [("resample.1.", "spatial."), ("conv_shortcut.", "shortcut."),
                     ("mid_block.resnets.0.", "mid.res1."), ("mid_block.resnets.1.", "mid.res2."),
                     ("mid_block.attentions.0.", "mid.attn."), ("to_qkv.", "qkv.")]:
        key = key.replace(old, new)
    key = re.sub(r"(down|up)_blocks\.(\d+)\.resnets\.", r"\1.\2.res.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsampler\.", r"down.\1.resample.", key)
    return re.sub(r"up_blocks\.(\d+)\.upsampler\.", r"up.\1.resample.", key)


def test_residual_is_the_same_function_as_diffusers_wan22():
    """residual=True against diffusers' AutoencoderKLWan(is_residual=True) (Wan 2.2's VAE layout,
    without its 2×2 patchify) with the same weights: one-shot and chunked, encode and decode."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                        is_residual=True).eval()
    ours = tiny(residual=True)
    own = ours.state_dict()
    converted = {diffusers_residual_to_ours(k): v for k, v in theirs.state_dict().items()}
    assert set(own) - set(converted) == {"latent_mean", "latent_std"} and set(converted) <= set(own)
    ours.load_state_dict({k: v.reshape(own[k].shape) for k, v in converted.items()}, strict=False)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    x = video(9)
    z = torch.randn(1, 4, 3, 2, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for chunked in (False, True):
            torch.testing.assert_close(ours.moments(x, chunked), theirs._encode(x), atol=1e-5, rtol=0)
            decoded = ours.decode_raw(z, chunked).clamp(-1, 1)
            torch.testing.assert_close(decoded, theirs.decode(z).sample, atol=1e-5, rtol=0)
