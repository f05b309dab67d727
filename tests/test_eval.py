"""``megasmoe eval`` on the shared tiny trained run (conftest.trained_tiny_run).

Real megatron-core model, real torchrun/gloo processes for each layout, real
transformers for the export. One evaluation per layout of the same sets: the run's
valid and test splits (2 global batches, as the trainer's validation draws them), the
embedded domains (2 batches), a small text file (whole) and the first questions of the
embedded multiple-choice sets.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import BIN, REPO, TRAINED_TINY_STEPS, read_metrics, run_megasmoe

SMALL_TEXT = ("It is a truth universally acknowledged, that a single man in possession of a "
              "good fortune, must be in want of a wife.\n\nHowever little known the feelings "
              "or views of such a man may be on his first entering a neighbourhood, this truth "
              "is so well fixed in the minds of the surrounding families.\n\n"
              "def add(a, b):\n    return a + b\n")
COMMON = ["--batches", "2", "--limit", "6"]
WS1 = ["parallel.world_size=1", "parallel.ep=1"]
LAYOUTS = {"ep2": ["parallel.ep=2"],
           "tp2_sp": ["parallel.ep=1", "parallel.tp=2", "parallel.sp=true"]}


@pytest.fixture(scope="module")
def run(trained_tiny_run, tmp_path_factory):
    """A copy of the shared trained run (evaluation writes eval/ and tensorboard/ into it)."""
    dst = tmp_path_factory.mktemp("eval") / "tiny"
    shutil.copytree(trained_tiny_run, dst)
    (dst.parent / "small.txt").write_text(SMALL_TEXT)
    return dst


def evaluate(run_dir, name, overrides=(), nproc=1, extra=()):
    """Run ``megasmoe eval`` (torchrun, nproc processes); (report, stdout)."""
    args = ["eval", str(run_dir), *overrides, *COMMON, "--data",
            f"small={run_dir.parent / 'small.txt'}", "--name", name, *extra]
    proc = run_megasmoe(args, nproc=nproc)
    return json.loads((run_dir / "eval" / f"{name}.json").read_text()), proc.stdout


@pytest.fixture(scope="module")
def ws1(run):
    return evaluate(run, "ws1", WS1)


def assert_same_numbers(a: dict, b: dict, rel: float) -> None:
    assert a["datasets"].keys() == b["datasets"].keys() and a["mc"].keys() == b["mc"].keys()
    for name, d in a["datasets"].items():
        assert d["tokens"] == b["datasets"][name]["tokens"], name
        assert math.isclose(d["loss"], b["datasets"][name]["loss"], rel_tol=rel), name
    for name, m in a["mc"].items():
        for x, y in zip(m["per_item"], b["mc"][name]["per_item"], strict=True):
            for u, v in zip(x["loglik"], y["loglik"], strict=True):
                assert math.isclose(u, v, rel_tol=rel), (name, x, y)
        assert (m["acc"], m["acc_norm"]) == (b["mc"][name]["acc"], b["mc"][name]["acc_norm"])


def test_eval_prints_perplexity_per_domain_and_equals_the_trainers_valid_loss(run, ws1):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report, out = ws1
    assert set(report["datasets"]) == {"valid", "test", "austen", "python", "small"}
    assert set(report["mc"]) == {"austen-continuation", "python-continuation"}
    for name in report["datasets"]:  # the console table: one line per dataset with its ppl
        line = next(li for li in out.splitlines() if li.startswith(name + " "))
        assert f"{report['datasets'][name]['ppl']:.2f}" in line
    trainer = [r["valid/loss"] for r in read_metrics(run) if "valid/loss" in r]
    assert len(trainer) == 1 and read_metrics(run)[-1]["step"] == TRAINED_TINY_STEPS
    assert math.isclose(report["datasets"]["valid"]["loss"], trainer[0], rel_tol=1e-5)
    assert report["datasets"]["valid"]["tokens"] == 2 * 8 * 128  # 2 global batches
    assert report["step"] == TRAINED_TINY_STEPS and report["world_size"] == 1
    # The domains differ: the model learned English, not Python.
    assert report["datasets"]["python"]["loss"] > report["datasets"]["austen"]["loss"] + 0.2
    mc = report["mc"]["austen-continuation"]
    assert mc["items"] == 6 and len(mc["per_item"]) == 6 and mc["chance"] == 0.25
    assert all(len(i["loglik"]) == 4 and max(i["loglik"]) < 0 for i in mc["per_item"])
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    scalars = events.Tags()["scalars"]
    assert "eval/ws1/valid/loss" in scalars and "eval/ws1/austen-continuation/acc" in scalars
    assert events.Scalars("eval/ws1/valid/loss")[0].step == TRAINED_TINY_STEPS


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_gives_the_same_numbers(run, ws1, layout):
    """launch/eval.sh (the same torchrun) runs in docs/evaluation.md's runnable block."""
    report, _ = evaluate(run, layout, LAYOUTS[layout], nproc=2)
    assert report["world_size"] == 2
    assert_same_numbers(report, ws1[0], rel=1e-5)


def _tree_hashes(path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_spectral_with_c0_equals_topk_and_leaves_the_checkpoint_alone(run, ws1):
    before = _tree_hashes(run / "checkpoints")
    report, _ = evaluate(run, "spectral", [*WS1, "moe.router.name=spectral", "moe.router.c=0"])
    assert report["router"] == "spectral"
    assert report["overrides"][-2:] == ["moe.router.name=spectral", "moe.router.c=0"]
    assert_same_numbers(report, ws1[0], rel=1e-5)
    assert _tree_hashes(run / "checkpoints") == before


def test_hf_export_evaluated_by_transformers_gives_the_same_loss(run, ws1, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from megasmoe.convert import to_hf
    from megasmoe.data import load_tokenizer
    from megasmoe.evaluation import mc, sources
    from megasmoe.evaluation.engine import pack_documents

    to_hf(run, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32)
    model.eval()
    tok = load_tokenizer(yaml.safe_load((run / "config.yaml").read_text())["data"]["tokenizer"])
    docs = sources.read_documents(run.parent / "small.txt")
    total, count = 0.0, 0.0
    with torch.no_grad():
        for s in pack_documents([tok.encode(d) for d in docs], 128, tok.eod):
            logits = model(s["tokens"][None]).logits[0].float()
            nll = torch.nn.functional.cross_entropy(logits, s["labels"], reduction="none")
            total += float((nll * s["loss_mask"]).sum())
            count += float(s["loss_mask"].sum())
        assert abs(total / count - ws1[0]["datasets"]["small"]["loss"]) < 1e-4
        # Multiple-choice log-likelihoods: the same continuation tokens, the same numbers.
        from megasmoe.data import evalsets

        items = sources.read_mc(evalsets.mc_set_path("austen-continuation"))[:2]
        for item, per_choice, got in zip(items, mc.build_requests(items, tok.encode, tok.eod, 128),
                                         ws1[0]["mc"]["austen-continuation"]["per_item"]):
            for (seq, n_cont), ll in zip(per_choice, got["loglik"]):
                ids = torch.tensor(seq)
                logp = torch.log_softmax(model(ids[None, :-1]).logits[0].float(), -1)
                want = logp[torch.arange(len(seq) - 1), ids[1:]][-n_cont:].sum().item()
                assert abs(want - ll) < 1e-4 * max(1.0, abs(ll)), (want, ll)


class _CharTokenizer:
    eod = 0

    @staticmethod
    def encode(text: str) -> list:
        return [ord(c) for c in text]


def _hand_made_logprobs(sequences):
    """A 'model' whose answers are known: log p(token) = -0.5 for 'x', -1 otherwise."""
    return [[-0.5 if t == ord("x") else -1.0 for t in s[1:]] for s in sequences]


def test_multiple_choice_accuracy_from_a_hand_made_scorer():
    from megasmoe.evaluation import mc
    from megasmoe.evaluation.sources import MCItem

    enc, eod = _CharTokenizer.encode, _CharTokenizer.eod
    # Trailing context spaces move into the continuation; an empty context is EOD.
    assert mc.encode_pair(enc, "Q: ", "x", eod) == (enc("Q:"), enc(" x"))
    assert mc.encode_pair(enc, "", " x", eod) == ([eod], enc(" x"))
    assert mc.request_tokens([1, 2, 3, 4], [5, 6], 3) == [3, 4, 5, 6]
    items = [
        # " x": -1.5 (-0.75/byte); " xxxxxx": -4.0 (-0.57/byte): acc picks 0, acc_norm 1.
        MCItem("Q:", [" x", " xxxxxx"], 1, "a"),
        MCItem("Q: ", ["yy", "xx"], 1),  # " yy" -3 (-1.5/byte), " xx" -2 (-1/byte): 1, 1
        MCItem("", [" yyy", " y", " yy"], 0),  # " y" highest, and per byte all -1: first
    ]
    requests = mc.build_requests(items, enc, eod, max_len=16)
    result = mc.score_items(items, requests, _hand_made_logprobs)
    per = result["per_item"]
    assert [p["loglik"] for p in per] == [[-1.5, -4.0], [-3.0, -2.0], [-4.0, -2.0, -3.0]]
    assert [(p["pred"], p["pred_norm"]) for p in per] == [(0, 1), (1, 1), (1, 0)]
    assert per[0]["id"] == "a" and "id" not in per[1]
    assert result["acc"] == pytest.approx(1 / 3) and result["acc_norm"] == pytest.approx(1.0)
    assert result["chance"] == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)


def test_random_init_model_scores_near_chance_on_the_embedded_sets(run, tmp_path):
    """A model that has learned nothing cannot tell the true continuation from the three
    others drawn from the same text: its accuracy is a binomial draw around chance. With
    100 items and p = 0.25 one standard deviation is 0.043; allowed: 4 of them (0.17)."""
    rand = tmp_path / "random"
    script = (
        "import sys; from pathlib import Path\n"
        "from megasmoe.config import load_config, validate, save_config\n"
        "from megasmoe.training.distributed import init_distributed, destroy_distributed\n"
        "from megasmoe.model import build_model_chunks, layout_invariant_init, "
        "to_transformer_config\n"
        "from megasmoe.convert.weights_only import save_weights_only\n"
        "src, out = Path(sys.argv[1]), Path(sys.argv[2])\n"
        "cfg = validate(load_config(src / 'config.yaml', [f'run.dir={out}', "
        "'parallel.world_size=1', 'parallel.ep=1', 'parallel.dp=null']), 1)\n"
        "init_distributed(cfg)\n"
        "chunks = build_model_chunks(cfg, to_transformer_config(cfg))\n"
        "layout_invariant_init(chunks, 7, cfg.model.init_std, cfg.model.num_layers)\n"
        "save_weights_only(chunks, cfg, out / 'checkpoints', {})\n"
        "save_config(cfg, out / 'config.yaml')\n"
        "destroy_distributed()\n")
    subprocess.run([str(BIN / "python"), "-c", script, str(run), str(rand)], check=True,
                   cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    run_megasmoe(["eval", str(rand), "--batches", "1", "--name", "random"])
    report = json.loads((rand / "eval" / "random.json").read_text())
    assert report["step"] == 0
    for name, m in report["mc"].items():
        assert m["items"] == 100 and m["chance"] == 0.25
        for metric in ("acc", "acc_norm"):
            assert abs(m[metric] - 0.25) <= 4 * math.sqrt(0.25 * 0.75 / 100), (name, m)
    # Near-uniform predictions: the loss is close to ln(vocab size).
    assert abs(report["datasets"]["valid"]["loss"] - math.log(4096)) < 0.2


BAD_INPUTS = {
    "empty domain file": ("--data", "d.txt", b"", "d.txt: empty"),
    "domain file not UTF-8": ("--data", "d.txt", b"good line\n\xff\xfe bad\n", "d.txt:2: not UTF-8"),
    "MC missing field": ("--mc", "q.jsonl",
                         b'{"context": "a", "choices": [" b", " c"], "answer": 0}\n'
                         b'{"context": "a", "answer": 0}\n', "q.jsonl:2: field 'choices'"),
    "MC answer out of range": ("--mc", "q.jsonl",
                               b'{"context": "a", "choices": [" b", " c"], "answer": 2}\n',
                               "q.jsonl:1: field 'answer' is 2, out of range"),
    "MC one choice": ("--mc", "q.jsonl", b'{"context": "a", "choices": [" b"], "answer": 0}\n',
                      "q.jsonl:1: field 'choices' has 1 choice"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_nothing_is_written(run, tmp_path, capsys, case):
    from megasmoe.cli import main

    option, filename, content, message = BAD_INPUTS[case]
    (tmp_path / filename).write_bytes(content)
    before = _tree_hashes(run)
    rc = main(["eval", str(run), "--no-default-sets", option, f"x={tmp_path / filename}",
               "--name", "bad"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("megasmoe: data error: ") and message in err, err
    assert _tree_hashes(run) == before


def test_bad_input_exit_code_from_the_command(run, tmp_path):
    (tmp_path / "e.txt").write_text("")
    proc = subprocess.run([str(BIN / "megasmoe"), "eval", str(run), "--data",
                           f"e={tmp_path / 'e.txt'}"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"megasmoe: data error: {tmp_path / 'e.txt'}: empty (no documents); give a file with "
        "text in it"]
    assert not (run / "eval" / "eval-topk.json").exists()


def test_python_api_is_importable_without_torch_distributed():
    """`megasmoe --help` and `megasmoe check` stay fast: the eval command's module does
    not import torch."""
    code = ("import sys, megasmoe.cli; megasmoe.cli.build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout.strip()
    assert out == "False"
