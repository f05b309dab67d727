"""The layout search: every layout of a config that validates and fits, fastest first,
and, when none fits, why."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Optional

from megasmoe.plan.estimates import GB, GPU_OVERHEAD_GB, Hardware, Plan, make_plan
from megasmoe.plan.sizes import count_parameters


class PlanError(ValueError):
    """Nothing fits: one line per problem."""


def _divisors(n: int, limit: Optional[int] = None) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and (limit is None or d <= limit)]


def search_layouts(cfg, hw: Hardware) -> tuple[list[Plan], list[str]]:
    """Every layout of ``cfg``'s model on ``hw.gpus`` that megasmoe's validator accepts
    and that fits, fastest first; and, when none fits, one line per problem.

    Tried: tp (within a node), pp (dividing the layers), vpp (1, 2), ep (dividing the
    experts), etp (1 or tp), cp (1, 2), distributed optimizer and recompute on/off;
    everything else as configured. ``megasmoe.config.validate`` decides what is a valid
    layout (divisibility, EP within DP x CP x TP, batch sizes, ...).
    """
    from megasmoe.config import ConfigError, validate

    n, e = hw.gpus, cfg.moe
    plans, valid = [], []
    for tp, pp, vpp, ep, etp_same, cp, distopt, recompute in itertools.product(
            _divisors(n, hw.gpus_per_node), _divisors(n), (None, 2), _divisors(e.num_experts),
            (False, True), (1, 2), (True, False), (False, True)):
        if n % (tp * pp * cp) or (etp_same and tp == 1) or ep > n:
            continue
        c = copy.deepcopy(cfg)
        c.parallel = dataclasses.replace(c.parallel, tp=tp, pp=pp, vpp=vpp, ep=ep, cp=cp,
                                         etp=tp if etp_same else 1, sp=tp > 1,
                                         world_size=n, dp=None)
        c.train.distributed_optimizer, c.train.recompute = distopt, recompute
        try:
            validate(c, n)
        except ConfigError:
            continue
        q = c.parallel
        if distopt and q.dp * q.cp == 1 and q.tp * q.cp * q.dp == q.ep * q.etp:
            continue  # nothing to shard over: the same layout as without
        plan = make_plan(c, hw)
        valid.append(plan)
        if plan.fits is not False:
            plans.append(plan)
    plans.sort(key=lambda pl: (pl.comm.step_s, pl.memory.total))
    problems: list[str] = []
    if not plans:
        problems = _nothing_fits(cfg, hw, valid)
    return plans, problems


def _nothing_fits(cfg, hw: Hardware, valid: list[Plan]) -> list[str]:
    where = f"{hw.gpus} GPU{'s' if hw.gpus != 1 else ''} of {hw.memory_gb:g} GB"
    if not valid:
        return [f"no parallel layout of this model validates on {where} (tp, pp, ep, cp "
                f"must divide the GPUs, heads, layers and experts; see megasmoe check)"]
    count = count_parameters(cfg)
    states = min(pl.memory.weights + pl.memory.gradients + pl.memory.optimizer
                 for pl in valid) / GB
    best = min(valid, key=lambda pl: pl.memory.total)
    mem = best.memory
    lines = [
        f"smallest layout ({best.layout()}) needs {mem.total / GB:.1f} GB per GPU > "
        f"{hw.memory_gb:g} GB: weights {mem.weights / GB:.1f}, gradients "
        f"{mem.gradients / GB:.1f}, optimizer {mem.optimizer / GB:.1f}, activations "
        f"{mem.activations / GB:.1f}, overhead {mem.overhead / GB:.1f}",
        f"weights + gradients + optimizer state alone are at least {states:.1f} GB per GPU "
        f"for {count.total / 1e9:.1f}B parameters on {hw.gpus} GPUs",
    ]
    total_states = count.total * (2 + 4) + count.total * 12  # bf16 + grads + Adam
    need = -(-int(total_states / GB) // max(1, int(hw.memory_gb - GPU_OVERHEAD_GB)))
    lines.append(f"model states need about {total_states / GB:.0f} GB in all: use at least "
                 f"{max(need, hw.gpus + 1)} GPUs of {hw.memory_gb:g} GB, or GPUs with more "
                 f"memory")
    return lines
