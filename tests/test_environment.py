"""The environment a run records in metrics/train.json: what dvc exp show puts beside its figures."""

import json
import re
import tomllib
from importlib.metadata import version

import torch

from tasks.environment import cpu_name, environment

from conftest import REPO


def test_environment_names_the_cpu_and_the_installed_versions():
    recorded = environment()
    assert recorded["cpu"] == cpu_name() and recorded["cpu"].strip()
    assert recorded["torch"] == torch.__version__
    for package in ("numpy", "dvc", "prefect"):
        assert recorded[package] == version(package)
    assert all(isinstance(v, str) for v in recorded.values())


def test_train_metrics_carry_the_environment(tiny_workspace):
    workspace, _ = tiny_workspace
    assert json.loads(workspace.metrics("train").read_text())["environment"] == environment()


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement)[0]).lower()


def test_lock_pins_every_declared_dependency():
    """A dependency added to pyproject.toml without `make lock` would install unpinned."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values()
                                          for r in extra]
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            assert pinned, f"requirements.lock: {line!r} is not an == pin"
            pins[_name(name)] = pinned
    missing = sorted({_name(r) for r in declared} - set(pins))
    assert not missing, f"not in requirements.lock (run `make lock`): {missing}"
    assert pins["torch"] == "2.13.0" and "qatflow" not in pins
