"""Embedded evaluation data: the builder reproduces the committed files, the
multiple-choice items are well formed and held out, the Python documents are real
standard-library source."""

from __future__ import annotations

import ast
import fnmatch
import gzip
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, repo_files
from megasmoe.data import build_evalsets
from megasmoe.data.corpus import corpus_documents, corpus_records, split_of
from megasmoe.data.errors import DataError
from megasmoe.data.evalsets import (DOMAINS, MC_SETS, MC_VERSION, domain_documents,
                                    evalset_files, mc_set_path, python_records)


def _items(name: str) -> list[dict]:
    return [json.loads(line) for line in mc_set_path(name).read_text("utf-8").splitlines()]


def test_builder_check_passes_and_a_second_build_gives_identical_bytes(tmp_path, monkeypatch):
    """--check builds in a fresh process; a second build here must give the same bytes
    (and --check's comparison must catch a changed item)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "megasmoe.data.build_evalsets", "--check"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all embedded evaluation files are up to date" in proc.stdout

    copies = {name: tmp_path / mc_set_path(name).name for name in MC_SETS}
    for name, copy in copies.items():
        copy.write_bytes(mc_set_path(name).read_bytes())
    items = _items("python-continuation")
    items[7]["answer"] = (items[7]["answer"] + 1) % 4
    copies["python-continuation"].write_text(
        "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), "utf-8")
    monkeypatch.setattr(build_evalsets, "mc_set_path", copies.__getitem__)
    problems = build_evalsets._check(None)
    assert len(problems) == 1 and str(copies["python-continuation"]) in problems[0], problems

    records = python_records()
    first = build_evalsets._gzip(build_evalsets._jsonl(records))
    assert build_evalsets._gzip(build_evalsets._jsonl(records)) == first
    committed = (build_evalsets.EVALSETS_DIR / "python-stdlib.jsonl.gz").read_bytes()
    assert gzip.decompress(first) == gzip.decompress(committed)


def test_api_names_files_and_errors():
    assert DOMAINS == ("austen", "python")
    assert MC_SETS == ("austen-continuation", "python-continuation")
    assert MC_VERSION == "v1"
    assert mc_set_path("austen-continuation").name == f"austen-continuation-{MC_VERSION}.jsonl"
    assert domain_documents("austen") == corpus_documents("test")
    assert domain_documents("python") == [r["text"] for r in python_records()]
    for bad, call in (("novels", domain_documents), ("python-continuation-v1", mc_set_path)):
        with pytest.raises(DataError, match=f"unknown embedded .*{bad!r}; use one of") as e:
            call(bad)
        assert "\n" not in str(e.value)
    files = evalset_files()
    assert all(p.is_file() for p in files) and len(files) == 5


def test_evalset_files_are_committed_and_packaged():
    tracked = set(repo_files())
    pyproject = (REPO / "pyproject.toml").read_text()
    section = pyproject.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    globs = [g.strip(' "') for g in section.split("=", 1)[1].strip(" \n[]").split(",")]
    for path in evalset_files():
        rel = path.relative_to(REPO)
        assert str(rel) in tracked, rel
        assert any(fnmatch.fnmatch(str(path.relative_to(REPO / "megasmoe")), g) for g in globs)


@pytest.mark.parametrize("name", MC_SETS)
def test_items_are_well_formed(name):
    items = _items(name)
    assert len(items) == build_evalsets.ITEMS_PER_SET
    assert len({it["id"] for it in items}) == len(items)
    for it in items:
        assert set(it) == {"id", "context", "choices", "answer"}, it["id"]
        choices = it["choices"]
        assert len(choices) >= 2 and len(set(choices)) == len(choices), it["id"]
        assert isinstance(it["answer"], int) and 0 <= it["answer"] < len(choices), it["id"]
        assert it["context"].strip() and it["context"] == it["context"].rstrip(), it["id"]
        separator = choices[it["answer"]][:len(choices[it["answer"]]) -
                                          len(choices[it["answer"]].lstrip())]
        assert separator.strip() == "" and separator, it["id"]
        # Every choice starts with the same separator: whitespace alone gives nothing away.
        assert all(c.startswith(separator) and not c[len(separator)].isspace()
                   for c in choices), it["id"]
    # The true answer is spread over the positions, and length alone does not find it.
    positions = [it["answer"] for it in items]
    assert all(positions.count(k) >= len(items) // 8 for k in range(4))
    for pick in (max, min):
        hits = sum(it["choices"].index(pick(it["choices"], key=len)) == it["answer"]
                   for it in items)
        assert hits <= 0.4 * len(items), (pick.__name__, hits)


def test_austen_items_come_from_test_chapters_only():
    records = corpus_records()
    tests = [r["text"] for r in records if split_of(r["id"]) == "test"]
    others = "\n\n".join(r["text"] for r in records if split_of(r["id"]) != "test")
    for it in _items("austen-continuation"):
        chapter = next((t for t in tests if it["context"] in t), None)
        assert chapter is not None, it["id"]
        assert it["context"] not in others, it["id"]
        for k, choice in enumerate(it["choices"]):
            assert choice.strip() in "\n\n".join(tests), it["id"]
            assert choice.strip() not in others, it["id"]
            # The true choice continues the passage verbatim, the others do not.
            assert ((it["context"] + choice) in chapter) == (k == it["answer"]), it["id"]


def test_python_documents_are_utf8_source_that_parses():
    records = python_records()
    assert [r["path"] for r in records] == list(build_evalsets.STDLIB_MODULES)
    size = sum(len(r["text"].encode("utf-8")) for r in records)
    assert 500_000 <= size <= 1_000_000, size
    for r in records:
        ast.parse(r["text"], filename=r["path"])
        assert "test" not in r["path"]
    texts = {r["id"]: r["text"] for r in records}
    for it in _items("python-continuation"):
        module = texts[it["id"].removeprefix("python-").rsplit("-L", 1)[0]]
        for k, choice in enumerate(it["choices"]):
            assert ((it["context"] + choice) in module) == (k == it["answer"]), it["id"]


def test_snapshot_refuses_a_module_that_is_missing_or_not_utf8(tmp_path):
    with pytest.raises(DataError, match=r"abc\.py: cannot read as UTF-8 .*CPython 3\.11\.7"):
        build_evalsets.stdlib_records(tmp_path)
    for rel in build_evalsets.STDLIB_MODULES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    (tmp_path / "csv.py").write_bytes(b"name = '\xff'\n")
    with pytest.raises(DataError, match=r"csv\.py: cannot read as UTF-8") as e:
        build_evalsets.stdlib_records(tmp_path)
    assert "\n" not in str(e.value)
