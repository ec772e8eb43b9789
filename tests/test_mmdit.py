"""MMDiT (modules/backbones/mmdit.py) against independent references: joint attention, one dual-stream
and one single-stream block and the whole model recomputed in float64 from the equations and the
weights (the whole model per sample with its padding cut off, no mask); padding invariance; separate
stream weights; RoPE on video only; AdaLN-Zero identity; closed-form parameter counts of both presets
and exact FLOPs; and the same function as diffusers' HunyuanVideoTransformer3DModel."""

import math

import pytest
import torch
from torch import Tensor

from experiments.config import REPO_CONFIGS, load_yaml
from modules.backbones.base import Denoiser
from modules.backbones.card import measure_forward_flops
from modules.backbones.dit import patchify, unpatchify
from modules.backbones.mmdit import DualStreamBlock, MMDiT, SingleStreamBlock, joint_attention
from modules.conditioning import Conditioning
from modules.layers.rope import axis_bands, grid_positions, rope_frequencies

F64 = torch.float64
C, TEXT_DIM, L, D, HEADS = 4, 12, 5, 32, 2
FRAMES, HEIGHT, WIDTH = 2, 6, 4  # patch (1, 2, 2) -> token grid (2, 3, 2), N = 12
GRID, N = (2, 3, 2), 12


def make_model(dtype: torch.dtype = torch.float32, **kw) -> MMDiT:
    torch.manual_seed(0)
    args = dict(in_channels=C, text_dim=TEXT_DIM, dim=D, double_depth=2, single_depth=2, heads=HEADS, patch=(1, 2, 2))
    args.update(kw)
    return MMDiT(**args).to(dtype)


def randomize_(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Non-trivial values everywhere: zero-initialised gates and output layer would hide the paths."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def make_inputs(batch: int = 2, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Conditioning]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, C, FRAMES, HEIGHT, WIDTH, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g, dtype=dtype) * 1000
    mask = torch.ones(batch, L, dtype=torch.bool)
    mask[0, 3:] = False  # sample 0: 3 real tokens, 2 padding
    return x, t, Conditioning(torch.randn(batch, L, TEXT_DIM, generator=g, dtype=dtype), mask)


# -- float64 references, written from the equations ------------------------------------------------


def ref_linear(x: Tensor, linear) -> Tensor:
    return x @ linear.weight.T + linear.bias


def ref_layer_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)


def ref_rms_norm(x: Tensor, norm) -> Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def ref_modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def ref_adaln(c: Tensor, adaln, chunks: int) -> tuple[Tensor, ...]:
    return ref_linear(c * torch.sigmoid(c), adaln.linear).chunk(chunks, dim=-1)  # SiLU then Linear


def ref_gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def ref_angles(grid: tuple[int, int, int], text_len: int, head_dim: int, theta: float) -> Tensor:
    """(N + L, d/2) RoPE angles: video at its grid positions, text at angle 0 (unrotated)."""
    video = rope_frequencies(grid_positions(grid), head_dim, theta, F64).angle()  # (N, d/2)
    return torch.cat([video, torch.zeros(text_len, head_dim // 2, dtype=F64)])


def ref_attention(q: Tensor, k: Tensor, v: Tensor, angles: Tensor, valid: Tensor) -> Tensor:
    """q, k, v (B, S, h, d); angles (S, d/2); valid (B, S) keys -> softmax(R(q)·R(k)ᵀ/√d)·v (B, S, h·d)."""

    def rotate(z: Tensor) -> Tensor:  # channel pairs (2j, 2j + 1) rotated by angles[:, j]
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # (S, 1, d/2)
        even, odd = z[..., 0::2], z[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)

    scores = torch.einsum("bqhd,bkhd->bhqk", rotate(q), rotate(k)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~valid[:, None, None, :], -math.inf)
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(-2)


def ref_qkv(qkv: Tensor, heads: int, q_norm, k_norm) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).unbind(2)  # fused features ordered (q|k|v, head, d)
    return ref_rms_norm(q, q_norm), ref_rms_norm(k, k_norm), v


def ref_dual(block: DualStreamBlock, x: Tensor, txt: Tensor, c: Tensor, angles: Tensor, valid: Tensor):
    streams = [(block.video, x), (block.text, txt)]
    mods = [ref_adaln(c, s.modulation, 6) for s, _ in streams]
    qkvs = [
        ref_qkv(ref_linear(ref_modulate(ref_layer_norm(h), m[0], m[1]), s.qkv), HEADS, s.q_norm, s.k_norm)
        for (s, h), m in zip(streams, mods)
    ]
    attn = ref_attention(*(torch.cat(parts, dim=1) for parts in zip(*qkvs)), angles, valid)
    outs = []
    for (s, h), m, a in zip(streams, mods, (attn[:, : x.shape[1]], attn[:, x.shape[1] :])):
        h = h + m[2][:, None] * ref_linear(a, s.proj)
        u = ref_modulate(ref_layer_norm(h), m[3], m[4])
        outs.append(h + m[5][:, None] * ref_linear(ref_gelu_tanh(ref_linear(u, s.mlp.fc1)), s.mlp.fc2))
    return tuple(outs)


def ref_single(block: SingleStreamBlock, h: Tensor, c: Tensor, angles: Tensor, valid: Tensor) -> Tensor:
    shift, scale, gate = ref_adaln(c, block.modulation, 3)
    u = ref_modulate(ref_layer_norm(h), shift, scale)
    qkv, m = ref_linear(u, block.linear1).split([3 * D, block.mlp_hidden], -1)
    attn = ref_attention(*ref_qkv(qkv, HEADS, block.q_norm, block.k_norm), angles, valid)
    return h + gate[:, None] * ref_linear(torch.cat([attn, ref_gelu_tanh(m)], dim=-1), block.linear2)


def ref_model(model: MMDiT, x: Tensor, t: Tensor, tokens: Tensor) -> Tensor:
    """One sample, x (1, C, T, H, W), t (1,), tokens (1, L_b, D_text) all real: no mask anywhere."""
    h = ref_linear(patchify(x, model.patch), model.x_embedder)  # (1, N, D)
    txt = ref_linear(tokens, model.txt_in)  # (1, L_b, D)
    c = model.t_embedder(t)
    angles = ref_angles(GRID, tokens.shape[1], D // HEADS, model.rope_theta)
    valid = torch.ones(1, N + tokens.shape[1], dtype=torch.bool)
    for block in model.blocks[: model.double_depth]:
        h, txt = ref_dual(block, h, txt, c, angles, valid)
    h = torch.cat([h, txt], dim=1)
    for block in model.blocks[model.double_depth :]:
        h = ref_single(block, h, c, angles, valid)
    shift, scale = ref_adaln(c, model.final_layer.modulation, 2)
    out = ref_linear(ref_modulate(ref_layer_norm(h[:, :N]), shift, scale), model.final_layer.linear)
    return unpatchify(out, model.patch, GRID, model.out_channels)


def block_inputs(model: MMDiT, dtype: torch.dtype = F64):
    """Random block inputs: x (2, N, D), txt (2, L, D), c (2, D), the text mask, key mask and RoPE table."""
    g = torch.Generator().manual_seed(5)
    x, txt, c = (torch.randn(*shape, generator=g, dtype=dtype) for shape in ((2, N, D), (2, L, D), (2, D)))
    mask = make_inputs()[2].mask
    valid = torch.cat([torch.ones(2, N, dtype=torch.bool), mask], dim=1)  # (2, N + L)
    return x, txt, c, valid, valid[:, None, None, :], model.rope_table(GRID, L, dtype=dtype)


# -- tests --------------------------------------------------------------------------------------------


def test_joint_attention_matches_float64_softmax_reference():
    model = make_model(F64)
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(3, 2, N + L, HEADS, D // HEADS, generator=g, dtype=F64)
    _, _, _, valid, key_mask, freqs = block_inputs(model)
    assert torch.equal(freqs[N:], torch.ones_like(freqs[N:]))  # text rows: the identity rotation
    expected = ref_attention(q, k, v, ref_angles(GRID, L, D // HEADS, model.rope_theta), valid)
    torch.testing.assert_close(joint_attention(q, k, v, freqs, key_mask), expected, rtol=1e-12, atol=1e-12)


def test_dual_and_single_blocks_match_float64_references():
    model = randomize_(make_model(F64))
    x, txt, c, valid, key_mask, freqs = block_inputs(model)
    angles = ref_angles(GRID, L, D // HEADS, model.rope_theta)
    dual, single = model.blocks[0], model.blocks[model.double_depth]
    assert isinstance(dual, DualStreamBlock) and isinstance(single, SingleStreamBlock)
    for got, want in zip(dual(x, txt, c, key_mask, freqs), ref_dual(dual, x, txt, c, angles, valid)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    h = torch.cat([x, txt], dim=1)
    want = ref_single(single, h, c, angles, valid)
    torch.testing.assert_close(single(h, c, key_mask, freqs), want, rtol=1e-10, atol=1e-10)


def test_model_matches_per_sample_reference_with_padding_cut_off():
    """The whole forward against the float64 reference run per sample on its real text tokens only,
    without any mask: the key mask makes padded text invisible to every query."""
    model = randomize_(make_model(F64)).eval()
    x, t, cond = make_inputs(dtype=F64)
    with torch.no_grad():
        out = model(x, t, cond)
        for b in range(2):
            want = ref_model(model, x[b : b + 1], t[b : b + 1], cond.tokens[b : b + 1, cond.mask[b]])
            torch.testing.assert_close(out[b : b + 1], want, rtol=1e-10, atol=1e-10)


def test_padded_text_never_changes_the_output():
    model = randomize_(make_model()).eval()
    x, t, cond = make_inputs()
    garbage = cond.tokens.clone()
    garbage[0, 3] = 1e6
    garbage[0, 4] = math.nan  # even NaN padding cannot leak (0·NaN): padded tokens are zeroed at entry
    empty = cond.mask.clone()
    empty[1] = False  # a text with no real token at all: video keys keep every softmax finite
    with torch.no_grad():
        base = model(x, t, cond)
        assert torch.equal(model(x, t, Conditioning(garbage, cond.mask)), base)
        changed = cond.tokens.clone()
        changed[0, 1] += 1.0  # a real token of sample 0 changes sample 0 only
        out = model(x, t, Conditioning(changed, cond.mask))
        assert (out[0] - base[0]).abs().max() > 1e-3 and torch.equal(out[1], base[1])
        assert torch.isfinite(model(x, t, Conditioning(cond.tokens, empty))).all()


def test_streams_have_separate_weights():
    """In a dual block the text MLP acts after the joint attention, so it changes the text output
    only, and the video MLP the video output only; QKV weights of either stream reach both through
    the joint attention. A video-only loss gives the text stream's attention output projection and
    MLP exactly zero gradient and its QKV a non-zero one."""
    model = randomize_(make_model(F64))
    x, txt, c, _, key_mask, freqs = block_inputs(model)
    block = model.blocks[0]
    base = block(x, txt, c, key_mask, freqs)
    for weight, changes in [
        (block.text.mlp.fc1.weight, (False, True)),
        (block.video.mlp.fc1.weight, (True, False)),
        (block.text.qkv.weight, (True, True)),
        (block.video.qkv.weight, (True, True)),
    ]:
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.add_(0.5)
            out = block(x, txt, c, key_mask, freqs)
            weight.copy_(saved)
        assert [not torch.equal(o, b) for o, b in zip(out, base)] == list(changes)
    block(x, txt, c, key_mask, freqs)[0].pow(2).sum().backward()
    for module in (block.text.proj, block.text.mlp):
        assert all(p.grad is None or not p.grad.any() for p in module.parameters())
    for module in (block.text.qkv, block.video.qkv, block.video.proj, block.video.mlp):
        assert all(p.grad.abs().max() > 0 for p in module.parameters())


def test_rope_positions_video_but_not_text():
    """Swapping two frames does not just swap the output frames (3D RoPE on video); permuting the
    text tokens, mask alongside, changes nothing (no position on text)."""
    model = randomize_(make_model(F64)).eval()
    x, t, cond = make_inputs(dtype=F64)
    perm = torch.tensor([4, 0, 3, 1, 2])
    with torch.no_grad():
        out = model(x, t, cond)
        frames_swapped = model(x[:, :, [1, 0]], t, cond)
        text_permuted = model(x, t, Conditioning(cond.tokens[:, perm], cond.mask[:, perm]))
    assert (frames_swapped - out[:, :, [1, 0]]).abs().max() > 1e-3
    torch.testing.assert_close(text_permuted, out, rtol=1e-12, atol=1e-12)


def test_identity_blocks_and_zero_output_at_init():
    model = make_model()
    x, t, cond = make_inputs()
    assert isinstance(model, Denoiser) and len(model.blocks) == 4
    h, txt, c, _, key_mask, freqs = block_inputs(model, torch.float32)
    for block in model.blocks[:2]:
        out = block(h, txt, c, key_mask, freqs)
        assert torch.equal(out[0], h) and torch.equal(out[1], txt)
    joint = torch.cat([h, txt], dim=1)
    for block in model.blocks[2:]:
        assert torch.equal(block(joint, c, key_mask, freqs), joint)
    assert torch.equal(model(x, t, cond), torch.zeros_like(x))
    randomize_(model)
    assert model(x, t, cond).abs().max() > 0
    model.init_weights()
    assert torch.equal(model(x, t, cond), torch.zeros_like(x))


def test_bad_inputs_and_configs_raise():
    model = make_model()
    x, _, cond = make_inputs()
    with pytest.raises(NotImplementedError, match="per-frame"):
        model(x, torch.rand(2, FRAMES), cond)
    with pytest.raises(ValueError, match="even size"):
        make_model(dim=30, heads=2)
    with pytest.raises(ValueError, match="single_depth >= 1"):
        make_model(single_depth=0)


def mmdit_parameters(in_channels: int, text_dim: int, dim: int, double: int, single: int, heads: int,
                     patch: tuple[int, int, int], mlp_ratio: float) -> int:
    """Closed form: Linear(i, o) has i·o + o parameters; per-head QK RMSNorms d each."""
    P, F, d = math.prod(patch), round(dim * mlp_ratio), dim // heads

    def linear(i: int, o: int) -> int:
        return i * o + o

    stream = linear(dim, 6 * dim) + linear(dim, 3 * dim) + 2 * d + linear(dim, dim) + linear(dim, F) + linear(F, dim)
    single_block = linear(dim, 3 * dim) + linear(dim, 3 * dim + F) + 2 * d + linear(dim + F, dim)
    return (
        linear(in_channels * P, dim) + linear(256, dim) + linear(dim, dim) + linear(text_dim, dim)
        + double * 2 * stream + single * single_block
        + linear(dim, 2 * dim) + linear(dim, P * in_channels)
    )


@pytest.mark.parametrize(
    "preset,in_channels,text_dim,expected",
    [("mmdit_hunyuan_13b", 16, 4096, 12_502_390_848), ("mmdit_tiny", 4, 32, 462_592)],
)
def test_preset_parameter_counts_match_closed_form(preset, in_channels, text_dim, expected):
    """HunyuanVideo's 16 latent channels and 4096-wide text: the preset comment's count."""
    node = load_yaml(REPO_CONFIGS / "backbone" / f"{preset}.yaml")
    assert node.pop("_target_") == "modules.backbones.mmdit.MMDiT"  # tests/contracts builds it through build.py
    with torch.device("meta"):
        model = MMDiT(in_channels=in_channels, text_dim=text_dim, **node)
    closed = mmdit_parameters(in_channels, text_dim, node["dim"], node["double_depth"], node["single_depth"],
                              node["heads"], tuple(node["patch"]), node["mlp_ratio"])
    assert sum(p.numel() for p in model.parameters()) == closed == expected


@pytest.mark.parametrize("x_shape,text_len", [((2, C, 2, 8, 8), 5), ((1, C, 4, 16, 16), 7)])
def test_flops_equal_flop_counter(x_shape, text_len):
    with torch.device("meta"):
        model = make_model()
    assert model.flops(x_shape, text_len) == measure_forward_flops(model, x_shape, text_len, TEXT_DIM)


# our dual-block stream -> diffusers' (AdaLN, q/k/v, output projection, QK-norms, MLP) in that block
DIFFUSERS_STREAMS = {
    "video": ("norm1", ("to_q", "to_k", "to_v"), "to_out.0", ("norm_q", "norm_k"), "ff"),
    "text": ("norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out",
             ("norm_added_q", "norm_added_k"), "ff_context"),
}


def _load_diffusers_hunyuan(ours: MMDiT, theirs) -> None:
    """diffusers' weights into ours: separate q/k/v (and the single block's MLP input) fused, the
    final (scale, shift) rows reordered to (shift, scale), the Conv3d patch embedding flattened."""
    s = theirs.state_dict()
    new = {"x_embedder.weight": s["x_embedder.proj.weight"].reshape(D, -1)}  # Conv3d (D, C, pt, ph, pw)
    new["x_embedder.bias"] = s["x_embedder.proj.bias"]
    scale, shift = s["norm_out.linear.weight"].chunk(2), s["norm_out.linear.bias"].chunk(2)
    new["final_layer.modulation.linear.weight"] = torch.cat([scale[1], scale[0]])
    new["final_layer.modulation.linear.bias"] = torch.cat([shift[1], shift[0]])
    pairs = {
        "txt_in": "context_embedder.proj_in", "final_layer.linear": "proj_out",
        "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    }
    fused: dict[str, list[str]] = {}
    for i in range(ours.double_depth):
        b, o = f"blocks.{i}.", f"transformer_blocks.{i}.attn."
        for mine, (mod, qkv, out, (q_norm, k_norm), ff) in DIFFUSERS_STREAMS.items():
            p = f"{b}{mine}."
            their = f"transformer_blocks.{i}."
            pairs.update({
                p + "modulation.linear": their + mod + ".linear", p + "proj": o + out,
                p + "mlp.fc1": their + ff + ".net.0.proj", p + "mlp.fc2": their + ff + ".net.2",
            })
            new[p + "q_norm.weight"], new[p + "k_norm.weight"] = s[o + q_norm + ".weight"], s[o + k_norm + ".weight"]
            fused[p + "qkv"] = [o + name for name in qkv]
    for j in range(len(ours.blocks) - ours.double_depth):
        b, o = f"blocks.{ours.double_depth + j}.", f"single_transformer_blocks.{j}."
        pairs.update({b + "modulation.linear": o + "norm.linear", b + "linear2": o + "proj_out"})
        new[b + "q_norm.weight"], new[b + "k_norm.weight"] = s[o + "attn.norm_q.weight"], s[o + "attn.norm_k.weight"]
        fused[b + "linear1"] = [o + "attn.to_q", o + "attn.to_k", o + "attn.to_v", o + "proj_mlp"]
    for kind in ("weight", "bias"):
        new.update({f"{mine}.{kind}": s[f"{their}.{kind}"] for mine, their in pairs.items()})
        new.update({f"{mine}.{kind}": torch.cat([s[f"{n}.{kind}"] for n in names]) for mine, names in fused.items()})
    ours.load_state_dict(new, strict=True)


def test_same_function_as_diffusers_hunyuan_video():
    """With diffusers' weights, ours computes what `HunyuanVideoTransformer3DModel` computes once its
    omitted parts are neutralised (token-refiner gates and the pooled-CLIP embedder zeroed, no guidance
    embedding) and its RoPE bands set to ours: an independent check of the stream wiring, the AdaLN
    chunk orders, per-head QK-norm, RoPE on video only, the [video; text] order and the text mask."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    theirs = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=C, out_channels=C, num_attention_heads=HEADS, attention_head_dim=D // HEADS, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=False,
        text_embed_dim=TEXT_DIM, pooled_projection_dim=8, rope_theta=256.0, rope_axes_dim=axis_bands(D // HEADS),
    ).eval()
    randomize_(theirs)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".norm_out.linear." in name or "time_text_embed.text_embedder.linear_2" in name:
                p.zero_()
    ours = make_model(rope_theta=256.0).eval()
    _load_diffusers_hunyuan(ours, theirs)
    x, t, cond = make_inputs()
    with torch.no_grad():
        want = theirs(x, t, cond.tokens, cond.mask.long(), torch.zeros(2, 8), return_dict=False)[0]
        torch.testing.assert_close(ours(x, t, cond), want, rtol=1e-4, atol=1e-5)
