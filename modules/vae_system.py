"""The LightningModule that trains a video autoencoder (`modules.vaes`), with manual optimisation.

Generator step (one optimiser over the autoencoder), the LDM / VQGAN recipe (Rombach et al. 2022,
Esser et al. 2021) as the causal video VAEs use it (Wan, HunyuanVideo, Open-Sora):

    q = vae.posterior(x);  z ~ q (or its mean);  x̂ = vae.decode_raw(z)
    L_nll = rec(x, x̂) + w_p · LPIPS(x, x̂)
    L = L_nll + β · KL(q ‖ N(0, I)) + w_o · OPL(z) + [step ≥ disc_start] · w_d · λ · (−E[D(x̂)])
    λ = ‖∇_last L_nll‖ / (‖∇_last L_G‖ + 1e-4)   (adaptive weight at the decoder's last layer)

Discriminator step (its own optimiser, from ``disc_start`` on): hinge loss on D(x) and D(x̂.detach())
with a 3D PatchGAN. OPL is Movie Gen's outlier-penalty loss, for autoencoders that define
``outlier_penalty`` (the TAE). The LPIPS network is frozen and held outside the module tree (its
weights come from a file named in the config, so checkpoints do not carry a copy).

The autoencoder's per-channel latent statistics are measured after training by
`callbacks.latent_stats.LatentStats` and stored in its buffers, so ``encode`` of the trained model
returns normalised latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor

from modules.system import OptimConfig, warmup_schedule
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
    """Trains ``vae`` (a `LatentAutoencoder`) on reconstruction + KL (+ LPIPS, OPL, 3D PatchGAN).

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
        schedulers = [warmup_schedule(opt, self.optim.warmup_steps) for opt in optimizers]
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
