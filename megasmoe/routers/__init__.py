"""The router zoo. Importing this package registers every router.

Add a router: a module here with its math as plain tensor functions, a config
dataclass (``RouterConfigBase``) with one docstring per field, and a
``MegasmoeRouter`` subclass decorated with ``@register_router(name, ConfigCls)``;
then import the module below.
"""

from megasmoe.routers.registry import (
    register_router,
    registered_routers,
    router_config_for,
    router_entry,
    router_spec,
)

from megasmoe.routers import topk  # noqa: E402,F401  (registers "topk")

__all__ = ["register_router", "registered_routers", "router_config_for", "router_entry",
           "router_spec"]
