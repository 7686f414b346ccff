"""Orchestration overhead: the Prefect flow against plain `dvc repro` doing the same work.

    python -m bench.orchestration [--tiny] [--out bench/orchestration.json]

Each measurement runs in a fresh scratch copy of the project (git + DVC, same params), one after
the other on this machine, as the command a user would type:
- `dvc repro` from nothing;
- `python -m flows.pipeline` from nothing, with Prefect's temporary server (no PREFECT_API_URL);
- the same with a running `prefect server` on 127.0.0.1;
- a no-op flow run (everything up to date) against Prefect's own trivial one-task flow.
Flow runs use --no-experiment so both sides do the same work; saving the experiment is timed apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.scratch import default_params, project_env, scratch_project

REPO = Path(__file__).resolve().parents[1]
TINY = {"data": {"max_samples": 1000}, "train": {"epochs": 3, "model": {"widths": [32, 64], "dropout": 0.1}},
        "qat": {"epochs": 2, "freeze_bn_epoch": 1, "freeze_observers_epoch": 1},
        "export": {"max_accuracy_drop": 100.0}, "evaluate": {"latency_repeats": 5}}
# What the flow may cost over the same work done by `dvc repro` and by a trivial Prefect flow.
TARGETS = {"ratio_running_server": 1.15, "noop_minus_trivial_s": 2.0}
TRIVIAL_FLOW = """
from prefect import flow, task
@task
def one():
    return 1
@flow
def trivial():
    return one()
trivial()
"""


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return server, url
        except OSError:
            time.sleep(0.5)
    server.terminate()
    sys.exit("prefect server did not answer /api/health within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small params: seconds, not minutes")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "orchestration.json")
    args = parser.parse_args()
    # dvc.yaml names every section, so the small values go on top of the full params.yaml.
    params = default_params(**TINY) if args.tiny else default_params()
    work = Path(tempfile.mkdtemp(prefix="qatflow-bench-"))
    env = {**project_env("bench"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_HOME": str(work / "prefect-home"),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{work / 'prefect.db'}",
           "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    flow_cmd = [sys.executable, "-m", "flows.pipeline", "--no-experiment", "--project-dir"]
    results: dict = {"params": "tiny" if args.tiny else "params.yaml", "cpu_threads": os.cpu_count()}
    try:
        project = work / "repro"
        scratch_project(project, params, "bench")
        results["dvc_repro_s"] = timed([sys.executable, "-m", "dvc", "repro"], project, env)

        project = work / "flow-temporary"
        scratch_project(project, params, "bench")
        results["flow_temporary_server_s"] = timed([*flow_cmd, str(project)], project, env)

        server, url = start_server(env)
        served = {**env, "PREFECT_API_URL": url}
        try:
            project = work / "flow-server"
            scratch_project(project, params, "bench")
            results["flow_running_server_s"] = timed([*flow_cmd, str(project)], project, served)
            results["flow_noop_s"] = timed([*flow_cmd, str(project)], project, served)
            save = [sys.executable, "-m", "flows.pipeline", "--project-dir", str(project)]
            results["flow_noop_with_experiment_s"] = timed(save, project, served)
            (work / "trivial.py").write_text(TRIVIAL_FLOW)
            results["trivial_flow_s"] = timed([sys.executable, str(work / "trivial.py")], work, served)
        finally:
            server.terminate()
            server.wait(timeout=30)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for key in [k for k in results if k.endswith("_s")]:
        results[key] = round(results[key], 2)
    results["ratio_temporary_server"] = round(results["flow_temporary_server_s"] / results["dvc_repro_s"], 3)
    results["ratio_running_server"] = round(results["flow_running_server_s"] / results["dvc_repro_s"], 3)
    results["noop_minus_trivial_s"] = round(results["flow_noop_s"] - results["trivial_flow_s"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    print("targets: " + ", ".join(f"{key} <= {limit:g}" for key, limit in TARGETS.items()))


def markdown(result: dict) -> str:
    """docs/prefect.md's table of bench/orchestration.json (bench/tables.py)."""
    rows = [("`dvc repro`, everything from scratch", f"{result['dvc_repro_s']:.1f} s"),
            ("flow, temporary Prefect server",
             f"{result['flow_temporary_server_s']:.1f} s ({result['ratio_temporary_server']:.2f}x)"),
            ("flow, running `prefect server`",
             f"{result['flow_running_server_s']:.1f} s ({result['ratio_running_server']:.2f}x)"),
            ("flow with nothing to do (all stages Skipped)", f"{result['flow_noop_s']:.2f} s"),
            ("Prefect's own trivial one-task flow", f"{result['trivial_flow_s']:.2f} s"),
            ("flow with nothing to do, saving the experiment", f"{result['flow_noop_with_experiment_s']:.2f} s")]
    lines = ["| run | wall time |", "|---|---|", *(f"| {run} | {time} |" for run, time in rows)]
    ratio, extra = result["ratio_running_server"], result["noop_minus_trivial_s"]
    met = {True: "met", False: "**not met**"}
    lines += ["", f"With a running server the flow takes {ratio:.2f}x the time of `dvc repro` (target ≤ "
              f"{TARGETS['ratio_running_server']:g}x: {met[ratio <= TARGETS['ratio_running_server']]}), and a "
              f"no-op run is {extra:.2f} s slower than a trivial flow (target ≤ +{TARGETS['noop_minus_trivial_s']:g} s: "
              f"{met[extra <= TARGETS['noop_minus_trivial_s']]}). Params: {result['params']}; "
              f"{result['cpu_threads']} CPU threads."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
