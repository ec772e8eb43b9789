"""The diffusers adapters against diffusers itself: tiny randomly initialised AutoencoderKLWan,
AutoencoderKLHunyuanVideo and AutoencoderDC are saved with ``save_pretrained`` and loaded back
through `modules.vaes.diffusers_vae`; the normalisation each applies is recomputed here from the
formula of its family, independently of the adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderDC, AutoencoderKLHunyuanVideo, AutoencoderKLWan

from experiments.build import instantiate
from experiments.config import ConfigError, REPO_CONFIGS, load_yaml
from modules.vaes.base import VideoAutoencoder
from modules.vaes.diffusers_vae import DCAEVAE, HunyuanVideoVAE, WanVAE, load_diffusers_vae
from tests.contracts.vae_contract import check_vae

WAN_MEAN, WAN_STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
HUNYUAN_SCALE, DC_SCALE = 0.476986, 0.41


def tiny_wan() -> AutoencoderKLWan:
    """The released layout (4, 8, 8) at width 8 with 4 latent channels."""
    return AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=WAN_MEAN, latents_std=WAN_STD,
    )


def tiny_hunyuan() -> AutoencoderKLHunyuanVideo:
    """Three blocks: compression (4, 4, 4)."""
    return AutoencoderKLHunyuanVideo(
        latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 3, up_block_types=("HunyuanVideoUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4,
        spatial_compression_ratio=4, temporal_compression_ratio=4, scaling_factor=HUNYUAN_SCALE,
    )


def tiny_dc() -> AutoencoderDC:
    """Three ResBlock stages: compression (1, 4, 4)."""
    return AutoencoderDC(
        latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock", decoder_block_types="ResBlock",
        encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), ()), decoder_qkv_multiscales=((), (), ()), scaling_factor=DC_SCALE,
    )


def wan_reference(model, x):
    z = model.encode(x).latent_dist.mode()
    mean, std = torch.tensor(WAN_MEAN).view(1, -1, 1, 1, 1), torch.tensor(WAN_STD).view(1, -1, 1, 1, 1)
    return (z - mean) / std


def wan_decode(model, z):
    mean, std = torch.tensor(WAN_MEAN).view(1, -1, 1, 1, 1), torch.tensor(WAN_STD).view(1, -1, 1, 1, 1)
    return model.decode(z * std + mean).sample


def frames(fn, x):
    """Apply an image function to each frame of (B, C, T, H, W)."""
    b, t = x.shape[0], x.shape[2]
    out = fn(x.transpose(1, 2).flatten(0, 1))  # (B·T, C', H', W')
    return out.unflatten(0, (b, t)).transpose(1, 2)


# kind: (diffusers model, adapter, clip (B, 3, T, H, W), expected latent shape (C, T', H', W'),
#        reference normalised encode, reference decode of normalised latents)
KINDS = {
    "wan": (tiny_wan, WanVAE, (2, 3, 5, 16, 24), (4, 2, 2, 3), wan_reference, wan_decode),
    "hunyuan": (
        tiny_hunyuan, HunyuanVideoVAE, (2, 3, 5, 8, 12), (4, 2, 2, 3),
        lambda m, x: m.encode(x).latent_dist.mode() * HUNYUAN_SCALE,
        lambda m, z: m.decode(z / HUNYUAN_SCALE).sample,
    ),
    "dc": (
        tiny_dc, DCAEVAE, (2, 3, 3, 8, 12), (4, 3, 2, 3),
        lambda m, x: frames(lambda f: m.encode(f).latent, x) * DC_SCALE,
        lambda m, z: frames(lambda f: m.decode(f).sample, z / DC_SCALE),
    ),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Each tiny model (eval) and the folder it was saved to."""
    out = {}
    for kind, (make, *_rest) in KINDS.items():
        torch.manual_seed(0)
        model = make().eval()
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        out[kind] = (model, folder)
    return out


def clip(shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_match_diffusers(kind, saved):
    _, adapter, shape, latent, reference_encode, reference_decode = KINDS[kind]
    model, folder = saved[kind]
    vae = adapter(str(folder))
    x = clip(shape)
    with torch.no_grad():
        z = vae.encode(x)
        torch.testing.assert_close(z, reference_encode(model, x), rtol=0, atol=1e-5)
        assert z.shape == (shape[0], *latent) == (shape[0], *vae.latent_shape(*shape[2:]))
        zn = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(vae.decode(zn), reference_decode(model, zn), rtol=0, atol=1e-5)
        assert vae.decode(z).shape == x.shape
    assert isinstance(vae, VideoAutoencoder) and vae.latent_channels == latent[0]


@pytest.mark.parametrize("kind", KINDS)
def test_vae_contract(kind, saved):
    """The contract suite on the loaded adapters (the presets need a path, so the preset suite skips them)."""
    adapter, folder = KINDS[kind][1], str(saved[kind][1])
    skipped = check_vae(lambda: adapter(folder))
    assert len(skipped) == 1 and "no trainable parameters" in skipped[0]


def test_compression_and_causality(saved):
    assert WanVAE(str(saved["wan"][1])).compression == (4, 8, 8)
    assert HunyuanVideoVAE(str(saved["hunyuan"][1])).compression == (4, 4, 4)
    assert DCAEVAE(str(saved["dc"][1])).compression == (1, 4, 4)
    assert WanVAE.causal and HunyuanVideoVAE.causal and not DCAEVAE.causal
    with pytest.raises(ValueError, match="1 \\+ k·4 frames"):
        WanVAE(str(saved["wan"][1])).latent_shape(4, 16, 16)


def test_released_defaults():
    """The diffusers defaults are the released models' layouts: Wan 2.1 (4, 8, 8) with 16 channels,
    HunyuanVideo (4, 8, 8) scaled by 0.476986, DC-AE f32."""
    assert WanVAE.geometry({}) == (16, (4, 8, 8))
    assert HunyuanVideoVAE.geometry({}) == (16, (4, 8, 8))
    assert DCAEVAE.geometry({}) == (32, (1, 32, 32))
    mean, std = HunyuanVideoVAE.config_stats({"scaling_factor": 0.476986})
    assert torch.equal(mean, torch.zeros(16)) and torch.allclose(1 / std, torch.full((16,), 0.476986))


def test_frozen_and_outside_the_state_dict(saved):
    vae = WanVAE(str(saved["wan"][1]))
    model = vae.diffusers_model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    vae.train()
    assert not model.training, "train() must not reach the frozen diffusers model"
    assert list(vae.parameters()) == []
    assert set(vae.state_dict()) == {"latent_mean", "latent_std"}
    torch.testing.assert_close(vae.latent_mean, torch.tensor(WAN_MEAN))
    torch.testing.assert_close(vae.latent_std, torch.tensor(WAN_STD))


def test_gradients_reach_the_input(saved):
    vae = HunyuanVideoVAE(str(saved["hunyuan"][1]))
    z = torch.randn(1, 4, 2, 2, 2, requires_grad=True)
    vae.decode(z).square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_sample_draws_from_the_posterior(saved):
    vae = WanVAE(str(saved["wan"][1]), sample=True)
    x = clip((1, 3, 1, 8, 8))
    with torch.no_grad():
        a, b, mode = vae.encode(x), vae.encode(x), vae.encode(x, sample=False)
    assert not torch.equal(a, b) and not torch.equal(a, mode)


def test_pipeline_folder_and_auto_detection(saved, tmp_path):
    model, _ = saved["dc"]
    model.save_pretrained(tmp_path / "vae")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline"}))
    x = clip((1, 3, 1, 8, 8))
    with torch.no_grad():
        expected = DCAEVAE(str(tmp_path), subfolder="vae").encode(x)
        for vae in (DCAEVAE(str(tmp_path)), load_diffusers_vae(str(tmp_path)), load_diffusers_vae(str(tmp_path / "vae"))):
            assert isinstance(vae, DCAEVAE)
            assert torch.equal(vae.encode(x), expected)
    assert isinstance(load_diffusers_vae(str(saved["wan"][1])), WanVAE)
    assert isinstance(load_diffusers_vae(str(saved["hunyuan"][1])), HunyuanVideoVAE)


def test_missing_folder_names_path_and_contents(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*config.json.*weights"):
        WanVAE(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_diffusers_vae(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    with pytest.raises(FileNotFoundError, match="has no weights"):
        WanVAE(str(tmp_path / "empty"))


def test_wrong_class_names_the_supported_ones(saved, tmp_path):
    with pytest.raises(ValueError, match="AutoencoderKLHunyuanVideo.*supported: AutoencoderDC, AutoencoderKLHunyuanVideo, AutoencoderKLWan"):
        WanVAE(str(saved["hunyuan"][1]))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="'AutoencoderKL'.*supported: AutoencoderDC"):
        load_diffusers_vae(str(tmp_path))


def test_bad_config_values(tmp_path):
    with pytest.raises(ValueError, match="latents_mean has 2 values.*4"):
        WanVAE.config_stats({"z_dim": 4, "latents_mean": [0.0, 0.0], "latents_std": [1.0] * 4})
    with pytest.raises(ValueError, match="scale_factor_spatial=8 disagrees"):
        WanVAE.geometry({"dim_mult": [1, 2], "scale_factor_spatial": 8})
    with pytest.raises(ValueError, match="dtype must be one of"):
        WanVAE(str(tmp_path), dtype="float64")


@pytest.mark.parametrize("name,adapter,kind", [("diffusers_wan", WanVAE, "wan"), ("diffusers_hunyuan", HunyuanVideoVAE, "hunyuan"), ("diffusers_dc", DCAEVAE, "dc")])
def test_presets(name, adapter, kind, saved):
    """Each preset needs ``vae.path``; with one set it builds the adapter."""
    path = REPO_CONFIGS / "vae" / f"{name}.yaml"
    node = load_yaml(path)
    assert node["path"] == "???"
    vae = instantiate({**node, "path": str(saved[kind][1])}, str(path))
    assert type(vae) is adapter and not vae.sample
    with pytest.raises(ConfigError, match="diffusers autoencoder folder not found"):
        instantiate({**node, "path": "/no/such/folder"}, str(path))
