"""dvc.yaml is the one stage graph; the stages' own idea of their paths must match it."""

import ast
from pathlib import Path

import yaml

from tasks.variants import EXPORTED, VARIANTS
from tasks.workspace import Workspace

from conftest import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def paths(entries) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries or []}


def test_stage_outputs_match_the_workspace_paths():
    workspace = Workspace(Path("."))
    declared = {
        name: paths(stage.get("outs")) | paths(stage.get("metrics")) for name, stage in DVC.items()
    }
    assert str(workspace.prepared) in declared["prepare"]
    assert {str(workspace.train_model), str(workspace.metrics("train"))} <= declared["train"]
    assert {str(workspace.qat_dir), str(workspace.metrics("qat"))} <= declared["qat"]
    assert {v.file for v in EXPORTED.values()} | {str(workspace.metrics("export"))} <= declared["export"]
    assert {str(workspace.metrics("evaluate")), str(workspace.latency)} <= declared["evaluate"]


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
        plumbing = {"tasks.atomic", "tasks.cli", "tasks.lifeline", "tasks.errors", "tasks.workspace", "tasks.params", "tasks.deprecations"}
        expected = {f"tasks/{m.split('.')[1]}.py" for m in imported - plumbing} | {f"tasks/{name}.py"}
        assert expected <= paths(stage["deps"]), name


def test_evaluate_reads_every_variant_file():
    assert {v.file for v in VARIANTS.values()} <= paths(DVC["evaluate"]["deps"])


def test_every_variant_file_is_a_declared_output():
    declared = set().union(*(paths(stage.get("outs")) for stage in DVC.values()))
    assert {v.file for v in VARIANTS.values()} <= declared
    assert {v.made_from for v in EXPORTED.values()} <= {"fp32", "qat", "ptq"}
