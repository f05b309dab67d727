"""Output and the command line: the plan table, the layout table, ``megasmoe plan``."""

from __future__ import annotations

import copy
import re

from megasmoe.plan.estimates import GB, Hardware, Plan, _precision, make_plan
from megasmoe.plan.search import search_layouts
from megasmoe.plan.sizes import count_parameters, flops_per_token


def parse_memory(text: str) -> float:
    """``80GB``, ``80``, ``141 GiB``, ``512MB`` -> GiB (GB is read as GiB, like nvidia-smi)."""
    mt = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([GMT]i?B?)?\s*", text, flags=re.I)
    if not mt:
        raise ValueError(f"--gpu-memory={text!r}: write a size such as 80GB")
    value, unit = float(mt.group(1)), (mt.group(2) or "G")[0].upper()
    return value * {"M": 1 / 1024, "G": 1.0, "T": 1024.0}[unit]


def _gb(x: float) -> str:
    return f"{x / GB:8.2f}"


def format_plan(plan: Plan, hw: Hardware) -> str:
    """The plan as the table ``megasmoe plan`` prints."""
    cfg, mem, comm = plan.cfg, plan.memory, plan.comm
    count = count_parameters(cfg, cfg.parallel.tp)
    t = cfg.train
    lines = [
        f"model: {count.total / 1e9:.2f}B parameters, {count.active / 1e9:.2f}B active "
        f"({count.total:,} / {count.active:,}); {flops_per_token(cfg) / 1e9:.2f} GFLOPs "
        f"per token (training)",
        f"layout on {hw.gpus} {'GPU' if hw.device == 'gpu' else 'process'}"
        f"{'s' if hw.gpus != 1 else ''}: {plan.layout()}",
        f"precision {_precision(cfg, hw.device)}, dispatcher {cfg.moe.dispatcher}, "
        f"micro batch {t.micro_batch_size} x {t.seq_length} tokens, "
        f"{t.global_batch_size // (t.micro_batch_size * cfg.parallel.dp)} micro batches per "
        f"step",
        "",
        f"memory per rank (GB), pipeline stage {mem.stage} of {cfg.parallel.pp}, "
        f"{mem.params / 1e9:.3f}B parameters:",
        f"  weights                        {_gb(mem.weights)}",
        f"  gradients (fp32 main grads)    {_gb(mem.gradients)}",
        f"  optimizer, replicated          {_gb(mem.optimizer_replicated)}"
        f"{'   <-' if not t.distributed_optimizer else ''}",
        f"  optimizer, distributed         {_gb(mem.optimizer_distributed)}"
        f"{'   <-' if t.distributed_optimizer else ''}",
        f"  activations, no recompute      {_gb(mem.activations_full)}"
        f"{'   <-' if not t.recompute else ''}  ({mem.in_flight} micro batches in flight)",
        f"  activations, full recompute    {_gb(mem.activations_recompute)}"
        f"{'   <-' if t.recompute else ''}",
        f"  overhead                       {_gb(mem.overhead)}",
        f"  total (<- rows)                {_gb(mem.total)}",
    ]
    if plan.fits is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"  {verdict} in {hw.memory_gb:g} GB "
                     f"({100 * mem.total / (hw.memory_gb * GB):.0f}% used)")
    lines += ["", "communication per rank per step:"]
    for kind in ("dp", "tp", "ep", "pp", "cp"):
        if comm.bytes.get(kind):
            lines.append(f"  {kind:3s} {comm.bytes[kind] / GB:10.2f} GB  "
                         f"{comm.seconds[kind]:8.3f} s")
    lines.append(f"  compute {comm.compute_s:.3f} s at {hw.tflops:g} TFLOP/s, pipeline bubble "
                 f"{100 * comm.bubble:.0f}%: about {comm.step_s:.2f} s per step")
    return "\n".join(lines)


def format_layouts(plans: list[Plan], hw: Hardware, top: int) -> str:
    """The ranked layout table of ``megasmoe plan --layouts``."""
    head = (f"{len(plans)} layouts fit on {hw.gpus} GPUs"
            f"{f' of {hw.memory_gb:g} GB' if hw.memory_gb else ''}, fastest first "
            f"(showing {min(top, len(plans))}):")
    rows = [head, f"{'#':>3} {'layout':<86} {'GB/rank':>8} {'comm GB':>8} {'step s':>7}"]
    for i, pl in enumerate(plans[:top], 1):
        rows.append(f"{i:>3} {pl.layout():<86} {pl.memory.total / GB:8.1f} "
                    f"{sum(pl.comm.bytes.values()) / GB:8.1f} {pl.comm.step_s:7.2f}")
    return "\n".join(rows)


def _cmd_plan(args) -> int:
    import sys

    from megasmoe.config import ConfigError, load_config, validate

    cfg = load_config(args.config, args.overrides)
    try:
        memory_gb = parse_memory(args.gpu_memory) if args.gpu_memory else None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    gpus = args.gpus or cfg.parallel.world_size
    if gpus is None:
        validate(copy.deepcopy(cfg))
        gpus = cfg.parallel.world_size or 1
    hw = Hardware(gpus=gpus, memory_gb=memory_gb, gpus_per_node=args.gpus_per_node,
                  device=args.device)
    ok = False
    try:
        configured = validate(copy.deepcopy(cfg), gpus) if args.gpus is None else \
            _at_world_size(cfg, gpus)
    except ConfigError as err:
        configured = None
        print(f"megasmoe: plan: the configured layout does not run on {gpus} GPUs: {err}",
              file=sys.stderr)
    if configured is not None:
        plan = make_plan(configured, hw)
        print(format_plan(plan, hw))
        ok = plan.fits is not False
    if not args.layouts:
        if configured is not None and plan.fits is False:
            print(f"megasmoe: plan: {plan.layout()} needs {plan.memory.total / GB:.1f} GB per "
                  f"GPU > {memory_gb:g} GB; try --layouts", file=sys.stderr)
        return 0 if ok else 2
    plans, problems = search_layouts(cfg, hw)
    if plans:
        print()
        print(format_layouts(plans, hw, args.top))
        return 0
    for line in problems:
        print(f"megasmoe: plan: nothing fits: {line}", file=sys.stderr)
    return 2


def _at_world_size(cfg, gpus: int):
    """The config's layout at another world size (dp follows)."""
    from megasmoe.config import validate

    c = copy.deepcopy(cfg)
    c.parallel.world_size, c.parallel.dp = gpus, None
    return validate(c, gpus)


def add_subcommand(subparsers):
    """Register ``megasmoe plan`` on the ``megasmoe`` command's subparsers."""
    p = subparsers.add_parser(
        "plan", help="parameters, memory per GPU, FLOPs, communication; layouts that fit")
    p.add_argument("config", nargs="?", default=None, help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--gpus", type=int, default=None,
                   help="number of GPUs (default: the config's parallel.world_size)")
    p.add_argument("--gpu-memory", default=None, help="memory per GPU, e.g. 80GB")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--layouts", action="store_true",
                   help="also list every layout that validates and fits, fastest first")
    p.add_argument("--top", type=int, default=15, help="layouts to list (default 15)")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="plan for GPUs (default) or for CPU processes (gloo)")
    p.set_defaults(fn=_cmd_plan)
    return p
