"""Reading and writing a ``Config``: YAML + ``key=value`` overrides, type checks, paths.

A config is read from a YAML file, then overridden by dotted ``key=value`` pairs (from
``MEGASMOE_OVERRIDES``, then the command line; values parsed as YAML and checked against
the field's type). The paths it holds are made absolute, relative to the caller's
directory; ``save_config`` writes the resolved config back as YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from megasmoe.config.schema import Config, ConfigError, RouterSection

__all__ = [
    "REPLACED_KEYS",
    "to_dict",
    "parse_override",
    "apply_overrides",
    "load_config",
    "OVERRIDES_ENV",
    "CALLER_DIR_ENV",
    "PATH_FIELDS",
    "caller_dir",
    "save_config",
]


class _Loader(yaml.SafeLoader):
    """YAML 1.1 SafeLoader that also reads 1e-3 / 3E-4 as floats (plain PyYAML wants a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str, where: str):
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML ({problem}{line})") from None


def _nearest(name: str, choices, prefix: str = "") -> str:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{match[0]}'?" if match else ""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        names = " or ".join(_type_name(a) for a in args if a is not type(None))
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if tp in (list, dict) or origin in (list, dict):
        if not isinstance(value, (origin or tp)):
            raise ConfigError(f"{key}: expected a {_type_name(origin or tp)}, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls, data: dict, prefix: str):
    """Build dataclass ``cls`` from a (nested) dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if cls is RouterSection:
        data = dict(data)
        kwargs = {"name": _coerce(data.pop("name", "topk"), str, prefix + "name")}
        kwargs["options"] = {**data.pop("options", {}), **data}
        return RouterSection(**kwargs)
    kwargs = {}
    for key, value in data.items():
        full = prefix + key
        if full in REPLACED_KEYS:
            raise ConfigError(REPLACED_KEYS[full](value))
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'"
                              f"{_nearest(key, names, prefix)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, full + ".")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


REPLACED_KEYS = {
    "moe.grouped_gemm": lambda value: (
        "moe.grouped_gemm was replaced by moe.expert_backend; set moe.expert_backend="
        + ("grouped" if value else "sequential")),
}
"""Keys that were renamed: the one-line message naming the replacement."""


def to_dict(cfg) -> dict:
    """A config as plain nested dicts (router options flattened under moe.router)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, RouterSection):
            out[f.name] = {"name": value.name, **value.options}
        elif dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        else:
            out[f.name] = value
    return out


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is parsed as YAML (so 2 is int, 1e-3 float)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value, e.g. train.steps=20")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}': empty key; write key=value, e.g. train.steps=20")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply dotted ``key=value`` overrides to a nested dict (types checked on build)."""
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return tree


def load_config(path: Optional[str | Path] = None, overrides: tuple | list = ()) -> Config:
    """Read a YAML config (or the defaults), apply overrides, build and type-check it."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found; pass a YAML file under configs/")
        tree = _yaml_load(path.read_text(), f"config file '{path}'") or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{path}': top level must be a mapping of sections")
    env = os.environ.get(OVERRIDES_ENV, "").split()
    if env:
        try:
            apply_overrides(tree, env)
        except ConfigError as e:
            raise ConfigError(f"{OVERRIDES_ENV}: {e}") from None
    apply_overrides(tree, list(overrides))
    cfg = _build(Config, tree, "")
    _absolute_paths(cfg)
    return cfg


OVERRIDES_ENV = "MEGASMOE_OVERRIDES"
"""Environment variable of extra ``key=value`` overrides (space-separated), applied after
the config file and before the command line's (which win): sets a field for every command
of a script at once (the docs test runs the README's commands at small sizes with it)."""

CALLER_DIR_ENV = "MEGASMOE_CALLER_DIR"
"""Environment variable naming the directory the user ran the command from.
launch/pretrain.sh sets it (the sbatch submit directory under SLURM) before it changes
into the repository; without it that is the current directory."""

PATH_FIELDS = (("run", "dir"), ("data", "tokenizer"), ("data", "cache_dir"),
               ("data", "index_cache_dir"))
"""(section, field) of config fields holding one path; data.prefixes is a list of them."""


def caller_dir() -> Path:
    """The directory relative paths a user gives are relative to (see CALLER_DIR_ENV)."""
    return Path(os.environ.get(CALLER_DIR_ENV) or os.getcwd())


def _absolute(value: str) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else caller_dir() / path)


def _absolute_paths(cfg: "Config") -> None:
    """Make every user-given path absolute, relative to the caller's directory.

    A user types paths relative to where they are; launch/pretrain.sh runs from the
    repository root, and the run's saved config.yaml must still point at the same files
    when resumed from anywhere. The default run directory (runs/<run.name>, no run.dir)
    stays relative to the working directory: the repository root under the launch script.
    """
    for section, name in PATH_FIELDS:
        value = getattr(getattr(cfg, section), name)
        if value:
            setattr(getattr(cfg, section), name, _absolute(str(value)))
    cfg.data.prefixes = [_absolute(str(p)) for p in cfg.data.prefixes]
    steer = cfg.moe.router.options.get("file")
    if isinstance(steer, str) and steer:
        cfg.moe.router.options["file"] = _absolute(steer)


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (atomically: temp file then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
