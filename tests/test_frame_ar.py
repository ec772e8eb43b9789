"""Frame-autoregressive backbone: the block-causal mask against a loop over frames, attention against
a float64 softmax reference, causality and window of influence, per-frame times, the KV cache
against full recomputation (forward and whole rollouts, also past the training length with a
sliding window), diffusion-forcing loss, and generation through the Lightning system."""

from functools import partial

import pytest
import torch

from experiments.build import build_system
from experiments.config import compose
from modules.backbones.frame_ar import FrameAR
from modules.conditioning import Conditioning
from modules.layers.attention import TokenWindows
from modules.layers.frame_attention import FrameCausalAttention, frame_causal_mask
from modules.layers.rope import apply_rope
from modules.objectives.flow import RectifiedFlow
from modules.samplers.euler import EulerSampler
from modules.samplers.guidance import classifier_free_guidance
from modules.samplers.rollout import frame_rollout
from tests.contracts.backbone_contract import perturb_

C, TEXT_DIM = 4, 16


def model(chunk: int = 1, context: int | None = None, depth: int = 2, **kw) -> FrameAR:
    torch.manual_seed(0)
    args = dict(dim=32, depth=depth, heads=2, patch=(1, 2, 2), chunk=chunk, context=context) | kw
    return perturb_(FrameAR(C, TEXT_DIM, **args), std=0.1).eval()


def inputs(batch: int = 2, frames: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, frames, 8, 8, generator=g)
    t = torch.rand(batch, frames, generator=g) * 1000  # per-frame times, on the network's scale
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return x, t, Conditioning(torch.randn(batch, 5, TEXT_DIM, generator=g), mask)


@pytest.mark.parametrize("chunk,context", [(1, None), (2, None), (1, 2), (3, 2)])
def test_mask_matches_a_loop_over_frames(chunk, context):
    frames, S = 7, 3
    mask = frame_causal_mask(frames, S, chunk, context)
    for i in range(frames * S):
        for j in range(frames * S):
            fq, fk = i // S, j // S
            first = fq // chunk * chunk
            expected = fk < first + chunk and (context is None or fk >= first - context)
            assert bool(mask[i, j]) == expected, (i, j)


def test_attention_matches_float64_reference():
    """softmax(q·kᵀ/√d + mask)·v with RMSNorm'd, RoPE-rotated q and k, in float64 from the weights."""
    torch.manual_seed(0)
    attn = perturb_(FrameCausalAttention(16, 2)).double()
    frames, S, B = 4, 4, 2
    x = torch.randn(B, frames * S, 16, dtype=torch.float64)
    freqs = TokenWindows.build("full", (frames, 2, 2), B, 8, dtype=torch.float64).freqs  # (1, N, 1, 4)
    mask = frame_causal_mask(frames, S, chunk=2, context=1)
    out = attn(x, freqs, mask)

    def rms(z, w):
        return z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + attn.q_norm.eps) * w

    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).chunk(3, -1)
    q = apply_rope(rms(q, attn.q_norm.weight).unflatten(-1, (2, 8)), freqs[0])  # (B, N, h, d)
    k = apply_rope(rms(k, attn.k_norm.weight).unflatten(-1, (2, 8)), freqs[0])
    v = v.unflatten(-1, (2, 8))
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / 8**0.5
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    ref = torch.einsum("bhnm,bmhd->bnhd", weights, v).flatten(-2) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk,context,depth", [(1, None, 2), (2, None, 2), (1, 2, 1), (2, 1, 1)])
def test_each_frame_influences_exactly_its_chunk_and_later_ones(chunk, context, depth):
    """Perturb frame f: frames of earlier chunks never change; with one block and a window, only the
    frames whose chunk window reaches f change; without a window, all later frames change."""
    net = model(chunk, context, depth)
    x, t, cond = inputs(frames=6)
    with torch.no_grad():
        base = net(x, t, cond)
        for f in range(6):
            x2 = x.clone()
            x2[:, :, f] += 1.0
            changed = ((net(x2, t, cond) - base).abs().amax(dim=(0, 1, 3, 4)) > 0).tolist()
            first = [q // chunk * chunk for q in range(6)]
            expected = [f < first[q] + chunk and (context is None or f >= first[q] - context) for q in range(6)]
            assert changed == expected, f"frame {f}: changed {changed}, expected {expected}"


def test_per_sample_t_is_every_frame_at_that_time_and_frame_times_are_local():
    net = model(chunk=2)
    x, _, cond = inputs(frames=6)
    t = torch.tensor([100.0, 700.0])
    with torch.no_grad():
        assert torch.equal(net(x, t, cond), net(x, t[:, None].expand(-1, 6).contiguous(), cond))
        t_frames = t[:, None].repeat(1, 6)
        base = net(x, t_frames, cond)
        t_frames[:, 3] = 900.0  # chunk 1
        changed = ((net(x, t_frames, cond) - base).abs().amax(dim=(0, 1, 3, 4)) > 0).tolist()
    assert changed == [False, False, True, True, True, True]


@pytest.mark.parametrize("chunk,context", [(1, None), (2, None), (2, 2), (1, 3)])
def test_cached_chunks_equal_the_full_forward(chunk, context):
    """Feeding the clip chunk by chunk with commit=True computes the full forward's output."""
    net = model(chunk, context)
    x, t, cond = inputs(frames=6)
    with torch.no_grad():
        full = net(x, t, cond)
        cache = net.new_cache()
        parts = [net(x[:, :, s : s + chunk], t[:, s : s + chunk], cond, cache, commit=True) for s in range(0, 6, chunk)]
    torch.testing.assert_close(torch.cat(parts, dim=2), full, rtol=0, atol=1e-5)
    assert cache.next_frame == 6
    assert cache.frames(16) == (6 if context is None else min(6, context))


@pytest.mark.parametrize("chunk,context,frames", [(1, None, 5), (2, None, 6), (2, 2, 9), (1, 3, 8)])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_cached_rollout_equals_full_recomputation(chunk, context, frames, scale):
    """The issue's bar: cached generation equals recomputing the past at every step, within 1e-4,
    with and without classifier-free guidance, and past a training length of 4 frames with a
    sliding window (the cache never holds more than `context` frames)."""
    net = model(chunk, context)
    _, _, cond = inputs()
    null = Conditioning(torch.zeros(1, 2, TEXT_DIM), torch.ones(1, 2, dtype=torch.bool))
    guide = partial(classifier_free_guidance, cond=cond, null_cond=null, scale=scale)
    noise = torch.randn(2, C, frames, 8, 8, generator=torch.Generator().manual_seed(3))
    flow, euler = RectifiedFlow(), EulerSampler(steps=4)
    held = []
    original = net.new_cache

    def tracking_cache():
        cache = original()
        held.append(cache)
        return cache

    net.new_cache = tracking_cache
    cached = frame_rollout(net, flow, euler, guide, noise, cached=True)
    recomputed = frame_rollout(net, flow, euler, guide, noise, cached=False)
    torch.testing.assert_close(cached, recomputed, rtol=0, atol=1e-4)
    assert cached.abs().max() > 0.1  # a real trajectory, not zeros
    if context is not None:
        assert held[0].frames(16) == context
        assert held[0].get(0)[0].shape[2] == context * 16
        assert held[0].keys[0].shape[2] == context * 16 + 16 * chunk  # the window and one chunk


def test_denoising_steps_write_the_chunk_into_the_cache_without_copying_it():
    """A step without commit attends over the held frames and the chunk without concatenating the
    cache (whose copy per step grew with the rollout's length), and leaves the held frames alone."""
    from torch.utils._python_dispatch import TorchDispatchMode

    cats = []

    class RecordCats(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.cat.default:
                cats.extend(tuple(a.shape) for a in args[0])
            return func(*args, **(kwargs or {}))

    net = model(chunk=1)
    x, t, cond = inputs(frames=4)
    cache = net.new_cache()
    with torch.no_grad():
        for s in range(3):
            net(x[:, :, s : s + 1], t[:, s : s + 1], cond, cache, commit=True)
        held = cache.get(0)[0].clone()  # (B, heads, 3 frames · 16 tokens, d)
        with RecordCats():
            net(x[:, :, 3:4], t[:, 3:4], cond, cache)
    assert held.shape[2] == 48 and not [shape for shape in cats if len(shape) == 4 and shape[2] == 48]
    assert cache.frames(16) == 3 and torch.equal(cache.get(0)[0], held)
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        net(x[:, :, 3:4], t[:, 3:4], cond, cache)  # with autograd on, the in-place cache refuses
    k = cache.get(0)[0][:1, :, :16]  # one sample's keys of one frame: the cache holds two samples
    with torch.no_grad(), pytest.raises(ValueError, match=r"do not match the cache's \(2, "):
        cache.extend(0, k, k, 16)


def test_rollout_first_chunk_is_the_plain_sampler():
    """The first chunk sees no past: it is exactly the sampler run on the chunk alone."""
    net = model(chunk=2)
    _, _, cond = inputs()
    flow, euler = RectifiedFlow(), EulerSampler(steps=3)
    noise = torch.randn(2, C, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    guide = partial(classifier_free_guidance, cond=cond, null_cond=cond, scale=1.0)
    out = frame_rollout(net, flow, euler, guide, noise)
    first = euler.sample(lambda x, t: flow.velocity(net, x, t, cond), noise[:, :, :2])
    torch.testing.assert_close(out[:, :, :2], first, rtol=0, atol=1e-6)


def test_diffusion_forcing_loss_draws_one_time_per_frame():
    """per_frame=True: t (B, T) iid per frame; the loss equals the formula recomputed by hand."""
    flow = RectifiedFlow()
    net = model(chunk=1)
    x0 = torch.randn(3, C, 4, 8, 8)
    _, _, cond = inputs(batch=3)
    out = flow.loss(net, x0, cond, generator=torch.Generator().manual_seed(7), per_frame=True)
    assert out.t.shape == (3, 4) and len(set(out.t.flatten().tolist())) == 12
    g = torch.Generator().manual_seed(7)
    t = torch.rand(3, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = (1 - t[:, None, :, None, None]) * x0 + t[:, None, :, None, None] * noise
    with torch.no_grad():
        ref = (net(x_t, t * 1000, cond) - (noise - x0)).pow(2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(out.t, t)
    torch.testing.assert_close(out.per_sample.detach(), ref, rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="one token frame per latent frame"):
        FrameAR(C, TEXT_DIM, patch=(2, 2, 2))
    with pytest.raises(ValueError, match="chunk"):
        FrameAR(C, TEXT_DIM, chunk=0)
    net = model(chunk=2)
    x, t, cond = inputs(frames=4)
    with pytest.raises(ValueError, match="at most 2 frames"):
        net(x, t, cond, cache=net.new_cache())
    with pytest.raises(ValueError, match=r"\(B,\) or \(B, T\)"):
        net(x, t[:, :3], cond)


def test_system_trains_per_frame_and_generates_frame_by_frame(out_dir):
    """Through the Lightning system: a training step draws per-frame t, and generate() goes chunk
    by chunk through a KV cache."""
    system = build_system(compose("smoke", ["backbone=frame_ar_tiny", "sampler.steps=3"]))
    caches = []
    new_cache = system.backbone.new_cache
    system.backbone.new_cache = lambda: caches.append(new_cache()) or caches[-1]
    seen = []
    loss = system.objective.loss
    system.objective.loss = lambda *a, **kw: seen.append(kw) or loss(*a, **kw)
    video = torch.rand(2, 3, 4, 32, 32) * 2 - 1
    assert torch.isfinite(system.training_step({"video": video, "caption": ["a", "b"]}, 0))
    assert seen == [{"per_frame": True}]
    out = system.generate(["a red square"], [0], num_frames=4, height=32, width=32, cfg_scale=2.0)
    assert out.shape == (1, 3, 4, 32, 32) and torch.isfinite(out).all()
    assert len(caches) == 1 and caches[0].next_frame == 4
