"""Data-parallel training (tasks/distributed.py): real torchrun, real gloo processes on this machine.

One workspace holds the tiny prepared data; the train stage runs there as `python -m tasks.train`,
the command dvc.yaml gives it, with train.distributed.nproc 2. A tiny DVC project runs it the way
users do: under `dvc repro`, and under DVC in the flow's own process.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from tasks.distributed import failure_line
from conftest import KILLABLE_PARAMS, REPO, TINY_PARAMS, dvc, init_tiny_project, project_env, write_params

pytestmark = pytest.mark.e2e

NPROC = 2


def ddp_params(**train) -> dict:
    params = copy.deepcopy(TINY_PARAMS)
    params["train"] |= {"distributed": {"nproc": NPROC}, "threads": 1, **train}
    return params


def stage(root: Path, name: str = "train", stderr: int = subprocess.STDOUT) -> subprocess.Popen:
    """The stage with a temp dir of its own, to see that nothing is left in it."""
    (root / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "QATFLOW_RUN_NAME": "ddp", "TMPDIR": str(root / "tmp")}
    return subprocess.Popen([sys.executable, "-m", f"tasks.{name}"], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=stderr)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


@pytest.fixture(scope="module")
def ddp_workspace(tiny_workspace, tmp_path_factory):
    """tiny_workspace's prepared data, trained by 2 DDP processes; its train metrics are those of
    the same params in one process."""
    single, _ = tiny_workspace
    root = tmp_path_factory.mktemp("ddp")
    shutil.copytree(single.prepared, root / "data" / "prepared")
    write_params(root / "params.yaml", ddp_params())
    code, output = finish(stage(root))
    assert code == 0, output
    return root, output, json.loads(single.metrics("train").read_text())


def state_of(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(root / "models/train/fp32_state.pt", weights_only=True)["state_dict"]


def outputs(root: Path) -> dict[str, bytes]:
    paths = ["models/train/fp32_state.pt", "metrics/train.json", "plots/train/history.csv"]
    return {path: (root / path).read_bytes() for path in paths}


def test_two_processes_end_with_identical_weights_and_learn_like_one(ddp_workspace):
    root, output, single = ddp_workspace
    assert f"train: {NPROC} processes (DDP, gloo), weights identical on every rank" in output
    # Rank 0 alone reports: one line per epoch, not one per rank.
    assert output.count("train epoch 1/3:") == 1
    metrics = json.loads((root / "metrics/train.json").read_text())
    assert metrics["epochs_run"] == 3
    # The same global batch (32 = 2 x 16) and schedule: comparable, not identical (other shuffles,
    # per-rank BatchNorm statistics).
    assert abs(metrics["val_accuracy"] - single["val_accuracy"]) <= 0.08, (metrics, single)
    assert not (root / "models/train/checkpoint.pt").exists()
    assert sorted(p.name for p in (root / "runs/train").iterdir()) == ["ddp"]
    # torchrun's log dir went with it (torch's own inductor cache may stay: it is meant to).
    assert not [p for p in (root / "tmp").iterdir() if p.name.startswith(("torchelastic_", "qatflow-"))]


def descendants(pid: int) -> list[int]:
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return children + [d for child in children for d in descendants(child)]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def worker_pids(stage_pid: int) -> dict[int, int]:
    """The workers of the torchrun that the stage started, by rank."""
    ranks = {}
    for pid in descendants(stage_pid):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((v for v in environ if v.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[int(rank[5:])] = pid
    return ranks


def test_killed_worker_fails_the_stage_keeps_outputs_and_the_rerun_resumes_to_the_same_weights(ddp_workspace):
    root, _, _ = ddp_workspace
    before = outputs(root)
    checkpoint = root / "models/train/checkpoint.pt"
    # The same params again: a fresh run, which an uninterrupted one ends exactly where the first did.
    run = stage(root, stderr=subprocess.PIPE)
    # Rank 0's progress reaches the terminal while it trains, not when the job ends.
    while not (line := run.stdout.readline()).startswith("train epoch 1/3:"):
        assert line, finish(run)
    deadline = time.monotonic() + 240
    while not checkpoint.exists():  # rank 0 saves it after every epoch
        assert run.poll() is None and time.monotonic() < deadline, finish(run)
        time.sleep(0.01)
    killed = worker_pids(run.pid)[1]
    os.kill(killed, signal.SIGKILL)
    output, errors = run.communicate(timeout=300)
    assert run.returncode == 1, output + errors
    # One line, from the stage, not torchrun's log and two tracebacks.
    assert errors == f"train: error: DDP rank 1 (pid {killed}) died: SIGKILL\n", output + errors
    assert outputs(root) == before  # nothing published, nothing half-written
    assert checkpoint.exists()

    # The stage itself killed (as DVC's death kills it): torchrun dies with it, and its workers
    # with torchrun, before any of them publishes.
    run = stage(root)
    while len(workers := worker_pids(run.pid)) < NPROC:
        assert run.poll() is None, finish(run)[1]
        time.sleep(0.01)
    os.kill(run.pid, signal.SIGKILL)
    finish(run)
    for pid in workers.values():
        deadline = time.monotonic() + 30
        while alive(pid):
            assert time.monotonic() < deadline, f"worker {pid} outlived the stage"
            time.sleep(0.05)
    assert outputs(root) == before

    code, output = finish(stage(root))
    assert code == 0, output
    assert "train: resuming from checkpoint.pt after epoch" in output
    first = torch.load(io.BytesIO(before["models/train/fp32_state.pt"]), weights_only=True)["state_dict"]
    resumed = state_of(root)
    assert resumed.keys() == first.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, resumed[name]), name
    assert not checkpoint.exists()


def test_qat_runs_on_two_processes(ddp_workspace, tiny_workspace):
    root, _, _ = ddp_workspace
    single, _ = tiny_workspace
    params = ddp_params()
    params["qat"] |= {"distributed": {"nproc": NPROC}, "threads": 1}
    write_params(root / "params.yaml", params)
    code, output = finish(stage(root, "qat"))
    assert code == 0, output
    assert f"qat: {NPROC} processes (DDP, gloo), weights identical on every rank" in output
    assert (root / "models/qat/qat_state.pt").exists()
    metrics = json.loads((root / "metrics/qat.json").read_text())
    assert metrics["int8_val_accuracy"] > 0.5


# DVC runs the stage, so it is DDP's launcher with DVC_STAGE set: the case users meet.
DVC_DDP_PARAMS = {
    **KILLABLE_PARAMS,
    "train": {**KILLABLE_PARAMS["train"], "epochs": 1, "threads": 1, "distributed": {"nproc": NPROC}},
}


@pytest.fixture(scope="module")
def dvc_ddp_project(tmp_path_factory) -> Path:
    """A tiny git + DVC project, prepared, whose train stage runs on 2 DDP processes: copy it
    (DVC hashes files, not paths), never change it."""
    root = tmp_path_factory.mktemp("dvc-ddp") / "project"
    dvc("repro", "prepare", cwd=root, env=init_tiny_project(root, DVC_DDP_PARAMS))
    return root


def assert_trained_on_two_processes(project: Path, output: str) -> None:
    assert f"train: {NPROC} processes (DDP, gloo), weights identical on every rank" in output, output
    assert "train" in yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert json.loads((project / "metrics/train.json").read_text())["epochs_run"] == 1


def test_dvc_repro_trains_on_two_processes(dvc_ddp_project, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(dvc_ddp_project, project, symlinks=True)
    assert_trained_on_two_processes(project, dvc("repro", "train", cwd=project, env=project_env()))


def test_the_flows_in_process_dvc_trains_on_two_processes(dvc_ddp_project, tmp_path):
    """The flow's own stage task body (flows.pipeline.run_stage, DVC's Python API in the flow's
    process), without the Prefect server a whole flow run would start and the stages after train."""
    project = tmp_path / "project"
    shutil.copytree(dvc_ddp_project, project, symlinks=True)
    task = ("import sys; from flows.pipeline import run_stage; "
            "sys.exit(0 if run_stage.fn(sys.argv[1], 'train')['ran'] else 'train did not run')")
    env = {**project_env(), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", task, str(project)], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_trained_on_two_processes(project, done.stdout)


def test_a_rank_that_raises_fails_the_stage_in_one_line_naming_it(tmp_path):
    """Rank 1 fails; rank 0, waiting for it in a collective, fails a moment later for want of its
    peer: the line names rank 1 and its error."""
    (tmp_path / "boom.py").write_text(
        "from tasks.cli import run_command\n"
        "from tasks.distributed import processes\n"
        "from tasks.errors import QatflowError\n"
        "def main(args):\n"
        "    with processes(2, 'boom', threads=1) as parallel:\n"
        "        if parallel.rank == 1:\n"
        "            raise QatflowError('rank 1 found no data')\n"
        "        parallel.sum(1.0)\n"
        "run_command('boom', main)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "boom"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.fullmatch(r"boom: error: DDP rank 1 \(pid \d+\) failed: rank 1 found no data\n", done.stderr), \
        done.stdout + done.stderr


def test_the_line_names_the_rank_that_failed_first(tmp_path):
    """Of the failures torchrun reports: not the ranks it stopped (SIGTERM), nor the one that lost
    its peer, whatever their order."""
    def failure(rank: int, exitcode: int, message: str | None = None) -> ProcessFailure:
        error_file = tmp_path / f"{rank}.json"
        if message is not None:
            error_file.write_text(json.dumps({"message": message, "timestamp": 1}))
            time.sleep(0.01)
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file=str(error_file))

    def line(*failures: ProcessFailure) -> str:
        return failure_line(ChildFailedError("train", {f.local_rank: f for f in failures}))

    killed = failure(1, -signal.SIGKILL)
    assert line(failure(0, -signal.SIGTERM), killed) == "DDP rank 1 (pid 101) died: SIGKILL"
    assert line(failure(0, 1, "RuntimeError: Connection closed by peer"), killed) == \
        "DDP rank 1 (pid 101) died: SIGKILL"
    raised = failure(2, 1, "no data")
    lost_peer = failure(0, 1, "RuntimeError: Connection closed by peer")
    assert line(lost_peer, raised, failure(1, -signal.SIGTERM)) == "DDP rank 2 (pid 102) failed: no data"
    assert line(failure(0, -signal.SIGTERM), failure(3, 3)) == "DDP rank 3 (pid 103) exited with status 3"
