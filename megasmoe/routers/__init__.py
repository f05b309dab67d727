"""The router zoo. Importing this package registers every router's fields; a router's
class (and megatron-core with it) is imported on first use (``router_entry``).

Add a router: a module here with its math as plain tensor functions and a
``MegasmoeRouter`` subclass decorated with ``@register_router(name, ConfigCls)``; its
config dataclass (``RouterConfigBase``, one docstring per field) goes in
``options.py`` with ``@router_options(name, module, summary)``.
"""

from megasmoe.routers import options  # noqa: F401  (registers every router's fields)
from megasmoe.routers.registry import (
    register_router,
    registered_routers,
    router_config_class,
    router_config_for,
    router_entry,
    router_options,
    router_spec,
    router_summary,
)

__all__ = ["register_router", "registered_routers", "router_config_class", "router_config_for",
           "router_entry", "router_options", "router_spec", "router_summary"]
