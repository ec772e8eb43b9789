"""The LightningModules that wire built parts: `GeneratorSystem` (text-to-video) and
`AutoencoderSystem` (trains a video autoencoder).

They know none of the parts' internals: the objective draws t and noise and computes the loss, the
sampler integrates a velocity field, the autoencoder owns latent normalisation, the loss maths of
autoencoders live in `modules.vaes.losses`. This file only decides what goes where, when guidance
applies, in which order optimisers step, and what a checkpoint carries.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import lightning as L
import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from modules.conditioning import Conditioning
from modules.ema import EMAConfig, ExponentialMovingAverage
from modules.parallel import ParallelConfig, parallelize, unsharded_trainable
from modules.samplers.guidance import Scale, classifier_free_guidance, expert_cfg_scale
from modules.samplers.rollout import frame_rollout
from modules.vaes.base import LatentAutoencoder
from modules.vaes.losses import (
    LPIPS,
    PatchDiscriminator3D,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    kl_loss,
    reconstruction_loss,
)


log = logging.getLogger("vidlab.train")

NONFINITE_CHOICES = ("stop", "skip")
SCHEDULES = ("constant", "cosine", "linear")


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN/Inf loss or gradient (``optim.nonfinite: stop``), before the optimizer
    step: the weights, and every checkpoint written, are those of the last finite step."""


@dataclass
class OptimConfig:
    """AdamW with a linear warm-up to ``lr`` over ``warmup_steps``, then ``schedule``: ``constant``,
    or ``cosine`` / ``linear`` decay from ``lr`` to ``min_lr_ratio · lr`` at ``trainer.max_steps``
    (`lr_schedule`).

    ``nonfinite``: what a step does whose loss or gradients are NaN/Inf on any rank (generator
    training): ``stop`` raises `NonFiniteLossError`; ``skip`` leaves the weights and the optimizer
    state untouched for that batch. Both count it in the metric ``train/nonfinite_skipped``.
    """

    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] | list[float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    nonfinite: str = "stop"

    def __post_init__(self) -> None:
        if self.nonfinite not in NONFINITE_CHOICES:
            raise ValueError(f"optim.nonfinite must be one of {' | '.join(NONFINITE_CHOICES)}, got {self.nonfinite!r}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError(f"optim.weight_decay and optim.warmup_steps must be >= 0, got {self.weight_decay!r} "
                             f"and {self.warmup_steps!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {' | '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        betas = list(self.betas)
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")


def all_finite(tensors: list[Tensor]) -> Tensor:
    """0-dim bool tensor: every element of every tensor is finite (a DTensor: this rank's shard; no sync)."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    if not local:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([torch.isfinite(t).all().to(local[0].device) for t in local]).all()


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The factor on ``lr`` at optimizer step s (stepped once per step), with w = ``warmup_steps``,
    S = ``total_steps`` and m = ``min_lr_ratio``:

        s < w:   (s + 1) / (w + 1)                                    linear warm-up
        after:   constant 1, or with p = min(1, (s − w) / (S − w)):
                 cosine  m + (1 − m)·(1 + cos(π·p)) / 2               (Loshchilov & Hutter 2017, SGDR eq. 5)
                 linear  m + (1 − m)·(1 − p)

    A decaying schedule needs a finite ``total_steps`` (``trainer.max_steps``) greater than w."""
    warmup = max(int(cfg.warmup_steps), 0)
    if cfg.schedule != "constant" and not total_steps > warmup:
        raise ValueError(
            f"optim.schedule: {cfg.schedule} decays over trainer.max_steps, which must be set and exceed "
            f"optim.warmup_steps ({warmup}); got trainer.max_steps = {total_steps}"
        )
    floor = cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup or cfg.schedule == "constant":
            return min(1.0, (step + 1) / (warmup + 1))
        p = min(1.0, (step - warmup) / (total_steps - warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * p)) if cfg.schedule == "cosine" else 1.0 - p
        return floor + (1.0 - floor) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def max_steps(module: L.LightningModule) -> int:
    """``trainer.max_steps`` of the Trainer ``module`` is attached to; −1 (no limit) outside one."""
    trainer = module._trainer
    return trainer.max_steps if trainer is not None else -1


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
        for key in ("cfg_scales", "cfg_boundaries", "cfg_interval"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (list, tuple))
                                          and all(isinstance(v, (int, float)) for v in value)):
                raise ValueError(f"guidance.{key} must be a list of numbers or null, got {value!r}")
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
        parallel: ParallelConfig | None = None,
        ema: EMAConfig | None = None,
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
        self.parallel = parallel or ParallelConfig()
        self._parallelized = False
        self.nonfinite_skipped = 0  # batches not applied because of a NaN/Inf loss or gradient (any rank)
        self._loss_nonfinite: Tensor | None = None  # since the last optimizer step, this rank (no sync)
        self._last_loss: Tensor | None = None
        self._last_batch = 0
        self.ema: ExponentialMovingAverage | None = None
        if ema is not None and ema.enabled:  # of the backbone and a trainable text encoder
            self.ema = ExponentialMovingAverage(self, ema, skip=("vae.",))
            # every rank computes the same average: DDP must not broadcast it before each forward
            self._ddp_params_and_buffers_to_ignore = [f"ema.{name}" for name, _ in self.ema.named_buffers()]

    def configure_model(self) -> None:
        """Apply `modules.parallel.parallelize` once: activation checkpointing / compile per block, and
        under `FSDP2Strategy` (a device mesh is set) FSDP2 sharding of blocks, backbone and a
        trainable text encoder."""
        if self._parallelized:
            return
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        trainable_text = self._modules.get("text_encoder")
        parallelize(self.backbone, trainable_text, self.parallel, mesh, self.device)
        if mesh is not None:
            left = [n for n in unsharded_trainable(self) if not n.startswith("vae.")]
            if left:
                raise RuntimeError(f"FSDP2: trainable parameters outside every sharded unit: {left[:5]}")
            if self.ema is not None:  # each rank keeps the average of its own shards only
                self.ema.match_placement(self)
        self._parallelized = True

    def on_fit_start(self) -> None:
        """Across processes every rank draws its own times, noise and caption dropout: seed + rank
        (the weights were built before this, from the same seed on every rank)."""
        if self.trainer.world_size > 1:
            torch.manual_seed(int(self.config.get("seed", 0)) + self.trainer.global_rank)

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
        # read in on_before_optimizer_step, where every rank decides together (see there)
        bad = ~torch.isfinite(out.loss.detach()).all()
        self._loss_nonfinite = bad if self._loss_nonfinite is None else self._loss_nonfinite | bad
        self._last_loss, self._last_batch = out.loss.detach(), batch_idx
        return out.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optim.nonfinite``: a NaN/Inf loss (any micro-batch since the last step) or gradient on any
        rank stops (`NonFiniteLossError`) or skips this step on every rank.

        The loss went through backward as usual (Lightning forbids a None loss with several ranks, and
        DDP / FSDP expect every rank's backward), so the step is skipped here, after the gradients
        are reduced and before clipping and ``optimizer.step``: dropping every gradient makes AdamW
        leave all parameters and their moments as they are. One all-reduce of two flags per step.
        Under fp16 AMP the gradient scaler owns Inf gradients (it skips those steps itself).
        """
        loss_bad = self._loss_nonfinite if self._loss_nonfinite is not None else torch.zeros((), dtype=torch.bool)
        self._loss_nonfinite = None
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        grads = [] if scaled else [p.grad for p in self.parameters() if p.grad is not None]
        flags = torch.stack([loss_bad.to(self.device), ~all_finite(grads).to(self.device)]).float()
        ranks_loss, ranks_grad = self.trainer.strategy.reduce(flags, reduce_op="sum").tolist()  # ranks that saw it
        if not ranks_loss and not ranks_grad:
            return
        self.nonfinite_skipped += 1
        for logger in self.loggers:  # at once, not on the log_every_n_steps cadence (rank zero only)
            logger.log_metrics({"train/nonfinite_skipped": float(self.nonfinite_skipped)}, step=self.global_step)
        what = self._nonfinite_reason(int(ranks_loss), int(ranks_grad))
        where = f"at step {self.global_step} (batch {self._last_batch} of epoch {self.current_epoch})"
        if self.optim.nonfinite == "stop":
            ckpt = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
            raise NonFiniteLossError(
                f"{what} {where}: stopped before the optimizer step (optim.nonfinite=stop); the weights were not "
                f"updated and the last checkpoint is {ckpt}; set optim.nonfinite=skip to skip such batches")
        if self.trainer.is_global_zero:
            log.warning("%s %s: batch skipped (optim.nonfinite=skip), %d so far", what, where, self.nonfinite_skipped)
        for p in self.parameters():
            p.grad = None

    def _nonfinite_reason(self, ranks_loss: int, ranks_grad: int) -> str:
        """What was non-finite, in words: this rank's loss value, or the other ranks, or gradients."""
        loss = float("nan") if self._last_loss is None else float(self._last_loss.float().mean())
        world = self.trainer.world_size

        def ranks(n: int) -> str:
            return f" on {n} of {world} ranks" if world > 1 else ""

        if ranks_loss:
            this = f" (this rank: {loss:.6g})" if math.isfinite(loss) else ""
            return f"train/loss is {'NaN/Inf' if this else f'{loss:.6g}'}{ranks(ranks_loss)}{this}"
        names = [n for n, p in self.named_parameters() if p.grad is not None and not all_finite([p.grad])]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return f"gradients are NaN/Inf{ranks(ranks_grad)} ({shown or 'other ranks'}) with a finite train/loss {loss:.6g}"

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's step, then the EMA update (before any callback of this step runs, so samples
        and evaluation at step N see the average including step N)."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and (self.trainer.global_step + 1) % self.ema.config.every_n_steps == 0:
            self.ema.update(self)

    @contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Inside the block the module holds the EMA weights (if ``ema.enabled``), its own after."""
        if self.ema is None:
            yield
            return
        with self.ema.swapped(self):
            yield

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params, lr=self.optim.lr, weight_decay=self.optim.weight_decay, betas=tuple(self.optim.betas)
        )
        schedule = lr_schedule(opt, self.optim, max_steps(self))
        # "name": the MLflow key under which the `lr_monitor` callback logs the lr of every step
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "train/lr"}}

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


# ---------------------------------------------------------------- autoencoder training

@dataclass
class AutoencoderLossConfig:
    """Loss terms and weights of autoencoder training (configs/base.yaml, ``autoencoder:``)."""

    recon: str = "l1"                      # l1 | l2
    kl_weight: float = 1.0e-6              # β on KL(q ‖ N(0, I)) (per-sample sum over latent elements)
    sample_posterior: bool = True          # decode z ~ q (True) or the posterior mean
    perceptual_weight: float = 0.0         # w_p; > 0 needs perceptual_path
    perceptual_path: str | None = None     # one file with VGG16 `features.*` and LPIPS `lin*` weights
    outlier_weight: float = 0.0            # w_o on Movie Gen's outlier penalty (autoencoders that define it)
    disc_weight: float = 0.0               # w_d; 0 turns the discriminator off
    disc_start: int = 0                    # generator steps before the GAN terms start
    disc_channels: int = 32
    disc_layers: int = 3
    disc_lr: float | None = None           # None: optim.lr
    adaptive_disc_weight: bool = True      # λ as above; False: λ = 1

    def __post_init__(self) -> None:
        if self.recon not in ("l1", "l2"):
            raise ValueError(f"autoencoder.recon must be 'l1' or 'l2', got {self.recon!r}")
        if self.perceptual_weight > 0 and not self.perceptual_path:
            raise ValueError("autoencoder.perceptual_weight > 0 needs autoencoder.perceptual_path (LPIPS weights file)")


class AutoencoderSystem(L.LightningModule):
    """Trains ``vae`` (a `LatentAutoencoder`) on reconstruction + KL (+ LPIPS, OPL, 3D PatchGAN), with
    manual optimisation. Generator step (one optimiser over the autoencoder), the LDM / VQGAN recipe
    (Rombach et al. 2022, Esser et al. 2021) as the causal video VAEs use it (Wan, HunyuanVideo):

        q = vae.posterior(x);  z ~ q (or its mean);  x̂ = vae.decode_raw(z)
        L_nll = rec(x, x̂) + w_p · LPIPS(x, x̂)
        L = L_nll + β · KL(q ‖ N(0, I)) + w_o · OPL(z) + [step ≥ disc_start] · w_d · λ · (−E[D(x̂)])
        λ = ‖∇_last L_nll‖ / (‖∇_last L_G‖ + 1e-4)   (adaptive weight at the decoder's last layer)

    Discriminator step (its own optimiser, from ``disc_start`` on): hinge loss on D(x) and D(x̂)
    detached, with a 3D PatchGAN. OPL is Movie Gen's outlier penalty, for autoencoders that define
    ``outlier_penalty`` (the TAE). The LPIPS network is frozen and held outside the module tree (its
    weights come from a file named in the config, so checkpoints do not carry a copy). The latent
    statistics are measured after training by `callbacks.latent_stats.LatentStats`.

    ``grad_clip``: max gradient norm for both optimisers (manual optimisation cannot use the
    Trainer's ``gradient_clip_val``; the build passes that value here).
    """

    def __init__(
        self,
        vae: LatentAutoencoder,
        loss: AutoencoderLossConfig | None = None,
        optim: OptimConfig | None = None,
        grad_clip: float | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(vae, LatentAutoencoder):
            raise TypeError(f"AutoencoderSystem trains a LatentAutoencoder, got {type(vae).__name__}")
        self.automatic_optimization = False
        self.vae = vae
        self.loss_cfg = loss or AutoencoderLossConfig()
        self.optim = optim or OptimConfig()
        self.grad_clip = grad_clip
        self.config = config or {}
        self.discriminator = (
            PatchDiscriminator3D(width=self.loss_cfg.disc_channels, layers=self.loss_cfg.disc_layers)
            if self.loss_cfg.disc_weight > 0 else None
        )
        if self.loss_cfg.perceptual_weight > 0:
            object.__setattr__(self, "lpips", LPIPS.from_file(self.loss_cfg.perceptual_path))
        else:
            object.__setattr__(self, "lpips", None)

    # -- losses ----------------------------------------------------------------------------------

    def generator_losses(self, video: Tensor, gan: bool) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """video (B, 3, T, H, W) -> (total generator loss, logged terms, reconstruction x̂)."""
        cfg = self.loss_cfg
        q = self.vae.posterior(video)
        z = q.sample() if cfg.sample_posterior else q.mode()
        recon = self.vae.decode_raw(z)[:, :, : video.shape[2]]  # (B, 3, T, H, W); the TAE pads T up
        terms = {"rec": reconstruction_loss(video, recon, cfg.recon), "kl": kl_loss(q)}
        nll = terms["rec"]
        if self.lpips is not None:
            if next(self.lpips.parameters()).device != video.device:
                self.lpips.to(video.device)
            terms["perceptual"] = self.lpips(video, recon).mean()  # per-frame distances (B, T) -> scalar
            nll = nll + cfg.perceptual_weight * terms["perceptual"]
        loss = nll + cfg.kl_weight * terms["kl"]
        if cfg.outlier_weight > 0 and hasattr(self.vae, "outlier_penalty"):
            terms["outlier"] = self.vae.outlier_penalty(z)
            loss = loss + cfg.outlier_weight * terms["outlier"]
        if gan:
            terms["g"] = hinge_g_loss(self.discriminator(recon))
            weight = torch.ones((), device=video.device)
            if cfg.adaptive_disc_weight:
                weight = adaptive_weight(nll, terms["g"], self.vae.last_layer())
            terms["disc_weight"] = weight
            loss = loss + cfg.disc_weight * weight * terms["g"]
        terms["loss"] = loss
        return loss, terms, recon

    # -- training --------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        video = batch["video"]
        optimizers = self.optimizers()
        opt_g, opt_d = (optimizers, None) if self.discriminator is None else optimizers
        schedulers = self.lr_schedulers()
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        gan = self.discriminator is not None and self.global_step >= self.loss_cfg.disc_start

        loss, terms, recon = self.generator_losses(video, gan)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self._clip(opt_g)
        opt_g.step()

        if gan:  # the discriminator sees real clips and the (detached) reconstructions
            logits_real = self.discriminator(video)
            logits_fake = self.discriminator(recon.detach())
            terms["d"] = hinge_d_loss(logits_real, logits_fake)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(terms["d"])
            self._clip(opt_d)
            # the wrapped torch optimiser: Lightning counts every LightningOptimizer.step() in
            # global_step, and trainer.max_steps / disc_start / checkpoint cadence mean generator steps
            opt_d.optimizer.step()
        schedulers[0].step()
        if gan:  # the discriminator's warm-up counts its own steps
            schedulers[1].step()

        batch_size = video.shape[0]
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            if name != "loss":
                self.log(f"train/{name}", value.detach(), batch_size=batch_size)
        return terms["loss"].detach()

    def _clip(self, optimizer: Any) -> None:
        if self.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")

    def configure_optimizers(self) -> Any:
        def adamw(params: Any, lr: float) -> torch.optim.Optimizer:
            return torch.optim.AdamW(params, lr=lr, weight_decay=self.optim.weight_decay, betas=tuple(self.optim.betas))

        opt_g = adamw([p for p in self.vae.parameters() if p.requires_grad], self.optim.lr)
        optimizers = [opt_g]
        if self.discriminator is not None:
            optimizers.append(adamw(self.discriminator.parameters(), self.loss_cfg.disc_lr or self.optim.lr))
        # stepped by training_step (manual optimisation); the names are the MLflow keys of `lr_monitor`
        schedulers = [{"scheduler": lr_schedule(opt, self.optim, max_steps(self)), "interval": "step", "name": name}
                      for opt, name in zip(optimizers, ("train/lr", "train/lr_disc"))]
        return optimizers, schedulers

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["vidlab_config"] = self.config

    # -- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def reconstruct(self, video: Tensor) -> Tensor:
        """video (B, 3, T, H, W) -> the reconstruction through the posterior mean, clamped to [-1, 1]."""
        was_training = self.training
        self.eval()
        try:
            recon = self.vae.decode_raw(self.vae.posterior(video).mode())[:, :, : video.shape[2]]
            return recon.clamp(-1.0, 1.0)
        finally:
            self.train(was_training)
