"""datamodules/latent_cache.py: `vidlab cache-latents` writes what the encoders give, `vidlab fit` trains
from it as from the videos, and a missing, partial or stale cache is refused with the rebuild command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from mlflow.tracking import MlflowClient

from datamodules.latent_cache import LatentCacheDataModule, LatentCacheError, build_cache, fingerprint
from datamodules.video import VideoDataModule
from experiments.build import build_datamodule, build_parts, build_system, instantiate
from experiments.cache import run_cache
from experiments.cli import main
from experiments.config import compose
from experiments.fit import run_fit
from experiments.tracking import tracking_uri
from modules.system import GeneratorSystem, GuidanceConfig
from conftest import output_dir_at

# identity VAE with patch 2, so a latent (12, 4, 8, 8) is not the clip (3, 4, 16, 16) itself
OVERRIDES = ["vae.patch=2", "callbacks.samples=null"]
REBUILD = "vidlab cache-latents EXPERIMENT [overrides]"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("latent_cache") / "outputs"
    with output_dir_at(out):
        yield out


@pytest.fixture(scope="module")
def cache(out):
    composed = compose("smoke_cached", OVERRIDES)
    return composed, run_cache(composed, progress=False)


def _parts_and_source(composed):
    """The parts `vidlab fit` builds (same seed) and the source datamodule, set up."""
    L.seed_everything(composed.cfg["seed"], verbose=False)
    parts = build_parts(composed)
    source = instantiate(composed.cfg["data"]["source"], "test [data.source]")
    source.setup("fit")
    return parts, source


def test_cached_latents_and_text_are_the_encoders_outputs(cache):
    composed, result = cache
    assert result.built and result.count == 32
    assert result.folder == Path(composed.cfg["output_dir"]) / "latents" / result.fingerprint[:16]
    parts, source = _parts_and_source(composed)
    shards = [torch.load(f, weights_only=True) for f in sorted(result.folder.glob("shard-*.pt"))]
    latent = torch.cat([s["latent"] for s in shards])
    videos = torch.stack([source.dataset[(i, 0)]["video"] for i in range(len(source.dataset))])
    assert latent.shape == (32, 12, 4, 8, 8)
    assert torch.equal(latent, parts.vae.encode(videos))
    captions = [c for s in shards for c in s["caption"]]
    assert captions == source.dataset.captions
    with torch.no_grad():
        text, null = parts.text(captions), parts.text([""])
    torch.testing.assert_close(torch.cat([s["text"] for s in shards]), text.tokens, rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.cat([s["text_mask"] for s in shards]), text.mask)
    cached_null = torch.load(result.folder / "null_text.pt", weights_only=True)
    torch.testing.assert_close(cached_null["text"], null.tokens[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(cached_null["text_mask"], null.mask[0])
    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert manifest["fingerprint"] == result.fingerprint and manifest["count"] == 32
    assert manifest["latent_shape"] == [12, 4, 8, 8] and manifest["text_shape"] == [24, 128]
    assert manifest["dtype"] == "torch.float32" and manifest["fixed_draws"] == []
    assert manifest["config"]["vae"]["patch"] == 2


def test_rerunning_cache_latents_is_a_noop(cache, capsys):
    _, result = cache
    mtimes = {p.name: p.stat().st_mtime_ns for p in result.folder.iterdir()}
    assert main(["cache-latents", "smoke_cached", *OVERRIDES]) == 0
    printed = capsys.readouterr().out.replace("\n", "")
    assert "nothing to do" in printed and result.fingerprint in printed and str(result.folder) in printed
    assert {p.name: p.stat().st_mtime_ns for p in result.folder.iterdir()} == mtimes


def test_training_from_the_cache_gives_the_losses_of_training_from_videos(cache):
    composed, _ = cache
    steps = ["trainer.max_steps=4", "trainer.log_every_n_steps=1"]
    losses = []
    for experiment in ("smoke", "smoke_cached"):
        composed = compose(experiment, OVERRIDES + steps)
        result = run_fit(composed)
        history = MlflowClient(tracking_uri(composed.cfg)).get_metric_history(result.run_id, "train/loss")
        losses.append([m.value for m in sorted(history, key=lambda m: m.step)])
    assert len(losses[0]) == 4
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_cached_text_and_caption_dropout_match_live_encoding(cache, tmp_path):
    """A frozen text encoder is read from the cache; a dropped caption gets the cached null encoding
    from the same RNG draw as `drop_captions`, so conditioning and loss match the uncached path."""
    composed, _ = cache
    parts, source = _parts_and_source(composed)
    parts.text.requires_grad_(False)
    build_cache(parts.vae, parts.text, source, root=tmp_path, progress=False)
    system = GeneratorSystem(parts.backbone, parts.vae, parts.text, parts.objective, parts.sampler,
                             guidance=GuidanceConfig(cond_dropout=0.5))
    data = LatentCacheDataModule(source, root=str(tmp_path), batch_size=4, vae=parts.vae, text_encoder=parts.text)
    data.setup("fit")
    cached = next(iter(data.train_dataloader()))
    videos = next(iter(source.train_dataloader()))
    assert cached["caption"] == videos["caption"]
    assert cached["latent"].shape == (4, 12, 4, 8, 8) and cached["text"].shape == (4, 24, 128)
    assert cached["text_mask"].shape == (4, 24) and cached["null_text"].shape == (24, 128)
    dropped = 0
    for seed in range(4):
        torch.manual_seed(seed)
        dropped += int((~system.keep_captions(4)).sum())
        torch.manual_seed(seed)
        live = system.encode_text(system.drop_captions(videos["caption"]))
        torch.manual_seed(seed)
        from_cache = system.cached_text(cached)
        torch.testing.assert_close(from_cache.tokens, live.tokens, rtol=1e-4, atol=1e-5)
        assert torch.equal(from_cache.mask, live.mask)
        torch.manual_seed(seed)
        loss_live = system.training_step(videos, 0)
        torch.manual_seed(seed)
        torch.testing.assert_close(system.training_step(cached, 0), loss_live, rtol=1e-4, atol=1e-5)
    assert dropped > 0


def test_changed_weights_data_file_or_clip_settings_change_the_fingerprint(cache, tmp_path):
    composed, result = cache
    parts, source = _parts_and_source(composed)
    assert fingerprint(parts.vae, parts.text, source).digest == result.fingerprint
    parts.vae.register_buffer("w", torch.zeros(2))  # an autoencoder weight
    before = fingerprint(parts.vae, parts.text, source)
    parts.vae.w[0] = 1.0
    assert fingerprint(parts.vae, parts.text, source).parts["vae"] != before.parts["vae"]
    parts.text.requires_grad_(False)  # a frozen text encoder's weights count
    before = fingerprint(parts.vae, parts.text, source)
    with torch.no_grad():
        parts.text.embed.weight[0, 0] += 1.0
    assert fingerprint(parts.vae, parts.text, source).parts["text"] != before.parts["text"]

    folder = tmp_path / "videos"
    shutil.copytree(source.dataset.root, folder)
    digest = lambda **kw: fingerprint(parts.vae, parts.text, VideoDataModule(str(folder), size=None, **kw)).parts
    base = digest(num_frames=4)
    assert digest(num_frames=3)["clip"] != base["clip"]
    shutil.copyfile(folder / "00001.mp4", folder / "00000.mp4")  # another valid video, same name
    assert digest(num_frames=4)["data"] != base["data"]


@pytest.mark.parametrize("override,differs", [("data.source.num_frames=3", "clip settings"),
                                              ("vae.patch=1", "autoencoder")])
def test_datamodule_refuses_a_stale_cache_with_the_rebuild_command(cache, override, differs):
    _, result = cache
    for extra in ([], [f"data.path={result.folder}"]):  # the folder of this fingerprint, or a given one
        composed = compose("smoke_cached", OVERRIDES + [override, *extra])
        system = build_system(composed)
        data = build_datamodule(composed, vae=system.vae, text_encoder=system.text_model)
        with pytest.raises(LatentCacheError, match="stale") as info:
            data.setup("fit")
        message = str(info.value)
        assert REBUILD in message and differs in message and str(info.value.folder) in message


def test_partial_or_missing_cache_is_refused_and_rebuilt(cache, tmp_path):
    composed, result = cache
    parts, source = _parts_and_source(composed)
    copy = tmp_path / "cache"

    def setup() -> LatentCacheDataModule:
        data = LatentCacheDataModule(source, path=str(copy), batch_size=4, vae=parts.vae, text_encoder=parts.text)
        data.setup("fit")
        return data

    with pytest.raises(LatentCacheError, match="missing") as info:
        setup()
    assert REBUILD in str(info.value) and str(copy) in str(info.value)
    shutil.copytree(result.folder, copy)
    assert len(setup().dataset) == 32
    shard = copy / "shard-00000.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(LatentCacheError, match="partial.*truncated"):
        setup()
    shard.unlink()
    with pytest.raises(LatentCacheError, match="partial.*shard-00000.pt is missing"):
        setup()
    (copy / "manifest.json").unlink()
    with pytest.raises(LatentCacheError, match="partial.*manifest") as info:
        setup()
    assert REBUILD in str(info.value)
    rebuilt = build_cache(parts.vae, parts.text, source, root="unused", path=copy, progress=False)
    assert rebuilt.built and rebuilt.fingerprint == result.fingerprint
    assert len(setup().dataset) == 32


def test_fit_refuses_a_missing_cache_with_the_rebuild_command(cache, capsys):
    assert main(["fit", "smoke_cached", "vae.patch=1", "callbacks.samples=null"]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "stale latent cache" in err and REBUILD in err
