"""dvc.yaml is the one stage graph; the stages' own idea of their paths must match it."""

import ast
from pathlib import Path

import yaml

from tasks.layout import Layout

from conftest import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def paths(entries) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries or []}


def test_stage_outputs_match_the_layout():
    layout = Layout(Path("."))
    declared = {
        name: paths(stage.get("outs")) | paths(stage.get("metrics")) for name, stage in DVC.items()
    }
    assert str(layout.prepared) in declared["prepare"]
    assert {str(layout.train_model), str(layout.metrics("train"))} <= declared["train"]
    assert {str(layout.qat_dir), str(layout.metrics("qat"))} <= declared["qat"]
    assert {str(layout.fp32_ts), str(layout.fp32_pt2), str(layout.int8_ts), str(layout.ptq_ts)} <= declared["export"]
    assert {str(layout.metrics("evaluate")), str(layout.latency)} <= declared["evaluate"]


def test_every_stage_depends_on_the_project_modules_it_imports():
    for name, stage in DVC.items():
        module = REPO / "tasks" / f"{name}.py"
        assert stage["cmd"] == f"python -m tasks.{name}"
        imported = set()
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "tasks":
                imported |= {f"tasks.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tasks."):
                imported.add(node.module)
        # Plumbing that cannot change an output's bytes needs no re-run when edited.
        plumbing = {"tasks.atomic", "tasks.cli", "tasks.errors", "tasks.layout", "tasks.params", "tasks.deprecations"}
        expected = {f"tasks/{m.split('.')[1]}.py" for m in imported - plumbing} | {f"tasks/{name}.py"}
        assert expected <= paths(stage["deps"]), name
