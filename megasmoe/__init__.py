"""megasmoe: Sparse Mixture-of-Experts pretraining on megatron-core.

The package is laid out one concern per module: ``config`` (what users type),
``platform`` (the CPU/gloo layer under megatron-core), ``routers`` (the router
zoo), ``model`` (megatron-core GPTModel from layer specs), ``training`` (the
loop), ``cli`` (the ``megasmoe`` command).
"""

__version__ = "0.1.0"

from megasmoe.platform import imports as _platform_imports

# P8 (megasmoe/platform/imports.py): must be in place before anything imports megatron.
_platform_imports.install()
