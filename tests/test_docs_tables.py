"""The measured tables in README.md and docs/ are bench/tables.py's output from the committed JSON."""

from __future__ import annotations

import json
import re

import pytest

from bench import tables
from conftest import REPO


def test_every_committed_table_matches_its_json():
    documents = tables.documents(REPO)
    assert REPO / "README.md" in documents and REPO / "docs" / "your-model.md" in documents
    found = []
    for path in documents:
        text = path.read_text()
        found += [m["name"] for m in tables.BLOCK.finditer(text)]
        assert tables.render(text, path) == text, (
            f"{path.relative_to(REPO)}: a table differs from its JSON; run `make docs`")
    assert "nets" in found


def test_a_table_edited_by_hand_is_put_back_and_the_prose_around_it_kept():
    text = (REPO / "README.md").read_text()
    block = next(tables.BLOCK.finditer(text))
    edited = text.replace(block["body"], block["body"].replace("%", " percent", 1), 1)
    assert edited != text
    assert tables.render(edited, REPO / "README.md") == text


def test_a_table_follows_its_json(tmp_path, monkeypatch):
    results = json.loads(tables.nets.RESULTS.read_text())
    results["results"][0]["accuracy"]["fp32"] = 0.5
    changed = tmp_path / "nets.json"
    changed.write_text(json.dumps(results))
    monkeypatch.setattr(tables.nets, "RESULTS", changed)
    doc = "intro\n<!-- table: nets -->\nold\n<!-- end table -->\nafter\n"
    rendered = tables.render(doc, tmp_path / "doc.md")
    assert "| 50.0% |" in rendered and "old" not in rendered
    assert rendered.startswith("intro\n<!-- table: nets -->\n| net |") and rendered.endswith("<!-- end table -->\nafter\n")


def test_an_unknown_table_names_the_document(tmp_path):
    with pytest.raises(SystemExit, match=r"doc\.md: unknown table 'nope'"):
        tables.render("<!-- table: nope -->\n<!-- end table -->\n", tmp_path / "doc.md")


LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)
HEADING = re.compile(r"^#+ (?P<title>.+)$", re.MULTILINE)


def test_every_table_is_in_a_document_and_every_marker_is_a_table():
    used = {m["name"] for path in tables.documents(REPO) for m in tables.BLOCK.finditer(path.read_text())}
    assert used <= tables.TABLES.keys(), f"markers without a renderer: {sorted(used - tables.TABLES.keys())}"
    unused = tables.TABLES.keys() - used
    assert not unused, f"tables no document shows: {sorted(unused)}"
    assert "results" in {m["name"] for m in tables.BLOCK.finditer((REPO / "README.md").read_text())}


def _anchor(title: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def test_every_relative_link_in_the_docs_points_at_a_file():
    broken = []
    for path in tables.documents(REPO):
        for link in LINK.finditer(CODE.sub("", path.read_text())):
            target = link["target"]
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            where = (path.parent / file).resolve() if file else path
            if not where.exists():
                broken.append(f"{path.relative_to(REPO)}: {target} (no such file)")
            elif anchor and where.suffix == ".md" and anchor not in {
                    _anchor(m["title"]) for m in HEADING.finditer(CODE.sub("", where.read_text()))}:
                broken.append(f"{path.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_reads_in_ten_minutes():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= 260, f"README.md has {lines} lines; move detail into docs/"
