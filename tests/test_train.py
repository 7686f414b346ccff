import json

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tasks.training.fit import history_csv, load_split
from tasks.model import load_checkpoint
from tasks.train import train
from tasks.workspace import Workspace

from conftest import REPRO_RUN_NAME, TINY_PARAMS, params_of


def test_train_writes_checkpoint_history_and_metrics(tiny_workspace):
    workspace, params = tiny_workspace
    model, config = load_checkpoint(workspace.train_model)
    assert config.kwargs["widths"] == [32, 64] and config.num_classes == 10
    metrics = json.loads(workspace.metrics("train").read_text())
    assert metrics["epochs_run"] == params.train.epochs
    assert 0.5 < metrics["val_accuracy"] <= 1.0  # three epochs on 700 images already learn digits
    history = (workspace.plots("train") / "history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr"
    assert len(history) == 1 + params.train.epochs
    val = load_split(workspace.prepared, "val")
    with torch.no_grad():
        accuracy = (model(val.x[:]).argmax(1) == val.y).float().mean().item()
    assert round(accuracy, 6) == metrics["val_accuracy"]


def test_tensorboard_run_has_scalars_histograms_graph_figure_and_hparams(tiny_workspace):
    workspace, params = tiny_workspace
    events = EventAccumulator(str(workspace.root / "runs" / "train" / REPRO_RUN_NAME), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("loss/train_step", "loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr"):
        assert tag in tags["scalars"], tag
    steps_per_epoch = -(-700 // params.train.batch_size)
    assert len(events.Scalars("loss/train_step")) == params.train.epochs * steps_per_epoch
    assert [e.step for e in events.Scalars("accuracy/val")] == [1, 2, 3]
    assert any(t.startswith("weights/") for t in tags["histograms"])
    assert any(t.startswith("grads/") for t in tags["histograms"])
    assert tags["graph"] is True
    assert "val_confusion" in tags["images"]
    assert "hparams" in events.PluginTagToContent("hparams") or events.PluginTagToContent("hparams")


def test_training_is_bitwise_reproducible(tiny_workspace, tmp_path, monkeypatch):
    workspace, params = tiny_workspace
    monkeypatch.setenv("QATFLOW_RUN_NAME", "again")
    again = Workspace(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepared").symlink_to(workspace.prepared)
    train(params.train, again)
    assert again.train_model.read_bytes() == workspace.train_model.read_bytes()
    assert again.metrics("train").read_bytes() == workspace.metrics("train").read_bytes()


def test_early_stopping_stops_after_patience(tmp_path, tiny_workspace):
    workspace, _ = tiny_workspace
    raw = {**TINY_PARAMS["train"], "epochs": 6, "patience": 1, "lr": 1e-9, "scheduler": "constant"}
    params = params_of({"train": raw}).train
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepared").symlink_to(workspace.prepared)
    metrics = train(params, Workspace(tmp_path))
    # With a learning rate of 1e-9 nothing improves after the first epoch.
    assert metrics["epochs_run"] < 6 and metrics["best_epoch"] == metrics["epochs_run"] - 1


def test_history_csv_is_plain_and_stable():
    from tasks.checkpoint import EpochRecord

    text = history_csv([EpochRecord(1, 0.123456789, 0.5, 0.25, 0.75, 0.001)])
    assert text == "epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr\n1,0.123457,0.5,0.25,0.75,0.001\n"
