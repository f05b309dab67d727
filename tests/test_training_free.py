"""The training-free workflow of docs/training-free.md on an imported model: a small
Mixtral made with transformers (random init, the embedded corpus' tokenizer), imported
with ``megasmoe convert from-hf``, evaluated with ``megasmoe eval`` under its own router
(``topk``) and switched to ``spectral`` (SSMoE) and ``unified`` (USMoE, each token group)
without changing the checkpoint.

SSMoE with c = 0 is the learned router alone: it must give topk's numbers. The other
switches must change them (and are reported, in the test output, for the record).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import BIN
from test_lm_eval import run_cmd, write_jsonl

MC_ITEMS = 6      # multiple-choice items scored per switch
TEXT_DOCS = 4     # held-out documents scored per switch
# name: (router, overrides), as docs/training-free.md lists them. The import writes topk's
# own fields (score_function, pre_softmax): a switch by name alone must drop them.
SWITCHES = {
    "topk": ("topk", []),
    "spectral-c0": ("spectral", ["moe.router.name=spectral", "moe.router.c=0"]),
    "spectral": ("spectral", ["moe.router.name=spectral"]),
    **{f"unified-{group}": ("unified", ["moe.router.name=unified", f"moe.router.group={group}",
                                        "moe.dispatcher=allgather"])
       for group in ("sequence", "micro_batch", "causal")},
}


def tiny_mixtral(out: Path) -> Path:
    """A randomly initialised Mixtral saved by transformers, with the embedded corpus'
    tokenizer (so the held-out text tokenizes into real pieces)."""
    import torch
    import transformers as tf

    from megasmoe.convert.tokenizer import write_tokenizer
    from megasmoe.data.default import prepare_default_data

    torch.manual_seed(0)
    config = tf.MixtralConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)
    tf.MixtralForCausalLM(config).save_pretrained(str(out))
    write_tokenizer(prepare_default_data(os.environ["MEGASMOE_CACHE"])["tokenizer"], out)
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """The Mixtral imported as a megasmoe run (weights-only checkpoint, its tokenizer)."""
    tmp = tmp_path_factory.mktemp("training_free")
    src = tiny_mixtral(tmp / "mixtral")
    run = tmp / "run"
    run_cmd([str(BIN / "megasmoe"), "convert", "from-hf", str(src), str(run)])
    return run


@pytest.fixture(scope="module")
def digest_before(imported) -> str:
    """The imported run's digest before any evaluation."""
    return _digest(imported)


def _digest(run: Path) -> str:
    """sha256 over config.yaml and every checkpoint file (names and bytes)."""
    h = hashlib.sha256()
    for path in sorted([run / "config.yaml", *(run / "checkpoints").rglob("*")]):
        if path.is_file():
            h.update(path.relative_to(run).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def reports(imported, digest_before) -> dict:
    """{switch: (report JSON, console output)}: one ``megasmoe eval`` per switch, two at a time
    (each is one process), on held-out text and multiple-choice items."""
    from megasmoe.data.corpus import corpus_documents
    from megasmoe.data.evalsets import mc_set_path

    text = imported.parent / "heldout.txt"
    text.write_text("\n\n".join(d[:2000] for d in corpus_documents("test")[:TEXT_DOCS]) + "\n")
    lines = mc_set_path("austen-continuation").read_text().splitlines()[:MC_ITEMS]
    items = write_jsonl(imported.parent / "mc.jsonl", [json.loads(line) for line in lines])

    def evaluate(switch: str):
        # Alone, megasmoe eval picks a free rendezvous port: two can run at once.
        proc = run_cmd([str(BIN / "megasmoe"), "eval", str(imported), *SWITCHES[switch][1],
                        "--name", f"eval-{switch}", "--no-default-sets",
                        "--data", f"heldout={text}", "--mc", f"continuation={items}"])
        report = json.loads((imported / "eval" / f"eval-{switch}.json").read_text())
        return report, proc.stdout

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SWITCHES, pool.map(evaluate, SWITCHES)))


def _numbers(report: dict) -> tuple[float, list[float]]:
    """(held-out loss, every choice's log-likelihood) of a report."""
    lls = [ll for item in report["mc"]["continuation"]["per_item"] for ll in item["loglik"]]
    return report["datasets"]["heldout"]["loss"], lls


def test_each_switch_is_reported_with_its_router(reports):
    for switch, (report, console) in reports.items():
        assert report["router"] == SWITCHES[switch][0], switch
        loss = report["datasets"]["heldout"]["loss"]
        assert 0 < loss < 20 and report["mc"]["continuation"]["items"] == MC_ITEMS
        assert "heldout" in console and "continuation" in console, console
        print(f"{switch}: heldout loss {loss:.6f}, continuation acc "
              f"{report['mc']['continuation']['acc']:.3f}")


def test_spectral_with_c0_gives_topk_numbers(reports):
    """SSMoE's mixture with c = 0 is the learned router's softmax: the same experts and
    weights up to one rounding in the renormalisation."""
    loss, lls = _numbers(reports["topk"][0])
    loss_c0, lls_c0 = _numbers(reports["spectral-c0"][0])
    assert abs(loss - loss_c0) < 1e-6, (loss, loss_c0)
    assert max(abs(a - b) for a, b in zip(lls, lls_c0)) < 1e-5


@pytest.mark.parametrize("switch", [s for s in SWITCHES if s not in ("topk", "spectral-c0")])
def test_other_switches_change_the_numbers(reports, switch):
    """Spectral mixing at the default c, and each USMoE token group, route differently."""
    loss, lls = _numbers(reports["topk"][0])
    other_loss, other_lls = _numbers(reports[switch][0])
    assert abs(loss - other_loss) > 1e-5 or max(abs(a - b) for a, b in zip(lls, other_lls)) > 1e-4


def test_the_switch_leaves_the_run_unchanged(imported, reports, digest_before):
    """Evaluating with another router writes only under eval/ (and tensorboard/): the
    checkpoint and config.yaml are byte for byte the imported ones."""
    assert _digest(imported) == digest_before
    assert sorted(p.name for p in (imported / "eval").glob("*.json")) == \
        sorted(f"eval-{s}.json" for s in SWITCHES)
