"""Autoencoder losses (modules/vaes/losses.py) against independent references: hand-computed hinge
numbers, an analytic adaptive-weight case (a linear last layer y = W·h, for which
∇_W Σ a·y = a·hᵀ has norm ‖a‖·‖h‖), torch.distributions' Gaussian KL, and a float64 LPIPS written
here with F.conv2d over the same state dict. LPIPS weights are random; they are written in the
single-file layout (torch and safetensors) and the two-file layout (torchvision vgg16 keys +
lpips' vgg.pth lin keys) and loaded every way.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modules.vaes.base import DiagonalGaussian
from modules.vaes.losses import (
    LPIPS, PatchDiscriminator3D, adaptive_weight, hinge_d_loss, hinge_g_loss, kl_loss,
    reconstruction_loss,
)

# torchvision vgg16().features: conv layers sit at these indices (ReLU after each, pools at 4, 9, 16, 23, 30).
VGG_CONV = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
            14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512),
            26: (512, 512), 28: (512, 512)}
LIN_CHANNELS = (64, 128, 256, 512, 512)


# -- reconstruction, KL, hinge, adopt ----------------------------------------------------------------

def test_reconstruction_loss():
    x = torch.tensor([[1.0, -1.0], [0.5, 0.0]])
    x_hat = torch.tensor([[0.0, -1.0], [1.5, 2.0]])
    assert reconstruction_loss(x, x_hat, "l1").item() == pytest.approx((1 + 0 + 1 + 2) / 4)
    assert reconstruction_loss(x, x_hat, "l2").item() == pytest.approx((1 + 0 + 1 + 4) / 4)
    with pytest.raises(ValueError, match="kind"):
        reconstruction_loss(x, x_hat, "l3")


def test_kl_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 2, 3, 3, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 4, 2, 3, 3, generator=g, dtype=torch.float64)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    per_sample = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    post = DiagonalGaussian(mean, logvar)
    torch.testing.assert_close(kl_loss(post), per_sample.mean())
    torch.testing.assert_close(kl_loss(post, per_element=True), per_sample.mean() / (4 * 2 * 3 * 3))
    # a hand case: mean 1, logvar 0 -> ½ per element
    one = DiagonalGaussian(torch.ones(2, 1, 1, 2, 2), torch.zeros(2, 1, 1, 2, 2))
    assert kl_loss(one).item() == pytest.approx(0.5 * 4)


def test_hinge_losses_hand_computed():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 − r) = 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = 0, 1, 2   -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)


# -- adaptive weight ------------------------------------------------------------------------------------

def test_adaptive_weight_linear_last_layer():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(5, generator=g, dtype=torch.float64)
    a, b = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    y = W @ h
    rec, gan = (a * y).sum(), (b * y).sum()  # ∇_W = a·hᵀ, b·hᵀ
    lam = adaptive_weight(rec, gan, W)
    expected = a.norm() * h.norm() / (b.norm() * h.norm() + 1e-4)
    assert lam.item() == pytest.approx(expected.item(), rel=1e-12)
    assert not lam.requires_grad
    (rec + lam * gan).backward()  # graph retained
    torch.testing.assert_close(W.grad, torch.outer(a + lam * b, h))


def test_adaptive_weight_quadratic_and_clamp():
    W = torch.tensor([[2.0, -1.0]], dtype=torch.float64, requires_grad=True)
    h = torch.tensor([1.0, 3.0], dtype=torch.float64)
    y = W @ h  # (−1,)
    rec = 0.5 * (y - 1.0).square().sum()  # ∇_W = (y − 1)·hᵀ = −2·(1, 3): norm 2·√10
    gan = -y.sum()  # ∇_W = −hᵀ: norm √10
    lam = adaptive_weight(rec, gan, W)
    assert lam.item() == pytest.approx(2 * math.sqrt(10) / (math.sqrt(10) + 1e-4), rel=1e-12)
    zero_gan = 0.0 * y.sum()  # ‖∇ L_G‖ = 0 -> ratio 2√10/1e-4, clamped
    assert adaptive_weight(rec, zero_gan, W, max_weight=7.0).item() == 7.0
    with torch.no_grad():
        y2 = W @ h
        assert adaptive_weight(y2.sum(), y2.sum(), W).item() == 0.0


# -- discriminator --------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm, t_down, expected", [
    # space 32 -> 16 -> 8 -> 4 (stride 2, k 4, p 1) -> 3 -> 2 (stride 1, k 4, p 1)
    # time 9 -> 5 -> 3 -> 2 (stride 2, k 3, p 1: ⌈T/2⌉) -> 2 -> 2 (stride 1 keeps T)
    ("group", None, (2, 1, 2, 2, 2)),
    ("none", 1, (2, 1, 5, 2, 2)),
])
def test_patch_discriminator_shape_and_grads(norm, t_down, expected):
    torch.manual_seed(0)
    d = PatchDiscriminator3D(in_channels=3, width=8, layers=3, norm=norm, temporal_downsample=t_down)
    x = torch.randn(2, 3, 9, 32, 32, requires_grad=True)
    logits = d(x)
    assert logits.shape == expected
    hinge_g_loss(logits).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters())
    assert any(isinstance(m, nn.GroupNorm) for m in d.modules()) == (norm == "group")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in d.modules())


def test_patch_discriminator_single_frame():
    d = PatchDiscriminator3D(width=4, layers=2)
    assert d(torch.randn(1, 3, 1, 16, 16)).shape == (1, 1, 1, 2, 2)


# -- LPIPS ----------------------------------------------------------------------------------------------

def _random_weights(seed: int = 0) -> tuple[dict, dict]:
    """(torchvision-style vgg16 state dict with a classifier key, lpips-style lin state dict)."""
    g = torch.Generator().manual_seed(seed)
    vgg = {}
    for i, (c_in, c_out) in VGG_CONV.items():
        vgg[f"features.{i}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * math.sqrt(2 / (9 * c_in))
        vgg[f"features.{i}.bias"] = 0.1 * torch.randn(c_out, generator=g)
    vgg["classifier.0.weight"] = torch.randn(4, 3, generator=g)  # ignored
    lin = {f"lin{l}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for l, c in enumerate(LIN_CHANNELS)}
    return vgg, lin


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("lpips")
    vgg, lin = _random_weights()
    torch.save(vgg, d / "vgg16.pth")
    torch.save(lin, d / "vgg.pth")
    single = {k: v for k, v in vgg.items() if k.startswith("features.")} | lin
    torch.save(single, d / "lpips_vgg.pt")
    return d, single


@pytest.fixture(scope="module")
def lpips(weights):
    d, _ = weights
    return LPIPS.from_file(d / "lpips_vgg.pt")


def _reference_lpips(sd: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """float64 LPIPS-VGG written from the paper / lpips package: (N, 3, H, W) pairs -> (N,)."""
    sd = {k: v.double() for k, v in sd.items()}
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    tap_after_conv = {2, 4, 7, 10, 13}  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (conv count)

    def feats(img):
        h, idx, n_conv, out = (img.double() - shift) / scale, 0, 0, []
        for v in cfg:
            if v == "M":
                h, idx = F.max_pool2d(h, 2, 2), idx + 1
            else:
                h = F.relu(F.conv2d(h, sd[f"features.{idx}.weight"], sd[f"features.{idx}.bias"], padding=1))
                idx, n_conv = idx + 2, n_conv + 1
                if n_conv in tap_after_conv:
                    out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for l, (fx, fy) in enumerate(zip(feats(x), feats(y))):
        w = sd[f"lin{l}.model.1.weight"].view(1, -1, 1, 1)
        total += (w * (fx - fy) ** 2).sum(1).mean(dim=(1, 2))
    return total


def _pair(seed=0, shape=(3, 3, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1, torch.rand(shape, generator=g) * 2 - 1


def test_lpips_state_dict_layout():
    keys = set(LPIPS().state_dict())
    expected = {f"features.{i}.{p}" for i in VGG_CONV for p in ("weight", "bias")}
    expected |= {f"lin{l}.model.1.weight" for l in range(5)}
    assert keys == expected
    shapes = {k: tuple(v.shape) for k, v in LPIPS().state_dict().items()}
    assert shapes["features.28.weight"] == (512, 512, 3, 3) and shapes["lin2.model.1.weight"] == (1, 256, 1, 1)


def test_lpips_matches_float64_reference(weights):
    _, sd = weights
    x, y = _pair()
    ref = _reference_lpips(sd, x, y)
    model = LPIPS()
    model.load_weights(sd)
    torch.testing.assert_close(model.double()(x.double(), y.double()), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.float()(x, y).double(), ref, rtol=1e-4, atol=1e-6)
    assert (ref > 0).all()


def test_lpips_loading_single_and_two_files(weights, lpips):
    d, single = weights
    x, y = _pair(1)
    expected = lpips(x, y)
    two = LPIPS.from_files(d / "vgg16.pth", d / "vgg.pth")
    torch.testing.assert_close(two(x, y), expected, rtol=0, atol=0)
    assert torch.equal(LPIPS(weights=d / "lpips_vgg.pt")(x, y), expected)
    safetensors = pytest.importorskip("safetensors.torch")
    lpips.save(d / "lpips_vgg.safetensors")
    assert set(safetensors.load_file(str(d / "lpips_vgg.safetensors"))) == set(single)
    torch.testing.assert_close(LPIPS.from_file(d / "lpips_vgg.safetensors")(x, y), expected, rtol=0, atol=0)


def test_lpips_identity_symmetry_frozen(lpips):
    x, y = _pair(2)
    assert torch.equal(lpips(x, x), torch.zeros(3))
    torch.testing.assert_close(lpips(x, y), lpips(y, x))
    assert not any(p.requires_grad for p in lpips.parameters())
    parent = nn.ModuleDict({"lpips": lpips}).train()
    assert not parent["lpips"].training
    y_hat = y.clone().requires_grad_(True)
    lpips(x, y_hat).mean().backward()
    assert y_hat.grad is not None and y_hat.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


def test_lpips_video_per_frame_and_subset(lpips):
    x, y = _pair(3, shape=(2, 3, 4, 16, 16))  # (B, C, T, H, W)
    per_frame = lpips(x, y)
    assert per_frame.shape == (2, 4)
    for t in range(4):
        torch.testing.assert_close(per_frame[:, t], lpips(x[:, :, t], y[:, :, t]))
    sub = lpips(x, y, frames=2, generator=torch.Generator().manual_seed(0))
    assert sub.shape == (2, 2)
    cols = [next(t for t in range(4) if torch.allclose(sub[:, j], per_frame[:, t])) for j in range(2)]
    assert cols[0] < cols[1]  # two distinct frames, in order
    torch.testing.assert_close(lpips(x, y, frames=9), per_frame)


def test_lpips_missing_files_and_keys(tmp_path, weights):
    d, single = weights
    missing = tmp_path / "nowhere" / "lpips_vgg.pt"
    with pytest.raises(FileNotFoundError, match=r"nowhere/lpips_vgg\.pt.*features\.N\.weight.*lin0"):
        LPIPS.from_file(missing)
    with pytest.raises(FileNotFoundError, match=r"missing_vgg\.pth.*torchvision vgg16"):
        LPIPS.from_files(tmp_path / "missing_vgg.pth", d / "vgg.pth")
    with pytest.raises(FileNotFoundError, match=r"missing_lin\.pth.*lpips"):
        LPIPS.from_files(d / "vgg16.pth", tmp_path / "missing_lin.pth")
    torch.save({k: v for k, v in single.items() if not k.startswith("lin4")}, tmp_path / "partial.pt")
    with pytest.raises(KeyError, match="lin4.model.1.weight"):
        LPIPS.from_file(tmp_path / "partial.pt")
