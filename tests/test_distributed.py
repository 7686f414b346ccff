"""Data-parallel training (tasks/distributed.py): real torchrun, real gloo processes on this machine.

One workspace holds the tiny prepared data; the train stage runs there as `python -m tasks.train`,
the command dvc.yaml gives it, with train.distributed.nproc 2.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_PARAMS, write_params

pytestmark = pytest.mark.e2e

NPROC = 2


def ddp_params(**train) -> dict:
    params = copy.deepcopy(TINY_PARAMS)
    params["train"] |= {"distributed": {"nproc": NPROC}, "threads": 1, **train}
    return params


def stage(root: Path, name: str = "train") -> subprocess.Popen:
    """The stage with a temp dir of its own, to see that nothing is left in it."""
    (root / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "QATFLOW_RUN_NAME": "ddp", "TMPDIR": str(root / "tmp")}
    return subprocess.Popen([sys.executable, "-m", f"tasks.{name}"], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


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
    run = stage(root)
    deadline = time.monotonic() + 240
    while not checkpoint.exists():  # rank 0 saves it after every epoch
        assert run.poll() is None and time.monotonic() < deadline, finish(run)[1]
        time.sleep(0.01)
    os.kill(worker_pids(run.pid)[1], signal.SIGKILL)
    code, output = finish(run)
    assert code != 0, output
    assert "exitcode  : -9 (pid:" in output and "Signal 9 (SIGKILL)" in output
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
