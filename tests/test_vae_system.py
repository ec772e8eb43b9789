"""Autoencoder training (task: autoencoder) end to end and its parts against independent references:
PSNR against its formula, latent statistics against a float64 recomputation, the latent statistics in
the exported checkpoint against the encoder's own outputs, the GAN path, and a generator trained on
the exported autoencoder's latents, every loss term (LPIPS from a file the test writes, outlier
penalty, 3D PatchGAN) in one short run."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch

from callbacks.latent_stats import channel_stats
from callbacks.reconstructions import reconstruction_metrics
from datamodules.shapes import ShapesDataModule
from experiments.config import ConfigError, compose
from experiments.fit import run_fit
from experiments.pretrained import pretrained_autoencoder
from modules.vaes.losses import LPIPS


def test_psnr_matches_its_formula_and_ssim_of_identical_clips_is_one():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 3, 16, 16, generator=g) * 2 - 1
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    m = reconstruction_metrics(x, y)
    mse01 = (((x + 1) / 2 - (y + 1) / 2) ** 2).double().mean()
    assert m["psnr"] == pytest.approx(10 * math.log10(1 / float(mse01)), rel=1e-5)
    assert m["l1"] == pytest.approx(float((x - y).abs().mean()), rel=1e-6)
    assert reconstruction_metrics(x, x)["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert m["ssim"] < 0.99


def test_channel_stats_match_float64_recomputation():
    g = torch.Generator().manual_seed(0)
    videos = torch.randn(7, 3, 2, 4, 4, generator=g)
    encode = lambda v: v * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1, 1) + torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1, 1)
    mean, std = channel_stats(encode, videos, batch_size=3)  # uneven batches
    z = encode(videos).double().transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(mean, z.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(std, z.std(1), rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "outputs"
    mp = pytest.MonkeyPatch()
    mp.setenv("VIDLAB_OUTPUT_DIR", str(out))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        composed = compose("vae_smoke")
        result = run_fit(composed)
    finally:
        mp.undo()
    return out, composed, result


def test_autoencoder_fit_logs_quality_and_stores_latent_stats(trained_vae):
    out, composed, result = trained_vae
    client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
    run = client.get_run(result.run_id)
    metrics = run.data.metrics
    for key in ("train/loss", "train/rec", "train/kl", "val/psnr", "val/ssim", "val/l1", "latent/std_c0"):
        assert key in metrics, key
    assert 0 < metrics["val/psnr"] < 100 and -1 <= metrics["val/ssim"] <= 1
    arts = [a.path for a in client.list_artifacts(result.run_id, "reconstructions")]
    videos = [f.path for d in arts for f in client.list_artifacts(result.run_id, d)]
    assert len(videos) == 2 and all(v.endswith(".mp4") for v in videos)
    assert run.data.tags["vidlab.autoencoder"].endswith("autoencoders/vae_smoke/last.ckpt")

    # the exported checkpoint's statistics are those of its own encoder on the first training clips
    vae = pretrained_autoencoder(run.data.tags["vidlab.autoencoder"])
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    data_cfg = {k: v for k, v in composed.cfg["data"].items() if k != "_target_"}
    data = ShapesDataModule(**data_cfg)
    data.prepare_data()
    data.setup("fit")
    clips = torch.stack([data.train_dataset[i]["video"] for i in range(16)])
    with torch.no_grad():
        raw = vae.posterior(clips).mode().double().transpose(0, 1).reshape(vae.latent_channels, -1)
        z = vae.encode(clips).double().transpose(0, 1).reshape(vae.latent_channels, -1)
    torch.testing.assert_close(vae.latent_mean.double(), raw.mean(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vae.latent_std.double(), raw.std(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z.mean(1), torch.zeros_like(z[:, 0]), rtol=0, atol=1e-4)
    torch.testing.assert_close(z.std(1), torch.ones_like(z[:, 0]), rtol=0, atol=1e-4)


def test_generator_trains_on_the_exported_autoencoder(trained_vae, out_dir):
    _, _, result = trained_vae
    client = mlflow.MlflowClient(f"sqlite:///{trained_vae[0]}/mlflow.db")
    ckpt = client.get_run(result.run_id).data.tags["vidlab.autoencoder"]
    composed = compose("smoke", ["vae=pretrained", f"vae.checkpoint={ckpt}", "data.num_frames=5",
                                 "backbone.patch=[1,1,1]", "trainer.max_steps=3", "callbacks.samples.every_n_steps=0"])
    fit = run_fit(composed)
    assert fit.final_loss is not None and math.isfinite(fit.final_loss)
    assert len(fit.samples) == 1  # decoded through the autoencoder at the end


def test_every_loss_term_with_a_tae_counts_generator_steps(out_dir, tmp_path):
    lpips = tmp_path / "lpips.pt"
    LPIPS().save(lpips)  # random weights in the one-file layout (real ones: modules/vaes/losses.py)
    composed = compose("vae_smoke", [
        "vae=tae_tiny", "trainer.max_steps=3", "autoencoder.disc_weight=0.5", "autoencoder.disc_start=1",
        "autoencoder.disc_channels=8", "autoencoder.disc_layers=2", "autoencoder.perceptual_weight=0.1",
        f"autoencoder.perceptual_path={lpips}", "autoencoder.outlier_weight=0.01"])
    result = run_fit(composed)  # 5-frame clips: the TAE pads to 8 frames, the loss sees 5
    client = mlflow.MlflowClient(f"sqlite:///{out_dir}/mlflow.db")
    for term in ("train/rec", "train/kl", "train/perceptual", "train/outlier"):
        assert len(client.get_metric_history(result.run_id, term)) >= 1, term
    history = client.get_metric_history(result.run_id, "train/d")
    assert history, "the discriminator loss is logged once the GAN starts"
    assert client.get_metric_history(result.run_id, "train/disc_weight"), "the adaptive weight is logged"
    # each optimiser's lr under its own key (lr_monitor; constant schedule: the configured lr)
    for key in ("train/lr", "train/lr_disc"):
        assert [m.value for m in client.get_metric_history(result.run_id, key)] == pytest.approx([1e-3]), key
    ckpt = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3  # discriminator steps do not advance trainer.max_steps
    assert any(k.startswith("discriminator.") for k in ckpt["state_dict"])


def test_config_errors_name_the_key(out_dir):
    with pytest.raises(ConfigError, match="autoencoder"):
        from experiments.build import build_system
        build_system(compose("vae_smoke", ["autoencoder.recon=l3"]))
    with pytest.raises(ConfigError, match="did you mean 'autoencoder'"):
        from experiments.build import build_system
        build_system(compose("vae_smoke", ["task=autoencodr"]))
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        pretrained_autoencoder(str(out_dir / "nope.ckpt"))


def test_bf16_autocast_training_keeps_fp32_weights(out_dir):
    """`vae_causal3d` trains in `bf16-mixed`: manual optimisation (with the GAN's adaptive weight)
    runs under autocast, the weights and the checkpoint stay fp32 and every loss is finite."""
    composed = compose("vae_smoke", ["trainer.precision=bf16-mixed", "trainer.max_steps=3",
                                     "autoencoder.disc_weight=0.5", "autoencoder.disc_start=1",
                                     "autoencoder.disc_channels=8", "autoencoder.disc_layers=2"])
    result = run_fit(composed)
    client = mlflow.MlflowClient(f"sqlite:///{out_dir}/mlflow.db")
    for term in ("train/rec", "train/kl", "train/d", "val/psnr"):
        history = client.get_metric_history(result.run_id, term)
        assert history and all(math.isfinite(m.value) for m in history), term
    ckpt = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    assert {v.dtype for v in ckpt["state_dict"].values() if v.is_floating_point()} == {torch.float32}
