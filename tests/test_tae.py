"""Movie Gen's 2.5D TAE (modules/vaes/tae.py): the 2.5D conv against a float64 conv3d composition,
variable length (padding in time, cropping on decode), the identity initialisation of the temporal
layers, the outlier penalty against a hand loop, checkpoints, gradients and the presets."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from experiments.build import instantiate
from experiments.config import REPO_CONFIGS, load_yaml
from modules.vaes.tae import TAE, Conv25d, outlier_penalty


def tiny(**kw) -> TAE:
    torch.manual_seed(0)
    args = dict(latent_channels=4, channels=8, channel_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=4)
    return TAE(**{**args, **kw}).eval()


def randomize(module: torch.nn.Module) -> None:
    """Replace the identity / zero initialisations so no layer is trivially skipped."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)


@pytest.mark.parametrize("stride,temporal_stride", [(1, 1), (2, 2), (2, 1)])
def test_conv25d_is_2d_conv_per_frame_then_1d_conv_per_pixel(stride, temporal_stride):
    conv = Conv25d(3, 5, kernel=3, stride=stride, temporal_stride=temporal_stride).double()
    randomize(conv)
    x = torch.randn(2, 3, 6, 8, 8, dtype=torch.float64)
    # reference: a (1, k, k) conv3d (zero padding; SD's (0, 1) padding when strided), then replicate
    # padding in time and a (k, 1, 1) conv3d
    w2, w1 = conv.spatial.weight[:, :, None], conv.temporal.weight[:, :, :, None, None]
    if stride == 1:
        ref = F.conv3d(x, w2, conv.spatial.bias, padding=(0, 1, 1))
    else:
        ref = F.conv3d(F.pad(x, (0, 1, 0, 1)), w2, conv.spatial.bias, stride=(1, 2, 2))
    ref = F.conv3d(F.pad(ref, (0, 0, 0, 0, 1, 1), mode="replicate"), w1, conv.temporal.bias, stride=(temporal_stride, 1, 1))
    out = conv(x)
    assert out.shape == (2, 5, 6 // temporal_stride, 8 // stride, 8 // stride)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_fresh_temporal_layers_are_identities():
    """Inflation: an untrained TAE without temporal downsampling encodes every frame on its own."""
    model = tiny(temporal_downsample=(False, False, False))
    assert model.compression == (1, 8, 8)
    x = torch.randn(1, 3, 3, 16, 16)
    with torch.no_grad():
        z = model.encode(x)
        per_frame = torch.cat([model.encode(x[:, :, t : t + 1]) for t in range(3)], dim=2)
    torch.testing.assert_close(z, per_frame, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_frames", [1, 3, 8, 9, 17])
def test_any_length_encodes_to_ceil_and_decode_crops_back(num_frames):
    model = tiny()
    x = torch.randn(2, 3, num_frames, 16, 24)
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (2, *model.latent_shape(num_frames, 16, 24))
        assert z.shape[2] == math.ceil(num_frames / 8)
        full = model.decode(z)
        cropped = model.decode(z, num_frames=num_frames)
    assert full.shape == (2, 3, 8 * z.shape[2], 16, 24)
    assert cropped.shape == x.shape
    torch.testing.assert_close(cropped, full[:, :, :num_frames])


def test_padding_repeats_the_last_frame():
    model = tiny()
    x = torch.randn(1, 3, 5, 16, 16)
    padded = torch.cat([x, x[:, :, -1:].expand(-1, -1, 3, -1, -1)], dim=2)  # (1, 3, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), model.encode(padded))


def test_bad_sizes_raise_naming_the_size():
    model = tiny()
    with pytest.raises(ValueError, match="12x16"):
        model.encode(torch.randn(1, 3, 8, 12, 16))
    with pytest.raises(ValueError, match="0 frame|at least 1"):
        model.latent_shape(0, 16, 16)
    z = torch.zeros(1, 4, 2, 2, 2)
    with pytest.raises(ValueError, match="not 8"):  # 2 latent frames decode to 9..16 frames
        model.decode(z, num_frames=8)
    with pytest.raises(ValueError, match="temporal_downsample"):
        TAE(channel_mult=(1, 2), temporal_downsample=(True, True))


def test_partial_temporal_downsampling():
    model = tiny(temporal_downsample=(True, False, True))
    assert model.compression == (4, 8, 8)
    with torch.no_grad():
        z = model.encode(torch.randn(1, 3, 6, 16, 16))
    assert z.shape == (1, 4, 2, 2, 2) == (1, *model.latent_shape(6, 16, 16))
    assert model.decode(z, num_frames=6).shape == (1, 3, 6, 16, 16)


# -- outlier penalty ------------------------------------------------------------------------------


def opl_by_hand(z: torch.Tensor, r: float) -> float:
    """Movie Gen's L_OPL per (sample, latent frame), averaged, with Python loops over positions."""
    b, c, t, h, w = z.shape
    per_latent = []
    for bi in range(b):
        for ti in range(t):
            vecs = [[float(z[bi, ci, ti, i, j]) for ci in range(c)] for i in range(h) for j in range(w)]
            mean = [sum(v[ci] for v in vecs) / len(vecs) for ci in range(c)]
            std = [math.sqrt(sum((v[ci] - mean[ci]) ** 2 for v in vecs) / len(vecs)) for ci in range(c)]
            std_norm = math.sqrt(sum(s * s for s in std))
            dists = [math.sqrt(sum((v[ci] - mean[ci]) ** 2 for ci in range(c))) for v in vecs]
            per_latent.append(sum(max(d - r * std_norm, 0.0) for d in dists) / len(vecs))
    return sum(per_latent) / len(per_latent)


def test_outlier_penalty_matches_hand_computation():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 2, 4, 4, dtype=torch.float64)
    z[0, :, 1, 2, 3] += torch.tensor([9.0, -7.0, 5.0], dtype=torch.float64)  # a spot
    z[1, 1, 0, 0, 0] -= 12.0
    for r in (3.0, 1.0):
        assert outlier_penalty(z, r).item() == pytest.approx(opl_by_hand(z, r), rel=1e-12)
    assert outlier_penalty(z, 3.0) > 0
    assert tiny().outlier_penalty(z).item() == pytest.approx(opl_by_hand(z, 3.0), rel=1e-12)


def test_outlier_penalty_is_zero_without_outliers_and_has_finite_gradients():
    torch.manual_seed(0)
    gaussian = torch.randn(4, 16, 3, 8, 8)  # ‖X_ij − mean‖ ≈ 4 ≪ 3·‖std‖ ≈ 12
    assert outlier_penalty(gaussian).item() == 0.0
    constant = torch.full((2, 4, 1, 4, 4), 0.7, requires_grad=True)  # no spread at all
    loss = outlier_penalty(constant)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(constant.grad).all()
    spot = torch.zeros(1, 4, 1, 8, 8)
    spot[0, :, 0, 3, 3] = 5.0
    assert outlier_penalty(spot).item() > 0


# -- training plumbing ----------------------------------------------------------------------------


def test_state_dict_round_trip():
    model = tiny()
    model.set_latent_stats(torch.arange(4.0), torch.full((4,), 2.0))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = TAE(latent_channels=4, channels=8, channel_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=4).eval()
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(1, 3, 9, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(other.encode(x), model.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(other.decode(model.encode(x), 9), model.decode(model.encode(x), 9), rtol=0, atol=0)


def test_gradients_are_finite():
    model = tiny().train()
    randomize(model)
    x = torch.rand(2, 3, 9, 16, 16) * 2 - 1
    q = model.posterior(x)
    z = q.sample()
    loss = (model.decode_raw(z, 9) - x).square().mean() + 1e-6 * q.kl().mean() + model.outlier_penalty(z)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("preset", ["tae_8x8x8", "tae_tiny"])
def test_preset_builds_and_runs_at_its_smallest_size(preset):
    torch.manual_seed(0)
    model = instantiate(load_yaml(REPO_CONFIGS / "vae" / f"{preset}.yaml"), preset).eval()
    assert isinstance(model, TAE) and not model.causal
    _, rh, rw = model.compression
    assert model.latent_channels == 16 and model.compression == (8, 8, 8)
    x = torch.rand(1, 3, 1, rh, rw) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (1, 16, 1, 1, 1)
        assert model.decode(z, num_frames=1).shape == x.shape
