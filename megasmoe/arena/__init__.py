"""``megasmoe arena CONFIG [key=value ...] --routers all --seeds 3 [--quick]``.

Trains every chosen router at equal active compute (megasmoe.arena.plan), several seeds,
one normal megasmoe run per cell in ``<out>/runs/<router>-s<seed>/`` (megasmoe.arena.
runner), sequentially here or as a SLURM job array (``--slurm``, then ``--collect``), and
writes ``<out>/results.md`` and ``<out>/results.json`` (megasmoe.arena.results). A
killed arena run again continues: finished cells are skipped, a cell stopped part-way
resumes from its checkpoint. See docs/arena.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from megasmoe.arena.plan import ArenaError

__all__ = ["add_subcommand", "ArenaError"]

EXIT_ERROR = 2


def _add_options(p: argparse.ArgumentParser, default=None) -> None:
    d = (lambda v: v) if default is None else (lambda v: default)
    p.add_argument("--routers", default=d("all"),
                   help="'all' (every registered router, `megasmoe routers`) or a comma list")
    p.add_argument("--seeds", type=int, default=d(None),
                   help="seeds per router: run.seed, run.seed + 1, ... (default 3; 1 with "
                        "--quick)")
    p.add_argument("--quick", action="store_true", default=d(False),
                   help="preset: 30 steps per cell, one final evaluation, 1 seed unless "
                        "--seeds (docs/arena.md)")
    p.add_argument("--out", default=d(None), metavar="DIR",
                   help="arena directory (default runs/arena-<config name>[-quick])")
    p.add_argument("--slurm", action="store_true", default=d(False),
                   help="submit the unfinished cells as a job array of "
                        "slurm/router-sweep.sbatch, then return")
    p.add_argument("--parallel", type=int, default=d(4), metavar="N",
                   help="--slurm: at most N array tasks at once (default 4)")
    p.add_argument("--sbatch", default=d(""), metavar="'ARGS'",
                   help="--slurm: extra sbatch options as one string, "
                        "--sbatch='--time=4:00:00 --ntasks-per-node=1'")
    p.add_argument("--collect", action="store_true", default=d(False),
                   help="train nothing: evaluate the trained cells and write the table "
                        "(after --slurm)")


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register ``megasmoe arena`` on the ``megasmoe`` command's subparsers."""
    p = subparsers.add_parser("arena", help="every router at equal compute, several seeds, "
                              "one results table (docs/arena.md)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG", help="YAML config shared by every cell")
    _add_options(p)
    # Overrides and options in any order after CONFIG: parsed again in _options.
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="[key=value ...] [options]",
                   help="overrides for every cell (ROUTER:key=value for one router)")
    p.set_defaults(fn=_cmd_arena)
    return p


def _options(args) -> argparse.Namespace:
    from megasmoe.cliargs import parse_rest

    return parse_rest(args, "megasmoe arena", _add_options, ArenaError)


def _default_out(config: str, quick: bool) -> Path:
    return Path("runs") / f"arena-{Path(config).stem}{'-quick' if quick else ''}"


def _setting(cells: list, quick: bool) -> dict:
    """The shared setting of the cells, read from the first cell's resolved config."""
    import yaml

    c = cells[0]
    tree = yaml.safe_load((Path(c.run_dir) / "config.yaml").read_text()) or {}
    m, moe, t = tree.get("model", {}), tree.get("moe", {}), tree.get("train", {})
    describe = (f"{m.get('num_layers')} layers, hidden {m.get('hidden_size')}, "
                f"{moe.get('num_experts')} experts of ffn {moe.get('ffn_hidden_size')}, "
                f"top-{moe.get('topk')}; {t.get('steps')} steps of "
                f"{t.get('global_batch_size')} x {t.get('seq_length')} tokens; "
                f"world size {tree.get('parallel', {}).get('world_size')}; seeds "
                f"{sorted({x.seed for x in cells})}" + ("; --quick" if quick else ""))
    return {"describe": describe, "eval_batches": c.eval_iters, "steps": c.steps,
            "quick": quick}


def _cmd_arena(args) -> int:
    try:
        return _arena(_options(args))
    except ArenaError as e:
        print(f"megasmoe: arena error: {e}", file=sys.stderr, flush=True)
        return EXIT_ERROR


def _arena(args) -> int:
    from megasmoe.arena.plan import parse_routers, plan_cells
    from megasmoe.arena.results import write_results
    from megasmoe.arena.runner import record_plan, run_cells, submit_slurm
    from megasmoe.config import caller_dir

    if args.seeds is None:  # --quick is a first look: one seed, under 10 min on 2 cores
        args.seeds = 1 if args.quick else 3
    if args.seeds < 1:
        raise ArenaError(f"--seeds {args.seeds}: give at least 1 seed")
    if args.parallel < 1:
        raise ArenaError(f"--parallel {args.parallel}: give at least 1")
    if args.slurm and args.collect:
        raise ArenaError("--slurm and --collect: submit first, then collect when the jobs end")
    routers = parse_routers(args.routers)
    out = Path(args.out) if args.out else _default_out(args.config, args.quick)
    out = out if out.is_absolute() else caller_dir() / out
    if out.exists() and not out.is_dir():
        raise ArenaError(f"--out {out} is a file; pass a directory (created if missing)")
    cells = plan_cells(args.config, args.overrides, routers, args.seeds, args.quick, out)
    record_plan(out, args.config, cells)
    print(f"arena: {len(routers)} routers x {args.seeds} seeds = {len(cells)} cells, "
          f"{cells[0].steps} steps each, in {out}", flush=True)
    say = lambda line: print(line, flush=True)  # noqa: E731
    if args.slurm:
        submit_slurm(args.config, cells, out, args.parallel, shlex.split(args.sbatch), say)
        print("arena: when the array has ended, run the same command with --collect instead "
              "of --slurm")
        return 0
    if args.collect:
        from megasmoe.arena.runner import cell_state

        missing = [c.name for c in cells if cell_state(c) in ("new", "partial")]
        if missing:
            raise ArenaError(f"--collect: {len(missing)} cells are not trained yet "
                             f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}); "
                             "wait for the array or run without --collect to train them here")
    run_cells(args.config, cells, out, say)
    command = "megasmoe arena " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if len(sys.argv) > 1 and sys.argv[1] == "arena" else "megasmoe arena ..."
    path = write_results(cells, out, command, _setting(cells, args.quick))
    print(f"arena: wrote {path} and {out / 'results.json'}", flush=True)
    return 0
