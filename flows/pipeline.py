"""The pipeline as a Prefect flow: one task per dvc.yaml stage, in DVC's order, with DVC deciding
what is stale. A run leaves the workspace exactly as `dvc repro` would (same outputs, same
dvc.lock) and is saved as a DVC experiment named after the flow run.

    python -m flows.pipeline [--set train.epochs=3 ...] [--no-experiment] [--push [--git-remote NAME]]

--push shares the run once it succeeded: the experiment's git ref to the git remote and its cached
outputs to the default DVC remote (`dvc exp push`), so a scheduled run on one machine is an
experiment everyone can `dvc exp pull` and `dvc exp apply`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.settings import get_current_settings
from prefect.states import Completed

from flows import dvcrepo
from flows.options import apply_overrides, parse_key_values
from tasks.cli import run_command
from tasks.contracts import RunSummary, read_report
from tasks.errors import ParamsError, QatflowError
from tasks.lifeline import pdeathsig_preexec
from tasks.params import load_params, parse_params, safe_yaml

# Training is the only stage that can run long; a hung one should not hold the workspace forever.
STAGE_TIMEOUT_S = {"train": 3600}
DEFAULT_TIMEOUT_S = 1800


class WorkspaceBusy(QatflowError):
    pass


def check_overrides(params_file: Path, overrides: dict[str, Any]) -> None:
    """Validate params.yaml with the overrides applied, against the one schema, before anything
    runs or is written."""
    try:
        text = params_file.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{params_file}: file not found") from None
    raw = safe_yaml(text, params_file.name) or {}
    apply_overrides(raw, overrides)
    parse_params(raw, origin=f"{params_file.name} with overrides {overrides}")


@contextmanager
def workspace_lock(root: Path, timeout_s: float) -> Iterator[None]:
    """One pipeline run per workspace at a time. DVC's own lock covers a single `dvc` call, not
    the gap between two stages, where a second run could otherwise interleave."""
    lock_dir = root / ".dvc" / "tmp"
    lock_dir.mkdir(parents=True, exist_ok=True)
    # Who holds the lock, for the message a waiting run gives up with; beside the lock file,
    # whose content filelock owns.
    holder = lock_dir / "qatflow-run.holder"
    lock = FileLock(lock_dir / "qatflow-run.lock")
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        who = holder.read_text().strip() if holder.exists() else "another process"
        raise WorkspaceBusy(
            f"{root} is busy: a pipeline run ({who}) holds .dvc/tmp/qatflow-run.lock; "
            f"waited {timeout_s:g}s (raise lock_timeout to wait longer)"
        ) from None
    try:
        holder.write_text(f"flow run {runtime.flow_run.name or '?'}, pid {os.getpid()}")
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def _retry_on_dvc_lock(task, task_run, state) -> bool:
    # The only failure a retry can fix: someone else's `dvc` command holding the repo lock.
    try:
        state.result()
    except Exception as exc:
        return dvcrepo.held_lock(exc)
    return False


# NO_CACHE: Prefect's input-based caching would return a stale result when a file behind a path
# changes; DVC's hashes decide what is stale.
@task(retries=3, retry_delay_seconds=10, retry_condition_fn=_retry_on_dvc_lock, cache_policy=NO_CACHE)
def run_stage(root: str, stage: str):
    """Run one dvc.yaml stage if DVC finds it stale; otherwise complete as Skipped."""
    start = time.perf_counter()
    ran = dvcrepo.reproduce_stage(Path(root), stage)
    result = {"stage": stage, "ran": ran, "seconds": round(time.perf_counter() - start, 2)}
    if not ran:
        return Completed(name="Skipped", message=f"{stage} is up to date", data=result)
    return result


def publish_artifacts(root: Path, stages: list[dict]) -> dict:
    """The report evaluate wrote, attached to the flow run: its markdown summary (plus which stages
    this run ran) and its per-variant metrics table."""
    report = root / "plots" / "latency"
    summary = read_report(RunSummary, report / "summary.json")
    create_table_artifact(summary.rows, key="qatflow-metrics", description="Test-set metrics per variant")
    ran = [s["stage"] for s in stages if s["ran"]]
    markdown = (report / "summary.md").read_text() + f"\n**Stages run**: {', '.join(ran) or 'none (all up to date)'}\n"
    create_markdown_artifact(markdown, key="qatflow-summary", description="qatflow run summary")
    return {"gate_passed": summary.gate.passed, **summary.headline}


@flow(name="qatflow-pipeline", log_prints=True)
def pipeline(
    overrides: dict[str, Any] | None = None,
    save_experiment: bool = True,
    project_dir: str = ".",
    lock_timeout: float = 3600.0,
    push: bool = False,
    git_remote: str = "origin",
) -> dict:
    """Run prepare -> train -> qat -> export -> evaluate as `dvc repro` would, then save the result
    as a DVC experiment named after this flow run.

    overrides: params.yaml keys to change first, e.g. {"train.epochs": 3}; validated before
    anything runs. lock_timeout: seconds to wait for another run in the same workspace.
    push: after a successful run, `dvc exp push GIT_REMOTE EXPERIMENT` (git ref + cached outputs to
    the default DVC remote); with save_experiment off, `dvc push` of the outputs only.
    """
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    params_file = root / "params.yaml"
    overrides = overrides or {}
    check_overrides(params_file, overrides)
    if push:
        dvcrepo.check_push(root)

    # DVC resolves stage names and paths against the working directory.
    with contextlib.chdir(root), workspace_lock(root, lock_timeout):
        if overrides:
            dvcrepo.set_params(params_file, overrides)
        load_params(params_file)  # the stages would refuse an invalid file; say so before they start
        run_name = runtime.flow_run.name
        # Stage commands say `python`: make that this interpreter. Name the TensorBoard runs after
        # this flow run so each experiment keeps its own curves.
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        if run_name:
            os.environ["QATFLOW_RUN_NAME"] = run_name

        # Called in turn, not submitted: DVC runs one stage at a time per repo anyway (its lock),
        # and a task in the flow's own thread can be interrupted by its timeout. wait_for records
        # dvc.yaml's edges so the Prefect UI draws the same graph as `dvc dag`.
        states: dict[str, Any] = {}
        for node in dvcrepo.pipeline_stages(root):
            stage_task = run_stage.with_options(
                name=node.name, task_run_name=node.name,
                timeout_seconds=STAGE_TIMEOUT_S.get(node.name, DEFAULT_TIMEOUT_S),
            )
            states[node.name] = stage_task(
                str(root), node.name, wait_for=[states[u] for u in node.upstream], return_state=True
            )
            if not states[node.name].is_completed():
                break  # downstream stages would only fail on its missing outputs
        stages = [state.result() for state in states.values()]  # re-raises a stage's failure
        logger.info("stages run: %s", [s["stage"] for s in stages if s["ran"]] or "none")

        summary = publish_artifacts(root, stages)
        summary["stages_run"] = [s["stage"] for s in stages if s["ran"]]
        if save_experiment:
            summary["experiment"] = dvcrepo.save_experiment(root, run_name)
            logger.info("saved DVC experiment %s (dvc exp show)", summary["experiment"])
        if push:
            # A failed push fails the run, naming the remote; the results stay in the workspace.
            summary["pushed"] = dvcrepo.push_results(root, git_remote, summary.get("experiment"))
            logger.info("pushed %s", summary["pushed"])
    return summary


def start_temporary_server() -> None:
    """Without PREFECT_API_URL, start the temporary Prefect server Prefect would start for the run,
    but one that dies with this process: Prefect's own outlives a `kill -9` of the flow.

    Prefect keeps one temporary server per process (SubprocessASGIServer's instance for port None)
    and starts it on first use; the one registered and started here, in the main thread (the
    death signal follows the thread that starts a child), is the one the flow then uses.
    """
    if get_current_settings().api.url or (preexec := pdeathsig_preexec()) is None:
        return
    from prefect.server.api import server as prefect_server

    class DiesWithFlowServer(prefect_server.SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            # Prefect's own command and environment, started with a death signal.
            real = prefect_server.subprocess
            prefect_server.subprocess = types.SimpleNamespace(
                Popen=lambda *args, **kwargs: real.Popen(*args, preexec_fn=preexec, **kwargs))
            try:
                return super()._run_uvicorn_command()
            finally:
                prefect_server.subprocess = real

    DiesWithFlowServer().start()


class FlowFailed(QatflowError):
    pass


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml key for this run (repeatable)")
    parser.add_argument("--no-experiment", action="store_true", help="do not save a DVC experiment")
    parser.add_argument("--project-dir", default=".", help="the DVC project (default: %(default)s)")
    parser.add_argument("--push", action="store_true",
                        help="after the run, push the experiment (dvc exp push) to --git-remote and "
                        "its outputs to the default DVC remote")
    parser.add_argument("--git-remote", default="origin", help="git remote for --push (default: %(default)s)")


def _main(args: argparse.Namespace) -> None:
    overrides = parse_key_values(args.set, "--set")
    # The flow checks again, as it must when called on its own; here a bad params.yaml (an alias
    # bomb among them, which DVC would parse) fails at once, before the temporary server starts.
    check_overrides(Path(args.project_dir) / "params.yaml", overrides)
    start_temporary_server()
    state = pipeline(overrides=overrides, save_experiment=not args.no_experiment,
                     project_dir=args.project_dir, push=args.push, git_remote=args.git_remote,
                     return_state=True)
    if not state.is_completed():
        raise FlowFailed(state.message)


def main() -> None:
    run_command("pipeline", _main, _arguments, prog="python -m flows.pipeline", description=__doc__)


if __name__ == "__main__":
    main()
