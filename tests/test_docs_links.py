"""Every relative link in README.md and docs/*.md points at a file that exists, and every
#anchor at a heading of its target (GitHub's heading ids). Text only: no pipeline, no model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's id for a heading: markup and punctuation dropped, lowercase, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    out = []
    for number, line in prose_lines(path):
        for match in LINK.finditer(CODE_SPAN.sub("code", line)):
            out.append((number, match.group(1)))
    return out


def test_the_pages_exist_and_link_somewhere():
    names = {p.name for p in PAGES}
    assert "README.md" in names and len(PAGES) > 2
    assert sum(len(links(p)) for p in PAGES) > 20


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    dangling = []
    for number, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        where = f"{page.relative_to(REPO)}:{number}: {target}"
        if not dest.exists():
            dangling.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            dangling.append(f"{where} (no heading #{anchor} in {dest.relative_to(REPO)})")
    assert not dangling, "\n".join(dangling)


def test_slug_matches_githubs_ids():
    assert slug("Non-uniform sparsity: OWL and per-layer lists") == (
        "non-uniform-sparsity-owl-and-per-layer-lists"
    )
    assert slug("Before a run: `rose plan`") == "before-a-run-rose-plan"
    assert slug("Measured: uniform against OWL on SmolLM2, and against llm-compressor's OWL") == (
        "measured-uniform-against-owl-on-smollm2-and-against-llm-compressors-owl"
    )


def test_ci_runs_exactly_the_readmes_test_command():
    """.ci/run's last command is the one bash line under README.md's "Run the tests"."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"^Run the tests.*?^```bash\n(.*?)^```", readme, re.S | re.M)
    assert block, 'README.md has no "Run the tests" bash block'
    (command,) = [line for line in block.group(1).splitlines() if line.strip()]
    ci = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()]
    ci = [line for line in ci if line and not line.startswith("#")]
    assert ci[-1] == command.strip()
