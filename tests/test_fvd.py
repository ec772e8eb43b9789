"""FVD maths against scipy and closed forms; I3D against an independent functional forward."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from eval.fvd import (PROTOCOLS, FrechetVideoDistance, feature_statistics, frechet_distance,
                      preprocess)
from eval.i3d import load_i3d


def _scipy_fd(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _random_stats(rng, d=400, n=600):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.1 + rng.standard_normal(d)
    return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    mu1, s1 = _random_stats(rng)
    mu2, s2 = _random_stats(rng)
    ours = float(frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1),
                                  torch.from_numpy(mu2), torch.from_numpy(s2)))
    ref = _scipy_fd(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-8)
    back = float(frechet_distance(torch.from_numpy(mu2), torch.from_numpy(s2),
                                  torch.from_numpy(mu1), torch.from_numpy(s1)))
    assert back == pytest.approx(ours, rel=1e-10)  # symmetric


def test_closed_form_diagonal_and_self():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(50, generator=g, dtype=torch.float64) + 0.1, torch.rand(50, generator=g, dtype=torch.float64) + 0.1
    mu1, mu2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    expected = ((a.sqrt() - b.sqrt()) ** 2).sum() + ((mu1 - mu2) ** 2).sum()
    got = frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert float(got) == pytest.approx(float(expected), rel=1e-10)
    feats = torch.randn(300, 64, generator=g)
    mu, sig = feature_statistics(feats)
    assert abs(float(frechet_distance(mu, sig, mu, sig))) < 1e-6


def test_statistics_normalisation():
    x = torch.randn(40, 8, dtype=torch.float64)
    for ddof in (0, 1):
        mu, sig = feature_statistics(x, ddof=ddof)
        assert torch.allclose(sig, torch.from_numpy(np.cov(x.numpy(), rowvar=False, ddof=ddof)), atol=1e-12)
        assert torch.allclose(mu, x.mean(0))


@pytest.mark.parametrize("ddof", [0, 1])
def test_metric_equals_hand_statistics(ddof):
    g = torch.Generator().manual_seed(2)
    real = torch.randn(90, 32, generator=g)
    fake = torch.randn(70, 32, generator=g) * 1.3 + 0.2
    metric = FrechetVideoDistance(num_features=32, ddof=ddof)
    for chunk in real.split(25):
        metric.update(chunk, real=True)
    for chunk in fake.split(30):
        metric.update(chunk, real=False)
    mu_r = real.double().mean(0)
    mu_f = fake.double().mean(0)
    sig_r = torch.from_numpy(np.cov(real.double().numpy(), rowvar=False, ddof=ddof))
    sig_f = torch.from_numpy(np.cov(fake.double().numpy(), rowvar=False, ddof=ddof))
    expected = _scipy_fd(mu_r.numpy(), sig_r.numpy(), mu_f.numpy(), sig_f.numpy())
    got = metric.compute()
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(expected, rel=1e-8)


def test_preprocess_protocols():
    v = torch.rand(2, 3, 20, 48, 64) * 2 - 1
    out = preprocess(v, PROTOCOLS["fvd2048_16f"])
    assert out.shape == (2, 3, 16, 224, 224)
    out = preprocess(v, PROTOCOLS["videogpt_16f"])
    assert out.shape == (2, 3, 16, 224, 224)
    assert PROTOCOLS["fvd2048_16f"].to_dict()["ddof"] == 1
    with pytest.raises(ValueError):
        preprocess(v[:, :, :8], PROTOCOLS["fvd2048_16f"])


# ---------- I3D: independent functional forward over the state dict ----------

def _pad_same(x, k, s):
    pads = []
    for dim in (4, 3, 2):  # F.pad lists the last dimension first
        n, kk, ss = x.shape[dim], k[dim - 2], s[dim - 2]
        p = max(kk - ss, 0) if n % ss == 0 else max(kk - n % ss, 0)
        pads += [p // 2, p - p // 2]
    return F.pad(x, pads)


def _unit(sd, name, x, k, s=(1, 1, 1)):
    w = sd[f"{name}.conv3d.weight"]
    x = F.conv3d(_pad_same(x, k, s), w, sd.get(f"{name}.conv3d.bias"), stride=s)
    if f"{name}.bn.weight" in sd:
        x = F.batch_norm(x, sd[f"{name}.bn.running_mean"], sd[f"{name}.bn.running_var"],
                         sd[f"{name}.bn.weight"], sd[f"{name}.bn.bias"], training=False, eps=1e-3)
        x = F.relu(x)
    return x


def _pool(x, k, s):
    return F.max_pool3d(_pad_same(x, k, s), k, s)


def _mixed(sd, n, x):
    one, three = (1, 1, 1), (3, 3, 3)
    b0 = _unit(sd, f"{n}.b0", x, one)
    b1 = _unit(sd, f"{n}.b1b", _unit(sd, f"{n}.b1a", x, one), three)
    b2 = _unit(sd, f"{n}.b2b", _unit(sd, f"{n}.b2a", x, one), three)
    b3 = _unit(sd, f"{n}.b3b", _pool(x, three, one), one)
    return torch.cat([b0, b1, b2, b3], 1)


def _reference_i3d(sd, x):
    x = _unit(sd, "Conv3d_1a_7x7", x, (7, 7, 7), (2, 2, 2))
    x = _pool(x, (1, 3, 3), (1, 2, 2))
    x = _unit(sd, "Conv3d_2b_1x1", x, (1, 1, 1))
    x = _unit(sd, "Conv3d_2c_3x3", x, (3, 3, 3))
    x = _pool(x, (1, 3, 3), (1, 2, 2))
    x = _mixed(sd, "Mixed_3c", _mixed(sd, "Mixed_3b", x))
    x = _pool(x, (3, 3, 3), (2, 2, 2))
    for n in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
        x = _mixed(sd, n, x)
    x = _pool(x, (2, 2, 2), (2, 2, 2))
    x = _mixed(sd, "Mixed_5c", _mixed(sd, "Mixed_5b", x))
    x = F.avg_pool3d(x, (2, 7, 7), stride=1)
    x = F.conv3d(x, sd["logits.conv3d.weight"], sd["logits.conv3d.bias"])  # (B, 400, T', 1, 1)
    return x.squeeze(4).squeeze(3).mean(2)


def _git_sha1(path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory):
    from eval.i3d import InceptionI3d

    torch.manual_seed(0)
    sd = InceptionI3d().state_dict()
    g = torch.Generator().manual_seed(3)
    for k, v in sd.items():  # non-trivial BatchNorm statistics so the test sees them
        if k.endswith("running_var"):
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)
        elif k.endswith("running_mean") or k.endswith("bn.bias"):
            v.copy_(torch.randn(v.shape, generator=g) * 0.1)
        elif k.endswith("bn.weight"):
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("weights") / "i3d_pretrained_400.pt"
    torch.save(sd, path)
    return path, sd


def test_i3d_loads_and_matches_functional_reference(i3d_file):
    path, sd = i3d_file
    assert "Mixed_3b.b1a.bn.running_var" in sd and "logits.conv3d.bias" in sd
    model = load_i3d(path, expected_sha1=_git_sha1(path))
    x = torch.rand(2, 3, 9, 193, 193, generator=torch.Generator().manual_seed(4)) * 2 - 1  # smallest size
    with torch.no_grad():
        got = model(x)
        ref = _reference_i3d(sd, x)
    assert got.shape == (2, 400)
    assert ref.abs().max() > 1e-3
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    metric = FrechetVideoDistance(model)  # the metric takes the network as its feature extractor
    metric.update(x, real=True)
    metric.update(x.flip(2), real=False)
    metric.update(x, real=False)
    assert torch.isfinite(metric.compute())


def test_i3d_missing_and_wrong_sha1(i3d_file, tmp_path):
    path, _ = i3d_file
    missing = tmp_path / "nowhere" / "i3d_pretrained_400.pt"
    with pytest.raises(FileNotFoundError) as e:
        load_i3d(missing)
    msg = str(e.value)
    assert "i3d_pretrained_400.pt" in msg and "a867b87ac3a9097d200598b1d48a1b890d8ec744" in msg
    assert "VIDLAB_WEIGHTS_DIR" in msg
    with pytest.raises(ValueError) as e:
        load_i3d(path)  # default expected SHA-1 is the published file's, not this random one
    assert str(path) in str(e.value) and _git_sha1(path) in str(e.value)


def test_i3d_found_through_weights_dir(i3d_file, monkeypatch):
    path, _ = i3d_file
    monkeypatch.setenv("VIDLAB_WEIGHTS_DIR", str(path.parent))
    model = load_i3d(expected_sha1=_git_sha1(path))
    assert model.logits.conv3d.weight.shape == (400, 1024, 1, 1, 1)


class _StyleGANVLike(torch.nn.Module):
    """A stand-in with the call signature of StyleGAN-V's i3d_torchscript.pt: with rescale it maps
    [0, 255] to [-1, 1] itself, with resize it resizes to 224 itself; it returns features."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 400)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if rescale:
            x = x / 127.5 - 1.0
        if resize:
            x = F.interpolate(x, size=(x.shape[2], 224, 224), mode="trilinear", align_corners=False)
        h = self.proj(x.mean(dim=(2, 3, 4)))  # (B, 400)
        return h if return_features else h.softmax(-1)


def test_torchscript_detector_loads_checked_and_is_called_without_a_second_normalisation(tmp_path):
    from eval.i3d import TORCHSCRIPT_SHA1, load_detector

    torch.manual_seed(0)
    module = _StyleGANVLike().eval()
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    detector = load_detector("i3d_torchscript.pt", path, expected_sha1=_git_sha1(path))
    x = torch.rand(2, 3, 16, 224, 224) * 2 - 1  # [-1, 1], already resized by the protocol
    with torch.no_grad():
        assert torch.allclose(detector(x), module(x, rescale=False, resize=False, return_features=True))
        uint8 = ((x + 1) * 127.5)  # the same clip as StyleGAN-V feeds it: [0, 255], rescale=True
        assert torch.allclose(detector(x), module(uint8, rescale=True, resize=False, return_features=True), atol=1e-5)
    assert detector.num_features == 400
    with pytest.raises(ValueError, match=TORCHSCRIPT_SHA1):
        load_detector("i3d_torchscript.pt", path)  # this file is not the published one
    with pytest.raises(ValueError, match="unknown FVD detector"):
        load_detector("i3d_600.pt", path)


def test_weights_are_downloaded_when_missing_and_checked(tmp_path, monkeypatch):
    """The download path, through a file:// URL: fetched into the weights folder atomically and
    checked; a wrong file is not kept; $VIDLAB_OFFLINE skips the attempt."""
    from eval.i3d import locate_weights

    source = tmp_path / "server" / "w.pt"
    source.parent.mkdir()
    source.write_bytes(b"weights")
    sha1 = _git_sha1(source)
    monkeypatch.setenv("VIDLAB_WEIGHTS_DIR", str(tmp_path / "cache"))
    got = locate_weights("w.pt", sha1, source.as_uri())
    assert got == tmp_path / "cache" / "w.pt" and got.read_bytes() == b"weights"
    with pytest.raises(FileNotFoundError, match="Download from .* failed.*expected 0{40}"):
        locate_weights("v.pt", "0" * 40, source.as_uri())
    assert not (tmp_path / "cache" / "v.pt").exists() and not list((tmp_path / "cache").glob("*.part"))
    monkeypatch.setenv("VIDLAB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as e:
        locate_weights("u.pt", sha1, source.as_uri())
    assert "Download" not in str(e.value) and sha1 in str(e.value)
