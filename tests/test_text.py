"""Text encoders: stable hashing tokenizer, null prompt, masks; MiniLM through transformers."""

import os
import subprocess
import sys
import zlib

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modules.conditioning import Conditioning  # noqa: E402
from modules.text.base import TextEncoder  # noqa: E402
from modules.text.hf import HFTextEncoder  # noqa: E402
from modules.text.trainable import TrainableTextEncoder  # noqa: E402

CAPTION = "A red circle, moving LEFT"
# [BOS] + [2 + zlib.crc32(word.encode()) % (4096 - 2) for word in "a red circle moving left".split()]
CAPTION_IDS = [1, 2271, 4005, 4025, 1952, 1616]


def test_trainable_ids_are_stable_crc32():
    enc = TrainableTextEncoder(dim=32, vocab_size=4096, max_length=8, heads=2)
    ids, mask = enc.tokenize([CAPTION])
    assert ids[0, :6].tolist() == CAPTION_IDS
    assert ids[0, 6:].tolist() == [0, 0] and mask[0].tolist() == [True] * 6 + [False] * 2
    assert CAPTION_IDS[1] == 2 + zlib.crc32(b"a") % 4094


def test_trainable_ids_stable_across_processes():
    code = (
        "from modules.text.trainable import TrainableTextEncoder as E;"
        f"print(E(dim=8, heads=2).tokenize([{CAPTION!r}])[0][0, :6].tolist())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True)
    assert out.stdout.strip() == str(CAPTION_IDS)


def test_trainable_forward_null_prompt_and_mask():
    torch.manual_seed(0)
    enc = TrainableTextEncoder(dim=32, max_length=4, depth=2, heads=2)
    assert isinstance(enc, TextEncoder) and enc.dim == 32 and enc.max_length == 4
    cond = enc(["", CAPTION])  # caption has 6 tokens: truncated to max_length = 4
    assert isinstance(cond, Conditioning) and len(cond) == 2
    assert cond.tokens.shape == (2, 4, 32) and cond.mask.shape == (2, 4)
    assert cond.mask.sum(1).tolist() == [1, 4]
    assert torch.isfinite(cond.tokens).all()
    cond.tokens[cond.mask].sum().backward()
    assert enc.embed.weight.grad is not None and enc.embed.weight.grad.abs().sum() > 0


def test_trainable_padding_does_not_leak():
    """The valid outputs of a prompt do not depend on how much padding follows it."""
    torch.manual_seed(0)
    short = TrainableTextEncoder(dim=16, max_length=8, heads=2).eval()
    long = TrainableTextEncoder(dim=16, max_length=16, heads=2).eval()
    with torch.no_grad():
        long.pos[:8] = short.pos
        long.load_state_dict({k: v for k, v in short.state_dict().items() if k != "pos"}, strict=False)
        a, b = short(["red circle"]), long(["red circle"])
    torch.testing.assert_close(a.tokens[0, :3], b.tokens[0, :3], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- Hugging Face (MiniLM)

@pytest.fixture(scope="module")
def minilm():
    return HFTextEncoder(max_length=16)


def test_hf_shapes_and_mask_match_tokenizer(minilm):
    prompts = ["a red circle moving left", "", "a very long caption " * 10]
    cond = minilm(prompts)
    assert minilm.dim == 384 and cond.tokens.shape == (3, 16, 384) and cond.mask.dtype == torch.bool
    ref = minilm.tokenizer(prompts, padding="max_length", truncation=True, max_length=16)
    assert cond.mask.long().tolist() == ref["attention_mask"]
    assert cond.mask[1].sum() >= 1  # null prompt: [CLS] [SEP]
    assert cond.mask[2].all()  # truncated to max_length


def test_hf_frozen(minilm):
    assert all(not p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.model.training
    assert not minilm(["x"]).tokens.requires_grad


def test_hf_similar_captions_are_closer(minilm):
    cond = minilm(["a red circle moving left", "a red circle moving right", "the stock market fell today"])
    m = cond.mask[..., None].float()
    pooled = torch.nn.functional.normalize((cond.tokens * m).sum(1) / m.sum(1), dim=-1)  # (3, 384)
    sim = pooled @ pooled.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2


def test_hf_cache_identical_and_skips_model():
    enc = HFTextEncoder(max_length=8)
    first = enc(["a blue square", "a red circle"])
    calls = []
    enc.model.register_forward_hook(lambda *args: calls.append(1))
    again = enc(["a red circle", "a blue square", "a red circle"])
    assert calls == []
    assert torch.equal(again.tokens[0], first.tokens[1]) and torch.equal(again.tokens[1], first.tokens[0])
    assert torch.equal(again.mask[2], first.mask[1])
    enc(["a new caption", "a red circle"])
    assert calls == [1]  # only the new caption is encoded


def test_hf_missing_path_raises():
    with pytest.raises(FileNotFoundError, match="/nonexistent/text-model"):
        HFTextEncoder("/nonexistent/text-model")
