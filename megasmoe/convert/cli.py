"""``megasmoe convert ...``: the command-line face of the converter.

    convert to-hf RUN OUT [--allow-drop] [--remote-code] [--tokenizer PATH]
                          [--max-shard-size BYTES] [--no-check]
    convert from-hf HF_DIR OUT_RUN [key=value ...]
    convert verify RUN HF_DIR [--tokens FILE | --text FILE] [--batch B --length N --seed S]
                   [--tol T]

Errors print one line (``megasmoe: convert error: ...``) and exit with code 2; ``verify``
ends with a PASS/FAIL line and exits 1 when the logits differ by more than ``--tol``.
The converter needs the ``hf`` extra (transformers, safetensors, tokenizers): without it
every command says so in one line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import warnings

__all__ = ["add_subcommand", "main", "EXIT_ERROR"]

EXIT_ERROR = 2
EXIT_MISMATCH = 1
"""``verify``: the logits differ by more than ``--tol``."""

_HF_EXTRA = ("transformers", "safetensors", "tokenizers")


def _require_hf_extra() -> None:
    """ConversionError naming the install command when the ``hf`` extra is missing."""
    from megasmoe.convert.errors import ConversionError

    missing = [m for m in _HF_EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise ConversionError(f"{', '.join(missing)} not installed: conversion needs the 'hf' "
                              f"extra; run `bash launch/setup.sh hf` (or pip install "
                              f"'megasmoe[hf]')")


def _quiet_one_process_loads() -> None:
    """Silence what loading a distributed checkpoint in one process and loading the HF
    model print by design (torch DCP's "distributed is disabled", its ShardedTensor
    deprecation, transformers' weight-loading progress bar): the report is the output."""
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _run(fn):
    def wrapped(args) -> int:
        from megasmoe.checkpoint import CheckpointError
        from megasmoe.config import ConfigError
        from megasmoe.convert.errors import ConversionError

        try:
            _require_hf_extra()
            with warnings.catch_warnings():
                _quiet_one_process_loads()
                return fn(args)
        except (ConversionError, ConfigError, CheckpointError) as e:
            print(f"megasmoe: convert error: {e}", file=sys.stderr)
            return EXIT_ERROR

    return wrapped


@_run
def _cmd_to_hf(args) -> int:
    from megasmoe.convert.export import to_hf

    report = to_hf(args.run, args.out, allow_drop=args.allow_drop, tokenizer=args.tokenizer,
                   max_shard_size=args.max_shard_size, check=not args.no_check,
                   remote_code=args.remote_code)
    print(report.summary())
    return 0


@_run
def _cmd_from_hf(args) -> int:
    from megasmoe.convert.importer import from_hf

    print(from_hf(args.hf_dir, args.out_run, args.overrides).summary())
    return 0


@_run
def _cmd_verify(args) -> int:
    from megasmoe.checkpoint import read_meta
    from megasmoe.convert.reader import resolve_checkpoint
    from megasmoe.convert.parity import random_token_ids, text_token_ids, verify

    if args.tokens:
        with open(args.tokens) as f:
            ids = json.load(f)
        source = f"token ids from {args.tokens}"
    elif args.text:
        with open(args.text, encoding="utf-8") as f:
            ids = text_token_ids(args.hf_dir, f.read(), args.batch, args.length)
        source = (f"{ids.shape[0]} x {ids.shape[1]} tokens of {args.text} (the export's "
                  f"tokenizer)")
    else:
        vocab = read_meta(resolve_checkpoint(args.run))["config"]["model"]["vocab_size"]
        ids = random_token_ids(vocab, args.batch, args.length, args.seed)
        source = (f"random token ids (seed {args.seed}), so the losses are not those of text; "
                  f"--text FILE for real text")
    report = verify(args.run, args.hf_dir, ids)
    print(f"tokens: {source}")
    print(report.summary())
    if report.max_abs_logit_diff <= args.tol:
        print(f"PASS: max |logit difference| {report.max_abs_logit_diff:.3e} <= --tol {args.tol:g}")
        return 0
    print(f"FAIL: max |logit difference| {report.max_abs_logit_diff:.3e} > --tol {args.tol:g}")
    return EXIT_MISMATCH


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register ``convert {to-hf,from-hf,verify}`` on an argparse subparsers object.

    Each leaf sets ``fn`` (``args.fn(args)`` returns the exit code), like megasmoe's
    other commands. Returns the ``convert`` parser.
    """
    conv = subparsers.add_parser("convert", help="Hugging Face export / import / parity check")
    sub = conv.add_subparsers(dest="convert_command", required=True)

    p = sub.add_parser("to-hf", help="export a checkpoint to a Hugging Face directory")
    p.add_argument("run", help="run dir, checkpoints dir or iter_XXXXXXX dir (any layout)")
    p.add_argument("out", help="output directory (new or empty)")
    p.add_argument("--allow-drop", action="store_true",
                   help="export even if some megatron tensors cannot be written (listed)")
    p.add_argument("--remote-code", action="store_true",
                   help="write megasmoe's own architecture (loads with trust_remote_code) "
                        "for a router logit bias (hyper, steered domain_steer; exact in every "
                        "dtype, where the default GPT-OSS export adds 1 to the up projection) "
                        "or a model no standard architecture holds")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer file or dir (default: the run's, if any)")
    p.add_argument("--max-shard-size", type=int, default=5 * 10**9, help="bytes per shard")
    p.add_argument("--no-check", action="store_true",
                   help="skip loading the result with transformers (saves memory)")
    p.set_defaults(fn=_cmd_to_hf)

    p = sub.add_parser("from-hf", help="import a Hugging Face directory as a megasmoe run")
    p.add_argument("hf_dir", help="local HF directory (config.json + safetensors)")
    p.add_argument("out_run", help="new run directory")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for the new run")
    p.set_defaults(fn=_cmd_from_hf)

    p = sub.add_parser("verify", help="compare megasmoe and HF logits on the same tokens")
    p.add_argument("run", help="run dir, checkpoints dir or iter_XXXXXXX dir")
    p.add_argument("hf_dir", help="HF directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tokens", default=None, help="JSON file with token ids [[...], ...]")
    src.add_argument("--text", default=None,
                     help="text file, tokenised by the export's tokenizer (--batch rows of "
                          "--length tokens)")
    p.add_argument("--batch", type=int, default=2, help="sequences (random ids or --text)")
    p.add_argument("--length", type=int, default=33, help="tokens per sequence")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="largest |logit difference| that passes (exit 1 above it); the "
                        "default suits fp32 exports")
    p.set_defaults(fn=_cmd_verify)
    return conv


def main(argv=None) -> int:
    """``python -m megasmoe.convert ...`` (the same as ``megasmoe convert ...``)."""
    parser = argparse.ArgumentParser(prog="python -m megasmoe.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommand(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["convert"]:
        argv = ["convert", *argv]
    args = parser.parse_args(argv)
    return args.fn(args)
