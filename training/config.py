"""Training configuration: per-model YAML defaults merged with a user YAML and the CLI.

``config/training/<model>.yaml`` holds every key a trainer reads, with its default. A
user file passed with ``--config`` may override any of them (nested mappings merge key
by key) but may not add keys (except inside ``*_options`` mappings, which are keyword
arguments of a builder): a typo such as ``lr_rate`` would otherwise be silently
ignored and the run would train with the default. YAML is read with ``safe_load``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from segmentation_safety.checkpoint import is_int
from segmentation_safety.errors import UserError

#: Defaults shipped with the repository, one file per trainable model.
DEFAULTS_DIR = Path(__file__).resolve().parent.parent / "config" / "training"
#: Mappings whose name ends like this are keyword arguments and accept any key.
FREEFORM_SUFFIX = "_options"


class ConfigError(UserError, ValueError):
    """A configuration file or key that cannot be used; the message names it."""


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML mapping from ``path`` (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def merge(
    defaults: dict[str, Any], overrides: dict[str, Any], source: str, prefix: str = ""
) -> dict[str, Any]:
    """``defaults`` updated by ``overrides``; unknown keys raise a ConfigError naming them."""
    merged = copy.deepcopy(defaults)
    for key, value in overrides.items():
        name = f"{prefix}{key}"
        if key not in defaults:
            known = ", ".join(sorted(defaults))
            raise ConfigError(f"{source}: unknown config key {name!r} (known here: {known})")
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: config key {name!r} must be a mapping")
            if key.endswith(FREEFORM_SUFFIX):
                # Builder keyword arguments differ per architecture: pass them through.
                merged[key] = {**defaults[key], **copy.deepcopy(value)}
            else:
                merged[key] = merge(defaults[key], value, source, prefix=f"{name}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def default_config(model: str) -> dict[str, Any]:
    """The shipped defaults for ``model`` (``config/training/<model>.yaml``)."""
    path = DEFAULTS_DIR / f"{model}.yaml"
    if not path.is_file():
        raise ConfigError(f"no default training config for {model!r} ({path} is missing)")
    return read_yaml(path)


def load_config(
    model: str,
    path: str | os.PathLike[str] | None = None,
    cli: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Defaults for ``model``, then the user file at ``path``, then CLI values that are set.

    ``cli`` maps top-level keys to values; ``None`` means "not given on the command line".
    """
    config = default_config(model)
    if path is not None:
        config = merge(config, read_yaml(path), source=str(path))
    given = {k: v for k, v in (cli or {}).items() if v is not None}
    config = merge(config, given, source="command line")
    check_values(config, str(path) if path is not None else f"{model}'s defaults")
    return config


#: Keys every trainer's loop reads -> (smallest value, what it is); checked where present.
POSITIVE_INTS = {"iterations": 1, "batch_size": 1, "checkpoint_every": 1, "log_every": 1}
NON_NEGATIVE = ("workers", "weight_decay", "grad_clip")


def check_values(config: dict[str, Any], source: str) -> None:
    """Refuse, naming the key, values the loop cannot run with (a negative iteration
    count trained nothing and exited 0; a zero log_every divided by zero mid-run)."""

    def bad(key: str, want: str) -> ConfigError:
        return ConfigError(f"{source}: config key {key!r} = {config[key]!r}: {want}")

    def number(key: str) -> bool:
        return isinstance(config[key], int | float) and not isinstance(config[key], bool)

    for key, low in POSITIVE_INTS.items():
        if key in config and not (is_int(config[key]) and config[key] >= low):
            raise bad(key, f"must be an integer >= {low}")
    for key in NON_NEGATIVE:
        if key in config and config[key] is not None and not (number(key) and config[key] >= 0):
            raise bad(key, "must be a number >= 0")
    if "lr" in config and not (number("lr") and config["lr"] > 0):
        raise bad("lr", "must be a number > 0")
    crop = config.get("crop_size")
    if crop is not None and not (
        isinstance(crop, list) and len(crop) == 2 and all(is_int(v) and v > 0 for v in crop)
    ):
        raise bad("crop_size", "must be null or [height, width] in positive integers")
