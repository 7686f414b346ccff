"""flows.serve against a real `prefect server start`: a scheduled run of the pipeline completes in a
tiny project in a temporary git repo; without a server, serve refuses to start."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import KILLABLE_PARAMS, REPO, STAGES, copy_reproduced, dvc, init_tiny_project, write_params


def prefect_env(home: Path, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """`base` (default: this process's environment) minus any PREFECT_* the developer has set (an
    API URL would point the test at their server), with a fresh home and telemetry off."""
    env = {key: val for key, val in (base or os.environ).items() if not key.startswith("PREFECT_")}
    env.update(
        DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_HOME=str(home),
        # The subprocesses run in temporary folders (whatever they write by a relative path lands
        # there, and the repo's prefect.toml is not read): find flows/ on the path instead.
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **extra,
    )
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    # A session of its own, so that stop() also reaches the flow runs serve starts.
    with open(log, "wb") as out:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM to the process group this test started, SIGKILL if it is still there after
    timeout_s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real Prefect server on a free port, with its own home and SQLite file: its API URL. One
    for the module (its start costs ~20 s); each test serves a deployment of its own name."""
    tmp_path = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = prefect_env(
        tmp_path / "server-home",
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
    )
    log = tmp_path / "server.log"
    server = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                    "--port", str(port)], cwd=tmp_path, env=env, log=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"prefect server exited:\n{tail(log)}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"no /api/health after 120 s:\n{tail(log)}"
            time.sleep(1)
        yield url
    finally:
        stop(server)


def run_serve(cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.serve"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_serve_refuses_without_prefect_api_url(tmp_path):
    done = run_serve(cwd=tmp_path, env=prefect_env(tmp_path / "home"))
    assert done.returncode != 0
    assert "PREFECT_API_URL is not set" in done.stderr
    assert "flows.serve needs a running Prefect server: start one with `make server`" in done.stderr


def test_serve_refuses_when_no_server_answers(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/api"  # bound, then closed: nothing listens there
    done = run_serve(cwd=tmp_path, env=prefect_env(tmp_path / "home", PREFECT_API_URL=url))
    assert done.returncode != 0
    assert f"no Prefect server answers at {url}" in done.stderr
    assert "flows.serve needs a running Prefect server" in done.stderr


def test_schedule_comes_from_prefect_yaml_unless_overridden():
    from flows.serve import deployment_config, main_parser, schedule_from

    config = deployment_config()
    (configured,) = config["schedules"]
    parse = main_parser(config).parse_args
    nightly = schedule_from(parse([]), config)
    assert (nightly.cron, nightly.timezone) == (configured["cron"], configured["timezone"])
    other = schedule_from(parse(["--cron", "30 4 * * 1"]), config)
    assert (other.cron, other.timezone) == ("30 4 * * 1", configured["timezone"])
    assert schedule_from(parse(["--interval", "5"]), config).interval.total_seconds() == 5
    assert parse([]).name == config["name"]


def runs_of(api: httpx.Client, deployment: str) -> list[dict]:
    query = {"deployments": {"name": {"any_": [deployment]}}, "sort": "EXPECTED_START_TIME_ASC"}
    return api.post("/flow_runs/filter", json=query).raise_for_status().json()


def task_runs_of(api: httpx.Client, flow_run: dict) -> list[dict]:
    query = {"flow_runs": {"id": {"any_": [flow_run["id"]]}}}
    return api.post("/task_runs/filter", json=query).raise_for_status().json()


def serve_until_in_stage(url: str, name: str, tmp_path: Path, project: Path, env: dict[str, str], in_stage):
    """flows.serve of the tiny project at `project`, every 5 s, until a run is RUNNING and
    `in_stage(api, run)` says it is into the stage the test acts on."""
    env = prefect_env(tmp_path / "serve-home", env, PREFECT_API_URL=url)
    log = tmp_path / "serve.log"
    serve = start([sys.executable, "-m", "flows.serve", "--interval", "5", "--name", name,
                   "--param", f"project_dir={project}"], cwd=project, env=env, log=log)
    try:
        with httpx.Client(base_url=url, timeout=10) as api:
            deadline = time.monotonic() + 240
            while not ((running := [r for r in runs_of(api, name) if r["state_type"] == "RUNNING"])
                       and in_stage(api, running[0])):
                assert serve.poll() is None, f"flows.serve exited:\n{tail(log)}"
                assert time.monotonic() < deadline, f"no run in its stage after 240 s:\n{tail(log)}"
                time.sleep(0.2)
    except BaseException:
        stop(serve)
        raise
    (in_flight,) = running
    return serve, log, in_flight


def serve_until_training(url: str, name: str, tmp_path: Path):
    """A fresh tiny project (KILLABLE_PARAMS) served until a run is RUNNING and into training."""
    project = tmp_path / "project"
    env = init_tiny_project(project, KILLABLE_PARAMS)
    serve, log, in_flight = serve_until_in_stage(
        url, name, tmp_path, project, env,
        lambda api, run: (project / "models" / "train" / "checkpoint.pt").exists())
    return serve, log, project, in_flight


@pytest.mark.e2e
def test_served_pipeline_runs_on_schedule_and_sigterm_lets_the_run_finish(prefect_server, reproduced, tmp_path):
    """The schedule starts a run; a SIGTERM (systemd stopping the service, a deploy) then takes no
    new runs, lets the one in flight finish and record its real state, and exits (Prefect's own
    serve would mark it CANCELLED); the schedule stays on for the next serve.

    The project is a copy of the session's reproduced one with evaluate's params changed, so the
    run has one stage to run (DVC finds the others up to date) and is in it at the SIGTERM."""
    url, name = prefect_server, "sigterm-test"
    project = tmp_path / "project"
    env = copy_reproduced(reproduced, project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["misclassified_shown"] = 4
    write_params(project / "params.yaml", params)
    shown = project / "plots" / "evaluate" / "misclassified.png"
    before = shown.read_bytes()

    def in_evaluate(api: httpx.Client, run: dict) -> bool:
        return any(t["name"] == "evaluate" and t["state_type"] == "RUNNING" for t in task_runs_of(api, run))

    serve, log, in_flight = serve_until_in_stage(url, name, tmp_path, project, env, in_evaluate)
    try:
        os.kill(serve.pid, signal.SIGTERM)  # serve alone, as `kill PID` or systemd's KillMode=mixed
        serve.wait(300)
    finally:
        stop(serve)
    with httpx.Client(base_url=url, timeout=10) as api:
        run = api.get(f"/flow_runs/{in_flight['id']}").raise_for_status().json()
        tasks = {t["name"]: t["state_name"] for t in task_runs_of(api, in_flight)}
        others = [r for r in runs_of(api, name) if r["id"] != in_flight["id"]]
        deployment = api.get(f"/deployments/name/qatflow-pipeline/{name}").raise_for_status().json()

    assert serve.returncode == 0, tail(log)
    assert run["state_type"] == "COMPLETED", f"{run['state_name']}: {run['state']['message']}\n{tail(log)}"
    assert run["auto_scheduled"], "the run should come from the schedule, not a manual trigger"
    assert run["parameters"] == {"project_dir": str(project)}
    # pause_on_shutdown=False: stopping serve leaves the schedule on.
    assert not deployment["paused"] and all(s["active"] for s in deployment["schedules"])
    # The stage in flight at the SIGTERM ran to the end: its outputs and dvc.lock are the new params'.
    assert tasks == {**dict.fromkeys(STAGES, "Skipped"), "evaluate": "Completed"}, tasks
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["evaluate"]
    assert lock["params"]["params.yaml"]["evaluate.misclassified_shown"] == 4
    assert shown.read_bytes() != before  # 4 misclassified images shown, not 9
    assert json.loads(dvc("status", "--json", cwd=project, env=env)) == {}
    experiments = subprocess.run(["git", "for-each-ref", "refs/exps"], cwd=project,
                                 capture_output=True, text=True, check=True).stdout
    assert run["name"] in experiments, f"no DVC experiment named {run['name']}:\n{experiments}"
    # No new run started once SIGTERM came.
    assert all(r["state_type"] == "SCHEDULED" for r in others), [(r["name"], r["state_name"]) for r in others]
    assert "taking no new runs" in log.read_text()


@pytest.mark.e2e
def test_a_second_sigterm_cancels_the_run_in_flight(prefect_server, tmp_path):
    url, name = prefect_server, "sigterm-twice-test"
    serve, log, project, in_flight = serve_until_training(url, name, tmp_path)
    try:
        os.kill(serve.pid, signal.SIGTERM)
        time.sleep(2)
        os.kill(serve.pid, signal.SIGTERM)
        serve.wait(120)
    finally:
        stop(serve)
    with httpx.Client(base_url=url, timeout=10) as api:
        run = api.get(f"/flow_runs/{in_flight['id']}").raise_for_status().json()
    assert serve.returncode == 0, tail(log)
    assert run["state_type"] == "CANCELLED", f"{run['state_name']}\n{tail(log)}"
    assert not (project / "models" / "int8.pt").exists()
