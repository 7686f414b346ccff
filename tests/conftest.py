"""Shared fixtures: tiny params and a tiny workspace that the stages run in, in temp folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tasks.deprecations import TORCH_DEPRECATIONS

# No network here and no one asked for telemetry, also in subprocesses the tests start.
os.environ.update(DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1", MPLBACKEND="Agg")

REPO = Path(__file__).resolve().parents[1]

# Small enough to run in seconds, wide enough that the int8 file is clearly smaller than fp32.
TINY_PARAMS = {
    "data": {"source": "builtin:mnist5k", "max_samples": 1000},
    "prepare": {"seed": 0, "split": {"train": 0.7, "val": 0.15, "test": 0.15}},
    "train": {"epochs": 3, "batch_size": 32, "lr": 0.01, "patience": 5, "model": {"widths": [32, 64], "dropout": 0.1}},
    "qat": {"epochs": 2, "freeze_bn_epoch": 1, "freeze_observers_epoch": 1, "ptq_calibration_batches": 4},
    "export": {"parity_samples": 40},
    "evaluate": {"latency_repeats": 3, "misclassified_shown": 9, "max_accuracy_drop": 100.0},
}


def pytest_configure(config: pytest.Config) -> None:
    # The same exact torch deprecation warnings the stages silence; every other warning still shows.
    for category, message in TORCH_DEPRECATIONS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory: pytest.TempPathFactory):
    """prepare -> train -> qat -> export run in-process once, on tiny params, for the stage tests."""
    from tasks.export import export
    from tasks.layout import Layout
    from tasks.params import parse_params
    from tasks.prepare import prepare
    from tasks.qat import qat
    from tasks.train import train

    root = tmp_path_factory.mktemp("workspace")
    os.environ["QATFLOW_RUN_NAME"] = "tiny"
    params = parse_params(TINY_PARAMS)
    layout = Layout(root)
    prepare(params.data, params.prepare, layout)
    train(params.train, layout)
    qat(params.qat, layout)
    export(params.export, layout)
    return layout, params
