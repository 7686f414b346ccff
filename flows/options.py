"""Command-line KEY=VALUE options shared by the flow entry points."""

from __future__ import annotations

from typing import Any

from tasks.errors import ParamsError
from tasks.params import safe_yaml


def parse_key_values(pairs: list[str], flag: str) -> dict[str, Any]:
    """["train.epochs=3", "save_experiment=false"] -> {"train.epochs": 3, "save_experiment": False};
    values are YAML, so numbers, booleans, lists and mappings arrive typed."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} expects KEY=VALUE, got {pair!r}")
        parsed[key] = safe_yaml(value, f"{flag} {key}")
    return parsed


def apply_overrides(params: dict, overrides: dict[str, Any]) -> None:
    """Set dotted keys ({"train.epochs": 3}) in a params mapping, in place.

    A section missing from the mapping is created (the schema fills defaults and names an unknown
    one); a key that holds a value cannot also hold a section.
    """
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = params
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                prefix = ".".join(parents[: depth + 1])
                raise ParamsError(f"override {key!r}: {prefix!r} is a value, not a section")
        node[leaf] = value
