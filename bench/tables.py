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

from bench import benchmark, ddp, families, nets, orchestration, prepare_large, reference, train_speed

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
METRICS = ROOT / "metrics"
DOCUMENTS = ["README.md", "docs/*.md"]
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.DOTALL)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _results() -> str:
    """The reference run's table: what `dvc repro` committed to metrics/."""
    return reference.markdown(_json(METRICS / "evaluate.json"), _json(METRICS / "latency.json"),
                              _json(METRICS / "export.json")["gate"], _json(METRICS / "train.json"))


# name: the table, rendered from the JSON the bench (or the pipeline) committed.
TABLES: dict[str, Callable[[], str]] = {
    "results": _results,
    "benchmark": lambda: benchmark.markdown(_json(BENCH / "results.json")),
    "benchmark-targets": lambda: benchmark.markdown_targets(_json(BENCH / "results.json")),
    "benchmark-ort-static": lambda: benchmark.markdown_ort(_json(BENCH / "results.json")),
    "benchmark-load": lambda: benchmark.markdown_load(_json(BENCH / "results.json")),
    "families": lambda: families.markdown(_json(families.RESULTS)),
    "orchestration": lambda: orchestration.markdown(_json(BENCH / "orchestration.json")),
    "ddp": lambda: ddp.markdown(_json(BENCH / "ddp.json")),
    "prepare-large": lambda: prepare_large.markdown_prepare(_json(BENCH / "prepare_large.json")),
    "prepare-large-train": lambda: prepare_large.markdown_train(_json(BENCH / "prepare_large.json")),
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
