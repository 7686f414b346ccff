import json

import torch

from tasks.training.fit import load_split
from tasks.model import load_checkpoint
from tasks.quant.fx import load_int8

from conftest import REPRO_RUN_NAME


def quantized_kernels(module: torch.nn.Module) -> set[str]:
    return {type(m).__module__ for m in module.modules() if "quantized" in type(m).__module__}


def test_qat_and_ptq_convert_to_real_int8_kernels(tiny_workspace):
    workspace, params = tiny_workspace
    for name in ("qat_state.pt", "ptq_state.pt"):
        int8, backend = load_int8(workspace.qat_dir / name)
        assert backend == params.qat.backend
        assert torch.load(workspace.qat_dir / name, weights_only=True)["kind"] == name[:3]
        assert any("torch.ao.nn.quantized" in m for m in quantized_kernels(int8)), name
        conv = next(m for m in int8.modules() if type(m).__name__ == "ConvReLU2d")
        assert conv.weight().dtype == torch.qint8


def test_qat_metrics_and_history(tiny_workspace):
    workspace, params = tiny_workspace
    metrics = json.loads(workspace.metrics("qat").read_text())
    assert metrics["backend"] == "x86"
    for key in ("fp32_val_accuracy", "ptq_val_accuracy", "fake_quant_val_accuracy", "int8_val_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    # QAT starts from the trained weights: it must not forget what train learned.
    assert metrics["int8_val_accuracy"] >= metrics["fp32_val_accuracy"] - 0.1
    history = (workspace.plots("qat") / "history.csv").read_text().splitlines()
    assert len(history) == 1 + params.qat.epochs


def test_int8_model_tracks_the_fp32_model(tiny_workspace):
    workspace, _ = tiny_workspace
    fp32, _ = load_checkpoint(workspace.train_model)
    int8, _ = load_int8(workspace.qat_dir / "qat_state.pt")
    val = load_split(workspace.prepared, "val")
    with torch.no_grad():
        agreement = (fp32(val.x[:]).argmax(1) == int8(val.x[:]).argmax(1)).float().mean().item()
    assert agreement > 0.8


def test_qat_logs_to_tensorboard_like_train(tiny_workspace):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workspace, params = tiny_workspace
    events = EventAccumulator(str(workspace.root / "runs" / "qat" / REPRO_RUN_NAME))
    events.Reload()
    tags = events.Tags()
    assert {"loss/train", "loss/val", "accuracy/val", "lr"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("accuracy/val")] == list(range(1, params.qat.epochs + 1))
    assert tags["graph"] is True and "val_confusion" in tags["images"]
    assert any(t.startswith("weights/") for t in tags["histograms"])
