"""The Prefect flow with the real Prefect (test harness server) and real DVC, on a tiny project."""

from __future__ import annotations

import json

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
)
from prefect.testing.utilities import prefect_test_harness

from flows.dvcrepo import pipeline_stages
from flows.pipeline import check_overrides, pipeline, workspace_lock
from tasks.errors import ParamsError
from tasks.variants import VARIANTS

from conftest import STAGES, TIMING_OUTPUTS, dvc, init_tiny_project, locked_outputs, run, write_params

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory, harness):
    root = tmp_path_factory.mktemp("flow-project")
    env = init_tiny_project(root)
    state = pipeline(project_dir=str(root), return_state=True)
    assert state.is_completed(), state.message
    return root, env, state


def task_states(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
    return {run.name: run.state.name for run in runs}


def test_stage_order_comes_from_dvc_graph(project):
    root, _, _ = project
    nodes = pipeline_stages(root)
    assert [n.name for n in nodes] == STAGES
    assert dict((n.name, n.upstream) for n in nodes)["export"] == ("prepare", "train", "qat")


def test_flow_runs_every_stage_and_leaves_dvc_clean(project):
    root, env, state = project
    summary = state.result()
    assert summary["stages_run"] == STAGES and summary["gate_passed"] is True
    assert task_states(state.state_details.flow_run_id) == dict.fromkeys(STAGES, "Completed")
    assert json.loads(dvc("status", "--json", cwd=root, env=env)) == {}
    assert "Running stage" not in dvc("repro", cwd=root, env=env)
    assert (root / "runs" / "train").is_dir()


def test_flow_publishes_summary_and_metrics_table(project):
    _, _, state = project
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    by_key = {a.key: a for a in artifacts}
    assert by_key["qatflow-summary"].type == "markdown"
    assert "int8 QAT" in by_key["qatflow-summary"].data and "Gate" in by_key["qatflow-summary"].data
    table = by_key["qatflow-metrics"]
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [row["variant"] for row in rows] == [v.label for v in VARIANTS.values()]
    assert "**Stages run**: prepare, train, qat, qat_pt2e, export, export_onnx, export_executorch, evaluate" in by_key["qatflow-summary"].data


def test_flow_run_is_saved_as_dvc_experiment(project):
    root, env, state = project
    name = state.result()["experiment"]
    shown = json.loads(dvc("exp", "show", "--json", cwd=root, env=env))
    experiments = {
        exp["name"]: exp["revs"][0]["data"] for base in shown for exp in base.get("experiments") or []
    }
    assert name in experiments
    metrics = experiments[name]["metrics"]["metrics/evaluate.json"]["data"]
    assert metrics["int8"]["accuracy"] == json.loads((root / "metrics/evaluate.json").read_text())["int8"]["accuracy"]


def test_flow_output_is_byte_identical_to_dvc_repro_in_another_checkout(project, repro_project):
    """The flow and `dvc repro`, in two checkouts at two paths, in other processes: every output
    but the timings hashes the same, so a run reproduces wherever it is made (on one CPU kind)."""
    root, _, _ = project
    by_flow, by_repro = locked_outputs(root), repro_project[3]
    assert by_flow.keys() == by_repro.keys()
    assert {p for p in by_flow if by_flow[p] != by_repro[p]} <= TIMING_OUTPUTS


def test_second_run_skips_every_stage(project):
    root, _, _ = project
    state = pipeline(project_dir=str(root), save_experiment=False, return_state=True)
    assert state.result()["stages_run"] == []
    assert task_states(state.state_details.flow_run_id) == dict.fromkeys(STAGES, "Skipped")


def test_override_reruns_exactly_the_downstream_stages(project):
    root, env, _ = project
    state = pipeline(overrides={"export.max_accuracy_drop": 99.0}, save_experiment=False, project_dir=str(root),
                     return_state=True)
    # export_onnx reads no accuracy budget (dvc.yaml lists exact keys), and export's files are unchanged.
    assert state.result()["stages_run"] == ["export", "export_executorch", "evaluate"]
    assert yaml.safe_load((root / "params.yaml").read_text())["export"]["max_accuracy_drop"] == 99.0
    assert json.loads(dvc("status", "--json", cwd=root, env=env)) == {}


def test_dvc_exp_apply_restores_the_first_runs_params_and_models(project):
    root, env, state = project
    dvc("exp", "apply", state.result()["experiment"], cwd=root, env=env)
    assert yaml.safe_load((root / "params.yaml").read_text())["export"]["max_accuracy_drop"] == 100.0
    assert json.loads(dvc("status", "--json", cwd=root, env=env)) == {}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.lr": -1}, "train.lr: Input should be greater than 0"),
        ({"train.epoch": 3}, "train.epoch: unknown key"),
        ({"training.epochs": 3}, "training: unknown key"),
        ({"train.epochs.max": 3}, "'train.epochs' is a value, not a section"),
    ],
)
def test_bad_override_fails_before_anything_runs(project, overrides, message):
    root, _, _ = project
    before = {p: (root / p).read_bytes() for p in ("params.yaml", "dvc.lock", "models/int8.pt")}
    state = pipeline(overrides=overrides, project_dir=str(root), return_state=True)
    assert state.is_failed() and message in state.message
    assert before == {p: (root / p).read_bytes() for p in before}


def test_check_overrides_validates_against_the_schema(tmp_path):
    write_params(tmp_path / "params.yaml", {"train": {"epochs": 2}})
    check_overrides(tmp_path / "params.yaml", {"train.epochs": 5, "qat.backend": "qnnpack"})
    with pytest.raises(ParamsError, match="qat.backend"):
        check_overrides(tmp_path / "params.yaml", {"qat.backend": "tpu"})


def test_a_second_run_on_a_busy_workspace_fails_at_once_saying_why(project):
    root, _, _ = project
    before = (root / "dvc.lock").read_bytes()
    with workspace_lock(root, timeout_s=0):
        state = pipeline(project_dir=str(root), lock_timeout=0, return_state=True)
    assert state.is_failed() and "is busy: a pipeline run" in state.message
    assert (root / "dvc.lock").read_bytes() == before


def test_push_shares_the_run_as_an_experiment_on_the_git_remote(project, tmp_path):
    root, env, _ = project
    origin = tmp_path / "origin.git"
    run("git", "init", "-q", "--bare", str(origin), cwd=tmp_path, env=env)
    run("git", "remote", "add", "origin", str(origin), cwd=root, env=env)
    run("git", "push", "-q", "origin", "HEAD", cwd=root, env=env)
    (tmp_path / "dvc-storage").mkdir()  # --push refuses a local remote that is no directory
    dvc("remote", "add", "--local", "-d", "storage", str(tmp_path / "dvc-storage"), cwd=root, env=env)
    try:
        state = pipeline(project_dir=str(root), push=True, return_state=True)
        name = state.result()["experiment"]
        assert "refs/exps/" in run("git", "ls-remote", str(origin), cwd=tmp_path, env=env)
        assert name in dvc("exp", "list", "origin", cwd=root, env=env)
        assert any((tmp_path / "dvc-storage").rglob("*")), "no outputs reached the DVC remote"

        before = (root / "dvc.lock").read_bytes()
        state = pipeline(project_dir=str(root), push=True, git_remote="nowhere", return_state=True)
        assert state.is_failed() and "git remote 'nowhere'" in state.message, state.message
        assert (root / "dvc.lock").read_bytes() == before
    finally:
        dvc("remote", "remove", "--local", "storage", cwd=root, env=env)
        run("git", "remote", "remove", "origin", cwd=root, env=env)


def test_push_without_a_dvc_remote_fails_before_anything_runs(project):
    root, _, _ = project
    before = (root / "dvc.lock").read_bytes()
    state = pipeline(project_dir=str(root), push=True, return_state=True)
    assert state.is_failed() and "needs a default DVC remote" in state.message
    assert (root / "dvc.lock").read_bytes() == before
