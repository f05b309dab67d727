"""The checkpoints directory on disk: names, verification, atomic publication, pruning.

Layout of ``<run dir>/checkpoints/``::

    iter_0000100/            a complete checkpoint (megatron files + megasmoe.json)
    iter_0000200/
    latest                   "iter_0000200": written last, atomically (tmp, fsync, rename)

A checkpoint is first written to ``iter_XXXXXXX.tmp``; after every rank finished, rank 0
writes ``megasmoe.json`` (step, data position, config, versions, layout, and a manifest
of every file with its size), fsyncs, renames the directory to its final name and only
then moves ``latest`` (``_publish``). A crash at any point leaves the previous checkpoint
and ``latest`` untouched. On resume a checkpoint whose manifest does not match the files
on disk (truncated or missing files, unreadable metadata) is skipped in favour of the
newest complete one, with a warning naming both. A save that fails removes its
``.tmp`` directory; whatever a killed save leaves is removed by the next save or resume.

Plain files and JSON only: importing this module does not import torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional

__all__ = [
    "META_FILE", "LATEST", "CheckpointError", "checkpoint_root", "iteration_dir",
    "list_checkpoints", "read_meta", "verify_checkpoint", "metadata_problem", "read_latest",
    "find_resume_checkpoint", "remove_leftovers", "replace_dir", "prune_checkpoints",
]


META_FILE = "megasmoe.json"

LATEST = "latest"

_ITER_RE = re.compile(r"^iter_(\d{7})$")

_TMP_RE = re.compile(r"^iter_\d{7}\.tmp$")

# Temporary directories of asynchronous saves still being written by this process:
# remove_leftovers must not delete them.
_IN_FLIGHT: set[str] = set()

class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names it and the fix.

    ``same_on_every_rank``: the check read only the checkpoint's metadata and the config,
    so every rank raises the same error (the CLI prints it once, from rank 0).
    """

    def __init__(self, message: str, same_on_every_rank: bool = False):
        super().__init__(message)
        self.same_on_every_rank = same_on_every_rank

def checkpoint_root(run_dir: Path) -> Path:
    """``<run dir>/checkpoints``."""
    return Path(run_dir) / "checkpoints"

def iteration_dir(root: Path, step: int) -> Path:
    """``<root>/iter_0000100`` for step 100."""
    return Path(root) / f"iter_{step:07d}"

def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of final-named checkpoint directories, oldest first (not verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _ITER_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)

def read_meta(ckpt_dir: Path) -> dict:
    """The megasmoe.json of a checkpoint (CheckpointError if absent or unreadable)."""
    path = Path(ckpt_dir) / META_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt_dir}: no readable {META_FILE} ({e}); not a complete "
                              f"megasmoe checkpoint") from None

def _manifest(ckpt_dir: Path) -> dict[str, int]:
    return {
        str(p.relative_to(ckpt_dir)): p.stat().st_size
        for p in sorted(Path(ckpt_dir).rglob("*"))
        if p.is_file() and p.name != META_FILE
    }

def verify_checkpoint(ckpt_dir: Path) -> Optional[str]:
    """None if complete, else the reason (missing meta, missing or truncated file,
    unreadable megatron metadata)."""
    try:
        meta = read_meta(ckpt_dir)
    except CheckpointError as e:
        return str(e)
    for rel, size in meta.get("manifest", {}).items():
        path = Path(ckpt_dir) / rel
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, expected {size} (truncated)"
    return metadata_problem(ckpt_dir)

def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__

def metadata_problem(ckpt_dir: Path) -> Optional[str]:
    """None if megatron's metadata files of a checkpoint can be read, else the reason.

    Reads ``.metadata`` (torch_dist's pickled index of every tensor chunk) and
    ``metadata.json``: a corrupt one would otherwise fail every rank's load (or
    ``inspect``) with a raw UnpicklingError traceback. Files that are absent are left to
    the manifest check.
    """
    from torch.distributed.checkpoint import FileSystemReader

    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / ".metadata").is_file():
        try:
            FileSystemReader(str(ckpt_dir)).read_metadata()
        except Exception as e:  # any unpickling error: the file is not usable
            return f"{ckpt_dir / '.metadata'} is unreadable ({_one_line(e)})"
    if (ckpt_dir / "metadata.json").is_file():
        try:
            json.loads((ckpt_dir / "metadata.json").read_text())
        except (OSError, ValueError) as e:
            return f"{ckpt_dir / 'metadata.json'} is unreadable ({_one_line(e)})"
    return None

def read_latest(root: Path) -> Optional[Path]:
    """The checkpoint directory ``<root>/latest`` names (not verified); None without one."""
    try:
        name = (Path(root) / LATEST).read_text().strip()
    except OSError:
        return None
    return Path(root) / name if _ITER_RE.match(name) else None

def find_resume_checkpoint(root: Path, step: Optional[int] = None) -> Optional[Path]:
    """The checkpoint to resume from: ``step`` if given, else ``latest``, verified.

    A named or latest checkpoint that fails verification is skipped for the newest
    complete older one, with a warning naming both. None when there is nothing to resume.
    """
    root = Path(root)
    candidates = list_checkpoints(root)
    if step is not None:
        wanted = iteration_dir(root, step)
        problem = verify_checkpoint(wanted) if wanted.is_dir() else f"{wanted} does not exist"
        if problem:
            raise CheckpointError(f"checkpoint.resume_step={step}: {problem}; pick a step from "
                                  f"{[s for s, _ in candidates]}")
        return wanted
    latest = read_latest(root)
    if latest is None and not candidates:
        return None
    newest_first = sorted(candidates, reverse=True)
    if latest is not None:
        # Never resume past the marker: a newer directory without marker is unfinished.
        newest_first = [(s, d) for s, d in newest_first if d.name <= latest.name]
    for s, d in newest_first:
        problem = verify_checkpoint(d)
        if problem is None:
            if latest is not None and d != latest:
                warnings.warn(f"megasmoe: checkpoint {latest} is incomplete or corrupt; "
                              f"resuming from {d} instead", stacklevel=2)
            return d
        warnings.warn(f"megasmoe: skipping checkpoint {d}: {problem}", stacklevel=2)
    return None

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)

def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())

def _abandon(tmp: Path) -> None:
    """Remove the directory of a save that failed (best effort: what stays behind, e.g.
    files another rank is still writing, is removed by the next save)."""
    shutil.rmtree(tmp, ignore_errors=True)

def remove_leftovers(root: Path) -> list[Path]:
    """Delete ``iter_*.tmp`` directories under ``root`` (saves that failed or were
    killed), except asynchronous saves this process is still writing. Rank 0 of the run
    that owns ``root`` calls it, at every save and at resume. Returns what it removed."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for child in sorted(root.iterdir()):
        if _TMP_RE.match(child.name) and child.is_dir() and str(child) not in _IN_FLIGHT:
            shutil.rmtree(child, ignore_errors=True)
            print(f"megasmoe: removed {child}, left by an unfinished save", file=sys.stderr,
                  flush=True)
            removed.append(child)
    return removed

def _publish(tmp: Path, final: Path, root: Path, meta: dict, keep_last: int) -> None:
    """Rank 0, after every rank wrote: manifest + meta, rename, move ``latest``, prune."""
    _fsync_tree(tmp)
    meta = {**meta, "manifest": _manifest(tmp)}
    _atomic_write(tmp / META_FILE, json.dumps(meta, indent=1, default=str))
    replace_dir(tmp, final)
    _fsync_dir(root)
    _atomic_write(root / LATEST, final.name)
    prune_checkpoints(root, keep_last)

def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0

def replace_dir(new: Path, final: Path) -> None:
    """Put directory ``new`` at ``final``; an existing ``final`` is replaced atomically.

    Re-saving a step (a signal right after a save, or a run resumed from an older
    step) must not leave a moment where ``latest`` names a missing directory: the two
    are exchanged in one rename and the old one, now at ``new``, deleted after. Where
    the kernel cannot exchange, the old one is renamed aside first (a short window).
    """
    if not final.exists():
        new.rename(final)
        return
    if _exchange(new, final):
        shutil.rmtree(new)
        return
    aside = final.with_name(final.name + ".old.tmp")  # a leftover *.tmp is cleaned later
    final.rename(aside)
    new.rename(final)
    shutil.rmtree(aside)

def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints, sparing permanent ones.

    A checkpoint is permanent when its megasmoe.json says so (checkpoint.keep_every) or
    when a file named KEEP is put in its directory. ``latest`` is never deleted.
    """
    if keep_last <= 0:
        return []
    found = list_checkpoints(root)
    latest = read_latest(root)
    removed = []
    for step, d in found[:-keep_last]:
        if d == latest or (d / "KEEP").exists():
            continue
        try:
            if read_meta(d).get("permanent"):
                continue
        except CheckpointError:
            pass
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed
