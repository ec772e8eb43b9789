"""Inception-I3D (Carreira & Zisserman 2017, "Quo Vadis, Action Recognition?") as the FVD detector.

The module tree mirrors the PyTorch `InceptionI3d` of piergiaj/pytorch-i3d, so the state dict of
`i3d_pretrained_400.pt` (VideoGPT / TATS / cd-fvd) loads key for key: `Conv3d_1a_7x7.conv3d.weight`,
`Conv3d_1a_7x7.bn.{weight,bias,running_mean,running_var}`, `Mixed_3b.b0|b1a|b1b|b2a|b2b|b3b.*`, ...,
`logits.conv3d.{weight,bias}`. Convolutions and max-pools use TensorFlow 'SAME' padding computed from
the input size (zeros, as the reference pads before pooling); BatchNorm eps is 1e-3.

Feature (Unterthiner et al. 2018 FVD as implemented by VideoGPT): the 400 Kinetics logits averaged
over time. Input (B, 3, T, H, W) in [-1, 1]; the pooling (2, 7, 7) before the logits needs T >= 9 and
H, W >= 193 (224 is the standard size).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

I3D_FILENAME = "i3d_pretrained_400.pt"
I3D_SHA1 = "a867b87ac3a9097d200598b1d48a1b890d8ec744"  # git blob SHA-1 (docs REFERENCE.md, ## FVD)
# VideoGPT's Google Drive file id 1mQK8KD8G6UWRa5t87SRMm5PVXtlpneJT (videogpt/download.py)
I3D_URL = "https://drive.usercontent.google.com/download?id=1mQK8KD8G6UWRa5t87SRMm5PVXtlpneJT&export=download&confirm=t"
TORCHSCRIPT_FILENAME = "i3d_torchscript.pt"  # StyleGAN-V (Skorokhodov et al. 2022), src/metrics/frechet_video_distance.py
TORCHSCRIPT_SHA1 = "93daef59c7ae0e9e8f76225521407e60cbafa6aa"
TORCHSCRIPT_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"


def _same_pad(size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> list[int]:
    """TF 'SAME' padding for (T, H, W) as an F.pad list (W front/back, H ..., T ...)."""
    pads: list[int] = []
    for s, k, st in zip(reversed(size), reversed(kernel), reversed(stride)):
        total = max(k - st, 0) if s % st == 0 else max(k - s % st, 0)
        pads += [total // 2, total - total // 2]
    return pads


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


class Unit3D(nn.Module):
    """SAME-padded Conv3d (+ BatchNorm3d eps 1e-3) (+ ReLU)."""

    def __init__(self, in_ch: int, out_ch: int, kernel=1, stride=1, bn: bool = True, relu: bool = True,
                 bias: bool = False):
        super().__init__()
        self.kernel, self.stride, self.relu = _triple(kernel), _triple(stride), relu
        self.conv3d = nn.Conv3d(in_ch, out_ch, self.kernel, self.stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(out_ch, eps=0.001, momentum=0.01) if bn else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv3d(F.pad(x, _same_pad(tuple(x.shape[2:]), self.kernel, self.stride)))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPool3dSame(nn.Module):
    """Max-pool 3D after zero TF-'SAME' padding (inputs are post-ReLU, so zeros never win wrongly)."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = _triple(kernel), _triple(stride)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, _same_pad(tuple(x.shape[2:]), self.kernel, self.stride))
        return F.max_pool3d(x, self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four branches concatenated on channels: 1x1 | 1x1→3x3 | 1x1→3x3 | maxpool 3x3→1x1."""

    def __init__(self, in_ch: int, oc: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(in_ch, oc[0], 1)
        self.b1a, self.b1b = Unit3D(in_ch, oc[1], 1), Unit3D(oc[1], oc[2], 3)
        self.b2a, self.b2b = Unit3D(in_ch, oc[3], 1), Unit3D(oc[3], oc[4], 3)
        self.b3a, self.b3b = MaxPool3dSame(3, 1), Unit3D(in_ch, oc[5], 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


_MIXED = {  # name: (in channels, (b0, b1a, b1b, b2a, b2b, b3b))
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


class InceptionI3d(nn.Module):
    """I3D up to the Kinetics logits. forward: (B, 3, T, H, W) in [-1, 1] → (B, num_classes)."""

    num_features = 400

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.num_features = num_classes
        self.Conv3d_1a_7x7 = Unit3D(3, 64, 7, 2)
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64, 1)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, 3)
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = InceptionModule(*_MIXED["Mixed_3b"])
        self.Mixed_3c = InceptionModule(*_MIXED["Mixed_3c"])
        self.MaxPool3d_4a_3x3 = MaxPool3dSame(3, 2)
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            setattr(self, name, InceptionModule(*_MIXED[name]))
        self.MaxPool3d_5a_2x2 = MaxPool3dSame(2, 2)
        self.Mixed_5b = InceptionModule(*_MIXED["Mixed_5b"])
        self.Mixed_5c = InceptionModule(*_MIXED["Mixed_5c"])
        self.logits = Unit3D(1024, num_classes, 1, bn=False, relu=False, bias=True)
        self.order = ["Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3",
                      "MaxPool3d_3a_3x3", "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b",
                      "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b",
                      "Mixed_5c"]

    def forward(self, x: Tensor) -> Tensor:
        for name in self.order:
            x = getattr(self, name)(x)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # (B, 1024, T/8 - 1, H/32 - 6, W/32 - 6); 1x1 at 224
        x = self.logits(x)  # (dropout is the identity at evaluation)
        return x.mean(dim=(3, 4)).mean(dim=2)  # spatial squeeze, then average over time → (B, 400)


def git_blob_sha1(path: str | os.PathLike) -> str:
    """SHA-1 of b"blob <size>\\0" + bytes, i.e. `git hash-object FILE`."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def weights_dir() -> Path:
    """`$VIDLAB_WEIGHTS_DIR`, else `~/.cache/vidlab`: where detector weights are looked for."""
    root = os.environ.get("VIDLAB_WEIGHTS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "vidlab"


def default_i3d_path() -> Path:
    """`$VIDLAB_WEIGHTS_DIR/i3d_pretrained_400.pt`, else `~/.cache/vidlab/i3d_pretrained_400.pt`."""
    return weights_dir() / I3D_FILENAME


def download(url: str, target: Path, expected_sha1: str | None, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``target`` atomically (temp file + rename) and check its git blob SHA-1.

    Raises OSError (offline, HTTP error) or ValueError (wrong file); nothing is left at ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out)
        if expected_sha1 is not None and git_blob_sha1(tmp) != expected_sha1.lower():
            raise ValueError(f"{url}: git blob SHA-1 {git_blob_sha1(tmp)}, expected {expected_sha1}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def locate_weights(filename: str, sha1: str, url: str | None, path: str | os.PathLike | None = None,
                   expected_sha1: str | None = "published", allow_download: bool = True) -> Path:
    """The checked weight file: ``path``, else ``weights_dir()/filename`` (downloaded from ``url``
    into that folder when missing, unless ``allow_download`` is False or ``$VIDLAB_OFFLINE`` is set).

    ``expected_sha1`` "published" means ``sha1`` (the published file's); None skips the check.
    Raises FileNotFoundError naming the file, where to put it and its SHA-1; ValueError on a
    SHA-1 mismatch.
    """
    want = sha1 if expected_sha1 == "published" else expected_sha1
    target = Path(path) if path is not None else weights_dir() / filename
    reason = ""
    if not target.is_file() and url and allow_download and not os.environ.get("VIDLAB_OFFLINE"):
        try:
            download(url, target, want)
        except (OSError, ValueError) as exc:  # offline: URLError is an OSError
            reason = f" Download from {url} failed: {exc}."
    if not target.is_file():
        raise FileNotFoundError(
            f"{filename} not found at {target}. Put {filename} (git blob SHA-1 {want or sha1}) there, "
            f"pass its path (vidlab eval --detector-path, callbacks.evaluation.detector_path), "
            f"or set VIDLAB_WEIGHTS_DIR to its folder (default folder: ~/.cache/vidlab)."
            + reason)
    if want is not None:
        actual = git_blob_sha1(target)
        if actual != want.lower():
            raise ValueError(f"{filename} at {target}: git blob SHA-1 {actual}, expected {want}")
    return target


def load_i3d(path: str | os.PathLike | None = None, expected_sha1: str | None = I3D_SHA1,
             map_location: str | torch.device = "cpu", allow_download: bool = True) -> InceptionI3d:
    """Build `InceptionI3d` in eval mode from a plain state dict (`i3d_pretrained_400.pt` layout).

    Found by `locate_weights` (path, VIDLAB_WEIGHTS_DIR, ~/.cache/vidlab, else download);
    `expected_sha1`: git blob SHA-1 to verify (None skips the check); a mismatch raises ValueError.
    Loaded with ``weights_only=True`` (no pickled code runs).
    """
    path = locate_weights(I3D_FILENAME, I3D_SHA1, I3D_URL, path, expected_sha1, allow_download)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # only reachable with expected_sha1=None: a truncated or foreign file
        why = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"I3D weights {path} cannot be read as a state dict ({why}); "
                         f"expected {I3D_FILENAME} (git blob SHA-1 {I3D_SHA1})") from exc
    if not isinstance(state, dict) or "logits.conv3d.weight" not in state:
        raise ValueError(f"I3D weights {path}: not an {I3D_FILENAME} state dict (no 'logits.conv3d.weight')")
    model = InceptionI3d(num_classes=state["logits.conv3d.weight"].shape[0])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"I3D weights {path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return model.eval().requires_grad_(False)


class TorchScriptI3D(nn.Module):
    """StyleGAN-V's `i3d_torchscript.pt` behind the same interface as `InceptionI3d`.

    forward: (B, 3, T, H, W) in [-1, 1], already resized by the protocol (`eval.fvd.preprocess`) →
    (B, 400) features. The archive is called with ``rescale=False, resize=False,
    return_features=True``: with rescale=True it would map [0, 255] to [-1, 1] itself, and feeding
    it [-1, 1] on top would normalise twice (REFERENCE.md, ## FVD). This is how the comparison of
    universome/fvd-comparison calls it, which matches the TF-hub FVD.
    """

    num_features = 400

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x, rescale=False, resize=False, return_features=True)


def load_torchscript_i3d(path: str | os.PathLike | None = None, expected_sha1: str | None = TORCHSCRIPT_SHA1,
                         map_location: str | torch.device = "cpu", allow_download: bool = True) -> TorchScriptI3D:
    """Load `i3d_torchscript.pt` (StyleGAN-V) with `torch.jit.load`, after the SHA-1 check.

    A TorchScript archive holds TorchScript code and tensors, not pickled Python objects; the
    SHA-1 check pins it to the published file.
    """
    path = locate_weights(TORCHSCRIPT_FILENAME, TORCHSCRIPT_SHA1, TORCHSCRIPT_URL, path, expected_sha1,
                          allow_download)
    module = torch.jit.load(str(path), map_location=map_location)
    return TorchScriptI3D(module.eval()).eval().requires_grad_(False)


DETECTORS = {I3D_FILENAME: load_i3d, TORCHSCRIPT_FILENAME: load_torchscript_i3d}


def load_detector(name: str, path: str | os.PathLike | None = None, expected_sha1: str | None = "published",
                  map_location: str | torch.device = "cpu") -> nn.Module:
    """An FVD feature network by file name (`FVDProtocol.detector`): (B, 3, T, H, W) in [-1, 1] →
    (B, num_features). ``expected_sha1="published"`` checks the published file's SHA-1."""
    if name not in DETECTORS:
        raise ValueError(f"unknown FVD detector {name!r}; known: {sorted(DETECTORS)}")
    if expected_sha1 == "published":
        expected_sha1 = I3D_SHA1 if name == I3D_FILENAME else TORCHSCRIPT_SHA1
    return DETECTORS[name](path, expected_sha1, map_location)
