"""Shared fixtures: tiny params and a tiny workspace that the stages run in, in temp folders."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

from bench import scratch
from tasks.deprecations import TORCH_DEPRECATIONS

# No network here and no one asked for telemetry, also in subprocesses the tests start. Prefect
# state goes to a throwaway home, never the user's ~/.prefect (set before prefect is imported).
PREFECT_HOME = tempfile.mkdtemp(prefix="qatflow-prefect-")
atexit.register(shutil.rmtree, PREFECT_HOME, ignore_errors=True)
os.environ.update(
    DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1", MPLBACKEND="Agg",
    PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_HOME=PREFECT_HOME,
)

REPO = Path(__file__).resolve().parents[1]

# Small enough to run in seconds, wide enough that the int8 file is clearly smaller than fp32.
TINY_PARAMS = {
    "data": {"source": "builtin:mnist5k", "max_samples": 1000},
    "prepare": {"seed": 0, "split": {"train": 0.7, "val": 0.15, "test": 0.15}},
    "train": {"epochs": 3, "batch_size": 32, "lr": 0.01, "patience": 5, "model": {"widths": [32, 64], "dropout": 0.1}},
    "qat": {"epochs": 2, "freeze_bn_epoch": 1, "freeze_observers_epoch": 1, "ptq_calibration_batches": 4},
    "export": {"parity_samples": 40, "max_accuracy_drop": 100.0},
    "evaluate": {"latency_repeats": 3, "misclassified_shown": 9},
}
# For the tests that kill or cancel a run once it is into training and need nothing it would learn:
# a narrow model on less data gets through an epoch (and saves its first checkpoint) in a fraction
# of a second, not several, and far more epochs than any test waits for (no early stop) keep it
# training whenever the test acts.
KILLABLE_PARAMS = {
    **TINY_PARAMS,
    "data": {**TINY_PARAMS["data"], "max_samples": 300},
    "train": {**TINY_PARAMS["train"], "epochs": 200, "patience": 200,
              "model": {"widths": [8, 16], "dropout": 0.1}},
}


def pytest_configure(config: pytest.Config) -> None:
    # The same exact torch deprecation warnings the stages silence; every other warning still shows.
    for category, message in TORCH_DEPRECATIONS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")


def write_params(path: Path, params: dict) -> Path:
    """Writes a params file: the repository's params.yaml with `params` on top (the schema has no
    defaults, so a file lists every key)."""
    path.write_text(yaml.safe_dump(scratch.default_params(**params), sort_keys=False))
    return path


def params_of(changes: dict):
    """The validated Params of the repository's params.yaml with `changes` on top."""
    from tasks.params import parse_params

    return parse_params(scratch.default_params(**changes))


def schema_keys(model=None, prefix: str = "") -> set[str]:
    """Every leaf key of the params schema, dotted: train.model.family, qat.distributed.nproc, ..."""
    from tasks.params import Params, Section

    keys = set()
    for name, field in (model or Params).model_fields.items():
        inner = field.annotation
        if isinstance(inner, type) and issubclass(inner, Section):
            keys |= schema_keys(inner, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def section(name: str, **values):
    """One section of params_of, by its dotted name, with `values` changed in it:
    section("train.model", widths=[8]) is params.yaml's train.model with widths [8]."""
    *outer, last = name.split(".")
    changes: dict = {last: values}
    for key in reversed(outer):
        changes = {key: changes}
    found = params_of(changes)
    for key in name.split("."):
        found = getattr(found, key)
    return found


def run(*args: str, cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def dvc(*args: str, cwd: Path, env: dict | None = None) -> str:
    return run(sys.executable, "-m", "dvc", *args, cwd=cwd, env=env)


def project_env() -> dict:
    """The environment to run a tiny project's stages, DVC and git with."""
    return scratch.project_env("qatflow tests")


def init_tiny_project(root: Path, params: dict = TINY_PARAMS) -> dict:
    """This project's code, dvc.yaml and `params` in a fresh git + DVC repo at `root`, with one
    commit. Returns the environment to run its stages with."""
    return scratch.scratch_project(root, params, "qatflow tests")


def locked_outputs(project: Path) -> dict[str, str]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


# The TensorBoard run name of repro_project's stages (runs/<stage>/<name>), tiny_workspace's too.
REPRO_RUN_NAME = "e2e"

# Beside the reproduced project: one line per stage process, the params keys it read.
PARAMS_READ = "params_read.jsonl"

# Outputs whose bytes depend on measured time; everything else must reproduce exactly.
TIMING_OUTPUTS = {"metrics/latency.json", "plots/latency"}
STAGES = ["prepare", "train", "qat", "qat_pt2e", "export", "export_onnx", "export_executorch", "evaluate"]


@contextmanager
def dies_in_epoch(epoch: int) -> Iterator[None]:
    """Training inside raises KeyboardInterrupt in `epoch`, as a kill would, before that epoch is
    checkpointed; the block expects it."""
    import tasks.training.fit

    log_epoch = tasks.training.fit.log_epoch

    def die(writer, model, record):
        if record.epoch == epoch:
            raise KeyboardInterrupt
        log_epoch(writer, model, record)

    tasks.training.fit.log_epoch = die
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        tasks.training.fit.log_epoch = log_epoch


@pytest.fixture(scope="session")
def _repro_run(tmp_path_factory) -> tuple[Path, str, dict[str, str]]:
    """The one real `dvc repro` of the tiny project a test run makes: (its folder, which no test
    changes, dvc repro's output, the hashes of its outputs). Under pytest-xdist the first worker to
    ask makes it in the folder all workers share, and the others wait for it and reuse it."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    root, done = shared / "reproduced" / "project", shared / "reproduced.json"
    with FileLock(shared / "reproduced.lock"):
        if not done.exists():
            env = init_tiny_project(root) | {"QATFLOW_RUN_NAME": REPRO_RUN_NAME}
            # Which params keys each stage reads, for test_dvc_params (tests/params_read/).
            tracer = [str(REPO / "tests" / "params_read"), *filter(None, [env.get("PYTHONPATH")])]
            env |= {"PYTHONPATH": os.pathsep.join(tracer), "QATFLOW_PARAMS_READ": str(root.parent / PARAMS_READ)}
            first = dvc("repro", cwd=root, env=env)
            done.write_text(json.dumps({"output": first, "outputs": locked_outputs(root)}))
        made = json.loads(done.read_text())
    return root, made["output"], made["outputs"]


@pytest.fixture(scope="session")
def repro_project(_repro_run, tmp_path_factory):
    """This worker's own copy of the tiny project that one real `dvc repro` ran through: (root,
    env, dvc repro's output, the hashes of its outputs right after). test_pipeline_e2e goes on to
    change it; test_flow compares a flow run in another checkout against the hashes."""
    reproduced, first, outputs = _repro_run
    root = tmp_path_factory.mktemp("repro") / "project"
    env = copy_reproduced(reproduced, root) | {"QATFLOW_RUN_NAME": REPRO_RUN_NAME}
    return root, env, first, outputs


@pytest.fixture(scope="session")
def reproduced(_repro_run) -> Path:
    """The tiny project as `dvc repro` left it (git, DVC cache, dvc.lock, every output), shared by
    every test (and xdist worker): copy it (copy_reproduced), never change it."""
    return _repro_run[0]


def copy_reproduced(reproduced: Path, root: Path) -> dict:
    """A checkout at `root` of the reproduced tiny project, up to date as `dvc repro` left it (DVC
    hashes files, not paths); returns the environment to run it with."""
    shutil.copytree(reproduced, root, symlinks=True)
    return project_env()


@pytest.fixture(scope="session")
def tiny_workspace(reproduced, tmp_path_factory: pytest.TempPathFactory):
    """Every stage before evaluate on tiny params, for the stage tests: the outputs (and TensorBoard
    runs, named REPRO_RUN_NAME) of the session's one `dvc repro`, each stage a real `python -m
    tasks.<stage>` in its own process, copied into a plain folder (no DVC project). The stages'
    outputs repeat byte for byte (test_flow, test_faults), so this is what running them in-process
    would write; evaluate's outputs are left out, for the tests that run it."""
    from tasks.workspace import Workspace

    root = tmp_path_factory.mktemp("workspace")
    lock = yaml.safe_load((reproduced / "dvc.lock").read_text())["stages"]
    copied = [out["path"] for stage, entry in lock.items() if stage != "evaluate" for out in entry.get("outs", [])]
    for name in [*copied, "runs"]:
        source, target = reproduced / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
    return Workspace(root), params_of(TINY_PARAMS)
