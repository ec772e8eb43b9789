"""The LightningModule that wires a text-to-video generator from built parts.

It knows none of the parts' internals: the objective draws t and noise and computes the loss, the
sampler integrates a velocity field, the autoencoder owns latent normalisation. This file only
decides what goes where, when guidance applies, and what a checkpoint carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from modules.conditioning import Conditioning
from modules.samplers.guidance import Scale, classifier_free_guidance, expert_cfg_scale
from modules.samplers.rollout import frame_rollout


@dataclass
class OptimConfig:
    """AdamW with a linear warm-up to ``lr`` over ``warmup_steps``, constant after."""

    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] | list[float] = (0.9, 0.999)
    warmup_steps: int = 0


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr · min(1, (step + 1) / (warmup_steps + 1)): linear warm-up, constant after (stepped per step)."""
    warmup = max(int(warmup_steps), 0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))


@dataclass
class GuidanceConfig:
    """Classifier-free guidance (Ho & Salimans 2022): caption dropout in training, scale at sampling.

    ``cfg_scales`` (optional) replaces ``cfg_scale`` by one scale per time interval, highest noise
    first, split at ``cfg_boundaries`` (sampler time, t = 0 data): Wan2.2 A14B uses [4.0, 3.0] split
    at [0.875], one scale per expert.
    """

    cond_dropout: float = 0.1
    cfg_scale: float = 4.0
    cfg_scales: list[float] | None = None
    cfg_boundaries: list[float] | None = None
    cfg_interval: list[float] | None = None

    def __post_init__(self) -> None:
        if self.cfg_scales is not None:
            self.scale()  # raises ValueError when the scales and boundaries do not fit
        self.interval()  # raises ValueError on a malformed interval

    def scale(self) -> Scale:
        """The ``scale`` argument of `classifier_free_guidance`: a number, or s(t) per interval."""
        if self.cfg_scales is None:
            return self.cfg_scale
        return expert_cfg_scale(self.cfg_boundaries or [], self.cfg_scales)

    def interval(self) -> tuple[float, float] | None:
        """The ``interval`` argument of `classifier_free_guidance`: guidance only for sampler times
        t in [start, stop] (Kynkäänniemi et al. 2024), or None for every step."""
        if self.cfg_interval is None:
            return None
        if len(self.cfg_interval) != 2 or not 0.0 <= self.cfg_interval[0] <= self.cfg_interval[1] <= 1.0:
            raise ValueError(f"guidance.cfg_interval must be [start, stop] with 0 <= start <= stop <= 1, got {self.cfg_interval}")
        return float(self.cfg_interval[0]), float(self.cfg_interval[1])


class GeneratorSystem(L.LightningModule):
    """Trains ``backbone`` on ``objective.loss`` over ``vae.encode(video)`` conditioned on captions.

    A frozen text encoder is held outside the module tree: its weights come from a folder named in
    the config, so checkpoints do not carry a copy. A trainable one is an ordinary submodule.
    """

    def __init__(
        self,
        backbone: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        objective: Any,
        sampler: Any,
        optim: OptimConfig | None = None,
        guidance: GuidanceConfig | None = None,
        config: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.vae = vae
        if any(p.requires_grad for p in text_encoder.parameters()):
            self.text_encoder = text_encoder
        else:
            object.__setattr__(self, "frozen_text_encoder", text_encoder.eval())
        self.objective = objective
        self.sampler = sampler
        self.optim = optim or OptimConfig()
        self.guidance = guidance or GuidanceConfig()
        self.config = config or {}

    # -- conditioning ----------------------------------------------------------------------------

    @property
    def text_model(self) -> nn.Module:
        """The text encoder: a frozen one (held outside the module tree) or the trainable submodule."""
        return self.__dict__.get("frozen_text_encoder") or self.text_encoder

    def encode_text(self, prompts: list[str]) -> Conditioning:
        """Captions → Conditioning on this module's device; ``""`` is the null condition."""
        encoder = self.text_model
        params = next(encoder.parameters(), None)
        if params is not None and params.device != self.device:
            encoder.to(self.device)
        return encoder(prompts).to(self.device)

    def keep_captions(self, n: int) -> Tensor:
        """(n,) bool, False with probability ``cond_dropout``: one draw per caption (global torch RNG)."""
        return torch.rand(n) >= self.guidance.cond_dropout

    def drop_captions(self, captions: list[str]) -> list[str]:
        """Replace each caption by ``""`` with probability ``cond_dropout`` (global torch RNG)."""
        keep = self.keep_captions(len(captions))
        return [c if k else "" for c, k in zip(captions, keep.tolist())]

    def cached_text(self, batch: dict[str, Any]) -> Conditioning:
        """Conditioning from a latent cache's ``text`` (B, L, D) and ``text_mask`` (B, L); a dropped
        caption gets the cached null encoding (L, D), drawn exactly as in `drop_captions`."""
        keep = self.keep_captions(len(batch["caption"])).to(self.device)  # (B,)
        tokens = torch.where(keep[:, None, None], batch["text"], batch["null_text"])  # (B, L, D)
        mask = torch.where(keep[:, None], batch["text_mask"], batch["null_text_mask"])  # (B, L)
        return Conditioning(tokens, mask)

    # -- training --------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        cached = "latent" in batch  # from a latent cache (datamodules/latent_cache.py), encoded offline
        if cached and "frozen_text_encoder" in self.__dict__:
            cond = self.cached_text(batch)
        else:  # a trainable text encoder learns here, so it encodes the captions itself
            cond = self.encode_text(self.drop_captions(batch["caption"]))
        if cached:
            x0 = batch["latent"]
        else:
            with torch.no_grad():
                x0 = self.vae.encode(batch["video"])  # (B, C, T', H', W'), normalised by the VAE
        per_frame = bool(getattr(self.backbone, "per_frame_time", False))  # diffusion forcing
        out = self.objective.loss(self.backbone, x0, cond, per_frame=per_frame)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=x0.shape[0])
        return out.loss

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params, lr=self.optim.lr, weight_decay=self.optim.weight_decay, betas=tuple(self.optim.betas)
        )
        schedule = warmup_schedule(opt, self.optim.warmup_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["vidlab_config"] = self.config

    # -- sampling --------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        num_frames: int,
        height: int,
        width: int,
        cfg_scale: float | None = None,
    ) -> Tensor:
        """One video per (prompt, seed) pair: ``(B, 3, T, H, W)`` pixels in [-1, 1].

        The noise of each video depends only on its seed, so a prompt and seed give the same video
        at every call, on every device count.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
        shape = self.vae.latent_shape(num_frames, height, width)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        scale = self.guidance.scale() if cfg_scale is None else cfg_scale
        cond = self.encode_text(list(prompts))
        null = self.encode_text([""] * len(prompts))
        guide = partial(
            classifier_free_guidance, cond=cond, null_cond=null, scale=scale, interval=self.guidance.interval()
        )
        # stochastic samplers (DDPM, DDIM η > 0) continue each seed's generator after its starting noise
        options: dict[str, Any] = {"path": self.objective.path}
        if getattr(self.sampler, "stochastic", False):
            options["generator"] = generators

        def velocity(x: Tensor, t: Tensor, c: Conditioning) -> Tensor:
            return self.objective.velocity(self.backbone, x, t, c)

        was_training = self.training
        self.eval()
        try:
            noise = noise.to(self.device)
            if hasattr(self.backbone, "new_cache"):  # frame-autoregressive: chunk by chunk with a KV cache
                x0 = frame_rollout(self.backbone, self.objective, self.sampler, guide, noise, **options)
            else:
                x0 = self.sampler.sample(guide(velocity), noise, **options)
            return self.vae.decode(x0).clamp(-1.0, 1.0)
        finally:
            self.train(was_training)
