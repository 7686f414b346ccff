"""Stage 5, evaluate: score every model variant (tasks/variants.py) on the test split, time it,
draw the figures and write the run's report. (The deployment gate on the int8 accuracy drop is
export's: a model that fails it is never published, so evaluate only reports the drop.)

Each variant records the sha256 of the file it measured, so every number traces to exact bytes;
the eager variant's file is its state-dict checkpoint. Accuracy is measured on each file as loaded;
latency after what a deployment does next (Variant.optimize: fp32 TorchScript through
`torch.jit.optimize_for_inference`, in memory only), because int8 must beat the best fp32.

metrics/evaluate.json and plots/evaluate/ hold only bytes that repeat across runs; timings go to
metrics/latency.json, plots/latency/tradeoff.png and the report (plots/latency/summary.md, the
Prefect flow's summary artifact, and summary.json, its table). All outputs are published together
once everything has been measured and drawn (tasks/atomic.py).
"""

from __future__ import annotations

if __name__ == "__main__":  # a serving process: OpenMP reads its wait policy once, as torch loads it
    from tasks.serving import use_serving_wait_policy

    use_serving_wait_policy()

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from tasks import figures
from tasks.atomic import StagedOutputs, staged_outputs
from tasks.cli import run_stage
from tasks.contracts import (
    ExportReport,
    Gate,
    LatencyReport,
    PreparedMeta,
    RunSummary,
    read_prepared_meta,
    read_report,
    read_test_split,
    report_dict,
)
from tasks.csvsafe import safe_cell
from tasks.environment import cpu_name
from tasks.inference import predict_logits, probabilities, time_calls
from tasks.params import EvaluateParams, load_params
from tasks.scores import calibration, class_scores, confusion_matrix
from tasks.variants import BASELINE, DEPLOYED, REFERENCE, VARIANTS
from tasks.serving import serving_threads
from tasks.workspace import Workspace, project_workspace

CALIBRATION_BINS = 10
DPI = 110
COMPARED = (REFERENCE, DEPLOYED)  # the pair the per-class and calibration outputs put side by side


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


def evaluate(params: EvaluateParams, workspace: Workspace) -> dict:
    workspace.require(*(v.path(workspace) for v in VARIANTS.values()))
    torch.set_num_threads(params.threads)
    meta = read_prepared_meta(workspace.prepared)
    names = meta.class_names
    test = read_test_split(workspace.prepared)
    x, y, x_raw = test.x, test.y.numpy(), test.x_raw
    n = len(y)

    metrics: dict = {"test_samples": n}
    latency: dict = {"threads": params.threads, "repeats": params.latency_repeats,
                     "torch_version": torch.__version__, "cpu": cpu_name(),
                     "threads_per_batch": {f"batch_{b}": serving_threads(b, params.threads)
                                           for b in params.latency_batch_sizes}}
    scored: dict[str, Scored] = {}
    for name, variant in VARIANTS.items():
        path = variant.path(workspace)
        scored[name] = s = Scored.of(probabilities(predict_logits(variant.load(workspace, names), x)),
                                     y, len(names))
        metrics[name] = {"accuracy": round(s.correct / n, 6),
                         "macro_f1": round(float(s.per_class["f1"].mean()), 6),
                         "ece": round(s.ece, 6), "size_bytes": path.stat().st_size,
                         "sha256": sha256(path)}
        latency[name] = time_calls(lambda v=variant: v.load_for_serving(workspace, names), x,
                                   params.latency_batch_sizes, params.latency_repeats,
                                   threads=lambda b: serving_threads(b, params.threads))

    # From counts, as export's gate computes it: the same files give the same drop.
    metrics |= {
        "size_ratio": round(metrics[BASELINE]["size_bytes"] / metrics[DEPLOYED]["size_bytes"], 3),
        "accuracy_drop": round(100 * (scored[REFERENCE].correct - scored[DEPLOYED].correct) / n, 4),
        "ptq_accuracy_drop": round(100 * (scored[REFERENCE].correct - scored["ptq"].correct) / n, 4),
    }
    latency["int8_speedup_vs_fp32_ts"] = {
        key: round(latency[BASELINE][key]["median_ms"] / latency[DEPLOYED][key]["median_ms"], 3)
        for key in latency[DEPLOYED]
    }
    gate = read_report(ExportReport, workspace.metrics("export")).gate
    typed_latency = LatencyReport.model_validate(latency)  # what the sweep and the docs read back
    with staged_outputs() as out:
        out.write_json(workspace.metrics("evaluate"), metrics)
        out.write_json(workspace.latency, report_dict(typed_latency))
        plots = out.path(workspace.plots("evaluate"), directory=True)
        write_tables(plots, names, y, scored)
        write_figures(out, plots, params, workspace, meta, x.numpy(), y, x_raw, scored, metrics, latency)
        rows = report_rows(metrics, latency)
        out.write_json(workspace.plots("latency") / "summary.json", report_dict(RunSummary(
            gate=gate, rows=rows,
            headline={"int8_accuracy": metrics[DEPLOYED]["accuracy"],
                      "fp32_accuracy": metrics[REFERENCE]["accuracy"],
                      "size_ratio": metrics["size_ratio"]},
        )))
        out.write_text(workspace.plots("latency") / "summary.md", report_markdown(rows, gate, metrics, latency))
    print_summary(metrics, latency)
    return metrics


def report_rows(metrics: dict, latency: dict) -> list[dict]:
    """One row per variant: the table the flow publishes and the report shows."""
    rows = []
    for name, variant in VARIANTS.items():
        row = {"variant": variant.label, "runtime": variant.runtime, "file": variant.file,
               "accuracy": metrics[name]["accuracy"], "macro_f1": metrics[name]["macro_f1"],
               "size_bytes": metrics[name]["size_bytes"]}
        row |= {f"{batch}_median_ms": t["median_ms"] for batch, t in latency[name].items()}
        rows.append(row)
    return rows


def report_markdown(rows: list[dict], gate: Gate, metrics: dict, latency: dict) -> str:
    batches = list(latency[DEPLOYED])
    speedups = ", ".join(f"{b.replace('_', ' ')}: {s:g}x" for b, s in latency["int8_speedup_vs_fp32_ts"].items())
    lines = [
        "# qatflow run",
        "",
        f"**Gate** (export): passed (int8 drop {gate.accuracy_drop:g} pp, limit "
        f"{gate.max_accuracy_drop:g} pp). **int8 vs fp32**: {metrics['size_ratio']:g}x smaller; "
        f"faster than optimized fp32 TorchScript at {speedups}. CPU: {latency['cpu']}, "
        f"{latency['threads']} threads.",
        "",
        "| variant | runtime | accuracy | size | " + " | ".join(f"{b.replace('_', ' ')} median" for b in batches) + " |",
        "|---|---|---|---|" + "---|" * len(batches),
    ]
    for row in rows:
        times = " | ".join(f"{row[f'{b}_median_ms']:.3f} ms" for b in batches)
        lines.append(f"| {row['variant']} (`{row['file']}`) | {row['runtime']} | {row['accuracy']:.2%} "
                     f"| {row['size_bytes'] / 1024:,.0f} KiB | {times} |")
    lines += ["", "**Plots**: `plots/evaluate/`, `plots/latency/tradeoff.png` (`dvc plots show`)"]
    return "\n".join(lines) + "\n"


def write_tables(out: Path, names: list[str], y: np.ndarray, scored: dict[str, Scored]) -> None:
    """The CSVs behind DVC's plots: int8 confusion pairs, per-class scores, calibration bins."""
    labels = np.array([safe_cell(name) for name in names])
    (out / "confusion.csv").write_text(_csv(["actual", "predicted"],
                                           zip(labels[y], labels[scored[DEPLOYED].pred])))
    columns = [(v, s) for v in COMPARED for s in ("precision", "recall")]
    support = np.bincount(y, minlength=len(names))
    (out / "per_class.csv").write_text(_csv(
        ["class", "support", *(f"{v}_{s}" for v, s in columns)],
        ([c, int(support[i]), *(round(float(scored[v].per_class[s][i]), 6) for v, s in columns)]
         for i, c in enumerate(labels)),
    ))
    fields = ("bin", "confidence", "accuracy", "count")
    (out / "calibration.csv").write_text(_csv(
        ["variant", *fields],
        ([v, int(b), round(float(conf), 6), round(float(acc), 6), int(count)]
         for v in COMPARED for b, conf, acc, count in zip(*(scored[v].bins[f] for f in fields))),
    ))


def write_figures(staged: StagedOutputs, out: Path, params: EvaluateParams, workspace: Workspace,
                  meta: PreparedMeta, x, y, x_raw, scored, metrics, latency) -> None:
    """The PNGs: the byte-stable ones into `out` (staged plots/evaluate), the timing one beside."""
    names = meta.class_names
    int8 = scored[DEPLOYED]
    history = [read_history(workspace.plots(stage) / "history.csv") for stage in ("train", "qat")]
    _png(out / "training_curves.png", figures.training_curves_figure(*history))
    _png(out / "confusion_int8.png", figures.confusion_figure(
        int8.matrix, names, "int8 (QAT) confusion matrix, test set"))
    _png(out / "per_class_accuracy.png",
         figures.per_class_figure(names, {v: scored[v].per_class["recall"] for v in COMPARED}))
    batch = min(params.latency_batch_sizes)
    points = [{"name": v, "accuracy": metrics[v]["accuracy"], "size_bytes": metrics[v]["size_bytes"],
               "latency_ms": latency[v][f"batch_{batch}"]["median_ms"]} for v in scored]
    # Drawn from timings, so it changes every run: kept out of the byte-stable plots/evaluate.
    staged.write_with(workspace.plots("latency") / "tradeoff.png",
                      lambda f: _save_png(f, figures.tradeoff_figure(points, batch)))
    _png(out / "reliability.png", figures.reliability_figure(
        {v: scored[v].bins for v in COMPARED}, {v: scored[v].ece for v in COMPARED},
        CALIBRATION_BINS))

    # Most confident mistakes first: those are the ones a deployment would trust.
    confidence = int8.proba.max(axis=1)
    wrong = np.flatnonzero(int8.pred != y)
    shown = wrong[np.argsort(-confidence[wrong], kind="stable")][: params.misclassified_shown]
    if meta.layout == "images":  # as the camera saw them
        samples = np.clip(x_raw[shown].astype(np.float32) / meta.normalization.scale, 0, 1)
    else:  # standardized: features on one scale, comparable across panels
        samples = x[shown]
    titles = [f"{names[y[i]]}→{names[int8.pred[i]]} (p={confidence[i]:.2f})" for i in shown]
    _png(out / "misclassified.png", figures.misclassified_figure(
        samples, titles, f"int8 misclassifications, most confident first ({len(shown)} of {len(wrong)})",
        meta.layout))


def print_summary(metrics: dict, latency: dict) -> None:
    keys = list(latency[DEPLOYED])
    table = Table(title="evaluate: test set")
    for column in ["variant", "accuracy", "macro-F1", "ECE", "size", *(f"{k} ms" for k in keys)]:
        table.add_column(column, justify="left" if column == "variant" else "right")
    for v, variant in VARIANTS.items():
        m = metrics[v]
        table.add_row(variant.label, f"{m['accuracy']:.2%}", f"{m['macro_f1']:.4f}", f"{m['ece']:.4f}",
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
    evaluate(load_params(args.params).evaluate, project_workspace())


if __name__ == "__main__":
    run_stage("evaluate", main)
