"""Command-line KEY=VALUE options shared by the flow entry points."""

from __future__ import annotations

from typing import Any

import yaml


def parse_key_values(pairs: list[str], flag: str) -> dict[str, Any]:
    """["train.epochs=3", "save_experiment=false"] -> {"train.epochs": 3, "save_experiment": False};
    values are YAML, so numbers, booleans, lists and mappings arrive typed."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} expects KEY=VALUE, got {pair!r}")
        parsed[key] = yaml.safe_load(value)
    return parsed
