"""Parallel parameter sweeps: every point of a grid's cartesian product is a DVC experiment, run in a
workspace of its own as a Prefect task on Dask (a LocalCluster on this machine, or a running
scheduler's workers).

    python -m flows.sweep --grid train.lr=1e-3,3e-3 --grid qat.epochs=2,4 [--grid-file sweep.yaml]
                          [--max-parallel N] [--dask-address tcp://HOST:8786] [--out DIR]

A grid file holds the grids a user keeps: `grid: {train.lr: [1e-3, 3e-3], qat.epochs: [2, 4]}`.
Each point's params are checked against the params.yaml schema before any point runs.

A point's workspace is a `git clone` of the project at its HEAD, with the project's uncommitted
changes to tracked files applied (what `dvc exp run` in the project would run), using the
project's DVC cache: the stages its params leave unchanged are checked out from the cache, not run
again. The point's experiment (a git ref under refs/exps) is pushed back to the project, so `dvc exp
show` there lists every point, and the clone is removed; nothing else in the project changes. A
failed point is reported and keeps its folder; the other points finish, and the sweep fails.

At the end: a table of the points (a Prefect artifact, sweep.csv and sweep.json) and a figure of
int8 accuracy against int8 latency with the Pareto front (sweep.png), in --out (default
.dvc/tmp/sweeps/<flow run name>/, git-ignored), and the best point: the highest int8 test accuracy
among the points that passed the deployment gate, ties broken by the lower int8 latency at batch 1.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter
from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
from prefect_dask import DaskTaskRunner

from flows import dvcrepo
from flows.options import apply_overrides
from flows.pipeline import start_temporary_server
from tasks.atomic import write_json, write_text, write_with
from tasks.cli import run_command
from tasks.contracts import ExportReport, LatencyReport, read_report
from tasks.csvsafe import safe_cell
from tasks.errors import QatflowError
from tasks.lifeline import pdeathsig_preexec
from tasks.params import load_params, parse_params, safe_yaml
from tasks.variants import DEPLOYED, REFERENCE

# Dask logs through its own handler, warnings and up (LocalCluster's silence_logs); propagating too
# would also print its every INFO line (cluster start, each worker's banner) through Prefect's.
logging.getLogger("distributed").propagate = False

BEST_RULE = ("the highest int8 test accuracy among the points that passed the deployment gate, ties broken "
             "by the lower int8 latency at batch 1, then by the lower point number")
# The lines of a failed `dvc exp run` that say why: the stage's own error, then DVC's.
WHY_LINES = 2


class SweepError(QatflowError):
    pass


@dataclass(frozen=True)
class Point:
    number: int  # 1-based, in the order of the grid's cartesian product
    overrides: dict[str, Any]

    @property
    def label(self) -> str:
        return " ".join(f"{key}={json.dumps(value)}" for key, value in self.overrides.items())


def _add_values(grid: dict[str, list], key: str, values: object, origin: str) -> None:
    if key in grid:
        raise SweepError(f"{origin}: {key!r} is given twice (each key once, with all its values)")
    if not isinstance(values, list) or not values:
        raise SweepError(f"{origin}: {key!r} needs a non-empty list of values, got {values!r}")
    repeated = [value for i, value in enumerate(values) if value in values[:i]]
    if repeated:
        raise SweepError(f"{origin}: {key!r} lists {repeated[0]!r} twice: the same point would run twice")
    grid[key] = values


def parse_grid(specs: list[str], grid_file: Path | None = None) -> dict[str, list]:
    """--grid KEY=V1,V2,... specs (values are YAML: `[1, 64],[1]` is two lists) and a grid file's
    `grid:` mapping, as one {key: values} dict; a key may appear in one place only."""
    grid: dict[str, list] = {}
    if grid_file is not None:
        try:
            raw = safe_yaml(grid_file.read_text(), str(grid_file))
        except FileNotFoundError:
            raise SweepError(f"{grid_file}: file not found") from None
        if not isinstance(raw, dict) or set(raw) != {"grid"} or not isinstance(raw["grid"], dict):
            found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise SweepError(f"{grid_file}: expected one key, grid: {{KEY: [VALUE, ...], ...}}, got {found}")
        for key, values in raw["grid"].items():
            _add_values(grid, str(key), values, f"{grid_file}: grid")
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values:
            raise SweepError(f"--grid expects KEY=VALUE[,VALUE...], got {spec!r}")
        _add_values(grid, key, safe_yaml(f"[{values}]", f"--grid {key}"), "--grid")
    if not grid:
        raise SweepError("nothing to sweep: give --grid KEY=VALUE[,VALUE...] or --grid-file FILE")
    return grid


def plan(project: Path, grid: dict[str, list]) -> list[Point]:
    """The grid's points, each one's params.yaml validated against the schema, before any runs."""
    params_file = project / "params.yaml"
    base = safe_yaml(params_file.read_text(), params_file.name) or {}
    points = []
    for number, values in enumerate(itertools.product(*grid.values()), start=1):
        point = Point(number, dict(zip(grid, values)))
        raw = copy.deepcopy(base)
        apply_overrides(raw, point.overrides)
        params = parse_params(raw, origin=f"{params_file.name} with point {number} ({point.label})")
        if 1 not in params.evaluate.latency_batch_sizes:
            raise SweepError(f"point {number} ({point.label}): the sweep compares int8 latency at batch 1, "
                             f"but evaluate.latency_batch_sizes is {params.evaluate.latency_batch_sizes}")
        points.append(point)
    return points


def default_max_parallel(project: Path) -> int:
    """As many points at once as the CPUs hold at train.threads each."""
    return max(1, (os.cpu_count() or 1) // load_params(project / "params.yaml").train.threads)


def _git(*args: str, cwd: Path, stdin: bytes | None = None) -> bytes:
    done = subprocess.run(["git", *args], cwd=cwd, input=stdin, capture_output=True)
    if done.returncode:
        why = done.stderr.decode(errors="replace").strip()
        raise SweepError(f"git {' '.join(args)} failed in {cwd}: {why}")
    return done.stdout


def _tail(log: Path, lines: int) -> str:
    return "\n".join([line for line in log.read_text(errors="replace").splitlines() if line.strip()][-lines:])


# NO_CACHE: a point's result lives in git and DVC, which decide what is stale; never Prefect's cache.
@task(cache_policy=NO_CACHE)
def run_point(project: str, head: str, changes: bytes, cache: str, point: Point, experiment: str) -> dict:
    """One point as a DVC experiment in a fresh clone of the project, pushed back to it. Returns
    its table row; raises naming the point, why, and the folder kept for a look."""
    logger = get_run_logger()
    folder = Path(tempfile.mkdtemp(prefix=f"qatflow-{experiment}-"))
    workspace, log = folder / "workspace", folder / "dvc-exp-run.log"
    try:
        _git("clone", "-q", "--no-checkout", project, str(workspace), cwd=folder)
        _git("checkout", "-q", "--detach", head, cwd=workspace)
        if changes:
            # --index: a file the project added but never committed is tracked here too.
            _git("apply", "--index", "--binary", "-", cwd=workspace, stdin=changes)
        dvcrepo.share_cache(workspace, Path(cache))
        dvcrepo.set_params(workspace / "params.yaml", point.overrides)
        # The DVC CLI in the clone, not the Python API: a point is then processes of its own, with
        # the clone as their working directory (DVC's API resolves paths against the process's,
        # which the threads of one Dask worker share), and its whole output lands in one log.
        env = {**os.environ, "QATFLOW_RUN_NAME": experiment,
               # Stage commands say `python`: make that this interpreter.
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        with log.open("wb") as out:
            done = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "--name", experiment],
                                  cwd=workspace, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  preexec_fn=pdeathsig_preexec())
        if done.returncode:
            raise SweepError(f"dvc exp run exited with {done.returncode}:\n{_tail(log, WHY_LINES)}")
        dvcrepo.push_experiment_ref(workspace, "origin", experiment)
        row = point_row(point, workspace, experiment, log)
    except Exception as exc:
        # A traceback only for what is not one of our own messages.
        raise SweepError(f"point {point.number} ({point.label}) failed: {exc}\n"
                         f"its workspace is kept in {folder} (dvc exp run's output: {log})"
                         ) from None if isinstance(exc, QatflowError) else exc
    shutil.rmtree(folder)
    logger.info("point %d (%s): experiment %s, stages run: %s", point.number, point.label, experiment,
                row["stages_run"] or "none")
    return row


def point_row(point: Point, workspace: Path, experiment: str, log: Path) -> dict:
    """The point's line of the table, from the metrics its evaluate and export stages wrote."""
    metrics = workspace / "metrics"
    evaluate = json.loads((metrics / "evaluate.json").read_text())
    latency = read_report(LatencyReport, metrics / "latency.json")
    gate = read_report(ExportReport, metrics / "export.json").gate
    ran = [line.split("'")[1] for line in log.read_text().splitlines() if line.startswith("Running stage '")]
    return {
        "point": point.number, "overrides": point.label, "status": "completed", "experiment": experiment,
        "fp32_accuracy": evaluate[REFERENCE]["accuracy"], "int8_accuracy": evaluate[DEPLOYED]["accuracy"],
        "int8_latency_ms": latency.variants[DEPLOYED]["batch_1"].median_ms,
        "int8_size_bytes": evaluate[DEPLOYED]["size_bytes"],
        "gate_passed": gate is not None and gate.passed, "stages_run": " ".join(ran), "error": None,
    }


def failed_row(point: Point, error: str) -> dict:
    return {"point": point.number, "overrides": point.label, "status": "failed", "experiment": None,
            "fp32_accuracy": None, "int8_accuracy": None, "int8_latency_ms": None, "int8_size_bytes": None,
            "gate_passed": None, "stages_run": None, "error": error}


def pareto_front(rows: list[dict]) -> list[dict]:
    """Completed points no other beats on both int8 accuracy (higher) and latency (lower), by latency."""
    front: list[dict] = []
    for row in sorted(rows, key=lambda r: (r["int8_latency_ms"], -r["int8_accuracy"])):
        if not front or row["int8_accuracy"] > front[-1]["int8_accuracy"]:
            front.append(row)
    return front


def best_point(rows: list[dict]) -> dict | None:
    """BEST_RULE."""
    passed = [row for row in rows if row["status"] == "completed" and row["gate_passed"]]
    return min(passed, key=lambda r: (-r["int8_accuracy"], r["int8_latency_ms"], r["point"]), default=None)


def sweep_figure(completed: list[dict], front: list[dict], best: dict | None) -> Figure:
    """int8 accuracy vs int8 latency at batch 1, marker area proportional to the int8 file size,
    each marker numbered as the table's point; the Pareto front drawn as the staircase it bounds."""
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    largest = max(row["int8_size_bytes"] for row in completed)

    def area(row: dict) -> float:
        return 800 * row["int8_size_bytes"] / largest

    for row in completed:
        x, y = row["int8_latency_ms"], row["int8_accuracy"] * 100
        ax.scatter(x, y, s=area(row), alpha=0.5, edgecolors="black",
                   color="tab:blue" if row in front else "tab:gray")
        ax.annotate(str(row["point"]), (x, y), ha="center", va="center", fontsize=9)
    ax.plot([r["int8_latency_ms"] for r in front], [r["int8_accuracy"] * 100 for r in front],
            drawstyle="steps-post", color="tab:blue", label="Pareto front (max accuracy, min latency)")
    if best is not None:  # a ring, so that the point's number stays readable
        ax.scatter(best["int8_latency_ms"], best["int8_accuracy"] * 100, s=area(best) + 400,
                   facecolors="none", edgecolors="gold", linewidths=3,
                   label=f"best: point {best['point']} ({best['overrides']})")
    ax.margins(0.2)
    ax.set_xlim(left=0)
    ax.yaxis.set_major_formatter(PercentFormatter())
    ax.set_xlabel("int8 latency at batch 1, median (ms)")
    ax.set_ylabel("int8 test accuracy")
    ax.set_title("Sweep: int8 accuracy vs latency (marker area ∝ int8 file size)")
    legend = ax.legend(loc="lower right", fontsize=8)
    for handle in legend.legend_handles[1:]:  # the ring at legend size, not at its marker's
        handle.set_sizes([80])
    ax.grid(alpha=0.3)
    return fig


def write_report(out: Path, rows: list[dict], best: dict | None, figure: Figure | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    # Numbers stay numbers; the strings (overrides, errors) quote what users typed.
    writer.writerows({key: safe_cell(value) if isinstance(value, str) else value for key, value in row.items()}
                     for row in rows)
    write_text(out / "sweep.csv", table.getvalue())
    write_json(out / "sweep.json", {"best_rule": BEST_RULE, "best": best, "points": rows})
    if figure is not None:
        write_with(out / "sweep.png",
                   lambda f: figure.savefig(f, format="png", dpi=120, metadata={"Software": None}))


@flow(name="qatflow-sweep", log_prints=True)
def sweep(grid: dict[str, list[Any]], project_dir: str = ".", max_parallel: int = 1,
          out: str | None = None) -> dict:
    """Run every point of the grid's cartesian product as a DVC experiment of the project, at most
    max_parallel at once, on this flow's task runner (see run_sweep). Returns the table, the best
    point and where the report is; fails, once every point has finished, if any point failed."""
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    points = plan(project, grid)
    out_dir = Path(out).resolve() if out else project / ".dvc" / "tmp" / "sweeps" / runtime.flow_run.name
    head = _git("rev-parse", "HEAD", cwd=project).decode().strip()
    # The tracked files' uncommitted changes, read without taking git's index lock.
    changes = _git("--no-optional-locks", "diff", "--binary", head, cwd=project)
    cache = str(dvcrepo.cache_dir(project))
    logger.info("%d point(s), at most %d at once, on commit %s%s", len(points), max_parallel, head[:8],
                " plus the workspace's uncommitted changes" if changes else "")

    # Submitted as slots free up rather than all at once: an existing Dask cluster may have more
    # workers than the CPUs (or the DVC cache's disk) can take training runs.
    waiting, running, finished = list(points), {}, {}  # finished: by point number
    while waiting or running:
        while waiting and len(running) < max_parallel:
            point = waiting.pop(0)
            name = f"{runtime.flow_run.name}-{point.number}"
            future = run_point.with_options(task_run_name=f"point-{point.number}").submit(
                str(project), head, changes, cache, point, name)
            running[future] = point
        done = next(as_completed(list(running)))
        finished[running.pop(done).number] = done

    rows = []
    for point in points:
        outcome = finished[point.number].result(raise_on_failure=False)
        rows.append(outcome if isinstance(outcome, dict) else failed_row(point, str(outcome)))
    completed = [row for row in rows if row["status"] == "completed"]
    front = pareto_front(completed)
    for row in rows:
        row["pareto_front"] = row in front
    best = best_point(rows)

    write_report(out_dir, rows, best, sweep_figure(completed, front, best) if completed else None)
    create_table_artifact(rows, key="qatflow-sweep", description="One row per sweep point")
    verdict = (f"point {best['point']} ({best['overrides']}), experiment {best['experiment']}: int8 "
               f"{best['int8_accuracy']:.2%} at {best['int8_latency_ms']:g} ms" if best else "none")
    create_markdown_artifact(f"**Best point** ({BEST_RULE}): {verdict}\n\n**Report**: `{out_dir}`\n",
                             key="qatflow-sweep-best", description="qatflow sweep's best point")
    print(f"best point ({BEST_RULE}): {verdict}")
    print(f"sweep table and figure: {out_dir}")
    failed = [row for row in rows if row["status"] == "failed"]
    if failed:
        raise SweepError(f"{len(failed)} of {len(rows)} point(s) failed (report in {out_dir}):\n"
                         + "\n".join(row["error"] for row in failed))
    return {"out": str(out_dir), "best": best, "points": rows}


def task_runner(max_parallel: int, dask_address: str | None = None) -> DaskTaskRunner:
    """An existing scheduler's workers, or a LocalCluster of one single-threaded worker process per
    parallel point, on 127.0.0.1 only and without a dashboard."""
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    # dashboard_address None: no dashboard, and the HTTP endpoint Dask keeps (health, metrics) binds
    # to host, as the scheduler and workers do, where the default ":8787" means every interface.
    return DaskTaskRunner(cluster_kwargs={"n_workers": max_parallel, "threads_per_worker": 1,
                                          "processes": True, "host": "127.0.0.1", "dashboard_address": None})


def run_sweep(grid: dict[str, list], project_dir: str = ".", max_parallel: int | None = None,
              dask_address: str | None = None, out: str | None = None, return_state: bool = False):
    """The sweep flow on Dask: max_parallel defaults to default_max_parallel(project)."""
    max_parallel = max_parallel or default_max_parallel(Path(project_dir))
    return sweep.with_options(task_runner=task_runner(max_parallel, dask_address))(
        grid=grid, project_dir=project_dir, max_parallel=max_parallel, out=out, return_state=return_state)


def server_for_workers() -> dict:
    """Settings that send the Dask workers' task runs to this process's temporary Prefect server.

    Prefect passes its settings to the workers with each task, and without an API URL every worker
    process would start a temporary server of its own and record its task runs there. Nothing to
    change with PREFECT_API_URL set: workers on other machines need such a server, one they reach.
    """
    if get_current_settings().api.url:
        return {}
    server = SubprocessASGIServer()  # the one start_temporary_server started (one per process)
    server.start()  # a no-op then; Prefect's own where that could not start one
    return {PREFECT_API_URL: server.api_url}


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=VALUE[,VALUE...]",
                        help="a params.yaml key and the values to sweep it over (repeatable)")
    parser.add_argument("--grid-file", type=Path, metavar="FILE",
                        help="a YAML file: grid: {KEY: [VALUE, ...]}")
    parser.add_argument("--max-parallel", type=int, metavar="N",
                        help="points at once (default: CPU count // train.threads, at least 1)")
    parser.add_argument("--dask-address", metavar="tcp://HOST:8786",
                        help="run the points on this Dask scheduler's workers (default: a LocalCluster here)")
    parser.add_argument("--project-dir", default=".", help="the DVC project (default: %(default)s)")
    parser.add_argument("--out", metavar="DIR",
                        help="report folder (default: .dvc/tmp/sweeps/<flow run name>)")


def _main(args: argparse.Namespace) -> None:
    if args.max_parallel is not None and args.max_parallel < 1:
        raise SweepError(f"--max-parallel must be at least 1, got {args.max_parallel}")
    grid = parse_grid(args.grid, args.grid_file)
    # The flow checks the points again, as it must when called on its own; here a typo fails at
    # once instead of after the temporary server's start.
    plan(Path(args.project_dir), grid)
    max_parallel = args.max_parallel or default_max_parallel(Path(args.project_dir))
    start_temporary_server()
    with temporary_settings(server_for_workers()):
        state = run_sweep(grid, args.project_dir, max_parallel, args.dask_address, args.out,
                          return_state=True)
    if not state.is_completed():
        raise SweepError(state.message)


def main() -> None:
    run_command("sweep", _main, _arguments, prog="python -m flows.sweep", description=__doc__)


if __name__ == "__main__":
    # Through the module's own name: Dask pickles the task and its Point arguments by reference to
    # flows.sweep, which its workers import, rather than by value from __main__.
    from flows.sweep import main as module_main

    module_main()
