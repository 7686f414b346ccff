"""Stage 5, evaluate: score every model variant on the test split, time it and draw the figures.
(The deployment gate on the int8 accuracy drop is export's: a model that fails it is never
published, so evaluate only reports the drop.)

Variants: "fp32" (the eager train-stage model), "fp32_ts" (models/fp32.pt), "ptq" (post-training
int8, models/ptq_int8.pt) and "int8" (QAT int8, models/int8.pt, the deployed one). The eager
variant's size is that of its state-dict checkpoint, the file it is loaded from. Each variant
records the sha256 of the file it measured, so every number traces to exact bytes.

metrics/evaluate.json and plots/evaluate/ hold only bytes that repeat across runs; timings go to
metrics/latency.json and plots/latency/tradeoff.png. fp32_ts is timed after `torch.jit.optimize_for_inference` (in memory only: its
output cannot be saved), because int8 must beat the best fp32, not a slow one. All outputs are
published together once everything has been measured and drawn (tasks/atomic.py).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from tasks import figures
from tasks.atomic import StagedOutputs, staged_outputs
from tasks.cli import run_stage
from tasks.deployed import load_deployed
from tasks.errors import DataError
from tasks.layout import Layout, project_layout
from tasks.model import load_checkpoint
from tasks.params import EvaluateParams, load_params
from tasks.scores import calibration, class_scores, confusion_matrix

CALIBRATION_BINS = 10
WARMUP_CALLS = 5  # TorchScript's profiling executor specializes the graph over the first calls
DPI = 110
VARIANTS = ("fp32", "fp32_ts", "ptq", "int8")
COMPARED = ("fp32", "int8")  # the pair the per-class and calibration outputs put side by side


def load_torchscript(path: Path, class_names: list[str]) -> torch.jit.ScriptModule:
    model, meta = load_deployed(path)
    if meta["class_names"] != class_names:
        raise DataError(f"{path}: class names differ from data/prepared/meta.json; re-run export")
    return model


@torch.inference_mode()
def predict_proba(model, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    return torch.softmax(logits.double(), dim=1).numpy()


@dataclass(frozen=True)
class Scored:
    """One variant's predictions on the test split and everything derived from them."""

    proba: np.ndarray
    pred: np.ndarray
    matrix: np.ndarray
    per_class: dict[str, np.ndarray]
    bins: dict[str, np.ndarray]
    ece: float

    @classmethod
    def of(cls, proba: np.ndarray, y: np.ndarray, num_classes: int) -> Scored:
        pred = proba.argmax(axis=1)
        matrix = confusion_matrix(y, pred, num_classes)
        return cls(proba, pred, matrix, class_scores(matrix), *calibration(proba, y, CALIBRATION_BINS))

    @property
    def correct(self) -> int:
        return int(np.trace(self.matrix))


def time_model(load: Callable[[], Any], x: torch.Tensor, batch_sizes: list[int],
               repeats: int) -> dict[str, dict]:
    """Median and p90 wall time of single calls, in ms, per batch size.

    `load` gives a fresh model for each batch size: TorchScript specializes its graph to the
    shapes of its first calls, and a module that ran batch 256 first stays about 2x slower at
    batch 1 however long it warms up (measured on int8.pt: 0.17 vs 0.09 ms).
    """
    result = {}
    with torch.inference_mode():
        for batch_size in batch_sizes:
            model = load()
            batch = x[torch.arange(batch_size) % len(x)]  # the test set repeated if it is smaller
            for _ in range(WARMUP_CALLS):
                model(batch)
            seconds = np.empty(repeats)
            for i in range(repeats):
                start = time.perf_counter()
                model(batch)
                seconds[i] = time.perf_counter() - start
            median, p90 = np.percentile(seconds * 1e3, [50, 90])
            result[f"batch_{batch_size}"] = {"median_ms": round(float(median), 4),
                                                 "p90_ms": round(float(p90), 4)}
    return result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_history(path: Path) -> dict[str, np.ndarray]:
    table = np.atleast_1d(np.genfromtxt(path, delimiter=",", names=True))
    return {name: table[name] for name in table.dtype.names}


def _csv(header: list[str], rows) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def _save_png(f, fig: Figure) -> None:
    # No "Software" entry: it names the matplotlib version, and byte-stable PNGs need stable bytes.
    fig.savefig(f, format="png", dpi=DPI, metadata={"Software": None})


def _png(path: Path, fig: Figure) -> None:
    with open(path, "wb") as f:
        _save_png(f, fig)


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def evaluate(params: EvaluateParams, layout: Layout) -> dict:
    layout.require(layout.prepared / "meta.json", layout.train_model, layout.fp32_ts,
                   layout.ptq_ts, layout.int8_ts)
    torch.set_num_threads(params.threads)
    meta = json.loads((layout.prepared / "meta.json").read_text())
    names = meta["class_names"]
    with np.load(layout.prepared / "test.npz", allow_pickle=False) as test:
        x, y, x_raw = torch.from_numpy(test["x"]), test["y"], test["x_raw"]
    n = len(y)

    files = dict(zip(VARIANTS, (layout.train_model, layout.fp32_ts, layout.ptq_ts, layout.int8_ts)))
    metrics: dict = {"test_samples": n}
    latency: dict = {"threads": params.threads, "repeats": params.latency_repeats,
                     "torch_version": torch.__version__, "cpu": cpu_name()}
    scored: dict[str, Scored] = {}
    loaders = {
        "fp32": lambda: load_checkpoint(files["fp32"])[0],
        "fp32_ts": lambda: load_torchscript(files["fp32_ts"], names),
        "ptq": lambda: load_torchscript(files["ptq"], names),
        "int8": lambda: load_torchscript(files["int8"], names),
    }
    for name, load in loaders.items():
        scored[name] = s = Scored.of(predict_proba(load(), x), y, len(names))
        metrics[name] = {"accuracy": round(s.correct / n, 6),
                         "macro_f1": round(float(s.per_class["f1"].mean()), 6),
                         "ece": round(s.ece, 6), "size_bytes": files[name].stat().st_size,
                         "sha256": sha256(files[name])}
        if name == "fp32_ts":  # the best fp32 is what int8 must beat
            latency[name] = time_model(lambda: torch.jit.optimize_for_inference(load()), x,
                                       params.latency_batch_sizes, params.latency_repeats)
        else:
            latency[name] = time_model(load, x, params.latency_batch_sizes, params.latency_repeats)

    # From counts, as export's gate computes it: the same files give the same drop.
    metrics |= {
        "size_ratio": round(metrics["fp32_ts"]["size_bytes"] / metrics["int8"]["size_bytes"], 3),
        "accuracy_drop": round(100 * (scored["fp32"].correct - scored["int8"].correct) / n, 4),
        "ptq_accuracy_drop": round(100 * (scored["fp32"].correct - scored["ptq"].correct) / n, 4),
    }
    latency["int8_speedup_vs_fp32_ts"] = {
        key: round(latency["fp32_ts"][key]["median_ms"] / latency["int8"][key]["median_ms"], 3)
        for key in latency["int8"]
    }
    with staged_outputs() as out:
        out.write_json(layout.metrics("evaluate"), metrics)
        out.write_json(layout.latency, latency)
        plots = out.path(layout.plots("evaluate"), directory=True)
        write_tables(plots, names, y, scored)
        write_figures(out, plots, params, layout, meta, x.numpy(), y, x_raw, scored, metrics, latency)
    print_summary(metrics, latency)
    return metrics


def write_tables(out: Path, names: list[str], y: np.ndarray, scored: dict[str, Scored]) -> None:
    """The CSVs behind DVC's plots: int8 confusion pairs, per-class scores, calibration bins."""
    labels = np.array(names)
    (out / "confusion.csv").write_text(_csv(["actual", "predicted"],
                                           zip(labels[y], labels[scored["int8"].pred])))
    columns = [(v, s) for v in COMPARED for s in ("precision", "recall")]
    support = np.bincount(y, minlength=len(names))
    (out / "per_class.csv").write_text(_csv(
        ["class", "support", *(f"{v}_{s}" for v, s in columns)],
        ([c, int(support[i]), *(round(float(scored[v].per_class[s][i]), 6) for v, s in columns)]
         for i, c in enumerate(names)),
    ))
    fields = ("bin", "confidence", "accuracy", "count")
    (out / "calibration.csv").write_text(_csv(
        ["variant", *fields],
        ([v, int(b), round(float(conf), 6), round(float(acc), 6), int(count)]
         for v in COMPARED for b, conf, acc, count in zip(*(scored[v].bins[f] for f in fields))),
    ))


def write_figures(staged: StagedOutputs, out: Path, params, layout, meta, x, y, x_raw, scored,
                  metrics, latency) -> None:
    """The PNGs: the byte-stable ones into `out` (staged plots/evaluate), the timing one beside."""
    names = meta["class_names"]
    int8 = scored["int8"]
    history = [read_history(layout.plots(stage) / "history.csv") for stage in ("train", "qat")]
    _png(out / "training_curves.png", figures.training_curves_figure(*history))
    _png(out / "confusion_int8.png", figures.confusion_figure(
        int8.matrix, names, "int8 (QAT) confusion matrix, test set"))
    _png(out / "per_class_accuracy.png",
         figures.per_class_figure(names, {v: scored[v].per_class["recall"] for v in COMPARED}))
    batch = min(params.latency_batch_sizes)
    points = [{"name": v, "accuracy": metrics[v]["accuracy"], "size_bytes": metrics[v]["size_bytes"],
               "latency_ms": latency[v][f"batch_{batch}"]["median_ms"]} for v in scored]
    # Drawn from timings, so it changes every run: kept out of the byte-stable plots/evaluate.
    staged.write_with(layout.plots("latency") / "tradeoff.png",
                      lambda f: _save_png(f, figures.tradeoff_figure(points, batch)))
    _png(out / "reliability.png", figures.reliability_figure(
        {v: scored[v].bins for v in COMPARED}, {v: scored[v].ece for v in COMPARED},
        CALIBRATION_BINS))

    # Most confident mistakes first: those are the ones a deployment would trust.
    confidence = int8.proba.max(axis=1)
    wrong = np.flatnonzero(int8.pred != y)
    shown = wrong[np.argsort(-confidence[wrong], kind="stable")][: params.misclassified_shown]
    if meta["layout"] == "images":  # as the camera saw them
        samples = np.clip(x_raw[shown].astype(np.float32) / meta["normalization"]["scale"], 0, 1)
    else:  # standardized: features on one scale, comparable across panels
        samples = x[shown]
    titles = [f"{names[y[i]]}→{names[int8.pred[i]]} (p={confidence[i]:.2f})" for i in shown]
    _png(out / "misclassified.png", figures.misclassified_figure(
        samples, titles, f"int8 misclassifications, most confident first ({len(shown)} of {len(wrong)})",
        meta["layout"]))


def print_summary(metrics: dict, latency: dict) -> None:
    keys = list(latency["int8"])
    table = Table(title="evaluate: test set")
    for column in ["variant", "accuracy", "macro-F1", "ECE", "size", *(f"{k} ms" for k in keys)]:
        table.add_column(column, justify="left" if column == "variant" else "right")
    for v in VARIANTS:
        m = metrics[v]
        table.add_row(v, f"{m['accuracy']:.2%}", f"{m['macro_f1']:.4f}", f"{m['ece']:.4f}",
                      f"{m['size_bytes'] / 1024:.0f} KiB",
                      *(f"{latency[v][k]['median_ms']:.3f}" for k in keys))
    console = Console()
    console.print(table)
    speedup = ", ".join(f"{k} {s:g}x" for k, s in latency["int8_speedup_vs_fp32_ts"].items())
    console.print(
        f"int8 vs fp32: drop {metrics['accuracy_drop']:g} pp; {metrics['size_ratio']:g}x smaller; "
        f"speedup vs optimized fp32_ts: {speedup}"
    )


def main(args) -> None:
    """Score, time and plot every model variant."""
    evaluate(load_params(args.params).evaluate, project_layout())


if __name__ == "__main__":
    run_stage("evaluate", main)
