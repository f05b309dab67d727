"""The project's configuration: dataclasses, YAML + ``key=value`` overrides, validation.

- ``schema``: ``Config`` and its section dataclasses, ``ConfigError``, ``field_docs``.
- ``loading``: YAML + overrides, type checks, path resolution, ``to_dict``, ``save_config``.
- ``validation``: ``validate`` (and ``resolve_world``), run before any process group starts.

Import from ``megasmoe.config``; the submodules import from each other, never from here.
"""

from megasmoe.config.loading import (
    CALLER_DIR_ENV,
    OVERRIDES_ENV,
    PATH_FIELDS,
    REPLACED_KEYS,
    _build,
    apply_overrides,
    caller_dir,
    load_config,
    parse_override,
    save_config,
    to_dict,
)
from megasmoe.config.schema import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    RouterSection,
    RunConfig,
    TrainConfig,
    field_docs,
)
from megasmoe.config.validation import (
    EXPERT_BACKENDS,
    FP8_RECIPES,
    TE_FP8_RECIPES,
    duration_s,
    moe_layer_pattern,
    resolve_world,
    validate,
)

__all__ = [
    # schema
    "Config",
    "ConfigError",
    "RunConfig",
    "ModelConfig",
    "RouterSection",
    "MoEConfig",
    "ParallelConfig",
    "TrainConfig",
    "DataConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "field_docs",
    # loading
    "load_config",
    "apply_overrides",
    "parse_override",
    "to_dict",
    "save_config",
    "caller_dir",
    "REPLACED_KEYS",
    "OVERRIDES_ENV",
    "CALLER_DIR_ENV",
    "PATH_FIELDS",
    "_build",  # private, but megasmoe/routers/registry.py and convert/runtime.py build with it
    # validation
    "validate",
    "resolve_world",
    "moe_layer_pattern",
    "duration_s",
    "EXPERT_BACKENDS",
    "FP8_RECIPES",
    "TE_FP8_RECIPES",
]
