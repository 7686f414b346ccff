"""Parallel sweeps: the grid and its checks in memory, then real sweeps (a Dask LocalCluster, the
Prefect test server, DVC experiments in clones) on a copy of the tiny project."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.testing.utilities import prefect_test_harness

from flows.sweep import SweepError, best_point, pareto_front, parse_grid, plan, run_sweep
from tasks.errors import ParamsError

from conftest import TINY_PARAMS, copy_reproduced, dvc, run, write_params


def test_grid_specs_and_grid_file_make_the_cartesian_product(tmp_path):
    write_params(tmp_path / "params.yaml", TINY_PARAMS)
    (tmp_path / "sweep.yaml").write_text("grid:\n  train.lr: [1e-3, 3e-3]\n")  # YAML 1.2 floats
    grid = parse_grid(["qat.epochs=2,4", "evaluate.latency_batch_sizes=[1, 64],[1]"], tmp_path / "sweep.yaml")
    assert grid == {"train.lr": [0.001, 0.003], "qat.epochs": [2, 4],
                    "evaluate.latency_batch_sizes": [[1, 64], [1]]}
    points = plan(tmp_path, grid)
    assert [p.number for p in points] == list(range(1, 9))
    assert points[0].overrides == {"train.lr": 0.001, "qat.epochs": 2,
                                   "evaluate.latency_batch_sizes": [1, 64]}
    assert points[-1].label == "train.lr=0.003 qat.epochs=4 evaluate.latency_batch_sizes=[1]"


@pytest.mark.parametrize(
    ("specs", "grid_file", "message"),
    [
        (["train.lr"], None, "--grid expects KEY=VALUE"),
        (["train.lr="], None, "--grid expects KEY=VALUE"),
        (["qat.epochs=2", "qat.epochs=4"], None, "'qat.epochs' is given twice"),
        (["qat.epochs=2,2"], None, "'qat.epochs' lists 2 twice"),
        (["qat.epochs=[2"], None, "--grid qat.epochs: not valid YAML"),
        (["qat.epochs=2"], "grid:\n  qat.epochs: [4]\n", "'qat.epochs' is given twice"),
        ([], "train.lr: [0.001]\n", "expected one key, grid:"),
        ([], "grid:\n  train.lr: 0.001\n", "'train.lr' needs a non-empty list of values"),
        ([], None, "nothing to sweep"),
    ],
)
def test_a_bad_grid_says_what_is_wrong(tmp_path, specs, grid_file, message):
    if grid_file is not None:
        (tmp_path / "sweep.yaml").write_text(grid_file)
    with pytest.raises((SweepError, ParamsError), match=re.escape(message)):
        parse_grid(specs, tmp_path / "sweep.yaml" if grid_file is not None else None)


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"train.epoch": [3]}, "point 1 (train.epoch=3) is invalid:\n  train.epoch: unknown key"),
        ({"qat.epochs": [2, -1]},
         "point 2 (qat.epochs=-1) is invalid:\n  qat.epochs: Input should be greater than 0"),
        ({"evaluate.latency_batch_sizes": [[64]]}, "compares int8 latency at batch 1"),
    ],
)
def test_every_point_is_checked_against_the_schema_before_any_runs(tmp_path, grid, message):
    write_params(tmp_path / "params.yaml", TINY_PARAMS)
    with pytest.raises((SweepError, ParamsError), match=re.escape(message)):
        plan(tmp_path, grid)


def row(point: int, accuracy: float, latency: float, gate: bool = True, status: str = "completed") -> dict:
    return {"point": point, "status": status, "int8_accuracy": accuracy, "int8_latency_ms": latency,
            "gate_passed": gate}


def test_best_point_and_pareto_front():
    rows = [row(1, 0.90, 1.0), row(2, 0.95, 2.0), row(3, 0.95, 1.5), row(4, 0.99, 0.5, gate=False),
            row(5, 0.80, 0.4), row(6, None, None, gate=None, status="failed")]
    assert best_point(rows)["point"] == 3  # 2 and 3 tie on accuracy; 4 failed the gate
    completed = [r for r in rows if r["status"] == "completed"]
    assert [r["point"] for r in pareto_front(completed)] == [5, 4]
    assert [r["point"] for r in pareto_front([r for r in completed if r["point"] != 4])] == [5, 1, 3]
    assert best_point([rows[-1]]) is None


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory, reproduced, harness):
    """A copy of the tiny project `dvc repro` ran (up to date: test_remote checks that), its state
    committed as a user's would be, so that each point's clone finds every output in the shared
    cache and runs only what its params change."""
    root = tmp_path_factory.mktemp("sweep") / "project"
    env = copy_reproduced(reproduced, root)
    run("git", "add", "-A", cwd=root, env=env)
    run("git", "commit", "-q", "--allow-empty", "-m", "reference run", cwd=root, env=env)
    return root, env


def snapshot(root: Path) -> dict[str, str]:
    """Every workspace file's hash (git-tracked, DVC outputs, ignored ones), DVC's cache and scratch
    folder aside, with what `git status` says."""
    skipped = (root / ".git", root / ".dvc" / "cache", root / ".dvc" / "tmp")
    kept = [p for p in sorted(root.rglob("*"))
            if p.is_file() and not any(p.is_relative_to(s) for s in skipped)]
    files = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in kept}
    return files | {"git status": run("git", "status", "--porcelain", cwd=root)}


def experiments(root: Path, env: dict) -> dict[str, dict]:
    shown = json.loads(dvc("exp", "show", "--json", cwd=root, env=env))
    return {exp["name"]: exp["revs"][0]["data"] for base in shown for exp in base.get("experiments") or []}


def artifacts(flow_run_id) -> dict:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found}


@pytest.mark.e2e
def test_a_two_point_sweep_records_two_experiments_and_leaves_the_workspace_as_it_was(project):
    root, env = project
    before = snapshot(root)
    state = run_sweep({"evaluate.latency_repeats": [4, 5]}, str(root), max_parallel=2, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    rows = result["points"]
    names = [r["experiment"] for r in rows]
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert [r["stages_run"] for r in rows] == ["evaluate", "evaluate"]  # the rest came from the cache

    shown = experiments(root, env)
    for name, repeats in zip(names, [4, 5]):
        assert shown[name]["params"]["params.yaml"]["data"]["evaluate"]["latency_repeats"] == repeats
        assert shown[name]["metrics"]["metrics/latency.json"]["data"]["repeats"] == repeats
    assert shown[names[0]]["metrics"] != shown[names[1]]["metrics"]
    metrics = shown[names[0]]["metrics"]["metrics/evaluate.json"]["data"]["int8"]
    assert (rows[0]["int8_accuracy"], rows[0]["int8_size_bytes"]) == (metrics["accuracy"],
                                                                      metrics["size_bytes"])
    # Same models, so the same accuracy: the best is the faster one.
    assert result["best"]["point"] == min(rows, key=lambda r: (r["int8_latency_ms"], r["point"]))["point"]

    out = Path(result["out"])
    assert out.parent == root / ".dvc" / "tmp" / "sweeps"
    assert (out / "sweep.png").read_bytes().startswith(b"\x89PNG")
    assert [r["experiment"] for r in json.loads((out / "sweep.json").read_text())["points"]] == names
    assert (out / "sweep.csv").read_text().count("\n") == 3
    table = artifacts(state.state_details.flow_run_id)["qatflow-sweep"]
    table_rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert table.type == "table" and [r["experiment"] for r in table_rows] == names

    assert snapshot(root) == before
    run_name = names[0].rsplit("-", 1)[0]
    assert not list(Path(tempfile.gettempdir()).glob(f"qatflow-{run_name}-*"))  # the clones are removed


@pytest.mark.e2e
def test_a_failing_point_is_reported_and_the_others_finish(project, tmp_path):
    """The schema takes any non-empty data.source; prepare refuses an unknown one at once. The other
    point changes nothing, so it runs no stage: a whole sweep without a pipeline run. One at a time,
    the failing point first: the next one still runs."""
    root, env = project
    before = snapshot(root)
    state = run_sweep({"data.source": ["builtin:nope", "builtin:mnist5k"]}, str(root), max_parallel=1,
                      out=str(tmp_path / "report"), return_state=True)
    assert state.is_failed()
    assert "1 of 2 point(s) failed" in state.message
    assert 'point 1 (data.source="builtin:nope") failed' in state.message
    assert "unknown source 'builtin:nope'" in state.message
    kept = Path(re.search(r"its workspace is kept in (\S+)", state.message)[1])
    assert "unknown source" in (kept / "dvc-exp-run.log").read_text()
    shutil.rmtree(kept)

    report = json.loads((tmp_path / "report" / "sweep.json").read_text())
    failed, done = report["points"]
    assert (failed["status"], done["status"], done["stages_run"]) == ("failed", "completed", "")
    assert "unknown source 'builtin:nope'" in failed["error"]
    assert report["best"]["point"] == 2
    assert done["experiment"] in experiments(root, env)
    assert (tmp_path / "report" / "sweep.png").exists()
    assert snapshot(root) == before
