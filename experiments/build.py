"""The one place where configuration becomes objects.

Every node with ``_target_: package.module.Class`` is built by importing that class and calling it
with the node's other keys. Keys the constructor does not take are errors naming the config file,
the key and the nearest parameter, so a typo inside a preset is caught before any training starts.
Values one part needs from another (the backbone's input channels come from the autoencoder, its
text width from the text encoder) are passed here, explicitly, and nowhere else.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

import lightning as L

from experiments.config import Composed, ConfigError, nearest
from modules.ema import EMAConfig
from modules.parallel import FSDP2Strategy, ParallelConfig
from modules.system import AutoencoderLossConfig, AutoencoderSystem, GeneratorSystem, GuidanceConfig, OptimConfig


def locate(target: str, where: str) -> Any:
    """Import ``package.module.Attr``; ``where`` names the config file and key for errors."""
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import {module_name!r} for _target_ {target!r}: {exc}") from exc
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_")]
        raise ConfigError(f"{where}: {module_name!r} has no {attr!r}; {nearest(attr, names)}")
    return getattr(module, attr)


def check_kwargs(fn: Any, keys: list[str], where: str) -> None:
    """Raise ConfigError when ``fn`` does not accept every key (unless it takes ``**kwargs``)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [name for name in params if name != "self"]
    for key in keys:
        if key not in valid:
            name = getattr(fn, "__qualname__", str(fn))
            raise ConfigError(f"{where}: unknown key {key!r} for {name}; {nearest(key, valid)}")


def _nested_where(where: str, key: str) -> str:
    """``"file [backbone]"`` + ``experts`` → ``"file [backbone.experts]"``."""
    return f"{where[:-1]}.{key}]" if where.endswith("]") else f"{where}.{key}"


def _build_nested(value: Any, where: str, injected: dict[str, Any]) -> Any:
    """Build every ``_target_`` node inside a constructor argument (in lists and mappings, at any
    depth), passing ``injected`` down; other values are returned as they are."""
    if isinstance(value, dict) and "_target_" in value:
        return instantiate(value, where, **injected)
    if isinstance(value, dict):
        return {k: _build_nested(v, _nested_where(where, str(k)), injected) for k, v in value.items()}
    if isinstance(value, list):
        return [_build_nested(v, _nested_where(where, str(i)), injected) for i, v in enumerate(value)]
    return value


def instantiate(node: dict[str, Any], where: str, **injected: Any) -> Any:
    """Build ``node`` (a dict with ``_target_``). ``injected`` values fill parameters the node leaves
    unset and the constructor accepts; values in the node win.

    Arguments that are themselves ``_target_`` nodes (or lists / mappings of them) are built first,
    with the same ``injected`` values: ``TimestepExperts(experts={high_noise: {_target_: ...DiT}})``
    receives built DiTs whose ``in_channels`` and ``text_dim`` came from the autoencoder and the text
    encoder. Errors inside name the nested key (``[backbone.experts.high_noise]``).
    """
    if not isinstance(node, dict) or "_target_" not in node:
        raise ConfigError(f"{where}: expected a mapping with a '_target_' key, got {node!r}")
    target = locate(node["_target_"], where)
    kwargs = {k: v for k, v in node.items() if k != "_target_"}
    check_kwargs(target, list(kwargs), where)
    kwargs = {k: _build_nested(v, _nested_where(where, k), injected) for k, v in kwargs.items()}
    params = inspect.signature(target).parameters
    for key, value in injected.items():
        if key in params and key not in kwargs:
            kwargs[key] = value
    try:
        return target(**kwargs)
    except (TypeError, ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"{where}: building {node['_target_']} failed: {exc}") from exc


def _where(composed: Composed, key: str) -> str:
    return f"{composed.sources.get(key, 'config')} [{key}]"


@dataclass
class Parts:
    """The swappable model parts of a generator, built and wired."""

    text: Any
    vae: Any
    backbone: Any
    objective: Any
    sampler: Any


def build_parts(composed: Composed) -> Parts:
    cfg = composed.cfg
    text = instantiate(cfg["text"], _where(composed, "text"))
    vae = instantiate(cfg["vae"], _where(composed, "vae"))
    backbone = instantiate(
        cfg["backbone"], _where(composed, "backbone"), in_channels=vae.latent_channels, text_dim=text.dim
    )
    objective = instantiate(cfg["objective"], _where(composed, "objective"))
    sampler = instantiate(cfg["sampler"], _where(composed, "sampler"))
    return Parts(text, vae, backbone, objective, sampler)


def build_generator_system(composed: Composed) -> GeneratorSystem:
    """The LightningModule of a text-to-video generator, carrying its resolved config."""
    cfg = composed.cfg
    parts = build_parts(composed)
    return GeneratorSystem(
        backbone=parts.backbone, vae=parts.vae, text_encoder=parts.text,
        objective=parts.objective, sampler=parts.sampler, config=cfg,
        optim=section(composed, "optim", OptimConfig), guidance=section(composed, "guidance", GuidanceConfig),
        parallel=section(composed, "parallel", ParallelConfig), ema=section(composed, "ema", EMAConfig),
    )


def section(composed: Composed, key: str, cls: type) -> Any:
    """The dataclass ``cls`` built from the config section ``key`` (absent: its defaults); an unknown
    field names the nearest one, a value ``cls`` refuses (its ValueError, e.g. optim.lr <= 0) names
    the section."""
    node = composed.cfg.get(key) or {}
    check_kwargs(cls, list(node), _where(composed, key))
    try:
        return cls(**node)
    except ValueError as exc:
        raise ConfigError(f"{_where(composed, key)}: {exc}") from exc


def build_autoencoder_system(composed: Composed) -> AutoencoderSystem:
    """The LightningModule that trains ``vae`` itself (``task: autoencoder``) with the ``autoencoder``
    loss settings; ``trainer.gradient_clip_val`` becomes its clipping (manual optimisation)."""
    cfg = composed.cfg
    vae = instantiate(cfg["vae"], _where(composed, "vae"))
    check_kwargs(OptimConfig, list(cfg["optim"]), _where(composed, "optim"))
    check_kwargs(AutoencoderLossConfig, list(cfg["autoencoder"]), _where(composed, "autoencoder"))
    try:
        loss = AutoencoderLossConfig(**cfg["autoencoder"])
        return AutoencoderSystem(vae, loss, OptimConfig(**cfg["optim"]),
                                 grad_clip=(cfg["trainer"] or {}).get("gradient_clip_val"), config=cfg)
    except (TypeError, ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"{_where(composed, 'autoencoder')}: {exc}") from exc


SYSTEMS = {"generator": build_generator_system, "autoencoder": build_autoencoder_system}


def build_system(composed: Composed) -> L.LightningModule:
    """The LightningModule of the experiment's ``task`` (generator or autoencoder)."""
    task = composed.cfg.get("task", "generator")
    if task not in SYSTEMS:
        raise ConfigError(f"{_where(composed, 'task')}: unknown task {task!r}; {nearest(str(task), list(SYSTEMS))}")
    return SYSTEMS[task](composed)


def build_datamodule(composed: Composed, vae: Any = None, text_encoder: Any = None) -> L.LightningDataModule:
    """The ``data`` node; ``vae`` and ``text_encoder`` (the system's) go to a constructor that takes
    them and is not given them: the latent cache checks its fingerprint against them."""
    injected = {k: v for k, v in {"vae": vae, "text_encoder": text_encoder}.items() if v is not None}
    return instantiate(composed.cfg["data"], _where(composed, "data"), **injected)


def build_callbacks(composed: Composed) -> list[L.Callback]:
    where = _where(composed, "callbacks")
    nodes = composed.cfg["callbacks"] or {}
    return [instantiate(node, _nested_where(where, name)) for name, node in nodes.items() if node]


def trainer_kwargs(composed: Composed) -> dict[str, Any]:
    """The ``trainer`` section, checked against ``lightning.Trainer``'s parameters; ``strategy: fsdp``
    becomes `modules.parallel.FSDP2Strategy` (``ddp`` and Lightning's other names pass through)."""
    kwargs = dict(composed.cfg["trainer"])
    check_kwargs(L.Trainer.__init__, list(kwargs), _where(composed, "trainer"))
    optim = composed.cfg.get("optim") or {}
    schedule, max_steps = optim.get("schedule", "constant"), kwargs.get("max_steps", -1)
    if schedule != "constant" and not (isinstance(max_steps, int) and max_steps > optim.get("warmup_steps", 0)):
        raise ConfigError(f"{_where(composed, 'optim')}: optim.schedule: {schedule} decays over trainer.max_steps, "
                          f"which must be set and exceed optim.warmup_steps; got trainer.max_steps = {max_steps}")
    if kwargs.get("strategy") == "fsdp":
        if composed.cfg.get("task") == "autoencoder":
            raise ConfigError(f"{_where(composed, 'trainer')}: strategy fsdp shards a generator's backbone blocks; "
                              "train autoencoders with ddp")
        kwargs["strategy"] = FSDP2Strategy()
    if composed.cfg.get("task") == "autoencoder":  # manual optimisation: the system clips (see above)
        kwargs.pop("gradient_clip_val", None)
        kwargs.pop("gradient_clip_algorithm", None)
    return kwargs
