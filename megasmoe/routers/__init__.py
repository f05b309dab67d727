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

# Importing a module registers its routers.
from megasmoe.routers import topk  # noqa: E402,F401
from megasmoe.routers import baselines  # noqa: E402,F401
from megasmoe.routers import domain_steer  # noqa: E402,F401
from megasmoe.routers import hyper  # noqa: E402,F401
from megasmoe.routers import spectral  # noqa: E402,F401
from megasmoe.routers import unified  # noqa: E402,F401

__all__ = ["register_router", "registered_routers", "router_config_for", "router_entry",
           "router_spec"]
