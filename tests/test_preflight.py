"""The preflight (tasks/preflight.py): every target tried on the net before any epoch, a refusal
in one line per target naming the net, and nothing written."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from tasks.contracts import ModelConfig
from tasks.errors import DataError, ModelError
from tasks.preflight import TARGETS, check, main, preflight
from tasks.train import train
from tasks.workspace import Workspace

from conftest import REPO, section, write_params

# FX cannot trace the `if`, torch.export cannot guard on it, and a plain trace (ONNX) would bake
# in the branch it happened to take.
BRANCHY = '''
import torch
from torch import nn


class Branchy(nn.Module):
    def __init__(self, num_classes, input_shape):
        super().__init__()
        self.conv = nn.Conv2d(input_shape[0], 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        if x.sum() > 0:
            x = x * 2
        return self.fc(x.mean((2, 3)))


def build(num_classes, input_shape):
    return Branchy(num_classes, input_shape)
'''

ONE_TOO_MANY = '''
from torch import nn


def build(num_classes, input_shape):
    features = input_shape[0] * input_shape[1] * input_shape[2]
    return nn.Sequential(nn.Flatten(), nn.Linear(features, num_classes + 1))
'''

IMAGES = [1, 12, 12]
META = {
    "source": "hand-written", "layout": "images", "layout_reason": "set in params",
    "class_names": ["a", "b", "c"], "input_shape": IMAGES,
    "normalization": {"scale": 255.0, "mean": [0.5], "std": [0.25]},
    "samples": {"train": 10, "val": 2, "test": 2},
}
SOURCE_LINE = "branchy.py:14: if x.sum() > 0:"


def net_reference(tmp_path: Path, monkeypatch, source: str, name: str = "branchy") -> str:
    """`source` as an importable module of a name no other test has imported."""
    module = f"preflight_{uuid.uuid4().hex}_{name}"
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{module}:build"


def project(root: Path, family: str) -> Path:
    """A project folder as the preflight reads it: params.yaml, prepared meta.json, nets/."""
    write_params(root / "params.yaml", {"train": {"model": {"family": family, "widths": [8, 16]}}})
    (root / "data" / "prepared").mkdir(parents=True)
    (root / "data" / "prepared" / "meta.json").write_text(json.dumps(META))
    (root / "nets").mkdir()
    (root / "nets" / "__init__.py").write_text("")
    (root / "nets" / "branchy.py").write_text(BRANCHY)
    return root


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_the_default_cnn_passes_every_target_without_moving_the_callers_rng(capsys):
    config = ModelConfig(net="tasks.model:cnn2d", input_shape=[1, 28, 28], num_classes=10, kwargs={})
    rng, engine = torch.get_rng_state(), torch.backends.quantized.engine
    results = preflight(config)
    assert [(r.target, r.ok, r.reason) for r in results] == [
        (target, True, "") for target in ["model", *TARGETS.values()]]
    assert all(r.seconds > 0 for r in results)
    assert torch.equal(torch.get_rng_state(), rng) and torch.backends.quantized.engine == engine
    out = capsys.readouterr().out
    assert out.startswith("preflight: tasks.model:cnn2d ok on fx→torchscript, torch.export→pt2e, onnx (")
    assert out.count("\n") == 1


def test_a_data_dependent_if_is_refused_per_target_in_one_line_each_within_seconds(
        tmp_path, monkeypatch, capfd):
    reference = net_reference(tmp_path, monkeypatch, BRANCHY)
    config = ModelConfig(net=reference, input_shape=IMAGES, num_classes=3, kwargs={})
    started = time.perf_counter()
    results = {r.target: r for r in check(config)}
    assert time.perf_counter() - started < 10
    assert results["model"].ok
    fx, pt2e, onnx = (results[TARGETS[key]] for key in ("fx", "pt2e", "onnx"))
    assert not fx.ok and fx.reason.startswith(
        "TraceError: symbolically traced variables cannot be used as inputs to control flow (")
    assert not pt2e.ok and pt2e.reason.startswith(
        "GuardOnDataDependentSymNode: Could not guard on data-dependent expression")
    assert not onnx.ok and onnx.reason.startswith(
        "fp32: TracerWarning: Converting a tensor to a Python boolean")
    for r in (fx, pt2e, onnx):
        assert r.reason.endswith(SOURCE_LINE + ")") and "\n" not in r.reason and len(r.reason) <= 240
        assert str(tmp_path) not in r.reason
    # torch.export's dump of the partial graph (a screenful per failure) stays out of the terminal.
    assert "def forward" not in capfd.readouterr().err

    with pytest.raises(ModelError) as refused:
        preflight(config)
    lines = str(refused.value).splitlines()
    assert lines[0] == f"{reference} cannot go through fx → torchscript: {fx.reason}"
    assert lines[1] == f"{reference} cannot go through torch.export → pt2e: {pt2e.reason}"
    assert lines[2] == f"{reference} cannot go through onnx: {onnx.reason}"
    assert len(lines) == 4 and "make check-model" in lines[3] and "When a target refuses" in lines[3]


def test_only_the_asked_targets_are_tried(tmp_path, monkeypatch):
    config = ModelConfig(net=net_reference(tmp_path, monkeypatch, BRANCHY), input_shape=IMAGES,
                         num_classes=3, kwargs={})
    assert [r.target for r in check(config, targets=["onnx"])] == ["model", "onnx"]


def test_a_wrong_output_shape_is_refused_naming_expected_and_got(tmp_path, monkeypatch):
    reference = net_reference(tmp_path, monkeypatch, ONE_TOO_MANY, "wide")
    config = ModelConfig(net=reference, input_shape=IMAGES, num_classes=3, kwargs={})
    (result,) = check(config)  # no target is tried on a net of the wrong shape
    assert result.target == "model" and not result.ok
    assert "shape [2, 4], expected float of shape [2, 3]" in result.reason
    with pytest.raises(ModelError) as refused:
        preflight(config)
    assert str(refused.value).splitlines()[0] == f"{reference} fails the model check: {result.reason}"


def test_a_net_that_cannot_be_imported_is_one_model_error():
    config = ModelConfig(net="nowhere_to_be_found:build", input_shape=IMAGES, num_classes=3, kwargs={})
    with pytest.raises(ModelError, match="nowhere_to_be_found:build: cannot import"):
        check(config)


def run_preflight(cwd: Path) -> subprocess.CompletedProcess:
    # Without the caller's PYTHONDONTWRITEBYTECODE: the preflight itself keeps nets/__pycache__ out.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPATH=str(REPO), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "tasks.preflight"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("family, returncode", [("nets.branchy:build", 1), ("auto", 0)])
def test_the_command_prints_the_table_exits_by_the_verdict_and_writes_nothing(tmp_path, family, returncode):
    root = project(tmp_path, family)
    before = listing(root)
    done = run_preflight(root)
    assert done.returncode == returncode, done.stderr
    assert listing(root) == before  # nets/__pycache__ included
    for row in ["model", *TARGETS.values()]:
        assert f"│ {row}" in done.stdout
    if returncode:
        assert "TraceError" in done.stdout
        errors = done.stderr[done.stderr.index("preflight: error: "):].splitlines()
        assert errors[0] == ("preflight: error: nets.branchy:build cannot go through fx → torchscript: "
                             "TraceError: symbolically traced variables cannot be used as inputs to "
                             f"control flow (nets/{SOURCE_LINE})")
        assert errors[1].startswith("nets.branchy:build cannot go through torch.export → pt2e: ")
        assert "Traceback" not in done.stderr and "def forward" not in done.stderr
    else:
        assert done.stdout.count("│ ok ") == 1 + len(TARGETS)
        assert "preflight: tasks.model:cnn2d ok (" in done.stdout


def test_the_command_says_to_prepare_first(tmp_path, monkeypatch):
    write_params(tmp_path / "params.yaml", {})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"^data/prepared/meta.json: missing; .* `dvc repro prepare` first"):
        main(argparse.Namespace(params="params.yaml", target=None))


def test_train_refuses_the_net_before_any_epoch(tmp_path, monkeypatch):
    reference = net_reference(tmp_path, monkeypatch, BRANCHY)
    root = tmp_path / "project"
    (root / "data" / "prepared").mkdir(parents=True)
    (root / "data" / "prepared" / "meta.json").write_text(json.dumps(META))
    before = listing(root)
    with pytest.raises(ModelError, match=f"^{reference} cannot go through fx → torchscript: TraceError"):
        train(section("train", model={"family": reference}), Workspace(root))
    assert listing(root) == before  # no checkpoint, no TensorBoard run, no metrics
