"""The loss maths of video-autoencoder training: reconstruction, KL, LPIPS, a 3D PatchGAN
discriminator with hinge losses, and VQGAN's adaptive generator weight. No Lightning here: the
autoencoder LightningModule combines these (LDM / taming-transformers recipe)

    L_AE = L_rec + w_p·LPIPS + w_kl·KL + [step ≥ start]·w_d·λ·L_G,
    L_D  = hinge_d_loss(D(x), D(x̂.detach()))   (from step `start` on; before it D is not run),

with λ = `adaptive_weight(L_rec + w_p·LPIPS, L_G, last_layer)` (Esser et al. 2021, eq. 7).
Videos are ``(B, C, T, H, W)`` with pixels in [-1, 1].
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.vaes.base import DiagonalGaussian

__all__ = [
    "reconstruction_loss", "kl_loss", "LPIPS", "PatchDiscriminator3D",
    "hinge_d_loss", "hinge_g_loss", "adaptive_weight",
]


# -- reconstruction and KL ----------------------------------------------------------------------

def reconstruction_loss(x: Tensor, x_hat: Tensor, kind: str = "l1") -> Tensor:
    """Mean over all elements of |x − x̂| (``"l1"``) or (x − x̂)² (``"l2"``); any equal shapes."""
    if x.shape != x_hat.shape:
        raise ValueError(f"reconstruction_loss: shapes differ, {tuple(x.shape)} vs {tuple(x_hat.shape)}")
    losses = {"l1": F.l1_loss, "l2": F.mse_loss}
    if kind not in losses:
        raise ValueError(f"reconstruction_loss: kind must be one of {sorted(losses)}, got {kind!r}")
    return losses[kind](x_hat, x)


def kl_loss(posterior: DiagonalGaussian, per_element: bool = False) -> Tensor:
    """Scalar KL(q(z|x) ‖ N(0, I)) from ``posterior.kl()`` (per sample, summed over latent elements).

    ``per_element=False`` (default, LDM's ``AutoencoderKL``): sum over the latent elements, mean over
    the batch — the scale that LDM's ``kl_weight`` (1e-6) is tuned for. ``per_element=True``: also
    divide by the number of latent elements C·T'·H'·W', so the loss does not grow with the clip
    size (multiply the weight by that number to get the same gradients as the default).
    """
    kl = posterior.kl()  # (B,)
    if per_element:
        kl = kl / posterior.mean[0].numel()
    return kl.mean()


# -- LPIPS ----------------------------------------------------------------------------------------

# torchvision's vgg16 "D" configuration: channels of each 3×3 conv, "M" a 2×2 max-pool.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_TAPS = (3, 8, 15, 22, 29)  # indices in vgg16().features of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_TAP_CHANNELS = (64, 128, 256, 512, 512)
# lpips.pretrained_networks ScalingLayer: ImageNet mean/std re-expressed for inputs in [-1, 1].
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)

_SINGLE_FILE_HINT = (
    "one state dict with the VGG16 trunk keys 'features.N.weight'/'features.N.bias' (torchvision "
    "vgg16 IMAGENET1K_V1) and the LPIPS keys 'lin0.model.1.weight' … 'lin4.model.1.weight' (lpips "
    "package weights/v0.1/vgg.pth); make it with LPIPS.from_files(vgg_path, lin_path).save(path)"
)


def _vgg16_features() -> nn.Sequential:
    """``torchvision.models.vgg16().features`` with the same module indices (0 … 30)."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU()]
            c_in = v
    return nn.Sequential(*layers)


def _load_state_dict(path: str | Path, what: str) -> dict[str, Tensor]:
    """A state dict from ``path``: safetensors for ``*.safetensors``, else ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weights not found: {path} (it should hold {what})")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(f"{path} is a safetensors file but the 'safetensors' package is not installed") from exc
        return load_file(str(path), device="cpu")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__}); it should hold {what}")
    return sd


class _NetLinLayer(nn.Module):
    """lpips' NetLinLayer: ``model = Sequential(Dropout, Conv2d(C, 1, 1, bias=False))``. The dropout
    is a no-op in eval, so an Identity stands in and keeps the key ``model.1.weight``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """Learned Perceptual Image Patch Similarity, VGG variant (Zhang et al. 2018, "The Unreasonable
    Effectiveness of Deep Features as a Perceptual Metric"; the ``lpips`` package, v0.1).

    For images x, y (N, 3, H, W) in [-1, 1]: s(x) = (x − shift) / scale (lpips' ScalingLayer),
    f_l the VGG16 activations at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (C_l channels),
    f̂_l = f_l / (‖f_l‖₂ over channels + 1e-10), and

        d(x, y) = Σ_l mean_{h,w} Σ_c w_{l,c} · (f̂_l(x) − f̂_l(y))²_{c,h,w},

    with w_l the 1×1 "lin" convolutions (lpips keys ``linL.model.1.weight``, shape (1, C_l, 1, 1)).

    Weights (nothing is downloaded): the trunk is torchvision's ``vgg16(weights="IMAGENET1K_V1")``
    ``features.*`` (this module's ``features`` has the same indices), the lin layers the lpips
    package's ``lpips/weights/v0.1/vgg.pth``. Load them with ``LPIPS.from_files(vgg, lin)`` or one
    merged file with ``LPIPS.from_file(path)`` / ``LPIPS(weights=path)``; ``save(path)`` writes the
    merged file. Without weights the module is randomly initialised (tests only).

    The module is frozen (parameters have ``requires_grad=False``) and always in eval mode, even
    under a parent's ``.train()``; gradients still flow to the inputs.
    """

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        self.features = _vgg16_features()
        for i, c in enumerate(_TAP_CHANNELS):
            self.add_module(f"lin{i}", _NetLinLayer(c))
        if weights is not None:
            self.load_weights(_load_state_dict(weights, _SINGLE_FILE_HINT), source=str(weights))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # a frozen metric: stays in eval whatever the parent does

    # -- loading --------------------------------------------------------------------------------

    def load_weights(self, state_dict: dict[str, Tensor], source: str = "state dict") -> None:
        """Copy the ``features.*`` and ``lin*`` keys of ``state_dict`` (other keys, e.g. torchvision's
        ``classifier.*``, are ignored); a missing or misshapen key raises naming ``source``."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        if missing:
            raise KeyError(f"LPIPS: {source} lacks {len(missing)} keys, e.g. {missing[:4]}; expected {_SINGLE_FILE_HINT}")
        bad = [k for k in own if tuple(state_dict[k].shape) != tuple(own[k].shape)]
        if bad:
            raise ValueError(f"LPIPS: {source} has wrong shapes for {bad[:4]} "
                             f"(e.g. {tuple(state_dict[bad[0]].shape)} vs expected {tuple(own[bad[0]].shape)})")
        self.load_state_dict({k: state_dict[k] for k in own}, strict=True)

    @classmethod
    def from_file(cls, path: str | Path) -> "LPIPS":
        """One file holding both the VGG trunk keys and the lin keys (``.safetensors`` or torch)."""
        return cls(weights=path)

    @classmethod
    def from_files(cls, vgg_path: str | Path, lin_path: str | Path) -> "LPIPS":
        """A torchvision vgg16 state dict (``features.N.*``, ``classifier.*``) + lpips' ``vgg.pth``."""
        vgg = _load_state_dict(vgg_path, "a torchvision vgg16 state dict (IMAGENET1K_V1) with keys 'features.N.weight/bias'")
        lin = _load_state_dict(lin_path, "the lpips package's weights/v0.1/vgg.pth with keys "
                                         "'lin0.model.1.weight' … 'lin4.model.1.weight'")
        model = cls()
        model.load_weights({**{k: v for k, v in vgg.items() if k.startswith("features.")}, **lin},
                           source=f"{vgg_path} + {lin_path}")
        return model

    def save(self, path: str | Path) -> None:
        """Write the merged single-file state dict (safetensors for ``*.safetensors``, else torch)."""
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(sd, str(path))
        else:
            torch.save(sd, path)

    # -- the metric -------------------------------------------------------------------------------

    def _taps(self, x: Tensor) -> list[Tensor]:
        """Unit-normalised activations at the five taps for x (N, 3, H, W) in [-1, 1]."""
        # the constants are made in x's dtype (not stored as float32 buffers) so float64 stays exact
        shift = torch.tensor(_LPIPS_SHIFT, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        scale = torch.tensor(_LPIPS_SCALE, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        h = (x - shift) / scale
        taps = []
        for i, layer in enumerate(self.features[: _TAPS[-1] + 1]):
            h = layer(h)
            if i in _TAPS:
                taps.append(h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10))
        return taps

    def distance(self, x: Tensor, y: Tensor) -> Tensor:
        """Images (N, 3, H, W) -> LPIPS distance per image (N,)."""
        if x.dim() != 4 or x.shape[1] != 3 or x.shape != y.shape:
            raise ValueError(f"LPIPS.distance: expected two (N, 3, H, W) images, got {tuple(x.shape)} and {tuple(y.shape)}")
        n = x.shape[0]
        f = self._taps(torch.cat([x, y]))  # one trunk pass over both: (2N, C_l, H_l, W_l)
        d = x.new_zeros(n)
        for i, fl in enumerate(f):
            diff = (fl[:n] - fl[n:]).square()
            d = d + getattr(self, f"lin{i}").model(diff).mean(dim=(1, 2, 3))
        return d

    def forward(self, x: Tensor, y: Tensor, frames: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """LPIPS per image or per frame.

        Images (N, 3, H, W) -> (N,). Videos (B, 3, T, H, W) -> (B, T_s): each frame compared as an
        image (T folded into the batch); with ``frames=k < T`` only k frames, drawn uniformly
        without replacement (the same indices for the whole batch, sorted; ``generator`` is a CPU
        generator), to bound the cost. Take ``.mean()`` for a loss.
        """
        if x.dim() == 4:
            return self.distance(x, y)
        if x.dim() != 5 or x.shape != y.shape:
            raise ValueError(f"LPIPS: expected (N, 3, H, W) or (B, 3, T, H, W) pairs, got {tuple(x.shape)} and {tuple(y.shape)}")
        b, c, t, h, w = x.shape
        if frames is not None and frames < t:
            if frames < 1:
                raise ValueError(f"LPIPS: frames must be >= 1, got {frames}")
            idx = torch.randperm(t, generator=generator)[:frames].sort().values.to(x.device)
            x, y, t = x.index_select(2, idx), y.index_select(2, idx), frames  # (B, C, T_s, H, W)
        fold = lambda v: v.transpose(1, 2).reshape(b * t, c, h, w)  # (B, C, T, H, W) -> (B·T, C, H, W)
        return self.distance(fold(x), fold(y)).view(b, t)


# -- adversarial ----------------------------------------------------------------------------------

class PatchDiscriminator3D(nn.Module):
    """3D PatchGAN: video (B, C, T, H, W) -> logits (B, 1, T', H', W'), one per space-time patch.

    The pix2pix / taming ``NLayerDiscriminator`` lifted to Conv3d, as in the video-VAE
    discriminators of MAGVIT (Yu et al. 2023) and Open-Sora (``NLayerDiscriminator3D``):
    ``layers`` stride-2 convolutions (widths ``width·min(2^n, 8)``), one stride-1 convolution and a
    stride-1 convolution to one channel, LeakyReLU(0.2) between, GroupNorm (or none, ``norm="none"``)
    after every convolution but the first and last — no BatchNorm, so DDP/FSDP need no syncing.

    Kernels are 4 in space (stride 2 halves H, W; stride 1 takes 1 off each), and 3 in time with
    padding 1 (stride 2 maps T to ⌈T/2⌉, stride 1 keeps T), so any T ≥ 1 works. Only the first
    ``temporal_downsample`` strided layers stride in time (default: all). Initialisation N(0, 0.02)
    for convolutions and N(1, 0.02) for norm scales, as in pix2pix / taming.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3,
                 norm: str = "group", temporal_downsample: int | None = None) -> None:
        super().__init__()
        if norm not in ("group", "none"):
            raise ValueError(f"PatchDiscriminator3D: norm must be 'group' or 'none', got {norm!r}")
        t_down = layers if temporal_downsample is None else temporal_downsample

        def block(c_in: int, c_out: int, stride_t: int, stride_s: int, normed: bool) -> list[nn.Module]:
            conv = nn.Conv3d(c_in, c_out, kernel_size=(3, 4, 4), stride=(stride_t, stride_s, stride_s),
                             padding=1, bias=not normed)
            mods: list[nn.Module] = [conv]
            if normed:
                mods.append(nn.GroupNorm(math.gcd(32, c_out), c_out))
            return mods + [nn.LeakyReLU(0.2)]

        use_norm = norm == "group"
        mods = block(in_channels, width, 2 if t_down > 0 else 1, 2, normed=False)
        c = width
        for n in range(1, layers):
            c_out = width * min(2 ** n, 8)
            mods += block(c, c_out, 2 if n < t_down else 1, 2, normed=use_norm)
            c = c_out
        c_out = width * min(2 ** layers, 8)
        mods += block(c, c_out, 1, 1, normed=use_norm)
        mods.append(nn.Conv3d(c_out, 1, kernel_size=(3, 4, 4), stride=1, padding=1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, video: Tensor) -> Tensor:
        """video (B, C, T, H, W) -> logits (B, 1, T', H', W')."""
        return self.net(video)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss (Lim & Ye 2017; taming): ½·(mean relu(1 − D(x)) + mean relu(1 + D(x̂)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator loss of the hinge GAN: −mean D(x̂)."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer_weight: Tensor,
                    max_weight: float = 1e4) -> Tensor:
    """VQGAN's adaptive GAN weight (Esser et al. 2021, "Taming Transformers", eq. 7):

        λ = ‖∇_{W_L} L_rec‖₂ / (‖∇_{W_L} L_G‖₂ + 1e-4),  clamped to [0, max_weight], detached,

    W_L the decoder's last layer weight. Both gradients use ``retain_graph=True`` so the caller
    can still backpropagate the total loss. Returns a 0-dim tensor; 0 when autograd is off
    (validation under ``torch.no_grad``), as taming-transformers does. Multiply by the
    discriminator weight outside.
    """
    if not torch.is_grad_enabled() or not (rec_loss.requires_grad and g_loss.requires_grad):
        return torch.zeros((), dtype=rec_loss.dtype, device=rec_loss.device)
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)
    lam = torch.linalg.vector_norm(rec_grad) / (torch.linalg.vector_norm(g_grad) + 1e-4)
    return lam.clamp(0.0, max_weight).detach()
