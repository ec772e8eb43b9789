"""DiT: shapes, AdaLN-Zero identity at init, training signal, patchify round trip, text mask,
gradient checkpointing equivalence, for every self-attention layout; 3D RoPE makes it position-aware."""

import pytest
import torch

from modules.backbones.base import Denoiser
from modules.backbones.dit import DiT, patchify, unpatchify
from modules.conditioning import Conditioning

C, TEXT_DIM, L = 4, 16, 6
LAYOUTS = [dict(attention="full"), dict(attention="factorized"), dict(attention="window", window=(2, 2, 2))]
LAYOUT_IDS = ["full", "factorized", "window"]


def make_model(**kw) -> DiT:
    torch.manual_seed(0)
    args = dict(in_channels=C, text_dim=TEXT_DIM, dim=32, depth=2, heads=2, patch=(1, 2, 2))
    args.update(kw)
    return DiT(**args)


def make_inputs(batch: int = 2, T: int = 2, H: int = 8, W: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, T, H, W, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    tokens = torch.randn(batch, L, TEXT_DIM, generator=g)
    mask = torch.ones(batch, L, dtype=torch.bool)
    mask[0, 4:] = False  # first sample: 4 valid tokens, 2 padding
    return x, t, Conditioning(tokens, mask)


def randomize_(model: DiT, std: float = 0.1) -> None:
    """Give every parameter a non-trivial value (zero-initialised gates would hide the paths)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def test_output_shape_and_protocol():
    model = make_model(out_channels=6, patch=(2, 2, 2))
    x, t, cond = make_inputs(T=4)
    assert isinstance(model, Denoiser)
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 2
    assert model(x, t, cond).shape == (2, 6, 4, 8, 8)


def test_indivisible_size_raises_naming_sizes():
    model = make_model()
    x, t, cond = make_inputs(H=7)
    with pytest.raises(ValueError, match=r"\(2, 7, 8\).*\(1, 2, 2\)"):
        model(x, t, cond)


def test_per_frame_t_not_implemented():
    model = make_model()
    x, _, cond = make_inputs()
    with pytest.raises(NotImplementedError, match="per-frame"):
        model(x, torch.rand(2, 2), cond)


def test_patchify_unpatchify_round_trip_exact():
    x = torch.randn(3, 5, 4, 6, 10)
    patch = (2, 3, 2)
    tokens = patchify(x, patch)
    assert tokens.shape == (3, 2 * 2 * 5, 5 * 2 * 3 * 2)
    assert torch.equal(unpatchify(tokens, patch, (2, 2, 5), 5), x)
    # token 0 holds the first (pt, ph, pw) corner patch, features ordered (C, pt, ph, pw)
    assert torch.equal(tokens[:, 0], x[:, :, :2, :3, :2].reshape(3, -1))
    # token order is row-major (t, h, w): token 1 is the next patch along w
    assert torch.equal(tokens[:, 1], x[:, :, :2, :3, 2:4].reshape(3, -1))


@pytest.mark.parametrize("kw", LAYOUTS, ids=LAYOUT_IDS)
def test_adaln_zero_blocks_identity_and_zero_output_at_init(kw):
    model = make_model(**kw)
    x, t, cond = make_inputs(H=12)  # grid (2, 6, 4): the (2, 2, 2) windows need padding
    h = torch.randn(2, 2 * 6 * 4, 32)
    e = torch.stack(model.time_proj(model.t_embedder(t)), dim=1)
    text = model.text_embedder(cond.tokens)
    windows = model.token_windows((2, 6, 4), 2)
    assert len(windows) == len(model.blocks[0].attn) == (2 if kw["attention"] == "factorized" else 1)
    for block in model.blocks:
        assert torch.equal(block(h, e, text, cond.mask, windows), h)
    out = model(x, t, cond)
    assert torch.equal(out, torch.zeros_like(out))
    # init_weights() restores the identity after the weights were moved
    randomize_(model)
    assert model(x, t, cond).abs().max() > 0
    model.init_weights()
    assert torch.equal(model(x, t, cond), torch.zeros_like(out))


@pytest.mark.parametrize("kw", LAYOUTS, ids=LAYOUT_IDS)
def test_training_step_gives_finite_grads_and_changes_output(kw):
    model = make_model(**kw)
    x, t, cond = make_inputs(H=12)
    before = model(x, t, cond).detach()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    target = torch.randn_like(x)
    for _ in range(2):  # the first step only moves zero-initialised layers; the second reaches all
        opt.zero_grad()
        loss = (model(x, t, cond) - target).pow(2).mean()
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        opt.step()
    after = model(x, t, cond).detach()
    assert (after - before).abs().max() > 1e-4
    assert model.final_layer.linear.weight.abs().max() > 0
    assert model.time_proj.linear.weight.abs().max() > 0
    assert model.blocks[0].modulation.abs().max() > 0


def test_deterministic_in_eval():
    model = make_model().eval()
    randomize_(model)
    x, t, cond = make_inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, cond), model(x, t, cond))


def test_text_mask_matters():
    model = make_model().eval()
    randomize_(model)
    x, t, cond = make_inputs()
    with torch.no_grad():
        base = model(x, t, cond)
        masked = cond.tokens.clone()
        masked[0, 5] += 10.0  # a padding token of sample 0
        out_masked = model(x, t, Conditioning(masked, cond.mask))
        valid = cond.tokens.clone()
        valid[0, 1] += 10.0  # a valid token of sample 0
        out_valid = model(x, t, Conditioning(valid, cond.mask))
    torch.testing.assert_close(out_masked, base, rtol=0, atol=1e-6)
    assert (out_valid[0] - base[0]).abs().max() > 1e-3
    torch.testing.assert_close(out_valid[1], base[1], rtol=0, atol=1e-6)  # no leak across batch


@pytest.mark.parametrize("kw", LAYOUTS, ids=LAYOUT_IDS)
def test_grad_checkpointing_same_outputs_and_grads(kw):
    x, t, cond = make_inputs()
    results = []
    for ckpt in (False, True):
        model = make_model(grad_checkpointing=ckpt, **kw)
        randomize_(model)
        out = model(x, t, cond)
        out.pow(2).mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)


def test_rope_makes_the_output_depend_on_position():
    """Without any position signal attention is permutation-equivariant; with RoPE swapping two
    frames does not just swap the output frames. abs_pos adds the sin-cos embedding as well."""
    x, t, cond = make_inputs(T=2)
    swap = [1, 0]
    for kw, aware in [(dict(rope=False), False), (dict(), True), (dict(rope=False, abs_pos=True), True)]:
        model = make_model(**kw).eval()
        randomize_(model)
        with torch.no_grad():
            out, out_swapped = model(x, t, cond), model(x[:, :, swap], t, cond)
        gap = (out_swapped - out[:, :, swap]).abs().max()
        assert (gap > 1e-3) if aware else (gap < 1e-5), (kw, gap)


def test_bad_layout_and_head_size_raise():
    with pytest.raises(ValueError, match="attention must be one of"):
        make_model(attention="sparse")
    with pytest.raises(ValueError, match="even size with RoPE"):
        make_model(dim=30, heads=2)  # head_dim 15


def test_wan_1_3b_shape_on_meta_device():
    """The Wan2.1-1.3B preset's shape, built without allocating: 30 blocks, FFN 8960, the parameter
    count of Wan2.1-T2V-1.3B with a 4096-wide text encoder, and the analytic FLOPs of one 81x480x832
    clip (21x60x104 latent)."""
    with torch.device("meta"):
        model = DiT(in_channels=16, text_dim=4096, dim=1536, depth=30, heads=12, mlp_ratio=8960 / 1536)
    assert model.blocks[0].mlp.fc1.out_features == 8960
    assert sum(p.numel() for p in model.parameters()) == 1_418_996_800  # diffusers' Wan2.1-T2V-1.3B count
    flops = model.flops((1, 16, 21, 60, 104), 512)
    N = 21 * 30 * 52
    # dominated by 30 blocks of 2·N·(4·D² self + 2·D² cross q/out + 2·D·8960 FFN) + 4·N²·D self and
    # 4·N·L·D cross attention (283 PFLOP: attention over 32760 tokens is 70 % of it)
    dominant = 30 * (2 * N * (6 * 1536**2 + 2 * 1536 * 8960) + 4 * N * N * 1536 + 4 * N * 512 * 1536)
    assert 1.0 < flops / dominant < 1.002


def _load_diffusers_wan(ours: DiT, theirs) -> None:
    """Copy a diffusers `WanTransformer3DModel`'s weights into our DiT (same function, other names):
    q/k/v fused into qkv, k/v into kv, the output Linear's rows from (pt, ph, pw, C) to (C, pt, ph, pw)."""
    s = theirs.state_dict()
    D = ours.dim
    pt, ph, pw = ours.patch
    new = {
        "x_embedder.weight": s["patch_embedding.weight"].reshape(D, -1),
        "x_embedder.bias": s["patch_embedding.bias"],
        "final_layer.modulation": s["scale_shift_table"][0],
        "final_layer.linear.weight": s["proj_out.weight"].view(pt, ph, pw, -1, D).permute(3, 0, 1, 2, 4).reshape(-1, D),
        "final_layer.linear.bias": s["proj_out.bias"].view(pt, ph, pw, -1).permute(3, 0, 1, 2).reshape(-1),
    }
    pairs = {
        "t_embedder.mlp.0": "condition_embedder.time_embedder.linear_1",
        "t_embedder.mlp.2": "condition_embedder.time_embedder.linear_2",
        "time_proj.linear": "condition_embedder.time_proj",
        "text_embedder.fc1": "condition_embedder.text_embedder.linear_1",
        "text_embedder.fc2": "condition_embedder.text_embedder.linear_2",
    }
    for i in range(len(ours.blocks)):
        b = f"blocks.{i}."  # the same block prefix on both sides
        pairs.update({
            b + "attn.0.proj": b + "attn1.to_out.0", b + "cross_attn.q": b + "attn2.to_q",
            b + "cross_attn.proj": b + "attn2.to_out.0", b + "norm_cross": b + "norm2",
            b + "mlp.fc1": b + "ffn.net.0.proj", b + "mlp.fc2": b + "ffn.net.2",
        })
        for mine, their_attn in (("attn.0", "attn1"), ("cross_attn", "attn2")):
            new[f"{b}{mine}.q_norm.weight"] = s[f"{b}{their_attn}.norm_q.weight"]
            new[f"{b}{mine}.k_norm.weight"] = s[f"{b}{their_attn}.norm_k.weight"]
        for kind in ("weight", "bias"):
            new[f"{b}attn.0.qkv.{kind}"] = torch.cat([s[f"{b}attn1.to_{n}.{kind}"] for n in "qkv"])
            new[f"{b}cross_attn.kv.{kind}"] = torch.cat([s[f"{b}attn2.to_{n}.{kind}"] for n in "kv"])
        new[b + "modulation"] = s[b + "scale_shift_table"][0]
    for mine, their_name in pairs.items():
        for kind in ("weight", "bias"):
            new[f"{mine}.{kind}"] = s[f"{their_name}.{kind}"]
    ours.load_state_dict(new, strict=True)


def test_same_function_as_diffusers_wan_transformer():
    """With diffusers' weights, our DiT (full attention, 3D RoPE, QK-norm across heads, AdaLN with a
    shared time projection, GELU-tanh) computes what `WanTransformer3DModel` computes: an independent
    check of the RoPE bands and pairing, the AdaLN chunk order and the patch layout."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    theirs = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=16, in_channels=C, out_channels=C,
        text_dim=TEXT_DIM, freq_dim=256, ffn_dim=80, num_layers=2,
    ).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = make_model(dim=48, heads=3, mlp_ratio=80 / 48).eval()
    _load_diffusers_wan(ours, theirs)
    x, t, cond = make_inputs(T=3, H=8, W=6)
    cond = Conditioning(cond.tokens, torch.ones_like(cond.mask))  # diffusers' Wan takes no text mask
    with torch.no_grad():
        expected = theirs(x, t, cond.tokens, return_dict=False)[0]
        out = ours(x, t, cond)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
