"""The ``megasmoe`` command.

    megasmoe pretrain [CONFIG.yaml] [key=value ...]   train (under torchrun/srun or alone)
    megasmoe check    [CONFIG.yaml] [key=value ...]   validate a config, print the layout
    megasmoe world-size [CONFIG.yaml] [key=value ...] validate, print the process count
    megasmoe checkpoint inspect DIR                   summary + integrity check of a checkpoint
    megasmoe tokenizer train --input F... --output-prefix P --vocab-size N
    megasmoe preprocess --input F... --output-prefix P --tokenizer T [--workers N]
    megasmoe convert to-hf|from-hf|verify ...         Hugging Face conversion (docs/conversion.md)
    megasmoe launch [--dry-run] CONFIG ...            SLURM plan / pre-flight (docs/slurm.md)
    megasmoe plan CONFIG [key=value ...] [--gpus N] [--gpu-memory 80GB] [--layouts]
                                                      memory per GPU, fit, layouts (docs/planning.md)
    megasmoe eval RUN [key=value ...] [--data N=F] [--mc N=F] [--batches N]
                                                      perplexity, multiple-choice accuracy (docs/evaluation.md)
    megasmoe steer discover|apply RUN ...             DSMoE expert discovery and steering (docs/steering.md)
    megasmoe routers                                  list registered routers and fields
    megasmoe arena CONFIG [key=value ...] [--routers all] [--seeds 3] [--quick]
                                                      every router, equal compute, one table (docs/arena.md)
    megasmoe analyze RUN [RUN ...] --out DIR          plots + report comparing runs (docs/analysis.md)
    megasmoe config-reference                         print every config field, documented

Config errors print one line (``megasmoe: config error: ...``) and exit with code 2
before any process group starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

__all__ = ["main"]

EXIT_CONFIG_ERROR = 2


def _quiet_megatron() -> None:
    # megatron-core warns on import when TE/Apex are absent; on CPU that is expected.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*apex.*", category=UserWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(megatron|torch)\.")
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor. is deprecated.*")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor. is deprecated.*")


def _world_size() -> int | None:
    ws = os.environ.get("WORLD_SIZE")
    return int(ws) if ws else None


def _load(args, processes: bool = False):
    """Load and validate args.config; ``processes``: this command *is* the job's process,
    so without a launcher (no WORLD_SIZE) the world is this one process."""
    from megasmoe.config import load_config, validate

    cfg = load_config(args.config, args.overrides)
    return validate(cfg, _world_size() or (1 if processes else None))


def _cmd_pretrain(args) -> int:
    from megasmoe.training.lifecycle import die_with_launcher

    die_with_launcher()  # before anything else: a killed launcher must not leave us running
    cfg = _load(args, processes=True)
    from megasmoe.training.data import resolve_data
    from megasmoe.training.trainer import pretrain

    resolve_data(cfg)  # data errors surface here, before any process group starts
    pretrain(cfg)
    return 0


def _cmd_check(args) -> int:
    cfg = _load(args)
    p = cfg.parallel
    print(f"ok: world_size={p.world_size} tp={p.tp} pp={p.pp} cp={p.cp} dp={p.dp} "
          f"ep={p.ep} etp={p.etp} vpp={p.vpp} sp={p.sp} router={cfg.moe.router.name} "
          f"run_dir={cfg.run.path}")
    return 0


def _cmd_world_size(args) -> int:
    from megasmoe.checkpoint import check_resume_compatible

    from megasmoe.training.runlock import check_run_lock

    from megasmoe.training.data import resolve_data

    cfg = _load(args)
    # launch/pretrain.sh runs this before torchrun: everything that can be refused in one
    # line is refused here, once, instead of in every rank half a minute later.
    check_run_lock(cfg.run.path)  # a run dir another job trains in
    check_resume_compatible(cfg)  # a checkpoint of another model shape or optimizer
    resolve_data(cfg)  # paths, index integrity, tokenizer vs model.vocab_size, data.split
    print(cfg.parallel.world_size)
    return 0


def _cmd_checkpoint_inspect(args) -> int:
    from megasmoe.checkpoint import format_inspection, inspect_checkpoint

    report = inspect_checkpoint(args.path, check_values=not args.no_values)
    print(format_inspection(report, all_tensors=args.all))
    return 1 if report["problems"] else 0


def _cmd_routers(args) -> int:
    from megasmoe.config import field_docs
    from megasmoe.routers import registered_routers, router_config_class, router_summary

    for name in registered_routers():
        config_cls = router_config_class(name)
        print(f"{name}: {router_summary(name)}")
        for field, text in field_docs(config_cls).items():
            print(f"    moe.router.{field}: {text}")
    return 0


def config_reference_rows() -> list[tuple[str, object, str]]:
    """(dotted name, default, docstring) for every config field, router fields included."""
    import dataclasses

    from megasmoe.config import Config, field_docs
    from megasmoe.routers import registered_routers, router_config_class

    rows = []
    defaults = Config()
    for section in dataclasses.fields(Config):
        value = getattr(defaults, section.name)
        for name, text in field_docs(type(value)).items():
            if section.name == "moe" and name == "router":
                continue
            rows.append((f"{section.name}.{name}", getattr(value, name), text))
    rows.append(("moe.router.name", "topk", field_docs(type(defaults.moe.router))["name"]))
    for router in registered_routers():
        config_cls = router_config_class(router)
        router_defaults = config_cls()
        for name, text in field_docs(config_cls).items():
            rows.append((f"moe.router.{name}", getattr(router_defaults, name),
                         f"[{router}] {text}"))
    return rows


def _cmd_config_reference(args) -> int:
    print("| name | default | meaning |\n|---|---|---|")
    for name, default, text in config_reference_rows():
        print(f"| `{name}` | `{default!r}` | {text} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``megasmoe`` command."""
    parser = argparse.ArgumentParser(prog="megasmoe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, helptext in (
        ("pretrain", _cmd_pretrain, "train a model"),
        ("check", _cmd_check, "validate a config and print the parallel layout"),
        ("world-size", _cmd_world_size, "validate a config and print its world size"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("config", nargs="?", default=None, help="YAML config (configs/*.yaml)")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
        p.set_defaults(fn=fn)
    ck = sub.add_parser("checkpoint", help="checkpoint tools").add_subparsers(
        dest="checkpoint_command", required=True)
    ins = ck.add_parser("inspect", help="summary + integrity check of a checkpoint")
    ins.add_argument("path", help="run dir, checkpoints dir or iter_XXXXXXX dir")
    ins.add_argument("--all", action="store_true", help="also list optimizer tensors")
    ins.add_argument("--no-values", action="store_true", help="skip the NaN/Inf scan")
    ins.set_defaults(fn=_cmd_checkpoint_inspect)
    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(
        dest="tokenizer_command", required=True)
    # Listed for `megasmoe --help`; main() hands their arguments to their own parsers.
    tok.add_parser("train", help="train a SentencePiece tokenizer (--help for options)")
    sub.add_parser("preprocess", help="text/JSONL -> Megatron .bin/.idx (--help for options)")
    sub.add_parser("routers", help="list routers").set_defaults(fn=_cmd_routers)
    from megasmoe.convert import add_subcommand as add_convert_subcommand
    from megasmoe.launch import add_subcommand as add_launch_subcommand

    add_convert_subcommand(sub)
    add_launch_subcommand(sub)
    from megasmoe.plan import add_subcommand as add_plan_subcommand

    add_plan_subcommand(sub)
    from megasmoe.analysis import add_subcommand as add_analyze_subcommand

    add_analyze_subcommand(sub)
    from megasmoe.evaluation import add_subcommand as add_eval_subcommand

    add_eval_subcommand(sub)
    from megasmoe.evaluation.steer_cli import add_subcommand as add_steer_subcommand

    add_steer_subcommand(sub)
    from megasmoe.arena import add_subcommand as add_arena_subcommand

    add_arena_subcommand(sub)
    sub.add_parser("config-reference", help="list config fields").set_defaults(
        fn=_cmd_config_reference)
    return parser


def _split_config_arg(args) -> None:
    # `megasmoe pretrain train.steps=3` has no config file: the first arg is an override.
    if getattr(args, "config", None) and "=" in args.config and not args.config.endswith(".yaml"):
        args.overrides = [args.config, *args.overrides]
        args.config = None


def _reports(error: Exception) -> bool:
    """Whether this process prints ``error``.

    An error every rank hits alike is said once, by rank 0 of a launch (or a process
    started without a launcher); the other ranks exit with the same code silently. Those
    are config errors raised before any process group (the same config validated by the
    same code in every rank) and checkpoint errors marked ``same_on_every_rank`` (read
    from the checkpoint's metadata). Any other error may be one rank's own: every rank
    reports it.
    """
    if _error_kind(error) == "checkpoint":
        shared = error.same_on_every_rank
    else:
        # torch not imported (a fast command) means no process group either.
        dist = getattr(sys.modules.get("torch"), "distributed", None)
        shared = not (dist is not None and dist.is_available() and dist.is_initialized())
    return not shared or os.environ.get("RANK", "0") == "0"


SILENT_RANK_WAIT_S = 30.0
"""How long a rank that leaves an error to rank 0 waits before exiting (see _fail)."""


def _fail(kind: str, error: Exception) -> int:
    """Print ``error`` as one line if this process reports it; the exit code.

    A rank that stays silent does not exit at once: torchrun tears the whole job down
    when the first worker exits, and on a loaded machine that could be this rank while
    rank 0 is still on its way to the same error, so nothing would be printed at all.
    It waits until the launcher ends it (torchrun does so as soon as rank 0 has exited
    with the message printed), or SILENT_RANK_WAIT_S under launchers that do not.
    """
    if _reports(error):
        print(f"megasmoe: {kind} error: {error}", file=sys.stderr, flush=True)
    elif os.environ.get("RANK", "0") != "0":
        import time

        time.sleep(SILENT_RANK_WAIT_S)
    return EXIT_CONFIG_ERROR


# Commands with their own argument parsers: argparse cannot hand them options it does not
# know (``REMAINDER`` stops at the first ``--option``), so they are dispatched before it.
_OWN_PARSERS = {("preprocess",): "preprocess_main", ("tokenizer", "train"): "tokenizer_main"}


def _own_parser_command(argv: list[str]):
    """(function name, its argv) when ``argv`` starts with a command of _OWN_PARSERS."""
    for prefix, fn in _OWN_PARSERS.items():
        if tuple(argv[:len(prefix)]) == prefix:
            return fn, argv[len(prefix):]
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``megasmoe`` console script."""
    _quiet_megatron()
    argv = list(sys.argv[1:] if argv is None else argv)
    own = _own_parser_command(argv)
    if own is not None:
        import megasmoe.data as data

        fn, rest = own
        return getattr(data, fn)(rest)
    args = build_parser().parse_args(argv)
    _split_config_arg(args)
    try:
        return args.fn(args)
    except BrokenPipeError:
        # `megasmoe routers | head`: the reader has what it wanted; no traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        kind = _error_kind(e)
        if kind is None:
            raise
        return _fail(kind, e)


# (module, exception class, what the one-line message calls it). Looked up in sys.modules
# only: an error of a module that was never imported cannot have been raised, and not
# importing megasmoe.checkpoint (torch) keeps `megasmoe check` and `routers` fast.
_ONE_LINE_ERRORS = (("megasmoe.config", "ConfigError", "config"),
                    ("megasmoe.checkpoint", "CheckpointError", "checkpoint"),
                    ("megasmoe.data.errors", "DataError", "data"))


def _error_kind(error: Exception) -> str | None:
    """'config', 'checkpoint' or 'data' for megasmoe's one-line errors, else None."""
    for module, name, kind in _ONE_LINE_ERRORS:
        mod = sys.modules.get(module)
        if mod is not None and isinstance(error, getattr(mod, name)):
            return kind
    return None


if __name__ == "__main__":
    sys.exit(main())
