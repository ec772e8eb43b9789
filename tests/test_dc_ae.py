"""Deep-compression video autoencoder (modules/vaes/dc.py): the residual-autoencoding shortcuts
against hand reshapes (and their exact inversion), chunk causality of the encoder, the decoder and
the temporal attention mask (against a hand softmax), shapes and size errors, checkpoints,
gradients and the presets."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from experiments.build import instantiate
from experiments.config import REPO_CONFIGS, load_yaml
from modules.vaes.dc import DCAE, DownBlock, UpBlock, channel_to_space, space_to_channel
from modules.vaes.tae import TemporalAttention

TINY = dict(
    latent_channels=8, widths=(8, 16, 16, 32, 32, 32), depths=(0, 1, 0, 1, 0, 1),
    temporal_downsample=(False, False, False, True, True), attention_from=3, norm_groups=8,
)


def tiny(**kw) -> DCAE:
    torch.manual_seed(0)
    return DCAE(**{**TINY, **kw}).eval()


def s2c_by_hand(x: torch.Tensor, s: int, t: int) -> torch.Tensor:
    """out[b, ((c·t + dt)·s + dh)·s + dw, n, i, j] = x[b, c, n·t + dt, i·s + dh, j·s + dw], by loops."""
    b, c, n, h, w = x.shape
    out = torch.empty(b, c * t * s * s, n // t, h // s, w // s, dtype=x.dtype)
    for ci in range(c):
        for dt in range(t):
            for dh in range(s):
                for dw in range(s):
                    out[:, ((ci * t + dt) * s + dh) * s + dw] = x[:, ci, dt::t, dh::s, dw::s]
    return out


# -- residual autoencoding shortcuts --------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 2])
def test_space_to_channel_matches_hand_reshape_and_is_inverted(t):
    x = torch.randn(2, 3, 4, 6, 8, dtype=torch.float64)
    y = space_to_channel(x, 2, t)
    assert torch.equal(y, s2c_by_hand(x, 2, t))
    assert torch.equal(channel_to_space(y, 2, t), x)
    if t == 1:  # per frame it is exactly pixel_unshuffle
        frames = F.pixel_unshuffle(x.transpose(1, 2).reshape(8, 3, 6, 8), 2)  # (B·T, 12, 3, 4)
        assert torch.equal(y, frames.reshape(2, 4, 12, 3, 4).transpose(1, 2))


@pytest.mark.parametrize("temporal", [False, True])
def test_down_shortcut_averages_channel_groups(temporal):
    t = 2 if temporal else 1
    block = DownBlock(6, 8, temporal=temporal).double()  # 6·4t channels averaged in groups of 3t
    x = torch.randn(2, 6, 4, 8, 8, dtype=torch.float64)
    y = s2c_by_hand(x, 2, t)  # (2, 24t, 4/t, 4, 4)
    g = 24 * t // 8
    ref = torch.stack([y[:, k * g : (k + 1) * g].mean(1) for k in range(8)], dim=1)
    torch.testing.assert_close(block.shortcut(x), ref, rtol=1e-14, atol=1e-14)
    assert block(x).shape == (2, 8, 4 // t, 4, 4)


@pytest.mark.parametrize("temporal", [False, True])
def test_up_shortcut_exactly_inverts_down_shortcut_when_no_averaging(temporal):
    f = 8 if temporal else 4
    down, up = DownBlock(4, 4 * f, temporal), UpBlock(4 * f, 4, temporal)
    x = torch.randn(1, 4, 4, 8, 8)
    assert down.group == 1 and up.repeats == 1
    assert torch.equal(up.shortcut(down.shortcut(x)), x)
    assert up(down(x)).shape == x.shape


def test_down_shortcut_is_a_left_inverse_of_up_shortcut():
    up, down = UpBlock(16, 8, temporal=True), DownBlock(8, 16, temporal=True)  # duplicate ×4, average ×4
    z = torch.randn(1, 16, 2, 3, 3, dtype=torch.float64)
    dup = up.shortcut(z)
    assert dup.shape == (1, 8, 4, 6, 6)
    assert torch.equal(s2c_by_hand(dup, 2, 2), z.repeat_interleave(4, dim=1))  # each channel 4 times
    torch.testing.assert_close(down.shortcut(dup), z, rtol=1e-15, atol=1e-15)


def test_incompatible_widths_raise():
    with pytest.raises(ValueError, match="DownBlock: 16 -> 128"):
        DownBlock(16, 128)
    with pytest.raises(ValueError, match="UpBlock: 24 -> 2"):
        UpBlock(24, 2)
    with pytest.raises(ValueError, match="latent_channels 7"):
        tiny(latent_channels=7)


# -- chunk causality ------------------------------------------------------------------------------


def test_chunk_causal_attention_matches_hand_softmax():
    torch.manual_seed(0)
    attn = TemporalAttention(4, groups=2, chunk=3).double()
    x = torch.randn(1, 4, 7, 2, 2, dtype=torch.float64)
    out = attn(x)
    s = attn.norm(x.transpose(1, 2).reshape(7, 4, 2, 2)).reshape(1, 7, 4, 2, 2)  # GroupNorm per frame
    for i in range(2):
        for j in range(2):
            q, k, v = attn.qkv(s[0, :, :, i, j]).chunk(3, dim=-1)  # (T, C) each
            scores = q @ k.T / 2.0  # 1/sqrt(C)
            for a in range(7):
                for b in range(7):
                    if b // 3 > a // 3:  # key in a later chunk
                        scores[a, b] = float("-inf")
            ref = x[0, :, :, i, j] + attn.out(scores.softmax(-1) @ v).T
            torch.testing.assert_close(out[0, :, :, i, j], ref, rtol=1e-12, atol=1e-12)
    # bidirectional inside a chunk, forwards only across chunks
    y = x.clone()
    y[:, :, 4] = torch.randn(1, 4, 2, 2, dtype=torch.float64)  # frame 4 (chunk 1 = frames 3..5)
    diff = (attn(y) - out).abs().amax(dim=(0, 1, 3, 4))  # (T,)
    assert (diff[:3] == 0).all() and (diff[3:] > 1e-6).all()


def test_encoder_is_chunk_causal():
    model = tiny().double()
    x = torch.rand(1, 3, 12, 32, 32, dtype=torch.float64) * 2 - 1
    y = x.clone()
    y[:, :, 4:8] = torch.rand(1, 3, 4, 32, 32, dtype=torch.float64)  # new chunk 1
    with torch.no_grad():
        zx, zy = model.encode(x), model.encode(y)
    diff = (zx - zy).abs().amax(dim=(0, 1, 3, 4))  # (3,) per latent frame
    assert diff[0] < 1e-12  # chunk 0 never sees chunk 1
    assert diff[1] > 1e-6 and diff[2] > 1e-6  # its own latent and the later one do
    y = x.clone()
    y[:, :, 7] += 0.5  # the last frame of chunk 1 alone
    with torch.no_grad():
        diff = (model.encode(y) - zx).abs().amax(dim=(0, 1, 3, 4))
    assert diff[0] < 1e-12 and diff[1] > 1e-6


def test_decoder_is_chunk_causal():
    model = tiny().double()
    z = torch.randn(1, 8, 3, 1, 1, dtype=torch.float64)
    w = z.clone()
    w[:, :, 1] += 1.0
    with torch.no_grad():
        diff = (model.decode(z) - model.decode(w)).abs().amax(dim=(0, 1, 3, 4))  # (12,) per frame
    assert (diff[:4] < 1e-12).all() and (diff[4:] > 1e-6).all()


# -- shapes, sizes, plumbing ----------------------------------------------------------------------


@pytest.mark.parametrize("num_frames", [4, 8, 12])
def test_shapes_for_several_lengths(num_frames):
    model = tiny()
    x = torch.randn(1, 3, num_frames, 32, 64)
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (1, *model.latent_shape(num_frames, 32, 64)) == (1, 8, num_frames // 4, 1, 2)
        assert model.decode(z).shape == x.shape


def test_bad_sizes_raise_naming_the_size():
    model = tiny()
    with pytest.raises(ValueError, match="48x32"):
        model.encode(torch.randn(1, 3, 4, 48, 32))
    with pytest.raises(ValueError, match="got 6"):
        model.encode(torch.randn(1, 3, 6, 32, 32))


def test_deterministic_posterior_and_variational_option():
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        q = tiny().posterior(x)
        assert (q.sample() - q.mode()).abs().max() < 1e-5
        q = tiny(variational=True).posterior(x)
        assert (q.sample() - q.mode()).abs().max() > 1e-2


def test_state_dict_round_trip():
    model = tiny(variational=True)
    model.set_latent_stats(torch.linspace(-1, 1, 8), torch.full((8,), 0.5))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    other = DCAE(**TINY, variational=True).eval()
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        z = model.encode(x)
        assert torch.equal(other.encode(x), z)
        assert torch.equal(other.decode(z), model.decode(z))


def test_gradients_are_finite():
    model = tiny(variational=True).train()
    x = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    q = model.posterior(x)
    loss = (model.decode_raw(q.sample()) - x).square().mean() + 1e-6 * q.kl().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum() > 0) for g in grads) == len(grads)


@pytest.mark.parametrize("preset,spatial,channels", [("dc_32x", 32, 32), ("dc_64x", 64, 128), ("dc_tiny", 32, 8)])
def test_preset_builds_and_runs_at_its_smallest_size(preset, spatial, channels):
    torch.manual_seed(0)
    model = instantiate(load_yaml(REPO_CONFIGS / "vae" / f"{preset}.yaml"), preset).eval()
    assert isinstance(model, DCAE) and not model.causal
    assert model.compression == (4, spatial, spatial) and model.latent_channels == channels
    x = torch.rand(1, 3, 4, spatial, spatial) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (1, channels, 1, 1, 1)
        assert model.decode(z).shape == x.shape
