"""``megasmoe eval RUN|CHECKPOINT [key=value ...] [options]``: measure a checkpoint.

Perplexity per dataset (the run's valid and test splits, the embedded domains, any
``--data NAME=PATH``) and multiple-choice accuracy (the embedded sets, any
``--mc NAME=PATH``) at any parallel layout, with any router (``moe.router.name=...``);
the checkpoint is only read. Run alone it evaluates in one process (world size 1);
under torchrun / ``bash launch/eval.sh`` at the run's layout or the one the overrides
give. Every input is read and checked before any process group starts: a problem is
one line (``megasmoe: data error: FILE:LINE: field ...``), exit code 2, nothing written.
See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

__all__ = ["add_subcommand", "prepare", "run", "resolve_target", "slurm_argv", "EvalPlan"]

SINGLE_PROCESS = ["parallel.world_size=1", "parallel.tp=1", "parallel.pp=1", "parallel.vpp=null",
                  "parallel.ep=1", "parallel.etp=null", "parallel.cp=1", "parallel.sp=false"]
"""The layout of ``megasmoe eval`` run without a launcher (the command line's win)."""


@dataclass
class EvalPlan:
    """Everything one evaluation needs, checked before any process group starts."""

    cfg: object
    """The validated config (the run's config.yaml + overrides)."""
    run_dir: Path
    """The run directory (outputs go to <run>/eval and <run>/tensorboard)."""
    checkpoint: Path
    """The checkpoint directory read."""
    name: str
    """Report name (<run>/eval/<name>.json)."""
    overrides: list
    """The user's overrides, as given."""
    batches: Optional[int] = None
    """Global batches per dataset (None: each whole once)."""
    texts: list = field(default_factory=list)
    """(TextSet, packed samples or None for a split)."""
    mcs: list = field(default_factory=list)
    """(MCSet, items, requests)."""


def _add_options(p: argparse.ArgumentParser, default=None) -> None:
    p.add_argument("--data", action="append", default=default if default is not None else [],
                   metavar="NAME=PATH", help="a text set: .txt (blank-line separated "
                   "documents), .jsonl ({\"text\": ...} per line) or an indexed .bin/.idx prefix")
    p.add_argument("--mc", action="append", default=default if default is not None else [],
                   metavar="NAME=PATH", help="a multiple-choice JSONL file "
                   "({\"context\", \"choices\", \"answer\"} per line)")
    p.add_argument("--name", default=default, help="report name (default eval-<router>)")
    p.add_argument("--batches", type=int, default=default,
                   help="global batches per dataset: the first N, as the trainer's validation "
                        "draws them (default: each dataset whole, once)")
    p.add_argument("--limit", type=int, default=default,
                   help="at most the first N questions of each multiple-choice set")
    p.add_argument("--no-default-sets", action="store_true", default=default,
                   help="only the --data/--mc sets (not the run's splits, embedded domains "
                        "and embedded multiple-choice sets)")
    p.add_argument("--world-size", action="store_true", default=default,
                   help="check everything, print the evaluated layout's process count, exit "
                        "(launch/eval.sh)")
    p.add_argument("--slurm-argv", default=default, metavar="FILE", help=argparse.SUPPRESS)


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register ``megasmoe eval`` on the ``megasmoe`` command's subparsers."""
    p = subparsers.add_parser("eval", help="perplexity and multiple-choice accuracy of a "
                              "checkpoint (docs/evaluation.md)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="RUN|CHECKPOINT",
                   help="a run directory (its latest checkpoint) or a checkpoints/iter_XXXXXXX "
                        "directory")
    _add_options(p)
    # Overrides and options in any order after the target (argparse alone would stop
    # at the first option): the rest is parsed again in _options.
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="[key=value ...] [options]",
                   help="dotted config overrides (parallel layout, moe.router.*), options")
    p.set_defaults(fn=_cmd_eval)
    return p


def _options(args) -> argparse.Namespace:
    """The options given before the target merged with those among the overrides."""
    from megasmoe.cliargs import parse_rest
    from megasmoe.config import ConfigError

    parse_rest(args, "megasmoe eval", _add_options,
               lambda msg: ConfigError(f"megasmoe eval: {msg}"), appended=("data", "mc"))
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"megasmoe eval: '{bad[0]}' is not a key=value override (one "
                          "RUN|CHECKPOINT, then overrides and options)")
    return args


def resolve_target(target: str) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) of a run dir, checkpoints dir or iter_X dir."""
    from megasmoe import checkpoint as ckpt

    from megasmoe.config import caller_dir

    path = (caller_dir() / Path(target).expanduser()).resolve()
    if (path / ckpt.META_FILE).is_file():
        ckpt_dir, run_dir = path, path.parent.parent
    else:
        run_dir = path.parent if path.name == "checkpoints" else path
        if not run_dir.is_dir():
            raise ckpt.CheckpointError(f"{target}: no such run or checkpoint directory",
                                       same_on_every_rank=True)
        ckpt_dir = ckpt.find_resume_checkpoint(ckpt.checkpoint_root(run_dir))
        if ckpt_dir is None:
            raise ckpt.CheckpointError(f"{run_dir}: no complete checkpoint to evaluate; train "
                                       "it (checkpoint.enabled=true) or give an iter_XXXXXXX "
                                       "directory", same_on_every_rank=True)
    problem = ckpt.verify_checkpoint(ckpt_dir)
    if problem:
        raise ckpt.CheckpointError(f"{ckpt_dir}: {problem}", same_on_every_rank=True)
    if not (run_dir / "config.yaml").is_file():
        raise ckpt.CheckpointError(f"{run_dir / 'config.yaml'}: missing; evaluate a checkpoint "
                                   "inside its run directory (run/checkpoints/iter_XXXXXXX)",
                                   same_on_every_rank=True)
    return run_dir, ckpt_dir


def _config(run_dir: Path, overrides: list, launched: Optional[int], single: bool):
    """The run's config with the evaluation's overrides, validated for this launch."""
    from megasmoe.config import load_config, validate

    saved_cfg = load_config(run_dir / "config.yaml")
    saved = saved_cfg.parallel
    base = [f"run.dir={run_dir}", "parallel.dp=null"]  # dp follows the evaluated layout
    if saved.etp == saved.tp:
        base.append("parallel.etp=null")
    router = _router_name(overrides)
    if router is not None and router != saved_cfg.moe.router.name:
        # Another router starts from its own defaults: the trained router's fields (e.g. an
        # import's score_function) are not its fields; later overrides set its own.
        base.append(f"moe.router={{name: {router}}}")
    if single:
        base += SINGLE_PROCESS
    cfg = load_config(run_dir / "config.yaml", [*base, *overrides])
    cfg.checkpoint.resume = False  # the checkpoint evaluated is the one given, not resumed
    return validate(cfg, launched if launched is not None else (1 if single else None))


def _router_name(overrides: list) -> Optional[str]:
    """The router named by the last ``moe.router.name=`` override, if any."""
    names = [o.split("=", 1)[1].strip() for o in overrides
             if isinstance(o, str) and o.split("=", 1)[0].strip() == "moe.router.name"]
    return names[-1] if names else None


def _tokenizer(cfg):
    from megasmoe.data import check_vocab, load_tokenizer

    if not cfg.data.tokenizer:
        return None
    tok = load_tokenizer(cfg.data.tokenizer)
    check_vocab(tok, cfg.model.vocab_size)
    return tok


def _needs_tokenizer(what: str):
    from megasmoe.data import DataError

    return DataError(f"{what} needs a tokenizer, and this run has none (data.tokenizer is "
                     "unset); add data.tokenizer=PATH to the command")


def _first_documents(docs, encode, tokens: Optional[int]) -> list:
    """The token documents, only as many as fill ``tokens`` (None: all): the rest would
    never be read (--batches)."""
    out, have = [], 0
    for d in docs:
        if tokens is not None and have > tokens:
            break
        out.append(encode(d))
        have += len(out[-1]) + 1
    return out


def _text_samples(ts, cfg, tok, batches: Optional[int]) -> list:
    from megasmoe.data import DataError
    from megasmoe.evaluation.engine import pack_documents, read_indexed_documents

    L = cfg.train.seq_length
    if ts.kind == "indexed":
        docs = read_indexed_documents(ts.prefix)
        top = max(int(d.max()) for d in docs if len(d))
        if top >= cfg.model.vocab_size:
            raise DataError(f"{ts.prefix}.bin: token id {top} >= model.vocab_size="
                            f"{cfg.model.vocab_size}; it was tokenized for another model")
        return pack_documents(docs, L, tok.eod if tok else 0, append_eod=False)
    if tok is None:
        raise _needs_tokenizer(f"--data {ts.name}")
    need = batches * cfg.train.global_batch_size * L + 1 if batches else None
    return pack_documents(_first_documents(ts.documents, tok.encode, need), L, tok.eod)


def prepare(args, launched: Optional[int] = None) -> EvalPlan:
    """Read and check everything (target, config, data, questions). No process group,
    nothing written; ConfigError / CheckpointError / DataError in one line."""
    from megasmoe.data import DataError
    from megasmoe.evaluation import mc, sources

    run_dir, ckpt_dir = resolve_target(args.target)
    single = launched is None and not (args.world_size or args.slurm_argv)
    cfg = _config(run_dir, args.overrides, launched, single)
    name = args.name or f"eval-{cfg.moe.router.name}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise DataError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
    for opt in ("batches", "limit"):
        value = getattr(args, opt)
        if value is not None and value < 1:
            raise DataError(f"--{opt}={value}: give a positive number (or leave it out)")
    tok = _tokenizer(cfg)
    texts, mcs = [], []
    if not args.no_default_sets:
        texts = sources.default_text_sets(with_splits=cfg.data.source != "mock",
                                          with_embedded=tok is not None)
        mcs = sources.default_mc_sets() if tok is not None else []
    texts += [sources.text_set(a) for a in args.data]
    mcs += [sources.mc_set(a) for a in args.mc]
    names = [t.name for t in texts] + [m.name for m in mcs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise DataError(f"two datasets are named '{dup}'; give each --data/--mc its own NAME=")
    if not names:
        raise DataError("nothing to evaluate: give --data NAME=PATH or --mc NAME=PATH"
                        + (" (or drop --no-default-sets)" if args.no_default_sets else ""))
    plan = EvalPlan(cfg, run_dir, ckpt_dir, name, list(args.overrides), args.batches)
    if any(t.kind == "split" for t in texts):
        from megasmoe.training.data import resolve_data

        resolve_data(cfg)
    plan.texts = [(t, None if t.kind == "split" else _text_samples(t, cfg, tok, args.batches))
                  for t in texts]
    for m in mcs:
        if tok is None:
            raise _needs_tokenizer(f"--mc {m.name}")
        items = m.items[:args.limit] if args.limit else m.items
        plan.mcs.append((m, items, mc.build_requests(items, tok.encode, tok.eod,
                                                     cfg.train.seq_length, m.source)))
    return plan


def run(plan: EvalPlan) -> dict:
    """Evaluate the plan in this process's group (collective); the report (every rank)."""
    from megasmoe.evaluation import mc
    from megasmoe.evaluation.engine import Evaluator, padded_to_batches, perplexity
    from megasmoe.evaluation.report import build_report
    from megasmoe.training.distributed import destroy_distributed, init_distributed

    cfg, gbs = plan.cfg, plan.cfg.train.global_batch_size
    init_distributed(cfg)
    try:
        ev = Evaluator(cfg)
        try:
            meta = ev.load(plan.checkpoint)
            datasets = {}
            for ts, samples in plan.texts:
                if samples is None:
                    ds = ev.split_dataset(ts.prefix, plan.batches)
                    if ds is None or len(ds) == 0:
                        continue  # a split the run's data.split leaves empty
                    loss, tokens = ev.dataset_loss(ds, plan.batches)
                else:
                    ds, whole = padded_to_batches(samples, gbs)
                    loss, tokens = ev.dataset_loss(ds, min(plan.batches or whole, whole))
                datasets[ts.name] = {"loss": loss, "ppl": perplexity(loss), "tokens": tokens,
                                     "source": ts.source}
            scores = {}
            for m, items, requests in plan.mcs:
                scores[m.name] = {**mc.score_items(items, requests, ev.token_logprobs),
                                  "source": m.source}
        finally:
            ev.close()
    finally:
        destroy_distributed()
    return build_report(name=plan.name, run_dir=plan.run_dir, checkpoint=plan.checkpoint,
                        step=int(meta.get("step", 0)), cfg=cfg, overrides=plan.overrides,
                        datasets=datasets, mc=scores)


def slurm_argv(world_size: int, env) -> list:
    """The job step that runs ``megasmoe eval`` in a SLURM allocation, up to ``-m
    megasmoe.cli`` (launch/eval.sh appends ``eval`` and its arguments): srun starting one
    torchrun per node with c10d rendezvous, as megasmoe.launch plans it for pretraining.
    ConfigError unless nodes x processes per node is the evaluated layout's world size."""
    from megasmoe.config import ConfigError
    from megasmoe.launch import LaunchError, build_plan

    try:
        lp = build_plan(None, [], env, launcher="torchrun")
    except LaunchError as e:
        raise ConfigError(str(e)) from None
    a = lp.allocation
    if a.nodes * a.nproc_per_node != world_size:
        raise ConfigError(f"the evaluated layout needs {world_size} processes but the "
                          f"allocation has {a.nodes} node(s) x {a.nproc_per_node}; submit with "
                          "matching --nodes/--ntasks-per-node or change parallel.*")
    argv = list(lp.srun)
    return argv[:argv.index("megasmoe.cli") + 1]


def _cmd_eval(args) -> int:
    from megasmoe.training.lifecycle import die_with_launcher

    die_with_launcher()  # a killed launcher must not leave us running
    args = _options(args)
    ws = os.environ.get("WORLD_SIZE")
    plan = prepare(args, launched=int(ws) if ws else None)
    if args.world_size:
        print(plan.cfg.parallel.world_size)
        return 0
    if args.slurm_argv:
        Path(args.slurm_argv).write_bytes(b"".join(
            a.encode() + b"\0" for a in slurm_argv(plan.cfg.parallel.world_size, os.environ)))
        return 0
    report = run(plan)
    if os.environ.get("RANK", "0") == "0":
        from megasmoe.evaluation.report import (format_table, report_path, write_json,
                                                write_tensorboard)

        path = report_path(plan.run_dir, plan.name)
        write_json(report, path)
        if plan.cfg.logging.tensorboard:
            write_tensorboard(report, plan.run_dir)
        print(format_table(report), flush=True)
        print(f"report: {path}", flush=True)
    return 0
