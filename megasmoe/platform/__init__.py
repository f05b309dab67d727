"""Platform layer: what megatron-core needs to run the same code on CPU and GPU.

``activate()`` is called once per process before megatron-core objects are built;
it does nothing when CUDA is present. See ``megasmoe.platform.cpu`` for the patch list
(P1-P7, P9, P10) and ``megasmoe.platform.imports`` for P8, which acts as megatron is imported.
This package imports torch lazily: ``import megasmoe`` installs P8's import hook
without importing torch (``megasmoe check`` and ``megasmoe routers`` stay fast).
"""

from __future__ import annotations

__all__ = ["PATCHES", "activate", "is_active", "seed_rng_streams", "device", "backend"]

_FROM_CPU = ("PATCHES", "activate", "is_active", "seed_rng_streams")


def __getattr__(name: str):
    # PEP 562: the CPU patches (and torch) load on first use, not at package import.
    if name in _FROM_CPU:
        from megasmoe.platform import cpu

        return getattr(cpu, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def device():
    """The device this process computes on: the local CUDA device, else CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend() -> str:
    """The torch.distributed backend for this machine: nccl with CUDA, else gloo."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"
