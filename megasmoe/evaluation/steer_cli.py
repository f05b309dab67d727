"""``megasmoe steer ...``: DSMoE expert discovery and steering (docs/steering.md).

    steer discover RUN [key=value ...] --domain NAME=FILE|austen|python [--domain ...]
                   --out steer.json [--target NAME] [--top-n 50] [--lambda 0.10]
                   [--mode multiplicative|additive] [--max-tokens 32768]
    steer apply RUN steer.json --out NEW_RUN

``discover`` runs alone (one process) or under torchrun at any layout without
pipeline/context parallelism (``parallel.*`` overrides; the run's own layout is not
reused). ``apply`` runs in one process. Errors are one line, exit code 2, nothing
written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["add_subcommand", "DEFAULT_TOP_N", "DEFAULT_LAMBDA", "DEFAULT_MAX_TOKENS"]

DEFAULT_TOP_N = 50
"""Steered (layer, expert) pairs (the authors' N)."""
DEFAULT_LAMBDA = 0.10
"""Steering strength lambda (the authors')."""
DEFAULT_MAX_TOKENS = 32768
"""Calibration tokens per domain (the first ones of its file)."""


def _world_size() -> int | None:
    ws = os.environ.get("WORLD_SIZE")
    return int(ws) if ws else None


def _domain(spec: str) -> tuple[str, str, list[str]]:
    """(name, source, documents) of a --domain: NAME=FILE, or the name of an embedded
    evaluation domain (megasmoe.data.evalsets: austen, python)."""
    from megasmoe.data import evalsets
    from megasmoe.evaluation.sources import parse_named, read_documents

    if "=" not in spec and spec in evalsets.DOMAINS:
        return spec, f"embedded:{spec}", evalsets.domain_documents(spec)
    name, path = parse_named(spec)
    return name, str(Path(path).resolve()), read_documents(path)


def _cmd_discover(args) -> int:
    from megasmoe.config import ConfigError
    from megasmoe.data.errors import DataError
    from megasmoe.evaluation import steer as S

    _later_options(args)
    domains = [_domain(spec) for spec in args.domain]  # read before any process starts
    names = [n for n, _, _ in domains]
    if len(set(names)) != len(names):
        raise DataError(f"--domain names repeat ({', '.join(names)}); give each domain once")
    target = args.target or names[0]
    if target not in names:
        raise DataError(f"--target {target} is none of the --domain names ({', '.join(names)})")
    if args.mode not in ("multiplicative", "additive"):
        raise ConfigError(f"--mode {args.mode}: use multiplicative or additive")
    if args.top_n < 1 or args.max_tokens < 2:
        raise ConfigError("--top-n must be >= 1 and --max-tokens >= 2")
    from megasmoe.evaluation import steer_run as R
    from megasmoe.evaluation.engine import load_model_tensors

    run = Path(args.run)
    cfg = R.run_config(run, args.overrides, _world_size())
    R.refuse_layout(cfg)
    ckpt_dir = R.newest_checkpoint(run)
    tok = R.run_tokenizer(cfg)
    if not hasattr(tok, "encode"):
        raise DataError(f"{run}: the run has no tokenizer (data.tokenizer is null); steering "
                        f"needs one to read calibration text")
    windows = [(n, source, S.domain_windows(d, tok, cfg.train.seq_length, args.max_tokens))
               for n, source, d in domains]
    from megasmoe.checkpoint import read_meta

    meta = read_meta(ckpt_dir)
    provenance = {"run": str(run.resolve()), "checkpoint": ckpt_dir.name,
                  "step": int(meta.get("step", 0)), "max_tokens": args.max_tokens}
    with _process_group(cfg):
        chunks = R.build_model(cfg)
        load_model_tensors(chunks, cfg, ckpt_dir)
        doc, notes = R.discover(chunks, cfg, windows, target, args.top_n, args.mode,
                                args.lam, provenance)
        if os.environ.get("RANK", "0") == "0":
            S.write_steering_file(doc, Path(args.out))
            for line in notes:
                print(f"megasmoe: note: {line}", file=sys.stderr)
            pairs = ", ".join(f"L{p['layer']}E{p['expert']}" for p in doc["pairs"][:8])
            more = " ..." if len(doc["pairs"]) > 8 else ""
            print(f"steer discover: {len(doc['pairs'])} (layer, expert) pairs for domain "
                  f"'{target}' ({pairs}{more}) -> {args.out}")
    return 0


class _process_group:
    """The launcher's process group (torchrun), or a private one-process group."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.inner = None

    def __enter__(self):
        if _world_size() is not None:
            from megasmoe.training.distributed import init_distributed

            init_distributed(self.cfg)
        else:
            from megasmoe.convert.runtime import single_process

            self.inner = single_process(self.cfg)
            self.inner.__enter__()

    def __exit__(self, *exc):
        if self.inner is not None:
            return self.inner.__exit__(*exc)
        from megasmoe.training.distributed import destroy_distributed

        destroy_distributed()
        return False


def _cmd_apply(args) -> int:
    from megasmoe.config import ConfigError
    from megasmoe.evaluation.steer_run import apply_steering

    if (_world_size() or 1) > 1:
        raise ConfigError("steer apply runs in one process; run it without torchrun")
    path = apply_steering(Path(args.run), Path(args.steering), Path(args.out))
    print(f"steer apply: {args.out} (domain_steer, {Path(args.out) / 'steer.json'}); "
          f"checkpoint {path}")
    return 0


def _discover_options(p: argparse.ArgumentParser, default=None) -> None:
    def dflt(value):
        return value if default is None else default

    p.add_argument("--domain", action="append", default=dflt([]), metavar="NAME=FILE",
                   help="calibration text of a domain: .txt (blank-line separated) or .jsonl "
                        "({\"text\": ...}), or an embedded domain: austen, python")
    p.add_argument("--out", default=dflt(None), help="steering file to write (JSON)")
    p.add_argument("--target", default=dflt(None), help="domain to steer (default: the first)")
    p.add_argument("--top-n", type=int, default=dflt(DEFAULT_TOP_N), help="pairs to steer (50)")
    p.add_argument("--lambda", dest="lam", type=float, default=dflt(DEFAULT_LAMBDA),
                   help="steering strength (0.10)")
    p.add_argument("--mode", default=dflt("multiplicative"),
                   help="multiplicative: delta = log(1 + lambda); additive: delta = lambda")
    p.add_argument("--max-tokens", type=int, default=dflt(DEFAULT_MAX_TOKENS),
                   help=f"calibration tokens per domain ({DEFAULT_MAX_TOKENS})")


def _later_options(args) -> None:
    """Merge the options given among the overrides (after RUN) into ``args``."""
    from megasmoe.cliargs import parse_rest
    from megasmoe.config import ConfigError

    parse_rest(args, "megasmoe steer discover", _discover_options,
               lambda msg: ConfigError(f"megasmoe steer discover: {msg}"), appended=("domain",))
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"megasmoe steer discover: '{bad[0]}' is not a key=value override")
    if not args.domain or not args.out:
        raise ConfigError("megasmoe steer discover: give --domain NAME=FILE (one or more) "
                          "and --out FILE")


def add_subcommand(sub) -> None:
    """Register ``megasmoe steer discover|apply`` on the top-level subparsers ``sub``."""
    p = sub.add_parser("steer", help="DSMoE expert discovery and steering (docs/steering.md)")
    steer = p.add_subparsers(dest="steer_command", required=True)
    d = steer.add_parser("discover", help="score (layer, expert) pairs per domain, write the "
                                          "steering file")
    d.add_argument("run", help="run directory (its newest checkpoint is used)")
    _discover_options(d)
    # Overrides and options in any order after RUN (argparse alone would stop taking
    # overrides at the first option): the rest is parsed again in _later_options.
    d.add_argument("rest", nargs=argparse.REMAINDER, metavar="[key=value ...] [options]",
                   help="dotted config overrides (e.g. the layout: parallel.world_size=2 "
                        "parallel.ep=2), options")
    d.set_defaults(fn=_cmd_discover)
    a = steer.add_parser("apply", help="write a steered run (domain_steer, bias in checkpoint)")
    a.add_argument("run", help="run directory (its newest checkpoint is used)")
    a.add_argument("steering", help="steering file (from steer discover)")
    a.add_argument("--out", required=True, help="new run directory to write")
    a.set_defaults(fn=_cmd_apply)

