"""The example nets of nets/ as a user runs them: `train.model.family: nets.<file>:build` in a
tiny project, every stage and every runtime under `dvc repro`, then the other net as a DVC
experiment (`dvc exp run -S`), and editing a net re-runs what builds the model and nothing else."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import TINY_PARAMS, dvc, init_tiny_project

# Each net at its narrowest that still has every block the test checks (depthwise, SE, Hardswish,
# residual add, concatenation), on the tiny data: the stages' fixed costs, not training, set the
# time. The parity check's int8 agreement is loosened: ONNX Runtime's int8 residual add rounds
# differently from FBGEMM's, and on 40 samples of a net trained for two epochs (logits still
# close together) one flipped argmax is 2.5%. bench/nets.py runs the full nets on the built-in
# data with the default 0.995.
MOBILENET = {"family": "nets.mobilenet:build",
             "kwargs": {"stem_width": 8, "head_width": 32,
                        "blocks": [[3, 16, 8, True, False, 2], [5, 32, 16, True, True, 2],
                                   [5, 48, 16, True, True, 1]]}}
NET_PARAMS = {**TINY_PARAMS, "data": {**TINY_PARAMS["data"], "max_samples": 500},
              "train": {**TINY_PARAMS["train"], "epochs": 2, "model": MOBILENET},
              "qat": {**TINY_PARAMS["qat"], "epochs": 1, "freeze_bn_epoch": 1, "freeze_observers_epoch": 1},
              "export": {**TINY_PARAMS["export"], "int8_min_agreement": 0.95}}
# What each runtime runs in float (tasks/quant/coverage.py), as the export reports must name it:
# ONNX Runtime and XNNPACK have no int8 Hardswish or Hardsigmoid; everything else is int8.
FLOAT_OPS = {
    "resnet": {"int8": set(), "int8_onnx": set(), "int8_pte": set()},
    "mobilenet": {"int8": set(), "int8_onnx": {"HardSigmoid", "Mul"},
                  "int8_pte": {"add", "clamp", "div", "hardswish"}},
}
STAGES = ["prepare", "train", "qat", "qat_pt2e", "export", "export_onnx", "export_executorch", "evaluate"]


def float_ops(root) -> dict[str, set[str]]:
    reports = {name: json.loads((root / "metrics" / f"{stage}.json").read_text())[name]
               for stage, name in [("export", "int8"), ("export_onnx", "int8_onnx"),
                                   ("export_executorch", "int8_pte")]}
    return {name: set(report["float_ops"]) for name, report in reports.items()}


@pytest.mark.e2e
def test_nets_of_your_own_go_through_every_stage_and_runtime(tmp_path):
    root = tmp_path / "project"
    env = init_tiny_project(root, NET_PARAMS)
    out = dvc("repro", cwd=root, env=env)
    assert all(f"Running stage '{stage}'" in out for stage in STAGES), out
    assert "preflight: nets.mobilenet:build ok on fx→torchscript, torch.export→pt2e, onnx" in out
    assert "export_onnx: int8_onnx runs these ops in float on ONNX Runtime, not as int8 kernels: " in out
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert {stage for stage, entry in lock.items() if any(d["path"] == "nets" for d in entry["deps"])} == \
        set(STAGES) - {"prepare"}
    evaluated = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert {"fp32", "int8", "ptq", "int8_onnx", "int8_pte"} <= set(evaluated)
    assert float_ops(root) == FLOAT_OPS["mobilenet"]

    # The other net, narrower, as an experiment: the prepared data is reused, the rest re-runs.
    # kwargs are replaced whole (`~` drops the MobileNet's, which the ResNet would refuse).
    out = dvc("exp", "run", "-S", "train.model.family=nets.resnet:build",
              "-S", "~train.model.kwargs",
              "-S", "+train.model.kwargs={widths: [8, 16, 32]}", cwd=root, env=env)
    assert "Stage 'prepare' didn't change, skipping" in out
    assert "preflight: nets.resnet:build ok" in out
    stored = json.loads((root / "metrics" / "train.json").read_text())
    assert stored["parameters"] < 50_000  # the narrow widths reached the net
    assert float_ops(root) == FLOAT_OPS["resnet"]

    # Editing a net re-runs the stages that build the model, and not prepare.
    with open(root / "nets" / "resnet.py", "a") as f:
        f.write("\n# edited\n")
    status = json.loads(dvc("status", "--json", cwd=root, env=env))
    assert set(status) == set(STAGES) - {"prepare"}
