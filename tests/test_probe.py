"""The Shapes probe (eval/probe.py): caption parsing, accuracy on held-out real clips (in memory and
through the real H.264 path), chance on noise, fvd_probe sanity, save/load."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from datamodules.shapes import ShapesDataModule, caption, sample_attributes
from eval.probe import (ATTRIBUTES, caption_labels, fvd_probe, load_probe, parse_caption,
                        probe_features, probe_scores, render_set, save_probe)

STEPS = 1000  # measured: ~100 s on 2 CPU threads; shape reaches >= 95 % from here (300 steps: ~42 %)
HELD_OUT = 256


@pytest.fixture(scope="module")
def probe(probe_cache):
    """The session's probe (conftest: train_probe(steps=1000, seed 0) at 8x32x32, cached)."""
    from conftest import PROBE_ARGS
    from eval.probe import cached_probe

    assert PROBE_ARGS["steps"] == STEPS
    return cached_probe(probe_cache, **PROBE_ARGS)


@pytest.fixture(scope="module")
def held_out():
    return render_set(HELD_OUT, seed=1)  # another seed than training (seed 0)


def test_caption_round_trip():
    for i in range(500):
        attrs = sample_attributes(np.random.default_rng([7, i]), two_object_prob=0.5)
        parsed = parse_caption(caption(attrs))
        assert parsed == {"objects": [{k: o[k] for k in ("color", "shape", "motion")}
                                      for o in attrs["objects"]],
                          "background": attrs["background"]}
    with pytest.raises(ValueError):
        parse_caption("a purple blob moving sideways on a black background")
    with pytest.raises(ValueError):  # the probe scores single-object prompts only
        caption_labels("a red circle moving left and a blue star standing still on a black background")


def test_held_out_accuracy(probe, held_out):
    scores = probe_scores(probe, *held_out)
    print(scores)
    for a in ("color", "shape", "motion", "background"):
        assert scores[f"probe_acc_{a}"] >= 0.95, scores


def test_noise_scores_chance(probe, held_out):
    """A probe that cannot see the prompt scores at most max_k P(label = k) in expectation
    (Σ_k P(pred = k) P(label = k) ≤ max_k P(label = k)); the label priors come from
    `sample_attributes`. Tolerance: 3 binomial standard deviations for N noise videos."""
    n = HELD_OUT
    gen = torch.Generator().manual_seed(3)
    noise = torch.rand(held_out[0].shape, generator=gen) * 2 - 1
    scores = probe_scores(probe, noise, held_out[1])
    labels = [caption_labels(caption(sample_attributes(np.random.default_rng([9, i]), 0.0)))
              for i in range(4000)]
    for a in ATTRIBUTES:
        p = max(Counter(r[a] for r in labels).values()) / len(labels)
        assert scores[f"probe_acc_{a}"] <= p + 3 * math.sqrt(p * (1 - p) / n), (a, scores)
    assert scores["probe_acc_joint"] <= 0.05, scores


def test_fvd_probe(probe, held_out):
    video, _ = held_out
    real_a, real_b = probe_features(probe, video[:128]), probe_features(probe, video[128:])
    assert real_a.shape == (128, 64)
    assert abs(fvd_probe(real_a, real_a)) < 1e-6 * max(1.0, float(real_a.var(0).sum()))
    noise = probe_features(probe, torch.rand(video[:128].shape, generator=torch.Generator().manual_seed(4)) * 2 - 1)
    d_real, d_noise = fvd_probe(real_a, real_b), fvd_probe(real_a, noise)
    print(f"fvd_probe real/real {d_real:.3f}, real/noise {d_noise:.3f}")
    assert d_noise > 10 * d_real


def test_save_load(probe, held_out, tmp_path, monkeypatch):
    path = tmp_path / "probe.pt"
    save_probe(probe, path)
    seen = {}
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = load_probe(path)
    assert seen.get("weights_only") is True
    video = held_out[0][:16]
    with torch.no_grad():
        a, b = probe(video), loaded(video)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(probe_features(probe, video), probe_features(loaded, video))


def test_real_mp4_path(probe, tmp_path):
    """Clips that went through H.264 (crf 18, yuv420p) and decord are read as well."""
    dm = ShapesDataModule(root=str(tmp_path), num_videos=48, seed=5)
    dm.setup("fit")
    items = [dm.dataset[i] for i in range(len(dm.dataset))]
    video = torch.stack([it["video"] for it in items])  # (N, 3, T, H, W)
    scores = probe_scores(probe, video, [it["caption"] for it in items])
    print("mp4", scores)
    for a in ("color", "shape", "motion", "background"):
        assert scores[f"probe_acc_{a}"] >= 0.9, scores
