"""The router registry: ``moe.router.name`` -> (router class, its config dataclass).

The config dataclasses register with ``@router_options`` (megasmoe/routers/options.py,
light); the classes with ``@register_router`` when their module is imported, which
``router_entry`` does on first use.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
from typing import Callable

__all__ = ["router_options", "register_router", "registered_routers", "router_summary",
           "router_config_class", "router_entry", "router_config_for", "router_spec"]

_OPTIONS: dict[str, tuple[type, str, str]] = {}
"""name -> (config dataclass, module of the router class, one-line summary)."""
_CLASSES: dict[str, type] = {}
"""name -> router class, filled as router modules are imported."""


def router_options(name: str, module: str, summary: str) -> Callable[[type], type]:
    """Dataclass decorator: the fields of router ``name``, whose class lives in ``module``.

    Registering the fields apart from the class lets validation and the CLI list routers
    without importing megatron-core (see megasmoe/routers/options.py).
    """

    def wrap(config_cls: type) -> type:
        if name in _OPTIONS:
            raise ValueError(f"router '{name}' is registered twice")
        _OPTIONS[name] = (config_cls, module, summary)
        return config_cls

    return wrap


def register_router(name: str, config_cls: type) -> Callable[[type], type]:
    """Class decorator: register a router class under ``name`` with its config dataclass
    (the one registered with ``@router_options`` under the same name)."""

    def wrap(cls: type) -> type:
        if name in _CLASSES:
            raise ValueError(f"router '{name}' is registered twice")
        if name not in _OPTIONS or _OPTIONS[name][0] is not config_cls:
            raise ValueError(f"router '{name}': register {config_cls.__name__} with "
                             f"@router_options('{name}', ...) in megasmoe/routers/options.py")
        cls.registry_name = name
        cls.config_cls = config_cls
        _CLASSES[name] = cls
        return cls

    return wrap


def registered_routers() -> list[str]:
    """Names users may write in moe.router.name."""
    return sorted(_OPTIONS)


def router_summary(name: str) -> str:
    """One line saying what router ``name`` does."""
    return _OPTIONS[name][2]


def _known(name: str) -> None:
    from megasmoe.config import ConfigError

    if name not in _OPTIONS:
        near = difflib.get_close_matches(name, list(_OPTIONS), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(
            f"moe.router.name='{name}' is not a registered router{hint} "
            f"(known: {', '.join(registered_routers())})"
        )


def router_config_class(name: str) -> type:
    """The config dataclass of a registered router (no megatron import); ConfigError otherwise."""
    _known(name)
    return _OPTIONS[name][0]


def router_entry(name: str) -> tuple[type, type]:
    """(router class, config dataclass) for a registered name; ConfigError otherwise.

    Imports the router's module (and so megatron-core) on first use.
    """
    _known(name)
    config_cls, module, _ = _OPTIONS[name]
    if name not in _CLASSES:
        importlib.import_module(module)
    if name not in _CLASSES:
        raise ValueError(f"router '{name}': {module} defines no class registered under that name")
    return _CLASSES[name], config_cls


def router_config_for(cfg):
    """Build and check the chosen router's own config from ``moe.router.*`` fields."""
    from megasmoe.config import _build

    name = cfg.moe.router.name
    config_cls = router_config_class(name)
    options = dict(cfg.moe.router.options)
    _refuse_other_routers_fields(name, config_cls, options)
    router_cfg = _build(config_cls, options, "moe.router.")
    check = getattr(router_cfg, "validate", None)
    if check is not None:
        check(cfg)
    return router_cfg


def _refuse_other_routers_fields(name: str, config_cls: type, options: dict) -> None:
    """A moe.router.* key that another router has (a leftover of switching routers, or
    the wrong name) is refused naming both routers, not as an unknown key."""
    from megasmoe.config import ConfigError

    own = set(config_fields(config_cls))
    for key in options:
        if key in own:
            continue
        owners = [r for r, (c, _, _) in sorted(_OPTIONS.items()) if key in config_fields(c)]
        if owners:
            raise ConfigError(
                f"moe.router.{key} is a field of router {', '.join(owners)}, not of "
                f"moe.router.name={name}; set moe.router.name={owners[0]} or drop "
                f"moe.router.{key}")


def router_spec(cfg) -> functools.partial:
    """What goes into MoESubmodules.router: the class with its config (and
    moe.aux_loss_normalization) bound."""
    cls, _ = router_entry(cfg.moe.router.name)
    return functools.partial(cls, router_config=router_config_for(cfg),
                             aux_loss_normalization=cfg.moe.aux_loss_normalization)


def config_fields(config_cls: type) -> list[str]:
    """Field names of a router config dataclass."""
    return [f.name for f in dataclasses.fields(config_cls)]
