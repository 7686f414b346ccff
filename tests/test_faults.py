"""Faults: a killed training run resumes to the same weights, and a stage that fails (a failed gate,
an exception, a kill) publishes nothing, so the last good models and metrics stay in place."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from tasks.checkpoint import Checkpointing, TrainingState, fingerprint, resume
from tasks.prepare import prepare
from tasks.qat import qat
from tasks.train import train
from tasks.workspace import Workspace

from conftest import REPO, TINY_PARAMS, dies_in_epoch, params_of, write_params

TRAIN_OUTPUTS = ["models/train/fp32_state.pt", "metrics/train.json", "plots/train/history.csv"]
EXPORT_OUTPUTS = ["models/fp32.pt", "models/fp32.pt2", "models/int8.pt", "models/ptq_int8.pt",
                  "metrics/export.json"]


def project_from(workspace: Workspace, root: Path, params: dict, *copied: str) -> Workspace:
    """A project at `root` with the workspace's prepared data, `copied` outputs and `params`."""
    for name in ("data/prepared", *copied):
        source, target = workspace.root / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
    write_params(root / "params.yaml", params)
    return Workspace(root)


def start_stage(name: str, root: Path) -> subprocess.Popen:
    env = {**os.environ, "QATFLOW_RUN_NAME": "faults"}
    return subprocess.Popen([sys.executable, "-m", f"tasks.{name}"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob(".*") if p.name.endswith((".staged", ".old"))]


def test_killed_training_resumes_to_the_uninterrupted_weights(tiny_workspace, tmp_path, capsys):
    workspace, _ = tiny_workspace
    project = project_from(workspace, tmp_path, TINY_PARAMS)
    previous = {name: f"previous run's {name}".encode() for name in TRAIN_OUTPUTS}
    for name, data in previous.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)

    running = start_stage("train", tmp_path)
    while not project.train_checkpoint.exists():
        assert running.poll() is None, running.communicate()
        time.sleep(0.02)
    running.send_signal(signal.SIGKILL)
    running.wait()

    # Killed mid-training: the previous outputs are untouched, and the checkpoint holds only data.
    assert {name: (tmp_path / name).read_bytes() for name in previous} == previous
    saved = torch.load(project.train_checkpoint, weights_only=True)
    epochs_done = len(saved["history"])
    assert 1 <= epochs_done < TINY_PARAMS["train"]["epochs"]
    kept = tmp_path / "kept-checkpoint.pt"
    shutil.copy2(project.train_checkpoint, kept)

    resumed = start_stage("train", tmp_path)
    stdout, stderr = resumed.communicate()
    assert resumed.returncode == 0, stderr
    assert f"train: resuming from checkpoint.pt after epoch {epochs_done}" in stdout
    for name in TRAIN_OUTPUTS:  # tiny_workspace trained the same params, uninterrupted
        assert (tmp_path / name).read_bytes() == (workspace.root / name).read_bytes(), name
    assert not project.train_checkpoint.exists() and not leftovers(tmp_path)

    # Other params: the checkpoint is not resumed, and the run says why.
    shutil.copy2(kept, project.train_checkpoint)
    changed = params_of({"train": {**TINY_PARAMS["train"], "epochs": 1}}).train
    assert train(changed, project)["epochs_run"] == 1
    assert ("train: ignoring checkpoint.pt: made with other train params; starting over"
            in capsys.readouterr().out)
    assert not project.train_checkpoint.exists()


def test_checkpoint_fingerprint_names_what_changed(tiny_workspace, tmp_path):
    workspace, params = tiny_workspace
    project = project_from(workspace, tmp_path, TINY_PARAMS)
    before = fingerprint("train", params.train, project.root)
    # Every dep dvc.yaml declares for the stage, and nothing else, is in it: one list of what
    # the stage reads.
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["deps"]
    assert list(before) == ["train params", *deps, "torch version"]
    with open(project.prepared / "val.npz", "ab") as f:
        f.write(b"\0")
    lr = params.train.model_copy(update={"lr": 0.02})
    after = fingerprint("train", lr, project.root)
    assert [k for k in before if before[k] != after[k]] == ["train params", "data/prepared"]
    assert before == fingerprint("train", params.train, workspace.root)


def test_an_unreadable_checkpoint_is_ignored_saying_so(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    training = TrainingState(model, optimizer, None, torch.Generator())
    assert resume(Checkpointing(path, {}), "train", training) is None
    out = capsys.readouterr().out
    assert out.startswith("train: ignoring checkpoint.pt: unreadable (") and out.count("\n") == 1


def test_qat_resumes_replaying_its_freeze_schedule(tiny_workspace, tmp_path):
    """BatchNorm frozen in epoch 0 is module state outside the state_dict: a run resumed after
    epoch 1 must freeze it again to end with the weights of an uninterrupted run."""
    workspace, _ = tiny_workspace
    # Less data than tiny_workspace's (the fp32 model is its): what is compared is two runs'
    # bytes, not what they learn, and QAT's time goes with the samples.
    raw = {**TINY_PARAMS, "data": {**TINY_PARAMS["data"], "max_samples": 300},
           "qat": {**TINY_PARAMS["qat"], "freeze_bn_epoch": 0}}
    params = params_of(raw)
    outputs = ["models/qat/qat_state.pt", "models/qat/ptq_state.pt", "metrics/qat.json",
               "plots/qat/history.csv"]
    whole = project_from(workspace, tmp_path / "whole", raw, "models/train/fp32_state.pt")
    shutil.rmtree(whole.prepared)
    prepare(params.data, params.prepare, whole)
    qat(params.qat, whole)

    killed = project_from(whole, tmp_path / "killed", raw, "models/train/fp32_state.pt")
    with dies_in_epoch(2):
        qat(params.qat, killed)
    assert not (killed.root / "models/qat").exists() and killed.qat_checkpoint.exists()
    qat(params.qat, killed)
    for name in outputs:
        assert (killed.root / name).read_bytes() == (whole.root / name).read_bytes(), name
    assert not killed.qat_checkpoint.exists() and not leftovers(killed.root)


def test_failed_gate_exits_1_and_publishes_nothing(tiny_workspace, tmp_path):
    workspace, _ = tiny_workspace
    raw = {**TINY_PARAMS, "export": {**TINY_PARAMS["export"], "max_accuracy_drop": 0.0}}
    project = project_from(workspace, tmp_path, raw, "models", "metrics")
    # An int8 model that ranks every class backwards: it still matches its own export exactly
    # (the parity check passes), but loses most of fp32's accuracy.
    qat_state = project.qat_dir / "qat_state.pt"
    saved = torch.load(qat_state, weights_only=True)
    for key in ("classifier.weight", "classifier.bias"):
        saved["state_dict"][key] = -saved["state_dict"][key]
    torch.save(saved, qat_state)
    before = {p: p.read_bytes() for p in sorted((tmp_path / "models").rglob("*"))
              + sorted((tmp_path / "metrics").rglob("*")) if p.is_file()}
    assert {str(p.relative_to(tmp_path)) for p in before} >= set(EXPORT_OUTPUTS)

    done = start_stage("export", tmp_path)
    stdout, stderr = done.communicate()
    assert done.returncode == 1, stdout + stderr
    message = stderr.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("export: error: int8 (models/int8.pt) test accuracy is "), stderr
    assert "over export.max_accuracy_drop = 0 pp; previous models and metrics left in place" in message[0]
    assert {p: p.read_bytes() for p in before} == before and not leftovers(tmp_path)
