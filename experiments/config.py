"""Compose one experiment from YAML: presets, the experiment's own keys, then command-line overrides.

An experiment file lists its presets under ``defaults:`` (``- backbone: dit_tiny``) and then sets its
own keys. Composition is strict, in the spirit of Hydra's struct mode but without its machinery:

1. ``configs/base.yaml`` declares every top-level key; a group key (``backbone``, ``data``, ...) is
   ``???`` there and is filled by the preset ``configs/<group>/<name>.yaml``.
2. The experiment's own keys are merged on top; a key that does not already exist is an error that
   names the file, the key and the nearest valid key. A value whose type does not match the existing
   value (``max_steps: ten``) is an error too.
3. Command-line items ``group=preset`` swap a preset, ``a.b=c`` set a key, under the same rules.

Preset folders come from vidlab's own ``configs/`` and from installed packages that register a
folder under the entry-point group ``vidlab.configs`` (see docs/plugins.md).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COMMAND_LINE = "command line"


class ConfigError(ValueError):
    """A configuration problem; the message names the file, the key and what would be valid."""


@dataclass
class Composed:
    """A resolved experiment: plain nested dicts plus where each part came from."""

    cfg: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)  # top-level key -> file it came from
    presets: dict[str, str] = field(default_factory=dict)  # group -> preset name


def config_roots() -> list[Path]:
    """vidlab's own ``configs/`` first, then every folder registered under ``vidlab.configs``.

    An entry point may name a path string, a ``pathlib.Path``, a module (its folder is used) or a
    callable returning one of those.
    """
    roots = [REPO_CONFIGS]
    for ep in entry_points(group="vidlab.configs"):
        obj = ep.load()
        obj = obj() if callable(obj) and not isinstance(obj, (str, Path)) else obj
        path = Path(obj.__file__).parent if hasattr(obj, "__file__") else Path(obj)
        if not path.is_dir():
            raise ConfigError(f"entry point {ep.name!r} in 'vidlab.configs' names {path}, not a folder")
        roots.append(path)
    return roots


def groups(roots: list[Path] | None = None) -> dict[str, dict[str, Path]]:
    """Every preset by group: ``{"backbone": {"dit_tiny": Path(...)}, ...}`` (first root wins)."""
    out: dict[str, dict[str, Path]] = {}
    for root in roots or config_roots():
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if folder.name in ("experiment", "ablation"):
                continue
            presets = out.setdefault(folder.name, {})
            for file in sorted(folder.glob("*.yaml")):
                presets.setdefault(file.stem, file)
    return out


def nearest(word: str, options: list[str] | set[str], prefix: str = "") -> str:
    """A 'did you mean' clause for an error message, or the list of options when none is close."""
    options = sorted(options)
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    if close:
        return f"did you mean {prefix + close[0]!r}?"
    return "valid: " + ", ".join(prefix + o for o in options[:30]) + (" ..." if len(options) > 30 else "")


def find_experiment(name: str) -> Path:
    """``smoke`` → ``configs/experiment/smoke.yaml`` (in any config root); a path is used as is."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"experiment file {path} does not exist")
        return path
    found = {}
    for root in config_roots():
        for file in (root / "experiment").glob("*.yaml"):
            found.setdefault(file.stem, file)
    if name not in found:
        raise ConfigError(f"unknown experiment {name!r}; {nearest(name, set(found))}")
    return found[name]


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and OmegaConf grammar errors
        raise ConfigError(f"{path}: cannot parse YAML: {exc}") from exc
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return OmegaConf.to_container(node, resolve=False)  # type: ignore[return-value]


def load_preset(presets: dict[str, Path], name: str, where: str, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset file; one that starts with ``defaults: [other, ...]`` extends those presets of its own
    group: their keys first (in order), then its own, which may add keys, change values or set a
    node to null (e.g. callbacks/ablation.yaml = default.yaml + the denoising metric)."""
    node = load_yaml(presets[name])
    bases = node.pop("defaults", None)
    if bases is None:
        return node
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{presets[name]}: 'defaults' of a preset must list presets of its group")
    merged: dict[str, Any] = {}
    for base in bases:
        if base not in presets:
            raise ConfigError(f"{presets[name]}: unknown preset {base!r} in defaults; {nearest(base, set(presets))}")
        if base in chain or base == name:
            raise ConfigError(f"{presets[name]}: presets extend each other in a loop: {' -> '.join((*chain, name, base))}")
        merged = _extend(merged, load_preset(presets, base, where, (*chain, name)))
    return _extend(merged, node)


def _extend(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Deep merge for preset inheritance: mappings merge key by key (a changed ``_target_`` replaces
    the node), anything else replaces."""
    out = dict(base)
    for key, value in new.items():
        old = out.get(key)
        mergeable = isinstance(value, dict) and isinstance(old, dict)
        if mergeable and value.get("_target_", old.get("_target_")) == old.get("_target_"):
            out[key] = _extend(old, value)
        else:
            out[key] = value
    return out


def _type_ok(old: Any, new: Any) -> bool:
    interpolation = any(isinstance(v, str) and v.startswith("${") for v in (old, new))
    if old is None or new is None or old == "???" or interpolation:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return isinstance(old, float) or isinstance(new, int)
    if isinstance(old, (list, tuple)):
        return isinstance(new, (list, tuple))
    return type(old) is type(new) or isinstance(old, str) and isinstance(new, str)


def merge_strict(base: dict[str, Any], new: dict[str, Any], source: str, prefix: str = "") -> None:
    """Merge ``new`` into ``base`` in place; unknown keys and wrong types raise ConfigError.

    A node that is ``???`` or ``None`` in ``base`` accepts any mapping wholesale (a group slot or an
    optional section); a ``_target_`` change replaces the whole node, since its keys belong to
    another class.
    """
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"{source}: unknown key {dotted!r}; {nearest(key, set(base), prefix)}")
        old = base[key]
        if isinstance(value, dict) and isinstance(old, dict):
            if "_target_" in value and value["_target_"] != old.get("_target_"):
                base[key] = value
            else:
                merge_strict(old, value, source, dotted + ".")
        elif isinstance(value, dict) and (old is None or old == "???"):
            base[key] = value
        elif isinstance(old, dict) and value is not None:
            raise ConfigError(f"{source}: key {dotted!r} is a section; got the value {value!r}")
        elif not _type_ok(old, value):
            raise ConfigError(
                f"{source}: key {dotted!r} expects {type(old).__name__} (like {old!r}); got {value!r}"
            )
        else:
            base[key] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=1e-3`` → (``"a.b"``, 0.001) with YAML typing; raises ConfigError for malformed items."""
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"{COMMAND_LINE}: override {item!r} must look like key=value")
    key, _, raw = item.partition("=")
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]), resolve=False)
    except Exception as exc:
        raise ConfigError(f"{COMMAND_LINE}: cannot parse value in {item!r}: {exc}") from exc
    return key.strip(), parsed["v"]  # type: ignore[index]


def _nested(key: str, value: Any) -> dict[str, Any]:
    node: Any = value
    for part in reversed(key.split(".")):
        node = {part: node}
    return node


def compose(experiment: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Composed:
    """Resolve an experiment name or file plus command-line overrides into one plain dict.

    Raises ConfigError naming the file (or "command line"), the key and the nearest valid key.
    """
    exp_path = find_experiment(str(experiment))
    preset_files = groups()
    base_path = REPO_CONFIGS / "base.yaml"
    cfg = load_yaml(base_path)
    sources = {key: str(base_path) for key in cfg}

    exp = load_yaml(exp_path)
    choices: dict[str, tuple[str, str]] = {}  # group -> (preset, where it was chosen)
    for entry in exp.pop("defaults", []) or []:
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(f"{exp_path}: each 'defaults' entry must be one 'group: preset' pair")
        choices.update({str(k): (str(v), str(exp_path)) for k, v in entry.items()})

    key_values = []
    for item in overrides:
        key, value = parse_override(item)
        if "." not in key and key in preset_files and isinstance(value, str):
            choices[key] = (value, COMMAND_LINE)
        else:
            key_values.append((key, value))

    for group, (name, where) in choices.items():
        if group not in preset_files:
            raise ConfigError(f"{where}: unknown preset group {group!r}; {nearest(group, set(preset_files))}")
        if name not in preset_files[group]:
            raise ConfigError(f"{where}: unknown {group} preset {name!r}; {nearest(name, set(preset_files[group]))}")
        if group not in cfg:
            raise ConfigError(f"{base_path}: preset group {group!r} has no top-level key")
        path = preset_files[group][name]
        cfg[group] = load_preset(preset_files[group], name, str(path))
        sources[group] = str(path)

    merge_strict(cfg, exp, str(exp_path))
    for key, value in key_values:
        merge_strict(cfg, _nested(key, value), COMMAND_LINE)
    cfg["presets"] = {**(cfg.get("presets") or {}), **{g: name for g, (name, _) in choices.items()}}

    missing = [k for k, v in cfg.items() if v == "???"]
    if missing:
        raise ConfigError(f"{exp_path}: no preset chosen for {missing}; add them under 'defaults:'")
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        raise ConfigError(f"{exp_path}: no value for {exc.full_key!r}; set it, e.g. {exc.full_key}=...") from exc
    except Exception as exc:  # an interpolation to a key that does not exist
        raise ConfigError(f"{exp_path}: {exc}") from exc
    return Composed(resolved, sources, cfg["presets"])  # type: ignore[arg-type]


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists are kept as values (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def to_yaml(cfg: dict[str, Any]) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(cfg))
