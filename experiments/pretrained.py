"""Load an autoencoder trained by vidlab (``task: autoencoder``) from its checkpoint, for generator
training, latent caching or sampling: ``vae=pretrained vae.checkpoint=PATH``.

The checkpoint carries the resolved config it was trained with (``vidlab_config``); its ``vae`` node is
built here (`experiments.build.instantiate`, so the class and its keys are checked as for any preset)
and the ``vae.*`` weights, latent statistics included, are loaded strictly. Nothing pickled is
executed: ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def pretrained_autoencoder(checkpoint: str, trainable: bool = False) -> nn.Module:
    """The ``vae`` of a vidlab autoencoder checkpoint (a Lightning ``.ckpt``), frozen in eval mode
    unless ``trainable``. Raises FileNotFoundError naming the path, ValueError when the file cannot be
    read or is not an autoencoder checkpoint of vidlab."""
    from experiments.build import instantiate  # build imports this module's callers

    path = Path(checkpoint).expanduser()
    if not path.is_file():
        experiment = path.parent.name if path.parent.parent.name == "autoencoders" else "vae_causal3d"
        raise FileNotFoundError(
            f"autoencoder checkpoint {path} does not exist; train one with `vidlab fit {experiment}` "
            "(it is written to <output_dir>/autoencoders/<experiment name>/last.ckpt) or set vae.checkpoint=PATH"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, a pickle that is not plain tensors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"autoencoder checkpoint {path} cannot be read ({first}); is it a complete "
                         "last.ckpt written by `vidlab fit`?") from exc
    config = (ckpt.get("vidlab_config") if isinstance(ckpt, dict) else None) or {}
    if config.get("task") != "autoencoder" or not isinstance(config.get("vae"), dict):
        raise ValueError(f"{path}: not a vidlab autoencoder checkpoint (its vidlab_config has task "
                         f"{config.get('task')!r}; expected 'autoencoder' with a 'vae' node)")
    vae = instantiate(config["vae"], f"{path} [vae]")
    state = {k[len("vae."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("vae.")}
    vae.load_state_dict(state, strict=True)
    if not trainable:
        vae.requires_grad_(False)
        vae.eval()
    return vae
