"""The measured tables in README.md and docs/, generated from the committed bench JSON: `make docs`.

A table lives between two markers, and everything between them is this script's to rewrite:

    <!-- table: nets -->
    | net | params | ... |
    <!-- end table -->

    python -m bench.tables          # rewrite every table from its JSON
    python -m bench.tables --check  # exit 1, naming the file and table, where one has drifted

tests/test_docs_tables.py runs the check, so a committed table cannot disagree with its JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from bench import nets, train_speed

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", "docs/*.md"]
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.DOTALL)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


# name: the table, rendered from the JSON the bench committed.
TABLES: dict[str, Callable[[], str]] = {
    "nets": lambda: nets.table(_json(nets.RESULTS)["results"]),
    "train-speed": lambda: train_speed.markdown(_json(train_speed.RESULTS)),
}


def documents(root: Path = ROOT) -> list[Path]:
    return sorted(path for pattern in DOCUMENTS for path in root.glob(pattern))


def render(text: str, where: Path) -> str:
    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise SystemExit(f"{where}: unknown table {name!r} (known: {', '.join(TABLES)})")
        return f"{match[1]}{TABLES[name]().rstrip()}\n{match[4]}"
    return BLOCK.sub(fill, text)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table drifted")
    args = parser.parse_args()
    drifted = []
    for path in documents():
        text = path.read_text()
        fresh = render(text, path.relative_to(ROOT))
        if fresh == text:
            continue
        names = [m["name"] for m, n in zip(BLOCK.finditer(text), BLOCK.finditer(fresh)) if m[0] != n[0]]
        drifted.append(f"{path.relative_to(ROOT)}: {', '.join(names)}")
        if not args.check:
            path.write_text(fresh)
    verb = "differ from their JSON" if args.check else "rewritten"
    for line in drifted:
        print(f"tables {verb}: {line}", file=sys.stderr if args.check else sys.stdout)
    if args.check and drifted:
        sys.exit("bench.tables: run `make docs` to regenerate them")


if __name__ == "__main__":
    main()
