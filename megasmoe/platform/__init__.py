"""Platform layer: what megatron-core needs to run the same code on CPU and GPU.

``activate()`` is called once per process before megatron-core objects are built;
it does nothing when CUDA is present. See ``megasmoe.platform.cpu`` for the patch list.
"""

import torch

from megasmoe.platform.cpu import PATCHES, activate, is_active, seed_rng_streams

__all__ = ["PATCHES", "activate", "is_active", "seed_rng_streams", "device", "backend"]


def device() -> torch.device:
    """The device this process computes on: the local CUDA device, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend() -> str:
    """The torch.distributed backend for this machine: nccl with CUDA, else gloo."""
    return "nccl" if torch.cuda.is_available() else "gloo"
