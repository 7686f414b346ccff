"""dvc.yaml lists, stage by stage, exactly the params keys the stage reads, each a key of
params.yaml (where every value lives): a change re-runs the stages that read it and no other."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import yaml

from conftest import PARAMS_READ, REPO, STAGES, schema_keys

DVC_STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
# Keys a stage lists that the tiny run (the built-in data) never reaches: they matter for image
# folders and CSV files only (tests/test_hardening_inputs.py and test_sources.py run those).
NOT_READ_ON_TINY_RUN = {
    "prepare": {"data.label_column", "data.image_size", "data.image_mode", "data.max_image_pixels"},
}


def listed(stage: str) -> set[str]:
    return set(DVC_STAGES[stage].get("params", []))


def in_params_yaml(key: str) -> bool:
    node = PARAMS
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_every_listed_key_is_in_params_yaml_and_every_key_is_listed():
    keys = schema_keys()
    for stage in DVC_STAGES:
        for key in DVC_STAGES[stage].get("params", []):
            # A plain key of params.yaml: DVC refuses a stage whose listed key is missing there.
            assert isinstance(key, str) and key in keys, f"dvc.yaml: {stage} lists {key!r}, not a params key"
            assert in_params_yaml(key), f"dvc.yaml: {stage} lists {key}, which params.yaml lacks"
    # Every knob re-runs what reads it: none lives where DVC cannot see it.
    assert keys == set().union(*map(listed, DVC_STAGES)), keys ^ set().union(*map(listed, DVC_STAGES))


@pytest.mark.e2e
def test_each_stage_lists_the_keys_it_read_in_a_real_run(_repro_run):
    """tests/params_read/ recorded every params value each stage process of the session's one
    `dvc repro` read (tests/conftest.py)."""
    root, _, _ = _repro_run
    read: dict[str, set[str]] = defaultdict(set)
    for line in (root.parent / PARAMS_READ).read_text().splitlines():
        record = json.loads(line)
        read[record["stage"]] |= set(record["read"])
    assert set(read) == set(STAGES)
    for stage in STAGES:
        assert not read[stage] - listed(stage), f"{stage} reads {sorted(read[stage] - listed(stage))}, " \
                                                "which its dvc.yaml params do not list"
        unread = listed(stage) - read[stage]
        assert unread == NOT_READ_ON_TINY_RUN.get(stage, set()), f"{stage} lists {sorted(unread)} unread"
