"""The router registry: ``moe.router.name`` -> (router class, its config dataclass)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Callable

__all__ = ["register_router", "registered_routers", "router_entry", "router_config_for",
           "router_spec"]

_REGISTRY: dict[str, tuple[type, type]] = {}


def register_router(name: str, config_cls: type) -> Callable[[type], type]:
    """Class decorator: register a router class under ``name`` with its config dataclass."""

    def wrap(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"router '{name}' is registered twice")
        cls.registry_name = name
        cls.config_cls = config_cls
        _REGISTRY[name] = (cls, config_cls)
        return cls

    return wrap


def registered_routers() -> list[str]:
    """Names users may write in moe.router.name."""
    return sorted(_REGISTRY)


def router_entry(name: str) -> tuple[type, type]:
    """(router class, config dataclass) for a registered name; ConfigError otherwise."""
    from megasmoe.config import ConfigError

    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(
            f"moe.router.name='{name}' is not a registered router{hint} "
            f"(known: {', '.join(registered_routers())})"
        )
    return _REGISTRY[name]


def router_config_for(cfg):
    """Build and check the chosen router's own config from ``moe.router.*`` fields."""
    from megasmoe.config import ConfigError, _build

    name = cfg.moe.router.name
    cls, config_cls = router_entry(name)
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
        owners = [r for r, (_, c) in sorted(_REGISTRY.items()) if key in config_fields(c)]
        if owners:
            raise ConfigError(
                f"moe.router.{key} is a field of router {', '.join(owners)}, not of "
                f"moe.router.name={name}; set moe.router.name={owners[0]} or drop "
                f"moe.router.{key}")


def router_spec(cfg) -> functools.partial:
    """What goes into MoESubmodules.router: the class with its config bound."""
    cls, _ = router_entry(cfg.moe.router.name)
    return functools.partial(cls, router_config=router_config_for(cfg))


def config_fields(config_cls: type) -> list[str]:
    """Field names of a router config dataclass."""
    return [f.name for f in dataclasses.fields(config_cls)]
