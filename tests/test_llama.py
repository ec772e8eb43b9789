"""LlamaDiT (modules/backbones/llama.py) against references written here with plain torch ops: one
block and the whole forward recomputed in float64 (RMSNorm, real-valued 3D RoPE, softmax attention,
SwiGLU), text padding ignored, bias-free blocks, identity at init, gradient checkpointing, LLaMA's FFN
width rule and the Movie Gen 30B preset's parameter count in closed form."""

import math

import pytest
import torch
import torch.nn.functional as F

from experiments.config import REPO_CONFIGS, load_yaml
from modules.backbones.base import Denoiser
from modules.backbones.dit import patchify, unpatchify
from modules.backbones.llama import LlamaDiT, llama_ffn_hidden
from modules.conditioning import Conditioning

C, TEXT_DIM, L, D, HEADS = 4, 16, 6, 32, 2
PATCH, T, H, W = (1, 2, 2), 2, 4, 6  # token grid (2, 2, 3): unequal axes catch t/h/w mix-ups


def make_model(**kw) -> LlamaDiT:
    torch.manual_seed(0)
    args = dict(in_channels=C, text_dim=TEXT_DIM, dim=D, depth=2, heads=HEADS, patch=PATCH, multiple_of=16)
    return LlamaDiT(**(args | kw))


def make_inputs(batch: int = 2, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, T, H, W, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g) * 1000
    tokens = torch.randn(batch, L, TEXT_DIM, generator=g, dtype=dtype)
    mask = torch.ones(batch, L, dtype=torch.bool)
    mask[0, 4:] = False  # sample 0: 4 valid tokens, 2 padding
    return x, t, Conditioning(tokens, mask)


def randomize_(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Non-trivial values everywhere (zero gates and projections would hide the paths under test)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


# -- references: plain torch ops, float64 --------------------------------------------------------------


def rms_norm(x, weight=None, eps=1e-6):
    """Zhang & Sennrich 2019 eq. 4 over the last dim."""
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * weight if weight is not None else y


def rope_3d(x, grid, theta=10000.0):
    """x (B, N, heads, d): rotate channel pairs (2j, 2j+1) by pos·θ^(−2i/d_b), bands (d_t, d_h, d_w) =
    (d − 4·(d // 6), 2·(d // 6), 2·(d // 6)) using the token's (t, h, w) index; real-valued cos/sin."""
    d = x.shape[-1]
    d_hw = 2 * (d // 6)
    tt, hh, ww = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid], indexing="ij")
    angles = torch.cat(
        [p.reshape(-1, 1) * theta ** (-torch.arange(0, band, 2, dtype=torch.float64) / band)
         for p, band in zip((tt, hh, ww), (d - 2 * d_hw, d_hw, d_hw))],
        dim=-1,
    )[:, None]  # (N, 1, d/2)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * angles.cos() - b * angles.sin()
    out[..., 1::2] = a * angles.sin() + b * angles.cos()
    return out


def attend(q, k, v, key_mask=None):
    """q (B, N, h, d), k and v (B, M, h, d), key_mask (B, M) bool -> softmax(q·kᵀ/√d)·v (B, N, h·d)."""
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    out = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), v)
    return out.flatten(2)


def reference_block(block, x, e, text, mask, grid):
    """One LlamaBlock (full attention) from its weights: AdaLN self-attention, cross-attention, SwiGLU."""
    heads = block.attn[0].heads
    split = lambda y: y.unflatten(-1, (heads, -1))  # (B, N, D) -> (B, N, h, d)
    modulate = lambda y, shift, scale: y * (1 + scale[:, None]) + shift[:, None]
    shift1, scale1, gate1, shift2, scale2, gate2 = (e + block.modulation).unbind(1)

    sa = block.attn[0]
    q, k, v = (modulate(rms_norm(x), shift1, scale1) @ sa.qkv.weight.T).chunk(3, dim=-1)
    q, k = rope_3d(split(rms_norm(q, sa.q_norm.weight)), grid), rope_3d(split(rms_norm(k, sa.k_norm.weight)), grid)
    x = x + gate1[:, None] * (attend(q, k, split(v)) @ sa.proj.weight.T)

    ca = block.cross_attn
    q = split(rms_norm(rms_norm(x, block.norm_cross.weight) @ ca.q.weight.T, ca.q_norm.weight))
    k, v = (text @ ca.kv.weight.T).chunk(2, dim=-1)
    x = x + attend(q, split(rms_norm(k, ca.k_norm.weight)), split(v), mask) @ ca.proj.weight.T

    w1, w3 = block.ffn.fc1.weight.chunk(2, dim=0)
    y = modulate(rms_norm(x), shift2, scale2)
    return x + gate2[:, None] * ((F.silu(y @ w1.T) * (y @ w3.T)) @ block.ffn.fc2.weight.T)


# -- tests ---------------------------------------------------------------------------------------------


def test_one_block_equals_float64_reference():
    model = randomize_(make_model()).double()
    grid, B = (T // PATCH[0], H // PATCH[1], W // PATCH[2]), 2
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, math.prod(grid), D, generator=g, dtype=torch.float64)
    e = torch.randn(B, 6, D, generator=g, dtype=torch.float64)
    text = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    _, _, cond = make_inputs()
    block = model.blocks[0]
    with torch.no_grad():
        out = block(x, e, text, cond.mask, model.token_windows(grid, B, dtype=torch.float64))
        ref = reference_block(block, x, e, text, cond.mask, grid)
    assert (out - x).abs().max() > 0.1  # the block does something
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_forward_equals_float64_reference_composition():
    """patchify → x_embedder → blocks (reference) → RMSNorm, AdaLN, Linear → unpatchify."""
    model = randomize_(make_model(out_channels=3)).double()
    x, t, cond = make_inputs(dtype=torch.float64)
    grid = (T // PATCH[0], H // PATCH[1], W // PATCH[2])
    with torch.no_grad():
        out = model(x, t, cond)
        c = model.t_embedder(t)  # (B, D), the shared timestep MLP (tested in test_layers)
        e = (F.silu(c) @ model.time_proj.linear.weight.T + model.time_proj.linear.bias).unflatten(-1, (6, D))
        lin, ln = model.text_embedder
        text = F.layer_norm(cond.tokens @ lin.weight.T + lin.bias, (D,), ln.weight, ln.bias, ln.eps)
        h = patchify(x, PATCH) @ model.x_embedder.weight.T + model.x_embedder.bias
        for block in model.blocks:
            h = reference_block(block, h, e, text, cond.mask, grid)
        shift, scale = (model.final_layer.modulation + c[:, None]).unbind(1)
        h = (rms_norm(h) * (1 + scale[:, None]) + shift[:, None]) @ model.final_layer.linear.weight.T
        ref = unpatchify(h, PATCH, grid, 3)
    assert out.shape == (2, 3, T, H, W)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_protocol_and_per_frame_t_not_implemented():
    model = make_model()
    x, t, cond = make_inputs()
    assert isinstance(model, Denoiser) and len(model.blocks) == 2
    assert model(x, t, cond).shape == x.shape
    with pytest.raises(NotImplementedError, match="per-frame"):
        model(x, torch.rand(2, T), cond)


@pytest.mark.parametrize("attention", ["full", "factorized", "window"])
def test_no_linear_in_blocks_has_a_bias(attention):
    model = make_model(attention=attention, window=(1, 2, 2))
    for block in model.blocks:
        linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 5 + 2 * len(block.attn)  # (qkv, proj) per self-attention; q, kv, proj; fc1, fc2
        assert all(m.bias is None for m in linears)


def test_text_padding_is_ignored():
    model = randomize_(make_model()).eval()
    x, t, cond = make_inputs()
    with torch.no_grad():
        base = model(x, t, cond)
        noisy = cond.tokens.clone()
        noisy[0, 4:] += 100.0  # sample 0's padding tokens
        torch.testing.assert_close(model(x, t, Conditioning(noisy, cond.mask)), base, rtol=0, atol=1e-6)
        # sample 0 alone with its padding cut off gives the same output
        alone = model(x[:1], t[:1], Conditioning(cond.tokens[:1, :4], cond.mask[:1, :4]))
        torch.testing.assert_close(alone, base[:1], rtol=1e-5, atol=1e-6)
        valid = cond.tokens.clone()
        valid[0, 1] += 10.0  # a valid token of sample 0
        changed = model(x, t, Conditioning(valid, cond.mask))
    assert (changed[0] - base[0]).abs().max() > 1e-3
    torch.testing.assert_close(changed[1], base[1], rtol=0, atol=1e-6)  # no leak across the batch


@pytest.mark.parametrize("attention", ["full", "factorized"])
def test_identity_at_init_and_zero_output(attention):
    model = make_model(attention=attention)
    x, t, cond = make_inputs()
    grid = (2, 2, 3)
    h = torch.randn(2, math.prod(grid), D)
    e = torch.stack(model.time_proj(model.t_embedder(t)), dim=1)
    text = model.text_embedder(torch.randn(2, L, TEXT_DIM))
    for block in model.blocks:
        assert torch.equal(block(h, e, text, cond.mask, model.token_windows(grid, 2)), h)
    assert torch.equal(model(x, t, cond), torch.zeros_like(x))
    randomize_(model)
    assert model(x, t, cond).abs().max() > 0
    model.init_weights()
    assert torch.equal(model(x, t, cond), torch.zeros_like(x))


def test_grad_checkpointing_same_outputs_and_grads():
    x, t, cond = make_inputs()
    results = []
    for ckpt in (False, True):
        model = randomize_(make_model(grad_checkpointing=ckpt))
        out = model(x, t, cond)
        out.pow(2).mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=1e-6, atol=1e-7)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_llama_ffn_width_rule():
    assert llama_ffn_hidden(4096) == 11008  # LLaMA 7B
    assert llama_ffn_hidden(4096, multiple_of=1024, ffn_dim_multiplier=1.3) == 14336  # LLaMA 3 8B
    assert llama_ffn_hidden(6144) == 16384  # Movie Gen 30B (Table 1)
    model = make_model()  # dim 32: 8·32/3 = 85.3 -> 96 (multiple of 16)
    assert model.ffn_hidden == 96 and model.blocks[0].ffn.fc2.in_features == 96
    assert make_model(ffn_hidden=40).blocks[0].ffn.fc2.in_features == 40


def moviegen_parameters(C: int, text_dim: int, D: int = 6144, depth: int = 48, F_: int = 16384) -> int:
    """Closed form for LlamaDiT, full attention, QK-norm, patch (1, 2, 2) (P = 4 values per channel)."""
    P = 4
    block = (
        3 * D * D + D * D + 2 * D  # self-attention: qkv, proj (no bias), QK-norm weights
        + D  # norm_cross weight (norm1 and norm2 have none)
        + D * D + 2 * D * D + D * D + 2 * D  # cross-attention: q, kv, proj, QK-norm weights
        + 3 * D * F_  # SwiGLU: W1, W3 (fused) and W2
        + 6 * D  # per-block AdaLN table
    )
    return (
        C * P * D + D  # x_embedder (with bias)
        + 256 * D + D + D * D + D  # t_embedder
        + D * 6 * D + 6 * D  # shared AdaLN projection
        + text_dim * D + D + 2 * D  # text projection: Linear + LayerNorm
        + depth * block
        + D * P * C + 2 * D  # final Linear (no bias) and its (shift, scale) table
    )


def test_moviegen_30b_parameter_count_on_meta():
    node = load_yaml(REPO_CONFIGS / "backbone" / "llama_moviegen_30b.yaml")
    assert node.pop("_target_") == "modules.backbones.llama.LlamaDiT"
    with torch.device("meta"):
        model = LlamaDiT(in_channels=16, text_dim=4096, **node)  # as experiments/build.py injects them
    count = sum(p.numel() for p in model.parameters())
    assert count == moviegen_parameters(16, 4096) == 29_286_125_568  # the preset's comment
    assert moviegen_parameters(16, 0) == 29_260_959_744  # + 6144·text_dim, the comment's general form
