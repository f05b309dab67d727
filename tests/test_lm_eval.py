"""lm-evaluation-harness (PyPI ``lm-eval``) on a ``megasmoe convert to-hf`` export, with the
local task files of megasmoe/evaluation/lm_eval_task/ (no downloads), run as
docs/training-free.md shows it; its per-item log-likelihoods equal ``megasmoe eval``'s on
the same items.

The shared trained run (tests/conftest.py ``trained_tiny_run``) is exported once. lm-eval
runs the two shipped tasks (first LIMIT items each) and a task file of the documented
shape over edge cases (a context ending in spaces, an empty context, non-ASCII choices);
``megasmoe eval`` scores the same items through ``--mc``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, REPO

TASK_DIR = REPO / "megasmoe" / "evaluation" / "lm_eval_task"
TEMPLATE = TASK_DIR / "_megasmoe_mc_template_yaml"
SHIPPED = {"austen-continuation": "megasmoe_austen_continuation",
           "python-continuation": "megasmoe_python_continuation"}
LIMIT = 12  # items per shipped set: enough to compare, cheap on a loaded 2-core machine
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
# A context ending in spaces (they move to the choice), an empty context (the EOD token is
# the context), non-ASCII choices (acc_norm divides by characters, acc_bytes by bytes).
EDGE_ITEMS = [
    {"id": "trailing-space", "context": "Mr. Bennet was so odd a mixture of quick parts, ",
     "choices": ["sarcastic humour, reserve, and caprice", "import os, sys", "}}]]))"],
     "answer": 0},
    {"id": "empty-context", "context": "", "choices": ["Elizabeth", "qqqq zz"], "answer": 0},
    {"id": "non-ascii", "context": "She said, with a smile,",
     "choices": [" \"naïve café résumé\"", " \"yes,\" and went out.", " 12 34 56"], "answer": 1},
]


def run_cmd(argv: list[str], cwd: Path = REPO, env: dict | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a documented command with this tree's megasmoe on the path; fail with its output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)
    assert proc.returncode == 0, f"{argv} failed ({proc.returncode}):\n" \
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def write_jsonl(path: Path, items: list[dict]) -> Path:
    """Write MC items, one JSON object per line."""
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def task_file(path: Path, name: str, data: Path) -> Path:
    """A task of the shape docs/training-free.md documents for a user's own MC file."""
    path.write_text(f"include: {TEMPLATE}\ntask: {name}\n"
                    f"dataset_kwargs:\n  data_files:\n    test: {data}\n")
    return path


def lm_eval_samples(out: Path, task: str) -> dict[str, list[float]]:
    """{item id: per-choice log-likelihoods} from lm-eval's --log_samples file of a task."""
    [path] = out.glob(f"*/samples_{task}_*.jsonl")
    samples = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        samples[record["doc"]["id"]] = [float(resp[0][0]) for resp in record["resps"]]
    return samples


def lm_eval_results(out: Path) -> dict:
    """The ``results`` section of lm-eval's results JSON."""
    [path] = out.glob("*/results_*.json")
    return json.loads(path.read_text())["results"]


@pytest.fixture(scope="module")
def export(trained_tiny_run, tmp_path_factory) -> Path:
    """The shared trained run exported with ``megasmoe convert to-hf`` (docs/conversion.md)."""
    out = tmp_path_factory.mktemp("lm_eval") / "tiny-hf"
    run_cmd([str(BIN / "megasmoe"), "convert", "to-hf", str(trained_tiny_run), str(out)])
    return out


@pytest.fixture(scope="module")
def both(export, trained_tiny_run, tmp_path_factory) -> dict:
    """lm-eval and megasmoe eval on the same items: {set: (lm-eval {id: lls}, megasmoe mc)}."""
    from megasmoe.data.evalsets import mc_set_path

    tmp = tmp_path_factory.mktemp("lm_eval_items")
    eos = json.loads((export / "config.json").read_text())["eos_token_id"]
    sets = {name: write_jsonl(tmp / f"{name}.jsonl",
                              [json.loads(line) for line in
                               mc_set_path(name).read_text().splitlines()[:LIMIT]])
            for name in SHIPPED}
    sets["edge"] = write_jsonl(tmp / "edge.jsonl", EDGE_ITEMS)
    edge_task = task_file(tmp / "edge_mc.yaml", "edge_mc", sets["edge"])
    out = tmp / "lm-eval"
    # The documented command (docs/training-free.md), plus --limit and the edge-case task.
    run_cmd([str(BIN / "lm_eval"), "--model", "hf", "--model_args",
             f"pretrained={export},dtype=float32,add_bos_token=False,prefix_token_id={eos}", "--device", "cpu",
             "--include_path", str(TASK_DIR), "--tasks", f"megasmoe_mc,{edge_task}",
             "--limit", str(LIMIT), "--batch_size", "16",
             "--log_samples", "--output_path", str(out)], env=OFFLINE)
    name = "lm-eval-check"
    run_cmd([str(BIN / "megasmoe"), "eval", str(trained_tiny_run), "--no-default-sets",
             "--name", name, *[arg for n, p in sets.items() for arg in ("--mc", f"{n}={p}")]])
    report = json.loads((trained_tiny_run / "eval" / f"{name}.json").read_text())
    tasks = {**SHIPPED, "edge": "edge_mc"}
    return {"lm_eval": {s: lm_eval_samples(out, t) for s, t in tasks.items()},
            "results": {s: lm_eval_results(out)[t] for s, t in tasks.items()},
            "megasmoe": report["mc"]}


def test_shipped_tasks_read_the_embedded_sets():
    """The task files name the embedded sets' committed files, relative to the repository
    root (where the documented command runs)."""
    from megasmoe.data.evalsets import MC_SETS, mc_set_path

    assert set(SHIPPED) == set(MC_SETS)
    for name, task in SHIPPED.items():
        text = (TASK_DIR / f"{task}.yaml").read_text()
        assert f"task: {task}" in text
        assert f"test: {mc_set_path(name).relative_to(REPO).as_posix()}" in text


def test_lm_eval_logliks_equal_megasmoe_eval(both):
    """Per item and choice, lm-eval's log-likelihood equals megasmoe eval's within 1e-4."""
    worst = 0.0
    for name, ours in both["megasmoe"].items():
        theirs = both["lm_eval"][name]
        assert len(ours["per_item"]) == len(theirs) == (LIMIT if name != "edge"
                                                         else len(EDGE_ITEMS))
        for item in ours["per_item"]:
            lls = theirs[item["id"]]
            assert len(lls) == len(item["loglik"]), item["id"]
            diff = max(abs(a - b) for a, b in zip(lls, item["loglik"]))
            assert diff < 1e-4, (name, item["id"], lls, item["loglik"])
            worst = max(worst, diff)
    print(f"max |lm-eval - megasmoe eval| log-likelihood: {worst:.2e}")


def test_lm_eval_accuracy_equals_megasmoe_eval(both):
    """acc and acc_norm (per character of the choice) are the same fractions."""
    for name, ours in both["megasmoe"].items():
        theirs = both["results"][name]
        assert abs(theirs["acc,none"] - ours["acc"]) < 1e-9, (name, theirs, ours["acc"])
        assert abs(theirs["acc_norm,none"] - ours["acc_norm"]) < 1e-9, (name, theirs, ours)
