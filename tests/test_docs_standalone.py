"""The docs stand alone: every relative link in README.md and docs/ names a file or folder of
this repository (nothing outside it, nothing missing)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])

# [text](target "title"), ![alt](target), and reference definitions [id]: target
_INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
# A path written out (in a code span or prose) that climbs out of its folder: ../x
_CLIMB = re.compile(r"(?<![\w./-])(\.\./[\w./-]*)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _targets(text: str) -> list[str]:
    """Relative paths a markdown text links to or names as ../ paths."""
    out = []
    for target in [*_INLINE.findall(text), *_REFERENCE.findall(text)]:
        if _SCHEME.match(target) or target.startswith(("#", "//")):
            continue  # URLs, mailto:, in-page anchors
        out.append(target.split("#", 1)[0].split("?", 1)[0])
    out.extend(_CLIMB.findall(text))
    return [t for t in dict.fromkeys(out) if t]


def _problems(doc: Path, root: Path = REPO) -> list[str]:
    problems = []
    for target in _targets(doc.read_text()):
        path = (doc.parent / target).resolve()
        if path != root and root not in path.parents:
            problems.append(f"{target} (outside the repository)")
        elif not path.exists():
            problems.append(f"{target} (no such file)")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_relative_links_stay_in_the_repository(doc):
    problems = _problems(doc)
    assert not problems, f"{doc.relative_to(REPO)} links outside the repository: {problems}"


def test_the_checker_catches_what_it_should(tmp_path):
    """A link out of the repository, a missing file and a written-out ../ path count;
    URLs, anchors, existing files and '...' ellipses do not."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "routers.md").write_text("# routers\n")
    doc = root / "docs" / "guide.md"
    doc.write_text("[a](../../outside.md) [b](missing.md) `../shared/reference/routers.md` "
                   "[c](https://example.com/x.md) [d](#balance-loss) .../torchrun "
                   "[e](routers.md#hooks) [f](../docs/routers.md)\n[ref]: ../nowhere.md\n")
    assert _problems(doc.resolve(), root.resolve()) == [
        "../../outside.md (outside the repository)", "missing.md (no such file)",
        "../nowhere.md (no such file)", "../shared/reference/routers.md (no such file)"]
