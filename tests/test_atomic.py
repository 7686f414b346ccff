"""All-or-nothing stage outputs (tasks/atomic.py), on plain files in a temp folder."""

import os
import subprocess
import sys

import pytest

from tasks.atomic import recover_leftovers, staged_outputs


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped), as a killed stage's would be."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_outputs_appear_together_and_replace_a_directory(tmp_path):
    folder, metrics = tmp_path / "prepared", tmp_path / "metrics.json"
    folder.mkdir()
    (folder / "stale.npz").write_text("from the last run")
    with staged_outputs() as out:
        staged = out.path(folder, directory=True)
        (staged / "train.npz").write_text("new")
        out.write_json(metrics, {"accuracy": 1.0})
        assert not metrics.exists() and (folder / "stale.npz").exists()  # nothing published yet
    assert sorted(p.name for p in folder.iterdir()) == ["train.npz"]
    assert metrics.read_text() == '{\n  "accuracy": 1.0\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "prepared"]


def test_a_failure_publishes_nothing_and_leaves_nothing(tmp_path):
    model, metrics = tmp_path / "int8.pt", tmp_path / "metrics.json"
    model.write_bytes(b"good model")
    with pytest.raises(RuntimeError, match="gate"):
        with staged_outputs() as out:
            out.write_with(model, lambda f: f.write(b"rejected model"))
            out.write_text(metrics, "{}")
            raise RuntimeError("gate failed")
    assert model.read_bytes() == b"good model" and not metrics.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.pt"]


def test_an_output_staged_but_never_written_fails_before_anything_moves(tmp_path):
    first, never = tmp_path / "a.json", tmp_path / "b.json"
    with pytest.raises(FileNotFoundError, match="b.json: staged but never written"):
        with staged_outputs() as out:
            out.write_text(first, "{}")
            out.path(never)
    assert not first.exists()


def test_leftovers_of_a_killed_run_are_cleared_or_put_back(tmp_path):
    pid = dead_pid()
    model = tmp_path / "int8.pt"
    model.write_bytes(b"good")
    (tmp_path / f".int8.pt.{pid}.staged").write_bytes(b"trunc")  # killed mid-write
    recover_leftovers(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.pt"]

    # Killed between a directory swap's two renames: the last good folder comes back.
    folder = tmp_path / "prepared"
    old = tmp_path / f".prepared.{pid}.old"
    old.mkdir()
    (old / "train.npz").write_text("good")
    recover_leftovers(folder)
    assert (folder / "train.npz").read_text() == "good" and not old.exists()


def test_a_live_process_keeps_its_staged_files(tmp_path):
    parent = os.getppid()  # alive while this test runs, and not this process
    staged = tmp_path / f".int8.pt.{parent}.staged"
    staged.write_bytes(b"in progress")
    recover_leftovers(tmp_path / "int8.pt")
    assert staged.exists()
