"""Commands as users type them (subprocesses), for what a new user's walkthrough hit.

Each test names the problem it guards against; each failed on the code before the fix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN, FAST, REPO

SMALL_WORLD = ["parallel.world_size=1", "parallel.ep=1"]


def _run(cmd: list[str], cwd: Path = REPO, env: dict | None = None, timeout: int = 300):
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full)


@pytest.fixture(scope="module")
def corpus_data(tmp_path_factory) -> dict:
    """The embedded corpus prepared (tokenizer + indexed splits), as a user's data."""
    from megasmoe.config import load_config
    from megasmoe.training.data import resolve_data

    cfg = resolve_data(load_config(REPO / "configs" / "tiny-cpu.yaml"))
    train, valid, _ = cfg.data.prefixes
    return {"tokenizer": Path(cfg.data.tokenizer), "train": Path(train), "valid": Path(valid)}


@pytest.mark.parametrize("argv", [["tokenizer", "train"], ["preprocess"]])
def test_data_commands_take_their_options(argv, tmp_path):
    """`megasmoe preprocess --input ...` and `megasmoe tokenizer train ...` failed on any
    arguments, --help included (`unrecognized arguments: --input`)."""
    helped = _run([str(BIN / "megasmoe"), *argv, "--help"])
    assert helped.returncode == 0, helped.stderr
    assert "--input" in helped.stdout and "--output-prefix" in helped.stdout
    # Reaches the command's own checks: one line naming the missing input, exit 2.
    own = (["--tokenizer", str(tmp_path / "none.model")] if argv == ["preprocess"]
           else ["--vocab-size", "64"])
    missing = _run([str(BIN / "megasmoe"), *argv, "--input", str(tmp_path / "none.txt"),
                    "--output-prefix", str(tmp_path / "out"), *own])
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.strip().count("\n") == 0 and "none.txt" in missing.stderr, missing.stderr


@pytest.mark.parametrize("case", ["vocab", "missing", "split"])
def test_data_problems_are_refused_before_torchrun(case, corpus_data, tmp_path):
    """Data problems surfaced 25-40 s late inside torchrun, once per rank, with torchrun's
    ChildFailedError report and exit 1: now one line, exit 2, before torchrun starts."""
    overrides = {
        # a 4096-token tokenizer for a 1024-row embedding table
        "vocab": [f"data.prefixes=[{corpus_data['train']}]",
                  f"data.tokenizer={corpus_data['tokenizer']}", "model.vocab_size=1024",
                  "data.split=90,10,0"],
        "missing": [f"data.prefixes=[{tmp_path / 'nothing'}]",
                    f"data.tokenizer={corpus_data['tokenizer']}"],
        # the valid prefix has a handful of chapters: 1% of them is no document
        "split": [f"data.prefixes=[{corpus_data['valid']}]",
                  f"data.tokenizer={corpus_data['tokenizer']}", "data.split=98,1,1"],
    }[case]
    proc = _run(["bash", "launch/pretrain.sh", "configs/tiny-cpu.yaml", "data.source=indexed",
                 f"run.dir={tmp_path / 'run'}", *overrides])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megasmoe: data error: "), proc.stderr
    assert "torchrun" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()
    want = {"vocab": "model.vocab_size", "missing": "nothing", "split": "data.split"}[case]
    assert want in lines[0]


def test_relative_paths_are_the_callers(corpus_data, tmp_path):
    """launch/pretrain.sh changes into the repository, so `data.tokenizer=tok.model` given
    from another directory was looked up in the repository (and the error did not say
    where it looked). Relative paths are now the caller's, stored absolute."""
    user = tmp_path / "user"
    (user / "data").mkdir(parents=True)
    shutil.copy(corpus_data["tokenizer"], user / "tok.model")
    for suffix in (".bin", ".idx"):
        shutil.copy(corpus_data["train"].with_suffix(suffix), user / "data" / f"mine{suffix}")
    args = ["bash", str(REPO / "launch" / "pretrain.sh"), "configs/tiny-cpu.yaml", *FAST,
            *SMALL_WORLD, "train.steps=2", "data.source=indexed", "data.prefixes=[data/mine]",
            "data.tokenizer=tok.model", "data.split=90,10,0", "run.dir=myrun"]
    proc = _run(args, cwd=user)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    saved = yaml.safe_load((user / "myrun" / "config.yaml").read_text())
    assert saved["data"]["tokenizer"] == str(user / "tok.model")
    assert saved["data"]["prefixes"] == [str(user / "data" / "mine")]
    assert not (REPO / "myrun").exists()

    (user / "tok.model").unlink()
    proc = _run(args[:-1] + ["run.dir=other"], cwd=user)
    assert proc.returncode == 2
    assert str(user / "tok.model") in proc.stderr, proc.stderr


def test_config_error_under_torchrun_is_printed_even_when_rank0_is_slow(tmp_path):
    """Under load rank 1 could exit before rank 0 printed; torchrun then SIGTERMed rank 0
    and nothing was printed. Rank 0 is slowed down here on purpose (sitecustomize)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""\
        import os, time
        if os.environ.get("RANK") == "0":
            time.sleep(4)
    """))
    env = {"PYTHONPATH": str(hook)}
    start = time.monotonic()
    proc = _run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m",
                 "megasmoe.cli", "pretrain", "configs/tiny-cpu.yaml", "train.stpes=3",
                 f"run.dir={tmp_path / 'run'}"], env=env)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("megasmoe: config error: ")]
    assert len(lines) == 1, proc.stderr
    assert "did you mean 'train.steps'" in lines[0]
    assert proc.returncode != 0
    # The silent rank does not wait out its whole grace period once rank 0 has exited.
    assert time.monotonic() - start < 60


def test_pretrain_without_a_launcher_is_one_process():
    """`megasmoe pretrain configs/tiny-cpu.yaml` without torchrun validated the config for
    its parallel.world_size=2 and then died inside megatron's initialize_model_parallel
    with a traceback per rank; it is one process, and says so in one line."""
    proc = _run([str(BIN / "megasmoe"), "pretrain", "configs/tiny-cpu.yaml"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "megasmoe: config error: parallel.world_size=2 but 1 process was launched; "
        "launch 2 (torchrun --nproc-per-node=2, or launch/pretrain.sh) or set "
        "parallel.world_size=1"], proc.stderr


def test_slurm_output_file_is_ignored():
    """sbatch's --output file (slurm-megasmoe-<id>.out) landed untracked in the repository."""
    proc = _run(["git", "check-ignore", "-q", "slurm-megasmoe-123.out"])
    assert proc.returncode == 0


@pytest.mark.parametrize("argv", [["routers"], ["check", "configs/tiny-cpu.yaml", "moe.router.name=xmoe"],
                                  ["check", "configs/tiny-cpu.yaml", "train.stpes=3"],
                                  ["config-reference"]])
def test_quick_commands_do_not_import_megatron(argv):
    """`megasmoe routers` and `megasmoe check` took 4-14 s: they imported megatron-core
    (router classes) and torch (error classes) eagerly. Checked by what gets imported,
    not by timing: neither torch nor megatron may be loaded."""
    code = ("import sys; from megasmoe.cli import main; rc = main(sys.argv[1:]); "
            "bad = [m for m in ('torch', 'megatron') if m in sys.modules]; "
            "print('IMPORTED', bad, file=sys.stderr); sys.exit(rc)")
    proc = _run([sys.executable, "-c", code, *argv])
    assert "IMPORTED []" in proc.stderr, proc.stderr
    assert proc.returncode == (2 if "train.stpes=3" in argv else 0), proc.stderr


def test_public_verify_stays_the_function_once_its_module_is_loaded():
    """`from megasmoe.convert import verify` gave the submodule megasmoe/convert/verify.py
    (not callable) once anything had imported it; the module is now convert/parity.py."""
    import importlib
    import types

    importlib.import_module("megasmoe.convert.parity")
    from megasmoe.convert import verify

    assert callable(verify) and not isinstance(verify, types.ModuleType)


def test_two_runs_alone_on_one_machine_do_not_collide(tmp_path):
    """`megasmoe pretrain` without a launcher used the fixed port 29500 for its process
    group: a second such run on the same machine failed with "address already in use"."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    procs = [subprocess.Popen([str(BIN / "megasmoe"), "pretrain", "configs/tiny-cpu.yaml",
                               *SMALL_WORLD, *FAST, "train.steps=3", "checkpoint.enabled=false",
                               f"run.dir={tmp_path / name}"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in ("a", "b")]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert all((tmp_path / name / "metrics.jsonl").is_file() for name in ("a", "b"))
