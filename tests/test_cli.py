"""The `python -m tasks.<stage>` entry points as dvc.yaml runs them."""

import os
import subprocess
import sys

from conftest import REPO, write_params


def run_stage(stage: str, cwd, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", f"tasks.{stage}", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_bad_params_exit_non_zero_with_one_clear_message_and_write_nothing(tmp_path):
    write_params(tmp_path / "params.yaml", {"train": {"lr": -1}, "prepare": {"sede": 1}})
    done = run_stage("prepare", tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("prepare: error: params.yaml is invalid:")
    assert "prepare.sede: unknown key" in done.stderr and "train.lr: Input should be greater than 0" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_debug_flag_shows_the_traceback(tmp_path):
    write_params(tmp_path / "params.yaml", {"data": {"source": "nowhere"}})
    done = run_stage("prepare", tmp_path, "--debug")
    assert done.returncode != 0 and "Traceback" in done.stderr and "DataError" in done.stderr


def test_missing_upstream_output_is_reported(tmp_path):
    write_params(tmp_path / "params.yaml", {})
    done = run_stage("train", tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "data/prepared/meta.json: missing; run the stages before this one" in done.stderr
