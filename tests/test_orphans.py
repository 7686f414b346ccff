"""A `kill -9` of `dvc repro` or of the flow process leaves no orphan behind: the running stage (and
the flow's temporary Prefect server) die with it, so nothing publishes outputs afterwards that
dvc.lock does not record. Real processes on the tiny project."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_serve import prefect_env

from conftest import KILLABLE_PARAMS, init_tiny_project

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")

CHECKPOINT = "models/train/checkpoint.pt"


def stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, session, start time) of a live process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1]), int(fields[3]), int(fields[19])


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    return "?"


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def descendants(root: int) -> dict[int, tuple[int, str]]:
    """Every live descendant of `root`: pid -> (start time, command line)."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        if (info := stat(pid)) and info[0] != "Z":
            children.setdefault(info[1], []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if info := stat(pid):
            found[pid] = (info[3], cmdline(pid))
            todo += children.get(pid, [])
    return found


def session_members(session: int) -> dict[int, str]:
    """Live (not zombie) processes of the session the test started, wherever they were reparented."""
    return {pid: cmdline(pid) for pid in all_pids()
            if (info := stat(pid)) and info[2] == session and info[0] != "Z"}


def outputs(project: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file the pipeline writes, and of dvc.lock."""
    files = [project / "dvc.lock"] if (project / "dvc.lock").exists() else []
    for top in ("data/prepared", "models", "metrics", "plots"):
        if (project / top).exists():
            files += [p for p in (project / top).rglob("*") if p.is_file()]
    return {str(p.relative_to(project)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def is_train(cmd: str) -> bool:
    return cmd.endswith("-m tasks.train") and "-c" not in cmd.split()  # not the `sh -c` around it


def wait_for_training(process: subprocess.Popen, project: Path, log: Path, timeout_s: float = 300):
    """Until train has saved a checkpoint and its process is among `process`'s descendants."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, f"exited early ({process.returncode}):\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"train never started:\n{log.read_text()[-4000:]}"
        running = descendants(process.pid)
        if (project / CHECKPOINT).exists() and any(is_train(cmd) for _, cmd in running.values()):
            return running
        time.sleep(0.05)


def kill_and_check(process: subprocess.Popen, project: Path, running: dict[int, tuple[int, str]]):
    """SIGKILL `process`: within a few seconds nothing it started is left, and nothing is written
    after."""
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    try:
        deadline = time.monotonic() + 5
        while left := session_members(process.pid):
            assert time.monotonic() < deadline, f"survived the kill of {process.pid}: {left}\n" \
                f"(running at the kill: {running})"
            time.sleep(0.1)
        # Those that ran at the kill are gone (or zombies), not just moved to another session.
        assert not [pid for pid, (start, _) in running.items()
                    if (info := stat(pid)) and info[3] == start and info[0] != "Z"]
        after = outputs(project)
        time.sleep(3)
        assert outputs(project) == after
    finally:
        for pid in session_members(process.pid):  # only what this test started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def assert_train_unpublished(project: Path) -> None:
    """prepare finished and is recorded; the killed train neither published nor got recorded."""
    stages = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert "prepare" in stages and "train" not in stages
    assert not (project / "models" / "train" / "fp32_state.pt").exists()


def start(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


# bash execs a lone command, so the stage is DVC's child; dash (Debian's /bin/sh) forks, so the
# stage's parent is a shell that outlives DVC. With 2 DDP processes, the stage is their launcher
# and the workers, under torchrun, are not DVC's stages: they die with torchrun, which dies with it.
@pytest.mark.e2e
@pytest.mark.parametrize("shell, nproc", [("bash", 1), ("sh", 1), ("sh", 2)])
def test_killed_dvc_repro_leaves_no_stage_running(tmp_path, shell, nproc):
    if not (path := shutil.which(shell)):
        pytest.skip(f"no {shell}")
    project, log = tmp_path / "project", tmp_path / "dvc.log"
    params = {**KILLABLE_PARAMS, "train": {**KILLABLE_PARAMS["train"], "threads": 1,
                                           "distributed": {"nproc": nproc}}}
    env = {**init_tiny_project(project, params), "SHELL": path}
    dvc = start([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, log=log)
    running = wait_for_training(dvc, project, log)
    # The workers run the stage's command too, under torchrun's agent, whose command ends with it.
    trains = [pid for pid, (_, cmd) in running.items() if is_train(cmd) and "tasks.distributed" not in cmd]
    (train,) = [pid for pid in trains if "tasks.distributed" not in cmdline(stat(pid)[1])]
    assert len(trains) == (1 if nproc == 1 else 1 + nproc), running
    parent = stat(train)[1]  # DVC, or the shell it ran the command with
    assert parent == dvc.pid or (stat(parent)[1] == dvc.pid and cmdline(parent).startswith(path)), running
    kill_and_check(dvc, project, running)
    assert_train_unpublished(project)


@pytest.mark.e2e
def test_killed_flow_leaves_no_stage_or_server_running(tmp_path):
    project, log = tmp_path / "project", tmp_path / "flow.log"
    # No PREFECT_API_URL: the flow starts its temporary server (in a fresh home, on 2 busy cores,
    # it can take longer than Prefect's default 20 s to come up).
    env = prefect_env(tmp_path / "home", init_tiny_project(project, KILLABLE_PARAMS),
                      PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    flow = start([sys.executable, "-m", "flows.pipeline", "--project-dir", str(project), "--no-experiment"],
                 cwd=project, env=env, log=log)
    running = wait_for_training(flow, project, log)
    assert any("uvicorn" in cmd for _, cmd in running.values()), running
    kill_and_check(flow, project, running)
    assert_train_unpublished(project)


def test_a_stage_whose_dvc_died_before_it_started_dies(tmp_path):
    """The race prctl leaves: DVC (here a shell) is gone before the stage arms its death signal."""
    said = tmp_path / "said"
    stage = ("import time; time.sleep(1); from tasks.lifeline import die_with_dvc; die_with_dvc(); "
             f"open({str(said)!r}, 'w').write('survived')")
    env = {**os.environ, "DVC_STAGE": "train", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # The shell starts the stage in the background and exits: the stage is orphaned at once.
    shell = subprocess.run(["/bin/sh", "-c", f'{sys.executable} -c "{stage}" >/dev/null 2>&1 & echo $!'],
                           env=env, capture_output=True, text=True, check=True, start_new_session=True)
    pid = int(shell.stdout)
    deadline = time.monotonic() + 60
    while (info := stat(pid)) and info[0] != "Z":
        assert time.monotonic() < deadline, "the orphaned stage is still running"
        time.sleep(0.1)
    assert not said.exists()
