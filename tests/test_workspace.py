"""dvc.yaml is the one stage graph; the stages' own idea of their paths must match it."""

import ast
from pathlib import Path

import yaml

from tasks.variants import VARIANTS, written_by
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
    assert {v.file for v in written_by("export").values()} | {str(workspace.metrics("export"))} <= declared["export"]
    assert {str(workspace.metrics("evaluate")), str(workspace.latency)} <= declared["evaluate"]


# Plumbing that cannot change an output's bytes needs no re-run when edited.
PLUMBING = {"tasks.atomic", "tasks.cli", "tasks.lifeline", "tasks.errors", "tasks.workspace", "tasks.params",
            "tasks.deprecations"}


def module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """The tasks.* modules `path` imports, wherever in the file (a stage may import lazily)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tasks":
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if module_file(f"{node.module}.{alias.name}")}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "tasks"}
    return {name for name in found if module_file(name)}


def transitive_imports(stage: str) -> set[Path]:
    """Every project file the stage's module reaches through imports, plumbing aside."""
    seen, todo = set(), [f"tasks.{stage}"]
    while todo:
        name = todo.pop()
        if name in seen or name in PLUMBING:
            continue
        seen.add(name)
        todo += imported_modules(module_file(name))
    return {module_file(name).relative_to(REPO) for name in seen} - {Path("tasks/__init__.py")}


def test_every_stage_depends_on_the_project_modules_it_reaches():
    """A dep may be the file or a folder holding it (a wing such as tasks/training)."""
    for name, stage in DVC.items():
        assert stage["cmd"] == f"python -m tasks.{name}"
        deps = [Path(d) for d in paths(stage["deps"])]
        missing = {str(f) for f in transitive_imports(name)
                   if not any(f == d or d in f.parents for d in deps)}
        assert not missing, f"{name} reads these modules but dvc.yaml does not list them: {sorted(missing)}"
        reached = transitive_imports(name)
        unread = {str(d) for d in deps if d.suffix == ".py" and d not in reached}
        assert not unread, f"{name} lists modules it never imports (a change re-runs it for nothing): {sorted(unread)}"


def test_the_transitive_check_sees_what_the_stage_imports_indirectly():
    # train reaches the checkpoint through the training runner, not by a direct import.
    assert Path("tasks/checkpoint.py") in transitive_imports("train")
    assert "tasks.checkpoint" not in imported_modules(REPO / "tasks/train.py")


def test_evaluate_reads_every_variant_file():
    assert {v.file for v in VARIANTS.values()} <= paths(DVC["evaluate"]["deps"])


def test_every_variant_file_is_a_declared_output():
    declared = set().union(*(paths(stage.get("outs")) for stage in DVC.values()))
    assert {v.file for v in VARIANTS.values()} <= declared
    assert {v.stage for v in VARIANTS.values()} <= set(DVC)
