"""torch's fused Adam kernel for megatron's optimizer on CPU.

Without Transformer Engine or Apex, megatron-core 0.16.1 builds ``torch.optim.AdamW``
with torch's default implementation, which on CPU is a Python loop over parameters,
~10 tensor operations each. torch's fused CPU kernel (``fused=True``, torch >= 2.4) does
the same update in one pass per tensor: at the default CPU shape (103 tensors, 4.5 M
parameters, 1 thread) 17.7 -> 4.9 ms a step (docs/benchmarks.md). The update is the same formula; results agree to float rounding
(the kernel vectorizes, so the last bit can differ from the loop's), not bitwise.

megatron offers no switch for it, so ``use_fused_adam`` sets the flag on the built
optimizer's param groups (torch reads ``group["fused"]`` at every step). A checkpoint's
param groups carry the flags they were saved with (the loop's, for one written before
this); the checkpoint load puts the run's own back (``RUN_GROUP_KEYS`` in
megasmoe/checkpoint/saveload.py). Only optimizers whose parameters are all on CPU are
switched: on a GPU megatron's optimizer is TE's or Apex's fused Adam where present, and
torch's CUDA default (foreach) is left as megatron chose it.
"""

from __future__ import annotations

import torch

__all__ = ["use_fused_adam"]


def _inner_optimizers(optimizer) -> list:
    """The torch optimizers inside a megatron (chained) optimizer."""
    return [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]


def _fusable(inner) -> bool:
    if type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    params = [p for g in inner.param_groups for p in g["params"]]
    return all(p.is_floating_point() and p.device.type == "cpu" for p in params) \
        and not any(g.get("differentiable") for g in inner.param_groups)


def use_fused_adam(optimizer) -> int:
    """Switch every torch Adam/AdamW inside megatron's ``optimizer`` whose parameters are
    on CPU to torch's fused kernel; returns how many were switched."""
    switched = 0
    for inner in _inner_optimizers(optimizer):
        if not _fusable(inner):
            continue
        inner.defaults.update(fused=True, foreach=False)
        for group in inner.param_groups:
            group.update(fused=True, foreach=False)
        switched += 1
    return switched
