"""Read any vidlab checkpoint for inference, and export a sharded one to a single safetensors file.

Three forms exist:

- ``*.ckpt`` file: Lightning's checkpoint of a one-process, DDP or autoencoder run (`torch.save`);
- ``*.ckpt/`` folder: an FSDP2 run's sharded checkpoint (torch.distributed.checkpoint): one
  ``.distcp`` file per rank holding ``state_dict`` and ``optimizer_0`` shards, plus Lightning's
  ``meta.pt`` with everything else (the vidlab config, loops, callbacks);
- ``*.safetensors``: the model weights as one file (`export_safetensors`), with the vidlab config
  and the global step in its metadata; it loads into a one-process model.

`read_checkpoint` gives ``{"state_dict", "vidlab_config", "global_step"}`` for any of them. Every
``torch.load`` here uses ``weights_only=True``; safetensors holds no code at all.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from modules.parallel import plain_name

META_FILE = "meta.pt"  # Lightning's ModelParallelStrategy: the non-tensor part of a sharded checkpoint


def is_sharded(path: str | os.PathLike) -> bool:
    """A torch.distributed.checkpoint folder (has ``.metadata``)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``{"state_dict": {name: tensor}, "vidlab_config": dict, "global_step": int}`` of a ``.ckpt``
    file, a sharded ``.ckpt/`` folder (gathered into full tensors on this process) or a
    ``.safetensors`` export. Raises FileNotFoundError / ValueError naming the path."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        if "vidlab_config" not in meta:
            raise ValueError(f"{path}: not a vidlab export (no 'vidlab_config' in its metadata)")
        return {"state_dict": load_file(str(path)), "vidlab_config": json.loads(meta["vidlab_config"]),
                "global_step": int(meta.get("global_step", 0))}
    if is_sharded(path):
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        meta = torch.load(path / META_FILE, map_location="cpu", weights_only=True)
        with tempfile.TemporaryDirectory() as tmp:
            full = Path(tmp) / "full.pt"
            dcp_to_torch_save(path, full)  # one process, no process group: every shard read and joined
            tensors = torch.load(full, map_location="cpu", weights_only=True)
        ckpt = {**meta, "state_dict": tensors["state_dict"]}
    elif path.is_file():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: a folder that is not a sharded checkpoint (no .metadata)")
    if "vidlab_config" not in ckpt:
        raise ValueError(f"{path}: not a vidlab checkpoint (no 'vidlab_config')")
    state = {plain_name(k): v for k, v in ckpt["state_dict"].items()}
    return {"state_dict": state, "vidlab_config": ckpt["vidlab_config"], "global_step": int(ckpt.get("global_step", 0))}


def export_safetensors(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the model weights of ``checkpoint`` (any form) to one ``.safetensors`` file (default:
    beside it, ``<name>.safetensors``), atomically; returns its path."""
    checkpoint = Path(checkpoint)
    out = Path(out) if out is not None else checkpoint.with_suffix(".safetensors")
    ckpt = read_checkpoint(checkpoint)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in ckpt["state_dict"].items()}  # no shared storage
    meta = {"vidlab_config": json.dumps(ckpt["vidlab_config"], default=str), "global_step": str(ckpt["global_step"]),
            "source": str(checkpoint)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
