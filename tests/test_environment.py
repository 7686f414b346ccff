"""The environment a run records in metrics/train.json: what dvc exp show puts beside its figures."""

import json
from importlib.metadata import version

import torch

from tasks.environment import cpu_name, environment


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
