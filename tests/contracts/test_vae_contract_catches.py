"""The autoencoder contract checks are not vacuous: small well-behaved autoencoders (causal and
not) pass all of them, and each deliberately broken variant fails the check meant to catch it."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from modules.vaes.base import DiagonalGaussian, LatentAutoencoder
from modules.vaes.identity import IdentityVAE

from .vae_contract import (
    check_deterministic,
    check_encode_shape,
    check_gradients,
    check_latent_shape_rejects_bad_sizes,
    check_normalisation,
    check_reconstruction_shape,
    check_state_dict_round_trip,
    check_vae,
    clip_shape,
    make_clip,
)


class ToyVAE(LatentAutoencoder):
    """One strided Conv3d to (mean, logvar), one ConvTranspose3d back; causal: the first frame is
    repeated r_t − 1 times in front, so 1 + k·r_t frames give 1 + k latent frames, and the decoder's
    first r_t − 1 frames are dropped. `defect` breaks one rule of the contract."""

    def __init__(self, latent_channels: int = 4, compression=(2, 2, 2), causal: bool = False, defect: str | None = None):
        super().__init__(latent_channels, compression)
        self.causal, self.defect = causal, defect
        self.encoder = nn.Conv3d(3, 2 * latent_channels, kernel_size=compression, stride=compression)
        self.decoder = nn.ConvTranspose3d(latent_channels, 3, kernel_size=compression, stride=compression)
        if defect == "unused":
            self.spare = nn.Linear(2, 2)
        if defect == "unsaved":
            self.register_buffer("gain", torch.rand(latent_channels) + 0.5, persistent=False)

    def posterior(self, video: Tensor) -> DiagonalGaussian:
        rt = self.compression[0]
        if self.causal:
            video = torch.cat([video[:, :, :1].expand(-1, -1, rt - 1, -1, -1), video], 2)  # (B, 3, (1+k)·r_t, H, W)
        mean, logvar = self.encoder(video).chunk(2, dim=1)  # each (B, C, T', H', W')
        if self.defect == "random":
            mean = mean + 1e-3 * torch.rand_like(mean)
        if self.defect == "unsaved":
            mean = mean * self.gain.view(1, -1, 1, 1, 1)
        return DiagonalGaussian(mean, logvar)

    def decode_raw(self, z: Tensor) -> Tensor:
        x = self.decoder(z)  # (B, 3, T'·r_t, H, W)
        if self.causal:
            x = x[:, :, self.compression[0] - 1 :]
        return x[:, :, :-1] if self.defect == "shape" else x

    def encode(self, video: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        if self.defect == "no_grad":
            with torch.no_grad():
                return super().encode(video, sample, generator)
        return super().encode(video, sample, generator)

    def decode(self, z: Tensor) -> Tensor:
        return self.decode_raw(z) if self.defect == "stats_ignored" else super().decode(z)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        if self.defect == "lenient":  # floors instead of refusing sizes off the grid
            rt, rh, rw = self.compression
            return (self.latent_channels, num_frames // rt, height // rh, width // rw)
        c, t, h, w = super().latent_shape(num_frames, height, width)
        return (c, t + 1, h, w) if self.defect == "latent_frames" else (c, t, h, w)


def build(defect: str | None = None, causal: bool = False):
    def make() -> ToyVAE:
        return ToyVAE(causal=causal, defect=defect)

    return make


CLIP = make_clip(clip_shape(ToyVAE()))


@pytest.mark.parametrize("causal", [False, True], ids=["non_causal", "causal"])
def test_a_good_autoencoder_passes_every_check(causal):
    assert check_vae(build(causal=causal)) == []
    assert clip_shape(ToyVAE(causal=causal))[2] == (3 if causal else 4)  # 1 + r_t, or 2·r_t frames


def test_skips_say_why():
    """Pixel space has no statistics and no parameters; a frozen autoencoder is not trained."""
    skipped = check_vae(lambda: IdentityVAE(patch=2))
    assert len(skipped) == 2 and "not a LatentAutoencoder" in skipped[0] and "no trainable parameters" in skipped[1]
    frozen = check_vae(lambda: ToyVAE().requires_grad_(False))
    assert len(frozen) == 1 and "no trainable parameters" in frozen[0]


@pytest.mark.parametrize(
    "defect,check,message",
    [
        ("latent_frames", lambda b: check_encode_shape(b(), CLIP), "latent_shape says"),
        ("shape", lambda b: check_reconstruction_shape(b(), CLIP), r"decode\(encode\(x\)\) gives"),
        ("random", lambda b: check_deterministic(b(), CLIP), "two eval encodes differ"),
        ("stats_ignored", lambda b: check_normalisation(b(), CLIP), "changed with the latent statistics"),
        ("unsaved", lambda b: check_state_dict_round_trip(b, CLIP), "encodes of the reloaded autoencoder differ"),
        ("unused", lambda b: check_gradients(b(), CLIP), "no gradient.*spare"),
        ("no_grad", lambda b: check_gradients(b(), CLIP), "does not require grad"),
        ("lenient", lambda b: check_latent_shape_rejects_bad_sizes(b()), "must raise ValueError"),
        ("lenient", lambda b: check_latent_shape_rejects_bad_sizes(ToyVAE(compression=(2, 1, 1), causal=True, defect="lenient")), r"latent_shape\(4, 1, 2\)"),
    ],
)
def test_each_defect_is_caught(defect, check, message):
    with pytest.raises(AssertionError, match=message):
        check(build(defect))

