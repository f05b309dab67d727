"""Capacity planning: parameters, per-rank memory, FLOPs and communication of a layout.

    megasmoe plan CONFIG [key=value ...] [--gpus N] [--gpu-memory 80GB] [--layouts]

Everything here is arithmetic on the config (no torch, no megatron): it answers in a
fraction of a second for a 47B-parameter recipe. The formulas follow what megasmoe builds
with megatron-core, and the tests hold them to it: parameter counts against the real
model built on the meta device, memory against measured peaks of real runs
(docs/planning.md has the model, the measurements and their error).

- megasmoe.plan.sizes: model shapes, parameter counts (count_parameters), training FLOPs
  per token (flops_per_token), the vocabulary padding and the layers of a pipeline stage.
- megasmoe.plan.estimates: the memory of one rank (estimate_memory; the memory model
  is in its docstring), the communication and step time (estimate_comm), Hardware, the
  overhead constants, and Plan / make_plan: one layout's estimates and fit.
- megasmoe.plan.search: search_layouts (every layout that validates and fits, fastest
  first; when none does, one line per problem) and PlanError.
- megasmoe.plan.cli: the tables ``megasmoe plan`` prints, --gpu-memory parsing and the
  subcommand (add_subcommand).

The names below are re-exported here; the submodules import from each other, never
from this package.
"""

from __future__ import annotations

from megasmoe.plan.cli import add_subcommand, format_layouts, format_plan, parse_memory
from megasmoe.plan.estimates import (
    CPU_BASELINE_GB,
    GB,
    GPU_OVERHEAD_GB,
    CommEstimate,
    Hardware,
    MemoryEstimate,
    Plan,
    estimate_comm,
    estimate_memory,
    make_plan,
)
from megasmoe.plan.search import PlanError, search_layouts
from megasmoe.plan.sizes import (
    ParamCount,
    count_parameters,
    flops_per_token,
    padded_vocab,
    stage_layers,
)

__all__ = [
    "Hardware",
    "ParamCount",
    "MemoryEstimate",
    "CommEstimate",
    "Plan",
    "PlanError",
    "count_parameters",
    "flops_per_token",
    "padded_vocab",
    "stage_layers",
    "estimate_memory",
    "estimate_comm",
    "make_plan",
    "search_layouts",
    "format_plan",
    "format_layouts",
    "parse_memory",
    "add_subcommand",
    "GB",
    "CPU_BASELINE_GB",
    "GPU_OVERHEAD_GB",
]
