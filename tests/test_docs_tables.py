"""The measured tables in README.md and docs/ are bench/tables.py's output from the committed JSON."""

from __future__ import annotations

import json

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
