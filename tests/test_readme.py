"""The README is the user's entry point: its commands and reference must stay true."""

from __future__ import annotations

import re

from conftest import REPO


def _readme() -> str:
    return (REPO / "README.md").read_text()


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    blocks = re.findall(r"```bash\n(.*?)```", _readme(), flags=re.S)
    run_cmd, test_cmd = blocks[0].strip(), blocks[1].strip()
    assert run_cmd == "bash launch/setup.sh && bash launch/pretrain.sh"
    assert "pytest" in test_cmd and test_cmd.startswith("bash launch/setup.sh dev")
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()


def test_config_reference_table_matches_the_code():
    from megasmoe.cli import config_reference_rows

    text = _readme()
    table = text.split("<!-- config-reference:start -->")[1].split("<!-- config-reference:end -->")[0]
    for name, default, doc in config_reference_rows():
        row = f"| `{name}` | `{default!r}` | {doc} |"
        assert row in table, f"README config reference is stale for {name}: run `megasmoe config-reference`"
    assert table.count("\n| `") == len(config_reference_rows())


def test_names_users_type_are_documented():
    """The stable names of the foundation issue are in the reference."""
    text = _readme()
    for name in ("run.name", "run.dir", "run.seed", "train.steps", "train.micro_batch_size",
                 "train.global_batch_size", "train.seq_length", "train.lr", "train.log_interval",
                 "train.eval_interval", "checkpoint.interval", "parallel.tp", "parallel.pp",
                 "parallel.vpp", "parallel.ep", "parallel.etp", "parallel.cp", "parallel.sp",
                 "model.num_layers", "model.hidden_size", "model.num_heads", "moe.num_experts",
                 "moe.topk", "moe.dispatcher", "moe.router.name"):
        assert f"`{name}`" in text, name
