"""The evaluate stage on a tiny hand-built project (a trained 3-class CNN, its TorchScript fp32 and
FX int8 exports, training histories) that needs no other stage, then on the real pipeline's
outputs (conftest's tiny_workspace)."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from tasks import figures
from tasks.atomic import write_with
from tasks.contracts import (
    ExportedMeta,
    Normalization,
    PreparedMeta,
    prepared_meta_text,
    read_prepared_meta,
)
from tasks.errors import DataError
from tasks.evaluate import evaluate
from tasks.model import build_model, model_config, save_checkpoint
from tasks.params import EvaluateParams
from tasks.quant import pt2e
from tasks.runtimes import RUNTIMES
from tasks.scores import calibration, class_scores, confusion_matrix
from tasks.variants import VARIANTS
from tasks.workspace import Workspace

from conftest import section


CLASSES = ["top-left", "top-right", "bottom"]  # where the bright patch is
SHAPE = [1, 28, 28]
PNGS = ["training_curves", "confusion_int8", "per_class_accuracy", "reliability", "misclassified"]
FAST = EvaluateParams(threads=1, latency_batch_sizes=[1, 8], latency_repeats=3, misclassified_shown=6)


def synthetic_data(n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Noisy 28x28 images whose class is a bright patch in one of three places; a few labels are
    flipped so that every model gets some wrong."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % 3
    x = rng.integers(0, 60, size=(n, *SHAPE))
    for c, (r, col) in enumerate([(4, 4), (4, 18), (18, 10)]):
        x[y == c, :, r : r + 6, col : col + 6] += 180
    y[[5, 17, 40]] = (y[[5, 17, 40]] + 1) % 3
    return x.astype(np.uint8), y.astype(np.int64)


def to_int8(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (x[:1],))
    with torch.no_grad():
        prepared(x)
    return convert_fx(prepared)


def pt2e_int8_pte(model: torch.nn.Module, x: torch.Tensor, meta: ExportedMeta) -> bytes:
    """What qat_pt2e and export_executorch make of `model`, with observers instead of training."""
    prepared = pt2e.prepare(copy.deepcopy(model), x)
    prepared.eval()
    with torch.no_grad():
        prepared(x)
    return RUNTIMES["executorch"].export(pt2e.convert(prepared, x), x, meta).payload


WRITERS = {name: (lambda m, x, meta, r=r: r.export(m, x, meta).payload) for name, r in RUNTIMES.items()}
WRITERS["executorch"] = pt2e_int8_pte


def save_export(variant: str, workspace: Workspace, model: torch.nn.Module, x: torch.Tensor,
                meta: ExportedMeta) -> None:
    """The file an exporter would write for `variant`, by its own writer for its runtime."""
    entry = VARIANTS[variant]
    writer = WRITERS[entry.runtime]
    data = writer(model, x, meta.model_copy(update={"variant": variant}))
    write_with(entry.path(workspace), lambda f: f.write(data))


def write_history(path, epochs: int, start_loss: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr"]
    for e in range(1, epochs + 1):
        loss = start_loss / e
        lines.append(f"{e},{loss:.6f},{1 - loss / 4:.6f},{loss * 1.1:.6f},{1 - loss / 3.5:.6f},0.001")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder with everything evaluate reads; returns (workspace, an untrained model, x)."""
    workspace = Workspace(tmp_path_factory.mktemp("project"))
    x_raw, y = synthetic_data()
    mean, std = x_raw.mean() / 255, x_raw.std() / 255
    x = ((x_raw / 255 - mean) / std).astype(np.float32)
    norm = Normalization(scale=255.0, mean=[float(mean)], std=[float(std)])
    workspace.prepared.mkdir(parents=True)
    np.savez(workspace.prepared / "test.npz", x=x, y=y, x_raw=x_raw)
    (workspace.prepared / "meta.json").write_text(prepared_meta_text(PreparedMeta(
        source="synthetic", layout="images", layout_reason="set by the test", class_names=CLASSES,
        input_shape=SHAPE, normalization=norm, samples={"test": len(y)})))

    torch.manual_seed(0)
    config = model_config("images", SHAPE, len(CLASSES), section("train.model", widths=[8, 16], dropout=0.0))
    untrained, model = build_model(config), build_model(config)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        optimizer.step()
    model.eval()

    write_with(workspace.train_model, lambda f: save_checkpoint(f, model, config))
    meta = ExportedMeta(variant="", class_names=CLASSES, input_shape=SHAPE, normalization=norm,
                        backend=None, torch_version=str(torch.__version__), model=config)
    int8_meta = meta.model_copy(update={"backend": "x86"})
    save_export("fp32_ts", workspace, model, xt, meta)
    save_export("fp32_pt2", workspace, model, xt, meta)
    save_export("ptq", workspace, to_int8(model, xt[:8]), xt, int8_meta)
    save_export("int8", workspace, to_int8(model, xt), xt, int8_meta)
    save_export("fp32_onnx", workspace, model, xt, meta)
    save_export("int8_onnx", workspace, to_int8(model, xt), xt, int8_meta)
    save_export("int8_pte", workspace, model, xt, meta)
    workspace.metrics("export").parent.mkdir(parents=True, exist_ok=True)
    workspace.metrics("export").write_text(json.dumps(
        {"gate": {"variant": "int8", "accuracy_drop": 0.0, "max_accuracy_drop": 0.5, "passed": True}}))
    write_history(workspace.plots("train") / "history.csv", 5, 2.0)
    write_history(workspace.plots("qat") / "history.csv", 2, 0.3)
    return workspace, to_int8(untrained.eval(), xt), xt


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_writes_sane_and_reproducible_outputs(project):
    workspace, _, x = project
    metrics = evaluate(FAST, workspace)

    saved = json.loads(workspace.metrics("evaluate").read_text())
    assert saved == metrics
    for variant in VARIANTS:
        assert set(saved[variant]) == {"accuracy", "macro_f1", "ece", "size_bytes", "sha256"}
        assert 0 <= saved[variant]["accuracy"] <= 1 and 0 <= saved[variant]["macro_f1"] <= 1
        assert saved[variant]["size_bytes"] > 0
    assert saved["fp32"]["accuracy"] > 0.8  # the fixture model did learn
    assert saved["fp32"]["accuracy"] == saved["fp32_ts"]["accuracy"] == saved["fp32_pt2"]["accuracy"]
    assert saved["size_ratio"] > 1
    assert saved["accuracy_drop"] == pytest.approx(
        100 * (saved["fp32"]["accuracy"] - saved["int8"]["accuracy"]), abs=1e-3)
    assert "gate" not in saved  # export's: a model that fails it never gets here
    for name, variant in VARIANTS.items():
        assert saved[name]["sha256"] == hashlib.sha256(variant.path(workspace).read_bytes()).hexdigest(), name

    report = json.loads((workspace.plots("latency") / "summary.json").read_text())
    assert [row["variant"] for row in report["rows"]] == [v.label for v in VARIANTS.values()]
    assert report["headline"]["int8_accuracy"] == saved["int8"]["accuracy"] and report["gate"]["passed"]
    summary = (workspace.plots("latency") / "summary.md").read_text()
    assert summary.startswith("# qatflow run") and "**Gate**" in summary
    assert all(v.label in summary for v in VARIANTS.values())

    latency = json.loads(workspace.latency.read_text())
    for variant in VARIANTS:
        for batch in ("batch_1", "batch_8"):
            timing = latency[variant][batch]
            assert 0 < timing["median_ms"] <= timing["p90_ms"]
    assert set(latency["int8_speedup_vs_fp32_ts"]) == {"batch_1", "batch_8"}
    assert latency["threads"] == 1 and latency["torch_version"] == torch.__version__

    out = workspace.plots("evaluate")
    confusion = read_csv(out / "confusion.csv")
    assert len(confusion) == len(x)
    assert {row["actual"] for row in confusion} <= set(CLASSES)
    per_class = read_csv(out / "per_class.csv")
    assert [row["class"] for row in per_class] == CLASSES
    assert sum(int(row["support"]) for row in per_class) == len(x)
    bins = read_csv(out / "calibration.csv")
    for variant in ("fp32", "int8"):
        assert sum(int(row["count"]) for row in bins if row["variant"] == variant) == len(x)

    tradeoff = workspace.plots("latency") / "tradeoff.png"
    for png in [*(out / f"{name}.png" for name in PNGS), tradeoff]:
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), png
        assert png.stat().st_size > 5000, png

    # Everything but the timings repeats byte for byte.
    stable = [workspace.metrics("evaluate"), *sorted(out.iterdir())]
    first = [p.read_bytes() for p in stable]
    evaluate(FAST, workspace)
    assert [p.name for p, data in zip(stable, first) if p.read_bytes() != data] == []


def test_evaluate_on_the_real_pipeline_outputs(tiny_workspace):
    """The same checks on what prepare -> train -> qat -> export actually produce."""
    workspace, params = tiny_workspace
    metrics = evaluate(params.evaluate, workspace)
    assert metrics["int8"]["size_bytes"] < metrics["fp32_ts"]["size_bytes"]
    assert metrics["fp32"]["accuracy"] == metrics["fp32_ts"]["accuracy"]
    export_report = json.loads(workspace.metrics("export").read_text())
    # Export gated on the same files and counts, so it saw the same drop.
    assert export_report["gate"]["accuracy_drop"] == metrics["accuracy_drop"]
    test_size = read_prepared_meta(workspace.prepared).samples["test"]
    assert len(read_csv(workspace.plots("evaluate") / "confusion.csv")) == test_size == metrics["test_samples"]
    assert sorted(p.name for p in workspace.plots("evaluate").glob("*.png")) == sorted(f"{n}.png" for n in PNGS)


def test_a_failing_evaluate_leaves_the_previous_metrics_and_plots(project, tmp_path):
    workspace, _, _ = project
    failing = Workspace(tmp_path / "failing")
    shutil.copytree(workspace.root, failing.root)
    evaluate(FAST, failing)
    outputs = [failing.metrics("evaluate"), failing.latency, failing.plots("latency") / "tradeoff.png",
               *failing.plots("evaluate").iterdir()]
    before = {path: path.read_bytes() for path in outputs}
    VARIANTS["int8"].path(failing).write_bytes(VARIANTS["int8"].path(failing).read_bytes()[:1000])  # truncated, say by a full disk

    with pytest.raises(DataError, match="int8.pt: not a model file qatflow exported"):
        evaluate(FAST, failing)

    assert {path: path.read_bytes() for path in outputs} == before
    assert sorted(failing.plots("evaluate").iterdir()) == sorted(p for p in outputs if p.parent.name == "evaluate")
    assert not [p.name for p in failing.root.rglob(".*") if p.name.endswith((".staged", ".old"))]


def test_class_scores_and_calibration_match_hand_computation():
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 1])
    matrix = confusion_matrix(y_true, y_pred, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]
    scores = class_scores(matrix)
    np.testing.assert_allclose(scores["precision"], [1, 0.5, 0])  # class 2 never predicted -> 0
    np.testing.assert_allclose(scores["recall"], [0.5, 1, 0])
    np.testing.assert_allclose(scores["f1"], [2 / 3, 2 / 3, 0])

    proba = np.array([[0.95, 0.05], [0.55, 0.45], [0.4, 0.6], [0.1, 0.9]])
    bins, ece = calibration(proba, np.array([0, 1, 1, 0]), n_bins=10)
    assert bins["bin"].tolist() == [5, 6, 9]  # empty bins are left out
    np.testing.assert_allclose(bins["confidence"], [0.55, 0.6, 0.925])
    np.testing.assert_allclose(bins["accuracy"], [0, 1, 0.5])
    assert bins["count"].tolist() == [1, 1, 2]
    assert ece == pytest.approx((0.55 + 0.4 + abs(1 - 1.85)) / 4)


def test_figures_handle_edge_cases():
    empty = figures.misclassified_figure(np.zeros((0, 1, 28, 28)), [], "none wrong", "images")
    assert isinstance(empty, Figure) and empty.texts
    fig = figures.confusion_figure(np.array([[3, 1], [0, 4]]), ["a", "b"], "title")
    assert [t.get_text() for t in fig.axes[0].texts] == ["3", "1", "0", "4"]
