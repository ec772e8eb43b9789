"""Adapters to pretrained diffusers autoencoders, loaded from a local folder (no hub access).

Each adapter is a `LatentAutoencoder`: it encodes to the raw latents of the diffusers model and
applies that model's own latent normalisation, copied from its ``config.json`` into the
``latent_mean`` / ``latent_std`` buffers, so that ``encode`` returns what the released pipelines
feed their transformers:

- ``AutoencoderKLWan`` (Wan 2.1 / 2.2): z = (z_raw − latents_mean) / latents_std, per channel.
- ``AutoencoderKLHunyuanVideo``: z = z_raw · scaling_factor (shift 0), i.e. std = 1 / scaling_factor.
- ``AutoencoderDC`` (DC-AE, an image autoencoder run on each of the B·T frames):
  z = z_raw · scaling_factor.

The two video VAEs are causal (``1 + k·r_t`` frames → ``1 + k`` latent frames, DESIGN.md).

The diffusers model is frozen (``requires_grad`` False, eval mode) and held *outside* the module
tree, like the frozen text encoder of `GeneratorSystem`: checkpoints carry only the normalisation
buffers, not a copy of the pretrained weights, ``.train()`` cannot switch it out of eval mode, and
it follows the input to its device on the first ``encode`` / ``decode`` there. Gradients still flow
through it to its input (for losses taken through the decoder).

``load_diffusers_vae(path)`` picks the adapter from the folder's ``_class_name``; the presets
``configs/vae/diffusers_*.yaml`` name the adapter class directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import diffusers
import torch
from torch import Tensor, nn

from modules.vaes.base import DiagonalGaussian, LatentAutoencoder

WEIGHTS = "diffusion_pytorch_model*.safetensors / *.bin"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_folder(path: str | Path, subfolder: str | None = None) -> Path:
    """The folder holding the autoencoder's ``config.json`` and weights.

    ``subfolder`` is joined to ``path``; without it, a pipeline folder (one with
    ``model_index.json``) means its ``vae/`` subfolder. Raises FileNotFoundError naming the folder
    and what it should contain.
    """
    root = Path(path).expanduser()
    if subfolder is None and (root / "model_index.json").is_file():
        subfolder = "vae"
    folder = root / subfolder if subfolder else root
    expected = f"config.json and diffusers weights ({WEIGHTS})"
    if not folder.is_dir():
        raise FileNotFoundError(f"diffusers autoencoder folder not found: {folder} (expected a folder with {expected})")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json (expected {expected})")
    if not any(folder.glob("diffusion_pytorch_model*")):
        raise FileNotFoundError(f"{folder} has no weights (expected {expected})")
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


class _PointMass(DiagonalGaussian):
    """A deterministic encoder's posterior: sample() is the mean (DC-AE has no variance)."""

    def __init__(self, mean: Tensor) -> None:
        super().__init__(mean, torch.full_like(mean, -30.0))

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        return self.mean


class DiffusersVAE(LatentAutoencoder):
    """Base of the adapters: folder checks, loading, freezing, device and dtype handling.

    A subclass sets ``class_name`` (the diffusers class it wraps) and ``causal``, and implements
    ``geometry`` (latent channels and compression from the config) and ``config_stats`` (per-channel
    mean and std of raw latents from the config); ``_posterior`` / ``_decode`` default to the KL
    autoencoders' ``encode(x).latent_dist`` / ``decode(z).sample``.

    Args:
        path: a local folder saved with ``save_pretrained``, or a pipeline folder (then its ``vae/``).
        subfolder: the autoencoder's subfolder of ``path`` (e.g. ``"vae"``), if any.
        sample: ``encode`` draws z ~ q(z | x) instead of taking its mode (the default for ``encode``).
        dtype: the diffusers model's dtype, ``float32``, ``bfloat16`` or ``float16``; inputs are
            cast to it and outputs back to the input's dtype.
    """

    class_name: ClassVar[str]

    def __init__(self, path: str, subfolder: str | None = None, sample: bool = False, dtype: str = "float32") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"{type(self).__name__}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        folder = resolve_folder(path, subfolder)
        config = read_config(folder)
        found = config.get("_class_name")
        if found != self.class_name:
            raise ValueError(
                f"{type(self).__name__} loads {self.class_name}, but {folder / 'config.json'} has _class_name "
                f"{found!r}; supported: {', '.join(sorted(ADAPTERS))} (load_diffusers_vae picks the adapter)"
            )
        latent_channels, compression = self.geometry(config)
        super().__init__(latent_channels, compression)
        self.set_latent_stats(*self.config_stats(config))
        model = getattr(diffusers, self.class_name).from_pretrained(
            str(folder), local_files_only=True, torch_dtype=DTYPES[dtype]
        )
        model.requires_grad_(False).eval()
        object.__setattr__(self, "_model", model)  # outside the module tree: no weights in state_dict
        self.path, self.sample, self.model_dtype = str(folder), bool(sample), DTYPES[dtype]

    # -- what a subclass implements --------------------------------------------------------------

    @classmethod
    def geometry(cls, config: dict[str, Any]) -> tuple[int, tuple[int, int, int]]:
        """(latent_channels, (r_t, r_h, r_w)) from the diffusers config."""
        raise NotImplementedError

    @classmethod
    def config_stats(cls, config: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Per-channel (mean, std), each (C,), with z_norm = (z_raw − mean) / std."""
        raise NotImplementedError

    def _posterior(self, model: nn.Module, video: Tensor) -> DiagonalGaussian:
        """The KL autoencoders: diffusers' ``encode(x).latent_dist`` (mean, clamped logvar)."""
        dist = model.encode(video).latent_dist
        return DiagonalGaussian(dist.mean, dist.logvar)

    def _decode(self, model: nn.Module, z: Tensor) -> Tensor:
        return model.decode(z).sample

    # -- shared ------------------------------------------------------------------------------------

    @property
    def diffusers_model(self) -> nn.Module:
        """The wrapped (frozen) diffusers model."""
        return self._model

    def _model_on(self, device: torch.device) -> nn.Module:
        param = next(self._model.parameters())
        if param.device != device:
            self._model.to(device)
        return self._model

    def posterior(self, video: Tensor) -> DiagonalGaussian:
        """video (B, 3, T, H, W) in [-1, 1] -> q(z | video) over raw latents (B, C, T', H', W')."""
        self.latent_shape(*video.shape[2:])  # a clear error for sizes the model cannot take
        q = self._posterior(self._model_on(video.device), video.to(self.model_dtype))
        q.mean, q.logvar = q.mean.to(video.dtype), q.logvar.to(video.dtype)
        return q

    def decode_raw(self, z: Tensor) -> Tensor:
        """Raw latents (B, C, T', H', W') -> video (B, 3, T, H, W)."""
        return self._decode(self._model_on(z.device), z.to(self.model_dtype)).to(z.dtype)

    def encode(self, video: Tensor, sample: bool | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Normalised latents (B, C, T', H', W'); ``sample=None`` uses the constructor's ``sample``."""
        return super().encode(video, self.sample if sample is None else sample, generator)

    def extra_repr(self) -> str:
        return f"{self.class_name} from {self.path}, compression={self.compression}, causal={self.causal}"


def _per_channel(values: list[float], channels: int, key: str, name: str) -> Tensor:
    if len(values) != channels:
        raise ValueError(f"{name}: config {key} has {len(values)} values, expected one per latent channel ({channels})")
    return torch.tensor(values, dtype=torch.float32)


class WanVAE(DiffusersVAE):
    """``AutoencoderKLWan`` (Wan 2.1: 16 channels, (4, 8, 8); Wan 2.2 TI2V: 48 channels, (4, 16, 16)).

    Compression: r_t = 2^(number of True in ``temperal_downsample``), r_s = 2^(len(dim_mult) − 1) ·
    patch_size; the config's ``scale_factor_temporal`` / ``scale_factor_spatial``, where given, must
    agree. Normalisation: (z − latents_mean) / latents_std.
    """

    class_name = "AutoencoderKLWan"
    causal = True

    @classmethod
    def geometry(cls, config: dict[str, Any]) -> tuple[int, tuple[int, int, int]]:
        temporal = 2 ** sum(bool(d) for d in config.get("temperal_downsample", [False, True, True]))
        spatial = 2 ** (len(config.get("dim_mult", [1, 2, 4, 4])) - 1) * int(config.get("patch_size") or 1)
        for key, derived in (("scale_factor_temporal", temporal), ("scale_factor_spatial", spatial)):
            declared = config.get(key)
            if declared is not None and int(declared) != derived:
                raise ValueError(f"{cls.__name__}: config {key}={declared} disagrees with the architecture ({derived})")
        return int(config.get("z_dim", 16)), (temporal, spatial, spatial)

    @classmethod
    def config_stats(cls, config: dict[str, Any]) -> tuple[Tensor, Tensor]:
        channels = cls.geometry(config)[0]
        if config.get("latents_mean") is None or config.get("latents_std") is None:
            raise ValueError(f"{cls.__name__}: config.json has no latents_mean / latents_std")
        mean = _per_channel(config["latents_mean"], channels, "latents_mean", cls.__name__)
        return mean, _per_channel(config["latents_std"], channels, "latents_std", cls.__name__)


class HunyuanVideoVAE(DiffusersVAE):
    """``AutoencoderKLHunyuanVideo``: compression (temporal_compression_ratio,
    spatial_compression_ratio, spatial_compression_ratio); z = z_raw · scaling_factor (0.476986)."""

    class_name = "AutoencoderKLHunyuanVideo"
    causal = True

    @classmethod
    def geometry(cls, config: dict[str, Any]) -> tuple[int, tuple[int, int, int]]:
        spatial = int(config.get("spatial_compression_ratio", 8))
        return int(config.get("latent_channels", 16)), (int(config.get("temporal_compression_ratio", 4)), spatial, spatial)

    @classmethod
    def config_stats(cls, config: dict[str, Any]) -> tuple[Tensor, Tensor]:
        return _scale_stats(cls.geometry(config)[0], config, 0.476986)


def _scale_stats(channels: int, config: dict[str, Any], default: float) -> tuple[Tensor, Tensor]:
    """mean 0, std 1 / scaling_factor: (z − 0) / std = z · scaling_factor."""
    scale = float(config.get("scaling_factor", default))
    return torch.zeros(channels), torch.full((channels,), 1.0 / scale)


class DCAEVAE(DiffusersVAE):
    """``AutoencoderDC`` (deep compression image autoencoder, Chen et al. 2024) on each frame:
    compression (1, r, r) with r = 2^(len(encoder_block_out_channels) − 1) (32 for the f32 models);
    deterministic; z = z_raw · scaling_factor."""

    class_name = "AutoencoderDC"
    causal = False

    @classmethod
    def geometry(cls, config: dict[str, Any]) -> tuple[int, tuple[int, int, int]]:
        spatial = 2 ** (len(config.get("encoder_block_out_channels", [0] * 6)) - 1)
        return int(config.get("latent_channels", 32)), (1, spatial, spatial)

    @classmethod
    def config_stats(cls, config: dict[str, Any]) -> tuple[Tensor, Tensor]:
        return _scale_stats(cls.geometry(config)[0], config, 1.0)

    def _posterior(self, model: nn.Module, video: Tensor) -> DiagonalGaussian:
        b, c, t, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * t, c, h, w)  # (B·T, 3, H, W)
        z = model.encode(frames).latent  # (B·T, C, H', W')
        return _PointMass(z.unflatten(0, (b, t)).transpose(1, 2))  # (B, C, T, H', W')

    def _decode(self, model: nn.Module, z: Tensor) -> Tensor:
        b, c, t, h, w = z.shape
        x = model.decode(z.transpose(1, 2).reshape(b * t, c, h, w)).sample  # (B·T, 3, H, W)
        return x.unflatten(0, (b, t)).transpose(1, 2)  # (B, 3, T, H, W)


ADAPTERS: dict[str, type[DiffusersVAE]] = {cls.class_name: cls for cls in (WanVAE, HunyuanVideoVAE, DCAEVAE)}


def load_diffusers_vae(path: str, subfolder: str | None = None, sample: bool = False, dtype: str = "float32") -> DiffusersVAE:
    """The adapter named by the folder's ``config.json`` ``_class_name`` (see `DiffusersVAE`)."""
    folder = resolve_folder(path, subfolder)
    found = read_config(folder).get("_class_name")
    if found not in ADAPTERS:
        raise ValueError(f"{folder / 'config.json'}: unsupported _class_name {found!r}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[found](str(folder), None, sample, dtype)
