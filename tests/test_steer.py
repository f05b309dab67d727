"""DSMoE discovery and steering (``megasmoe steer``) on the shared trained tiny run.

One discovery at world size 1 (in this process, twice: the file must come out byte for
byte the same), one under torchrun at EP=2 and one at TP=2+SP (the same pairs and
counts), one ``apply``, one export with verify, and ``megasmoe eval`` of the steered and
the unsteered run.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import free_port, run_megasmoe
from megasmoe.cli import main
from megasmoe.evaluation import steer as S

TOP_N = 6
LAMBDA = 0.1
LAYOUTS = {"ep2": ["parallel.ep=2"], "tp2_sp": ["parallel.tp=2", "parallel.sp=true"]}
CALIBRATION = ["--top-n", str(TOP_N), "--lambda", str(LAMBDA), "--max-tokens", "1024"]


@pytest.fixture(scope="module")
def steer(trained_tiny_run, tmp_path_factory):
    """The shared run copied, the two domain files, and the discovery's file at world
    size 1 (run twice), at EP=2 and at TP=2+SP."""
    root = tmp_path_factory.mktemp("steer")
    run = root / "run"
    shutil.copytree(trained_tiny_run, run)
    domains = ["--domain", "austen", "--domain", "python"]  # embedded (megasmoe.data.evalsets)
    for name in ("ws1", "ws1_again"):
        assert main(["steer", "discover", str(run), *domains, "--out", str(root / f"{name}.json"),
                     *CALIBRATION]) == 0
    for name, layout in LAYOUTS.items():
        run_megasmoe(["steer", "discover", str(run), "parallel.world_size=2", *layout,
                      *domains, "--out", str(root / f"{name}.json"), *CALIBRATION], nproc=2)
    return {"root": root, "run": run,
            "file": root / "ws1.json", "doc": json.loads((root / "ws1.json").read_text())}


def test_discover_writes_the_top_n_pairs_of_the_target_domain(steer):
    doc = steer["doc"]
    assert doc["format"] == S.FORMAT and doc["domain"] == "austen"
    assert doc["domains"]["python"]["source"] == "embedded:python"
    assert doc["mode"] == "multiplicative" and doc["lambda"] == LAMBDA
    pairs = [(p["layer"], p["expert"]) for p in doc["pairs"]]
    assert len(pairs) == len(set(pairs)) == TOP_N
    # The pairs are the best scores of the target domain, best first, and "experts"
    # (what the router reads) names exactly them.
    scores = doc["domains"]["austen"]["scores"]
    every = sorted((-s, int(layer), e) for layer, row in scores.items() for e, s in enumerate(row))
    assert [(layer, e) for _, layer, e in every[:TOP_N]] == pairs
    assert sorted((int(layer), e) for layer, ids in doc["experts"].items() for e in ids) == \
        sorted(pairs)
    # s = (n_important - n_unimportant) * p_e from the recorded counts.
    for name, d in doc["domains"].items():
        imp = torch.tensor([d["important"][k] for k in sorted(d["important"])])
        routed = torch.tensor([d["routed"][k] for k in sorted(d["routed"])])
        assert routed.sum() == d["tokens"] * 2 * 4  # top-2 in each of 4 MoE layers
        assert 0 < d["important_tokens"] < 0.85 * d["tokens"] + 1
        want = S.pair_scores(imp, routed)
        got = torch.tensor([d["scores"][k] for k in sorted(d["scores"])], dtype=torch.float64)
        assert torch.equal(got, want), name
    # The other domain is scored too, and differently.
    assert doc["domains"]["python"]["scores"] != scores
    prov = doc["provenance"]
    assert prov["step"] == 30 and prov["checkpoint"] == "iter_0000030" and prov["top_n"] == TOP_N


def test_discover_is_deterministic(steer):
    root = steer["root"]
    assert (root / "ws1.json").read_bytes() == (root / "ws1_again.json").read_bytes()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_discover_at_ep2_and_tp2_sp_writes_the_same_file(steer, layout):
    # The counts are integers and the scores a function of them, so the same tokens
    # classified and routed the same way give the same bytes (observed at EP=2 and at
    # TP=2+SP, where each rank holds half of every sequence). Importances and router logits differ across layouts by float rounding
    # only; a token within that rounding of the percentile or of a routing tie could
    # move one count by one, so the assertion allows that and no more.
    ws1 = steer["doc"]
    other = json.loads((steer["root"] / f"{layout}.json").read_text())
    assert [(p["layer"], p["expert"]) for p in other["pairs"]] == \
        [(p["layer"], p["expert"]) for p in ws1["pairs"]]
    for name, d in ws1["domains"].items():
        assert other["domains"][name]["tokens"] == d["tokens"]
        assert abs(other["domains"][name]["important_tokens"] - d["important_tokens"]) <= 1
        for field in ("important", "routed"):
            a = torch.tensor(list(d[field].values()))
            b = torch.tensor(list(other["domains"][name][field].values()))
            assert (a - b).abs().max() <= 1, (name, field)


@pytest.fixture(scope="module")
def steered(steer):
    """The run steered with the discovered file (``steer apply``)."""
    out = steer["root"] / "steered"
    assert main(["steer", "apply", str(steer["run"]), str(steer["file"]), "--out", str(out)]) == 0
    return out


def _routers(run: Path):
    """(layer -> router) of the run's model at world size 1, loaded from its checkpoint."""
    from megasmoe.config import to_dict
    from megasmoe.convert.runtime import single_process_config
    from megasmoe.evaluation.engine import load_model_tensors
    from megasmoe.evaluation.steer_run import build_model, newest_checkpoint, run_config
    from megasmoe.training.telemetry import routers

    cfg = single_process_config(to_dict(run_config(run, [], None)), run)
    chunks = build_model(cfg)
    load_model_tensors(chunks, cfg, newest_checkpoint(run))
    return {r.layer_number - 1: r for r in routers(chunks)}, cfg


def test_apply_changes_the_router_logits_only_on_the_named_experts(steer, steered):
    from megasmoe.convert.runtime import single_process

    chosen = {(p["layer"], p["expert"]) for p in steer["doc"]["pairs"]}
    delta = torch.tensor(math.log1p(LAMBDA), dtype=torch.float32)
    from megasmoe.evaluation.steer_run import run_config

    with single_process(run_config(steered, [], None)), torch.no_grad():
        plain, _ = _routers(steer["run"])
        steer_routers, _ = _routers(steered)
        x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
        for layer, router in steer_routers.items():
            assert type(router).__name__ == "DomainSteerRouter"
            assert torch.equal(router.weight, plain[layer].weight)
            diff = router.gating(x) - plain[layer].gating(x)
            for e in range(diff.shape[1]):
                if (layer, e) in chosen:
                    assert router.steering_bias[e] == delta
                    torch.testing.assert_close(diff[:, e], delta.expand(64), rtol=0, atol=1e-6)
                else:
                    assert router.steering_bias[e] == 0 and torch.all(diff[:, e] == 0)
    assert (steered / "steer.json").read_bytes() == steer["file"].read_bytes()


def test_steered_run_exports_and_verifies(steered, tmp_path):
    from megasmoe.convert import to_hf, verify

    report = to_hf(steered, tmp_path / "hf")
    assert report.architecture == "GptOssForCausalLM"
    check = verify(steered, tmp_path / "hf")
    assert check.max_abs_logit_diff < 1e-4 and check.next_token_agreement == 1.0


def test_eval_reports_the_per_domain_effect(steer, steered, monkeypatch):
    # megasmoe eval in this process (a one-process group on a free port; the env it
    # sets is undone after the test).
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())),
                       ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    from megasmoe.data import evalsets

    data = []
    for d in ("austen", "python"):  # the embedded domains as files: no other default set
        path = steer["root"] / f"{d}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n"
                                for t in evalsets.domain_documents(d)[:2]))
        data += ["--data", f"{d}={path}"]
    losses = {}
    # "switched": the unsteered checkpoint evaluated with the steering file named on the
    # command line (no steer apply): the same numbers as the applied run.
    switch = ["moe.router.name=domain_steer", f"moe.router.file={steer['file']}"]
    for name, run, extra in (("plain", steer["run"], []), ("steered", steered, []),
                             ("switched", steer["run"], switch)):
        assert main(["eval", str(run), "parallel.world_size=1", "parallel.ep=1", *extra,
                     *data, "--no-default-sets", "--batches", "1", "--name", f"steer-{name}"]) == 0
        report = json.loads((run / "eval" / f"steer-{name}.json").read_text())
        assert report["router"] == ("topk" if name == "plain" else "domain_steer")
        losses[name] = {d: report["datasets"][d]["loss"] for d in ("austen", "python")}
    for d in ("austen", "python"):
        assert math.isfinite(losses["plain"][d]) and losses["steered"][d] != losses["plain"][d]
        assert losses["switched"][d] == pytest.approx(losses["steered"][d], rel=1e-6, abs=0)


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("experts,named", [({"7": [1]}, "layer 7 does not exist"),
                                           ({"1": [2, 9]}, "layer 1 names expert 9")])
def test_apply_refuses_a_steering_file_naming_what_the_model_lacks(steer, capsys, experts, named):
    bad = steer["root"] / "bad.json"
    bad.write_text(json.dumps({"mode": "multiplicative", "lambda": 0.1, "experts": experts}))
    out = steer["root"] / "refused"
    err = _one_line_error(capsys, ["steer", "apply", str(steer["run"]), str(bad),
                                   "--out", str(out)])
    assert f"'{bad}'" in err and named in err and "megasmoe steer discover" in err
    assert not out.exists()


@pytest.mark.parametrize("content,named", [(b"", "empty"),
                                           (b"fine text\nbad \xff byte\n", ":2: not UTF-8")])
def test_discover_refuses_an_empty_or_non_utf8_domain_file(steer, capsys, content, named):
    bad = steer["root"] / "bad.txt"
    bad.write_bytes(content)
    out = steer["root"] / "refused.json"
    err = _one_line_error(capsys, ["steer", "discover", str(steer["run"]),
                                   "--domain", f"x={bad}", "--out", str(out)])
    assert str(bad) in err and named in err
    assert not out.exists()
