"""What a hostile or unlucky user meets (docs/failures.md), each with the real tools: processes,
a real DVC repo, the flows' command lines."""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from tasks.readers import available_memory

from conftest import REPO, TINY_PARAMS, copy_reproduced, dvc, init_tiny_project, run, write_params
from test_predict import scripted_model

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def prefect_api():
    """One Prefect server for the flows these tests start as processes, which then skip starting
    a temporary server each."""
    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


class Output:
    """A process's merged stdout and stderr, read as it comes, for waiting on a line."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process, self.lines = process, []
        self.reader = threading.Thread(target=lambda: self.lines.extend(process.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines if text in line]
            if found:
                return found[0]
            if self.process.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.2)
        raise AssertionError(f"no {text!r} in:\n{self.text}")

    def finish(self, timeout: float) -> tuple[int, str]:
        code = self.process.wait(timeout)
        self.reader.join(timeout)
        return code, self.text

    @property
    def text(self) -> str:
        return "".join(self.lines)


def start(args: list[str], root: Path, env: dict) -> Output:
    return Output(subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True))


def test_the_flow_retries_while_dvc_repro_holds_the_lock_then_succeeds(reproduced, tmp_path, prefect_api):
    root = tmp_path / "project"
    env = copy_reproduced(reproduced, root)
    # train stale for `dvc repro`, long enough to still hold DVC's lock when the flow starts
    long_train = {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "epochs": 200, "patience": 200}}
    write_params(root / "params.yaml", long_train)
    holder = start([sys.executable, "-m", "dvc", "repro", "train"], root, env)
    try:
        holder.wait_for("Running stage 'train'", timeout=120)
        flow = start([sys.executable, "-m", "flows.pipeline", "--no-experiment"], root,
                     env | {"PREFECT_API_URL": prefect_api})
        retry = flow.wait_for("Retry 1/3 will start", timeout=180)
        # The repository's lock (.dvc/tmp/lock), or the one on the paths its stage uses (rwlock).
        assert re.search(r"RepoBusy\(\"stage 'prepare': another dvc command holds a lock on the repository "
                         r"\(failed to reproduce 'prepare': .*(Unable to acquire lock|is busy, it is being "
                         r"blocked by: \(PID \d+\): .*repro train)", retry), retry
    finally:
        holder.process.send_signal(signal.SIGKILL)  # the lock goes with it
        holder.finish(timeout=60)
    write_params(root / "params.yaml", TINY_PARAMS)  # as the reproduced run had them: nothing to train
    try:
        code, output = flow.finish(timeout=300)
    finally:
        flow.process.kill()  # a no-op once it has exited
    assert code == 0, output
    assert "Traceback" not in output
    assert "Data and pipelines are up to date." in dvc("status", cwd=root, env=env)


def test_a_failing_sweep_point_prints_its_error_without_tracebacks(tmp_path, prefect_api):
    root = tmp_path / "project"
    env = init_tiny_project(root) | {"PREFECT_API_URL": prefect_api}
    sweep = [sys.executable, "-m", "flows.sweep", "--grid", "data.source=builtin:nope", "--max-parallel", "1"]
    done = subprocess.run(sweep, cwd=root, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "prepare: error: data.source: unknown source 'builtin:nope'" in done.stderr
    assert "sweep: error: " in done.stderr
    assert "Traceback" not in output


def test_push_to_a_missing_remote_fails_before_training_naming_it(tmp_path, prefect_api):
    root = tmp_path / "project"
    env = init_tiny_project(root) | {"PREFECT_API_URL": prefect_api}
    gone = tmp_path / "nonexistent"
    dvc("remote", "add", "-d", "gone", str(gone), cwd=root, env=env)
    push = [sys.executable, "-m", "flows.pipeline", "--push"]
    done = subprocess.run(push, cwd=root, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert f"pipeline: error: Flow run encountered an exception: PushError: --push: DVC remote 'gone' " \
           f"({gone}) is not there: no directory {gone}" in done.stderr
    assert "Traceback" not in output
    assert not (root / "dvc.lock").exists() and not (root / "data" / "prepared").exists()

    # A remote under a plain file cannot be made; --debug shows the tracebacks.
    (tmp_path / "a-file").write_text("")
    dvc("remote", "add", "-f", "-d", "gone", str(tmp_path / "a-file" / "remote"), cwd=root, env=env)
    debug = subprocess.run([*push, "--debug"], cwd=root, env=env, capture_output=True, text=True)
    assert debug.returncode == 1
    assert "DVC remote 'gone'" in debug.stderr and "Traceback" in debug.stderr


def test_make_run_refuses_a_yaml_alias_bomb_before_dvc_parses_it(tmp_path):
    root = tmp_path / "project"
    env = init_tiny_project(root)
    shutil.copy(REPO / "Makefile", root / "Makefile")
    (root / ".venv").symlink_to(Path(sys.executable).parents[1])  # `make run` runs .venv/bin's tools
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(9))
    (root / "params.yaml").write_text(bomb)
    started = time.monotonic()
    # -o setup: this venv is set up already (and not by this copy's Makefile).
    done = subprocess.run(["make", "-o", "setup", "run"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert "params: error: params.yaml: line 1: YAML anchors (&a) and aliases are not allowed" in done.stderr
    assert "tasks.params --check params.yaml" in done.stdout and "dvc repro" not in done.stdout
    assert time.monotonic() - started < 30

    flow = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=60)
    assert flow.returncode == 1
    assert flow.stderr.strip() == "pipeline: error: params.yaml: line 1: YAML anchors (&a) and aliases " \
                                  "are not allowed in params"


def test_every_count_and_size_has_an_upper_bound(tmp_path):
    huge = {
        "data": {"max_samples": 10**12, "image_size": [100_000, 100_000], "max_image_pixels": 10**12},
        "prepare": {"seed": 2**40},
        "train": {"epochs": 10**9, "patience": 10**9, "batch_size": 10**8, "model": {"widths": [10**6]}},
        "qat": {"epochs": 10**9, "ptq_calibration_batches": 10**9, "freeze_bn_epoch": 10**9,
                "freeze_observers_epoch": 10**9},
        "export": {"parity_samples": 10**9},
        "evaluate": {"latency_repeats": 10**9, "latency_batch_sizes": [10**8]},
    }
    write_params(tmp_path / "params.yaml", huge)
    done = subprocess.run([sys.executable, "-m", "tasks.params", "--check", "params.yaml"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    named = [line.split(":")[0].strip() for line in done.stderr.splitlines()[1:]]
    assert sorted(named) == sorted([
        "data.max_samples", "data.image_size.0", "data.image_size.1", "data.max_image_pixels", "prepare.seed",
        "train.epochs", "train.patience", "train.batch_size", "train.model.widths.0", "qat.epochs",
        "qat.ptq_calibration_batches", "qat.freeze_bn_epoch", "qat.freeze_observers_epoch",
        "export.parity_samples", "evaluate.latency_repeats", "evaluate.latency_batch_sizes.0"]), done.stderr
    write_params(tmp_path / "params.yaml", TINY_PARAMS)
    assert subprocess.run([sys.executable, "-m", "tasks.params", "--check", "params.yaml"], cwd=tmp_path,
                          capture_output=True, text=True).returncode == 0


def stage(name: str, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"tasks.{name}"], cwd=root, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(REPO)})


def image_folder(root: Path, classes: dict[str, int], names=lambda i: f"{i}.png") -> Path:
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("L", (2, 2), color=i * 30 % 256).save(root / name / names(i))
    return root


def test_images_that_cannot_fit_in_memory_are_refused_before_any_is_read(tmp_path):
    per_image = 3 * 8192 * 8192 * 4  # RGB float32 at the largest data.image_size
    count = available_memory() // per_image + 1
    image_folder(tmp_path / "data/raw/big", {"a": count - count // 2, "b": count // 2})
    write_params(tmp_path / "params.yaml", {"data": {"source": "data/raw/big", "image_size": [8192, 8192],
                                                     "image_mode": "rgb"}})
    started = time.monotonic()
    done = stage("prepare", tmp_path)
    assert done.returncode == 1, done.stderr
    assert f"prepare: error: data.image_size [8192, 8192]: {count:,} image(s) x 3 channel(s) x 8,192 x " \
           f"8,192 x 4 bytes (float32) = " in done.stderr
    assert "GiB of memory available" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - started < 30 and not (tmp_path / "data/prepared").exists()


def test_a_hidden_class_folder_is_named_in_a_warning(tmp_path):
    image_folder(tmp_path / "data/raw/shapes", {"round": 6, "square": 6, ".extra": 15})
    write_params(tmp_path / "params.yaml", {"data": {"source": "data/raw/shapes", "image_size": [4, 4]},
                                            "prepare": {"split": {"train": 0.5, "val": 0.25, "test": 0.25}}})
    done = stage("prepare", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "prepare: warning: data/raw/shapes/.extra is skipped, with its 15 image(s)" in done.stderr


def test_a_csv_error_quotes_a_short_prefix_of_a_long_line(tmp_path):
    header = ",".join(f"feature_{i}" for i in range(5000))
    (tmp_path / "data/raw").mkdir(parents=True)
    (tmp_path / "data/raw/wide.csv").write_text(header + "\n" + ",".join("1" * 5000) + "\n")
    write_params(tmp_path / "params.yaml", {"data": {"source": "data/raw/wide.csv"}})
    done = stage("prepare", tmp_path)
    assert done.returncode == 1
    assert "no label column 'label' (columns: feature_0, feature_1, " in done.stderr and "…)" in done.stderr
    assert len(done.stderr) < 400, done.stderr


def test_a_link_out_of_the_project_is_followed_by_dvc_as_the_warning_says(tmp_path):
    root, outside = tmp_path / "project", tmp_path / "elsewhere.npz"
    env = init_tiny_project(root, {**TINY_PARAMS, "data": {"source": "data/raw/linked.npz"}})
    rng = np.random.default_rng(0)
    np.savez(outside, x=rng.random((40, 3), np.float32), y=np.arange(40) % 2)
    (root / "data/raw/linked.npz").symlink_to(outside)
    output = dvc("repro", "prepare", cwd=root, env=env)
    assert (f"prepare: warning: data/raw/linked.npz links to {outside.resolve()}, outside the project: `dvc repro` "
            "follows the link and notices when that file changes") in output
    assert "Data and pipelines are up to date." in dvc("status", "prepare", cwd=root, env=env)
    np.savez(outside, x=rng.random((40, 3), np.float32), y=np.arange(40) % 2)
    assert "modified:" in dvc("status", "prepare", cwd=root, env=env)


def test_predicted_csv_cells_cannot_run_as_formulas(tmp_path):
    hostile = ["=cmd|calc!A0", "-2+3", "@SUM(1)"]
    model = scripted_model(tmp_path / "m.pt", [1, 2, 2], classes=3, class_names=hostile)
    files = ["=HYPERLINK(1).png", "+1.png", "\tx.png", "ok.png"]
    image_folder(tmp_path / "in", {"": len(files)}, names=lambda i: files[i])
    run(sys.executable, "-m", "tasks.predict", str(model), str(tmp_path / "in"), "--trust", "--out",
        str(tmp_path / "out.csv"), cwd=REPO)
    with open(tmp_path / "out.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header == ["id", "label", "class", "p_=cmd|calc!A0", "p_-2+3", "p_@SUM(1)"]  # start with p_
    assert sorted(row[0] for row in rows) == sorted("'" + name if name[0] in "=+\t" else name for name in files)
    for row in rows:
        assert row[2] == "'" + hostile[int(row[1])]
        assert all(0 <= float(p) <= 1 for p in row[3:])  # numbers stay numbers
