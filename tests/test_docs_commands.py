"""Every command block the docs mark runnable, run verbatim as a user would type it.

A fenced ```bash block right after a ``<!-- runnable -->`` line in README.md,
slurm/README.md or docs/*.md is a runnable block. The test runs each one with
``bash -e`` (README first, then the rest by path, in document order) in one scratch
clone of the repository: its tracked and untracked-not-ignored files copied, ``.venv``
linked, plus the two input files the Data section names (``corpus.txt``, ``data.jsonl``,
cut from the embedded corpus). Blocks later in the order may use what earlier ones left
(``runs/demo``), as a reader following the docs would.

Sizes are shrunk without editing the text, through the documented ``MEGASMOE_OVERRIDES``
(README: Running): smaller batches and evaluations; step counts stay as written. The
README's first command (setup + default pretraining) is run in a fresh checkout with its
own virtual environment by tests/test_install.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, repo_files

MARK = "<!-- runnable -->"
SMALL = ("train.global_batch_size=8 train.micro_batch_size=2 train.eval_iters=1 "
         "train.eval_interval=0 logging.progress=false logging.heatmaps=false")


def _documents() -> list[Path]:
    return [REPO / "README.md", REPO / "slurm" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def runnable_blocks(text: str) -> list[str]:
    """The ```bash blocks of a markdown text that follow a runnable mark."""
    return re.findall(re.escape(MARK) + r"\s*\n```bash\n(.*?)```", text, flags=re.S)


BLOCKS = [(doc.relative_to(REPO).as_posix(), i, block)
          for doc in _documents() for i, block in enumerate(runnable_blocks(doc.read_text()))]


def test_marks_are_on_bash_blocks():
    """A mark that does not precede a ```bash fence would silently test nothing."""
    for doc in _documents():
        text = doc.read_text()
        assert text.count(MARK) == len(runnable_blocks(text)), doc
    names = {name for name, _, _ in BLOCKS}
    assert {"README.md", "docs/conversion.md", "docs/checkpoints.md", "docs/slurm.md"} <= names


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A user's clone: the repository's files, the built .venv, and their own input data."""
    from megasmoe.data import corpus_documents

    dest = tmp_path_factory.mktemp("docs") / "megasmoe"
    for rel in repo_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    (dest / ".venv").symlink_to(REPO / ".venv")
    docs = corpus_documents("train")
    (dest / "corpus.txt").write_text("\n\n".join(docs[:60]) + "\n")
    with open(dest / "data.jsonl", "w") as f:
        for doc in docs[60:100]:
            f.write(json.dumps({"text": doc}) + "\n")
    return dest


@pytest.mark.parametrize("doc,index,block", BLOCKS,
                         ids=[f"{name}#{i}" for name, i, _ in BLOCKS])
def test_runnable_block(clone, doc, index, block):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env.update(MEGASMOE_OVERRIDES=SMALL, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=clone,
                          capture_output=True, text=True, timeout=900, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{doc} block {index} failed ({proc.returncode}):\n{block}\n{out[-6000:]}"
    assert "Traceback" not in out, out[-6000:]
