"""The MLP and 1-D CNN families through every stage after prepare (train, both QAT engines, the TorchScript,
ONNX and ExecuTorch exports, evaluate), in-process, on a tiny easy dataset written straight in the
prepared format (prepare is tested on its own): it must learn, convert to real int8 kernels, pass
every exporter's parity check and get evaluate's figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.contracts import Normalization, PreparedMeta, prepared_meta_text
from tasks.evaluate import evaluate
from tasks.export import export
from tasks.export_executorch import export_executorch
from tasks.export_onnx import export_onnx
from tasks.qat import qat
from tasks.qat_pt2e import qat_pt2e
from tasks.quant import pt2e
from tasks.train import train
from tasks.variants import VARIANTS
from tasks.workspace import Workspace

from conftest import params_of

CLASSES = ["a", "b", "c"]
N = 240  # 70/15/15: 168 train, 36 val, 36 test


def vectors(rng: np.random.Generator, y: np.ndarray) -> np.ndarray:
    """Three well-separated Gaussian clusters in 10 dimensions."""
    centres = rng.normal(0, 3, size=(len(CLASSES), 10))
    return centres[y] + rng.normal(size=(len(y), 10))


def sequences(rng: np.random.Generator, y: np.ndarray) -> np.ndarray:
    """Two-channel signals: a sine whose frequency is the class, at a random phase, with noise."""
    t = np.arange(32)
    phase = rng.uniform(0, 2 * np.pi, size=(len(y), 1, 1))
    wave = np.sin(2 * np.pi * (1 + 2 * y)[:, None, None] * t / 32 + phase)
    return wave * np.array([1.0, -0.5])[:, None] + 0.3 * rng.normal(size=(len(y), 2, 32))


def images(rng: np.random.Generator, y: np.ndarray) -> np.ndarray:
    """8x8 noise with a bright 3x3 patch in one of three corners; uint8 like real pictures."""
    x = rng.integers(0, 60, size=(len(y), 1, 8, 8))
    for c, (r, col) in enumerate([(0, 0), (0, 5), (5, 2)]):
        x[y == c, :, r : r + 3, col : col + 3] += 180
    return x.astype(np.uint8)


def write_prepared(root, layout: str, x_raw: np.ndarray, y: np.ndarray) -> None:
    """data/prepared as prepare writes it: standardized per feature/channel, x_raw kept for test."""
    scale = 255.0 if x_raw.dtype == np.uint8 else 1.0
    axes = tuple(i for i in range(x_raw.ndim) if i != 1)
    x = x_raw / scale
    mean, std = x.mean(axis=axes), x.std(axis=axes)
    broadcast = (1, -1) + (1,) * (x.ndim - 2)
    x = ((x - mean.reshape(broadcast)) / std.reshape(broadcast)).astype(np.float32)
    bounds = {"train": (0, 168), "val": (168, 204), "test": (204, N)}
    prepared = Workspace(root).prepared
    prepared.mkdir(parents=True)
    for split, (lo, hi) in bounds.items():
        extra = {"x_raw": x_raw[lo:hi]} if split == "test" else {}
        np.savez(prepared / f"{split}.npz", x=x[lo:hi], y=y[lo:hi].astype(np.int64), **extra)
    (prepared / "meta.json").write_text(prepared_meta_text(PreparedMeta(
        source="synthetic", layout=layout, layout_reason="set by the test", class_names=CLASSES,
        input_shape=list(x.shape[1:]),
        normalization=Normalization(scale=scale, mean=mean.tolist(), std=std.tolist()),
        samples={split: hi - lo for split, (lo, hi) in bounds.items()},
    )))


def tiny_params(family: str, widths: list[int] | None):
    return params_of({
        "train": {"epochs": 8, "batch_size": 16, "lr": 0.01, "augment_shift": 1,
                  "model": {"family": family, "widths": widths}},
        "qat": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "freeze_bn_epoch": 1,
                "freeze_observers_epoch": 1, "ptq_calibration_batches": 4},
        # The gate is not under test here (36 test samples: one mistake is 2.8 pp).
        "export": {"parity_samples": 36, "max_accuracy_drop": 100.0},
        "evaluate": {"threads": 1, "latency_batch_sizes": [1], "latency_repeats": 3,
                     "misclassified_shown": 6},
    })


# The families the session's tiny `dvc repro` (images, cnn2d) does not take through every stage;
# tests/test_model.py converts every family, overrides included, to int8 kernels. A narrow CNN
# keeps this quick; the MLP keeps its default widths, as narrower ones would make its int8 file no
# smaller than fp32 (the fixed per-file overhead outweighs the weights).
@pytest.mark.parametrize("layout, make, family, widths, expected, kernel", [
    ("vectors", vectors, "auto", None, "mlp", "quantized::linear_relu"),
    ("sequences", sequences, "auto", [16, 32], "cnn1d", "quantized::conv1d_relu"),
])
def test_family_runs_the_whole_pipeline(tmp_path, monkeypatch, layout, make, family, widths,
                                        expected, kernel):
    monkeypatch.setenv("QATFLOW_RUN_NAME", "families")
    rng = np.random.default_rng(0)
    y = rng.permutation(np.arange(N) % len(CLASSES))
    write_prepared(tmp_path, layout, make(rng, y), y)
    project, params = Workspace(tmp_path), tiny_params(family, widths)

    train(params.train, project)
    qat(params.qat, project)
    pt2e_metrics = qat_pt2e(params.qat, project)
    report = export(params.export, project)
    onnx_report = export_onnx(params.export, project)
    executorch_report = export_executorch(params.export, project)
    metrics = evaluate(params.evaluate, project)

    assert torch.load(project.train_model, weights_only=True)["config"]["net"] == f"tasks.model:{expected}"
    for stage_report in (report, onnx_report, executorch_report):  # TorchScript, ONNX Runtime, ExecuTorch
        assert all(check.passed for check in stage_report.files.values()), stage_report  # in a fresh interpreter
    assert pt2e_metrics["int8_val_accuracy"] >= 0.9, pt2e_metrics
    assert metrics["fp32"]["accuracy"] >= 0.9 and metrics["int8"]["accuracy"] >= 0.9, metrics
    assert metrics["int8_pte"]["accuracy"] >= 0.9, metrics
    # BatchNorm folded away whole: no in-place update of its state left for ExecuTorch to keep.
    program = pt2e.load_program(project.qat_pt2e_dir / "int8.pt2")
    assert not program.graph_signature.buffers_to_mutate
    assert not [n for n in program.graph.nodes if n.target == torch.ops.aten.add_.Tensor]
    assert metrics["int8"]["size_bytes"] < metrics["fp32_ts"]["size_bytes"]
    torch.backends.quantized.engine = params.qat.backend
    kinds = {node.kind() for node in torch.jit.load(VARIANTS["int8"].path(project)).graph.nodes()}
    assert {kernel, "quantized::linear"} <= kinds
    pngs = {p.name for p in project.plots("evaluate").glob("*.png")}
    assert {"misclassified.png", "confusion_int8.png", "training_curves.png"} <= pngs
