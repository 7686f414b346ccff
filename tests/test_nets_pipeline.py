"""The example nets of nets/ as a user runs them: `train.model.family: nets.<file>:build` in a
tiny project, every stage under `dvc repro`, every runtime, and editing the net re-runs what
builds the model and nothing else."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import TINY_PARAMS, dvc, init_tiny_project, run

# Less data and one epoch each: what is checked is that the net goes through, not what it learns.
NET_PARAMS = {
    **TINY_PARAMS,
    "data": {**TINY_PARAMS["data"], "max_samples": 400},
    "train": {**TINY_PARAMS["train"], "epochs": 1, "model": {"family": None, "kwargs": {"widths": [8, 16, 32]}}},
    "qat": {**TINY_PARAMS["qat"], "epochs": 1, "freeze_bn_epoch": 0},
}
# What each runtime runs in float (tasks/quant/coverage.py), as the export reports must name it:
# ONNX Runtime and XNNPACK have no int8 Hardswish or Hardsigmoid; everything else is int8.
FLOAT_OPS = {
    "resnet": {"int8": {}, "int8_onnx": {}, "int8_pte": {}},
    "mobilenet": {"int8": {}, "int8_onnx": {"HardSigmoid", "Mul"},
                  "int8_pte": {"add", "clamp", "div", "hardswish"}},
}
STAGES = ["prepare", "train", "qat", "qat_pt2e", "export", "export_onnx", "export_executorch", "evaluate"]


@pytest.mark.e2e
@pytest.mark.parametrize("net", ["resnet", "mobilenet"])
def test_a_net_of_your_own_goes_through_every_stage_and_runtime(tmp_path, net):
    params = json.loads(json.dumps(NET_PARAMS))
    params["train"]["model"]["family"] = f"nets.{net}:build"
    root = tmp_path / "project"
    env = init_tiny_project(root, params)
    out = dvc("repro", cwd=root, env=env)
    assert all(f"Running stage '{stage}'" in out for stage in STAGES), out
    assert f"preflight: nets.{net}:build ok on fx→torchscript, torch.export→pt2e, onnx" in out

    stored = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert any(dep["path"] == "nets" for dep in stored["train"]["deps"])
    evaluated = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert {"fp32", "int8", "ptq", "int8_onnx", "int8_pte"} <= set(evaluated)
    reports = {name: json.loads((root / "metrics" / f"{stage}.json").read_text())[name]
               for stage, name in [("export", "int8"), ("export_onnx", "int8_onnx"),
                                   ("export_executorch", "int8_pte")]}
    assert {name: set(r["float_ops"]) for name, r in reports.items()} == FLOAT_OPS[net]

    # Editing the net re-runs the stages that build the model, and not prepare.
    with open(root / "nets" / f"{net}.py", "a") as f:
        f.write("\n# edited\n")
    status = json.loads(dvc("status", "--json", cwd=root, env=env))
    assert set(status) == set(STAGES) - {"prepare"}
    run("git", "checkout", "--", f"nets/{net}.py", cwd=root, env=env)
