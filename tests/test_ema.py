"""modules/ema.py: the EMA maths against a float64 re-computation, against Lightning's own
``EMAWeightAveraging`` on a real training run (where Lightning's callback fits: one process), and the
swap that samples and evaluation use. Sharding under FSDP2 is in tests/test_parallel.py."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn

from experiments.build import build_datamodule, build_system
from experiments.config import ConfigError, compose
from modules.ema import EMAConfig, ExponentialMovingAverage, buffer_name


def test_average_follows_the_recursion_in_float64():
    """Random weight trajectories, warm-up on and off, every 1 or 3 steps: each average equals the
    module docstring's recursion computed in float64 (ema_0 = p_0, then lerp with d_k)."""
    for warmup, every in [(True, 1), (False, 1), (True, 3)]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
        net[1].bias.requires_grad_(False)  # frozen: not averaged
        ema = ExponentialMovingAverage(net, EMAConfig(enabled=True, decay=0.95, warmup=warmup, every_n_steps=every))
        assert ema.names == ["0.weight", "0.bias", "1.weight"]
        reference = {n: None for n in ema.names}
        k = 0
        for step in range(1, 13):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(torch.randn_like(p))
            if step % every:
                continue
            ema.update(net)
            d = 0.0 if k == 0 else (min(0.95, (1 + k) / (10 + k)) if warmup else 0.95)
            for name, p in net.named_parameters():
                if name in reference:
                    prev = reference[name]
                    cur = p.detach().double()
                    reference[name] = cur.clone() if prev is None else d * prev + (1 - d) * cur
            k += 1
        assert int(ema.num_updates) == k
        for name, ref in reference.items():
            torch.testing.assert_close(ema.get_buffer(buffer_name(name)).double(), ref, rtol=1e-6, atol=1e-6)


def test_swap_is_exact_and_restores_the_weights():
    torch.manual_seed(0)
    net = nn.Linear(5, 5)
    ema = ExponentialMovingAverage(net, EMAConfig(enabled=True, decay=0.5))
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    raw, avg = net.weight.detach().clone(), ema.get_buffer("weight").clone()
    assert not torch.equal(raw, avg)
    with ema.swapped(net):
        assert torch.equal(net.weight, avg) and torch.equal(ema.get_buffer("weight"), raw)
    assert torch.equal(net.weight, raw) and torch.equal(ema.get_buffer("weight"), avg)
    ema.copy_to(net)
    assert torch.equal(net.weight, avg)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"ema.*decay must be in \(0, 1\), got 1.5"):
        build_system(compose("smoke", ["ema.enabled=true", "ema.decay=1.5"]))
    with pytest.raises(ConfigError, match="ema.decy.*did you mean 'ema.decay'"):
        compose("smoke", ["ema.decy=0.9"])


def _train(composed, callbacks: list, steps: int) -> L.LightningModule:
    torch.manual_seed(0)
    system = build_system(composed)
    data = build_datamodule(composed, system.vae, system.text_model)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    torch.manual_seed(0)
    trainer.fit(system, datamodule=data)
    return system


def test_matches_lightnings_ema_callback_on_a_training_run(out_dir):
    """The same 6 smoke steps twice: with ``ema.enabled`` (no warm-up, decay 0.8), and with Lightning's
    EMAWeightAveraging(decay=0.8), which leaves its average in the model at train end. Same
    training trajectory, so our averages must equal Lightning's, parameter for parameter."""
    steps = 6
    off = ["callbacks.samples=null", "callbacks.timestep_loss=null", "callbacks.model_card=null"]
    ours = _train(compose("smoke", [*off, "ema.enabled=true", "ema.decay=0.8", "ema.warmup=false"]), [], steps)
    theirs = _train(compose("smoke", off), [EMAWeightAveraging(decay=0.8, use_buffers=False)], steps)
    assert int(ours.ema.num_updates) == steps
    names = ours.ema.names
    assert any(n.startswith("backbone.") for n in names) and any(n.startswith("text_encoder.") for n in names)
    theirs_params = dict(theirs.named_parameters())
    moved = 0
    for name in names:
        average = ours.ema.get_buffer(buffer_name(name))
        torch.testing.assert_close(average, theirs_params[name].detach(), rtol=1e-6, atol=1e-7)
        moved += not torch.equal(average, dict(ours.named_parameters())[name])
    assert moved > len(names) // 2  # the average is not just the current weights


def test_callbacks_see_the_average_and_training_goes_on_with_the_raw_weights(out_dir):
    """EveryNSteps callbacks run inside ``averaged_weights``: at that step they see exactly the
    average (and the buffer holds the weights meanwhile); after them the module trains on its own
    weights again, so the loss curve with EMA on is the curve with EMA off, bit for bit."""
    from callbacks.cadence import EveryNSteps

    def state(module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        weights = {n: p.detach().clone() for n, p in module.named_parameters() if n in module.ema.names}
        return weights, {n: module.ema.get_buffer(buffer_name(n)).clone() for n in weights}

    outside: dict[int, tuple] = {}
    inside: dict[int, tuple] = {}
    losses: dict[str, list[float]] = {}

    class Outside(L.Callback):  # listed first: runs before the swap
        def on_train_batch_end(self, trainer, module, *args):
            if module.ema is not None:
                outside[trainer.global_step] = state(module)

    class Inside(EveryNSteps):
        def run(self, trainer, module):
            inside[trainer.global_step] = state(module)

    class Losses(L.Callback):
        def __init__(self, key):
            self.key = key

        def on_train_batch_end(self, trainer, module, outputs, *args):
            losses.setdefault(self.key, []).append(float(outputs["loss"]))

    off = ["callbacks.samples=null", "callbacks.timestep_loss=null", "callbacks.model_card=null"]
    trained = _train(compose("smoke", [*off, "ema.enabled=true", "ema.decay=0.9"]),
                     [Outside(), Inside(2), Losses("ema")], 5)
    _train(compose("smoke", off), [Losses("plain")], 5)
    assert losses["ema"] == losses["plain"] and len(losses["plain"]) == 5
    assert sorted(inside) == [2, 4, 5]  # every 2 steps, and at train end
    for step, (weights_in, buffers_in) in inside.items():
        weights_out, buffers_out = outside[step]
        assert any(not torch.equal(weights_out[n], buffers_out[n]) for n in weights_out)
        for n in weights_out:
            assert torch.equal(weights_in[n], buffers_out[n]) and torch.equal(buffers_in[n], weights_out[n]), n
    final_weights, final_buffers = state(trained)
    assert all(torch.equal(final_weights[n], outside[5][0][n]) for n in final_weights)  # swapped back
    assert all(torch.equal(final_buffers[n], outside[5][1][n]) for n in final_buffers)
