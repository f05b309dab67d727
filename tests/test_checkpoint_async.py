"""Asynchronous checkpoint save (megatron-core AsyncCallsQueue), forced on CPU.

On GPU `checkpoint.async_save=auto` writes in the background; the same code path runs on
CPU when forced. A checkpoint written asynchronously must be published (manifest,
rename, `latest`) only once complete, and resume exactly like a synchronous one.
"""

from __future__ import annotations

import json

from conftest import pretrain, train_losses

COMMON = ["train.steps=10", "checkpoint.interval=4"]


def test_async_checkpoints_publish_and_resume_exactly(tmp_path):
    run = pretrain(tmp_path, "async", [*COMMON, "checkpoint.async_save=true"], nproc=2)
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000010"
    for step in (4, 8, 10):
        meta = json.loads((ckpts / f"iter_{step:07d}" / "megasmoe.json").read_text())
        assert meta["step"] == step and meta["manifest"], step
    assert not list(ckpts.glob("*.tmp"))
    full = train_losses(run)

    # Resume from the asynchronously written step-8 checkpoint and redo steps 9-10.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(ckpts / "iter_0000008", resumed / "checkpoints" / "iter_0000008")
    (resumed / "checkpoints" / "latest").write_text("iter_0000008")
    again = train_losses(pretrain(tmp_path, "resumed", COMMON, nproc=2))
    assert again[9] == full[9] and again[10] == full[10]
