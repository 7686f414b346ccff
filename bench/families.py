"""Accuracy per model family on real data, through the real stages: `python -m bench.families`.

Each dataset runs prepare -> train -> qat -> export -> export_onnx -> evaluate in-process in a
throwaway project folder, and is compared with a well-tuned linear model (logistic regression, C chosen by 5-fold
cross-validation on train+val) scored on the same prepared test split. Prints a table and writes
bench/families.json. `python -m bench.families digits wine` runs only the datasets named.

Datasets, and the params each changes from the defaults (and why):
  digits        builtin:digits, 1,797 8x8 images -> cnn2d. augment_shift 1: a 2-pixel shift is a
                quarter of an 8x8 digit and pushes strokes off the frame.
  breast_cancer scikit-learn's 569-row, 30-feature table written to CSV -> mlp. Small batches and
                more epochs: at batch 64 the 341 training rows make 6 steps per epoch. A 60/20/20
                split, so the test split has 114 rows rather than 57.
  wine          scikit-learn's 178-row, 13-feature table as CSV with string labels -> mlp. As above;
                its 36 test rows still make one mistake worth 2.8 pp.
  waveforms     synthetic signals (sine, square, triangle, sawtooth at a random frequency and phase,
                with Gaussian noise of 0.3) as an .npz of (N, 128) arrays, which data.layout auto
                reads as sequences -> cnn1d. augment_shift 8 along time; a linear model has no
                answer to the random phase.
All datasets set patience to their epoch count, so the one-cycle schedule runs to its end: with
the default patience of 6, a small validation split that reaches its best score early (digits'
180 images hit 100% by epoch 7) stops training while the learning rate is still near its peak.
The deployment gate (export.max_accuracy_drop) is opened: the bench reports the drop instead of
stopping at it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from bench.scratch import default_params
from tasks.evaluate import cpu_name, evaluate
from tasks.export import export
from tasks.export_onnx import export_onnx
from tasks.params import parse_params
from tasks.prepare import prepare
from tasks.qat import qat
from tasks.train import train
from tasks.workspace import Workspace

RESULTS = Path(__file__).with_name("families.json")
COMMON = {
    "export": {"max_accuracy_drop": 100.0},
    "evaluate": {"latency_repeats": 10},
}
TABULAR = {
    "prepare": {"split": {"train": 0.6, "val": 0.2, "test": 0.2}},
    "train": {"batch_size": 16, "epochs": 60, "patience": 60},
    "qat": {"batch_size": 16},
}


def sklearn_table_csv(loader: Callable, string_labels: bool) -> Callable[[Path], str]:
    def write(raw: Path) -> str:
        table = loader(as_frame=True)
        frame = table.frame.rename(columns={"target": "label"})
        if string_labels:
            frame["label"] = np.asarray(table.target_names)[frame["label"]]
        frame.to_csv(raw / "table.csv", index=False)
        return "data/raw/table.csv"
    return write


def waveforms(raw: Path, n: int = 2400, length: int = 128, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 4)
    cycles = rng.uniform(2, 6, (n, 1)) * np.arange(length) / length + rng.uniform(0, 1, (n, 1))
    u = cycles % 1  # position within the current period
    shapes = np.stack([np.sin(2 * np.pi * u), np.sign(np.sin(2 * np.pi * u)),
                       1 - 4 * np.abs(u - 0.5), 2 * u - 1])
    x = rng.uniform(0.7, 1.3, (n, 1)) * shapes[y, np.arange(n)] + rng.normal(0, 0.3, (n, length))
    np.savez(raw / "waveforms.npz", x=x.astype(np.float32), y=y.astype(np.int64),
             class_names=np.array(["sine", "square", "triangle", "sawtooth"]))
    return "data/raw/waveforms.npz"


@dataclass(frozen=True)
class Case:
    name: str
    write_source: Callable[[Path], str]  # writes the raw data under data/raw; returns data.source
    params: dict


def _builtin(name: str) -> Callable[[Path], str]:
    return lambda raw: name


def cases() -> list[Case]:
    from sklearn.datasets import load_breast_cancer, load_wine

    return [
        Case("digits", _builtin("builtin:digits"), {"train": {"augment_shift": 1, "patience": 20}}),
        Case("breast_cancer", sklearn_table_csv(load_breast_cancer, False), TABULAR),
        Case("wine", sklearn_table_csv(load_wine, True), TABULAR),
        Case("waveforms", waveforms,
             {"train": {"augment_shift": 8, "patience": 20}}),
    ]


def merged(*layers: dict) -> dict:
    out: dict = {}
    for layer in layers:
        for key, value in layer.items():
            out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def flat_split(prepared: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(prepared / f"{name}.npz", allow_pickle=False) as data:
        return data["x"].reshape(len(data["y"]), -1), data["y"]


def linear_baseline(prepared: Path) -> dict:
    """Logistic regression on the same standardized features; C by 5-fold CV on train+val."""
    from sklearn.linear_model import LogisticRegressionCV

    parts = [flat_split(prepared, name) for name in ("train", "val")]
    x_test, y_test = flat_split(prepared, "test")
    model = LogisticRegressionCV(Cs=np.logspace(-3, 3, 13), cv=5, scoring="accuracy", max_iter=5000)
    with warnings.catch_warnings(category=FutureWarning, action="ignore"):  # sklearn 1.10 notices
        model.fit(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return {"accuracy": round(float(model.score(x_test, y_test)), 6), "C": float(model.C_[0])}


def run_case(case: Case) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"qatflow-{case.name}-") as tmp:
        workspace = Workspace(Path(tmp))
        raw = workspace.root / "data" / "raw"
        raw.mkdir(parents=True)
        overrides = merged(COMMON, {"data": {"source": case.write_source(raw)}}, case.params)
        params = parse_params(default_params(**overrides))
        start = time.perf_counter()
        meta = prepare(params.data, params.prepare, workspace)
        trained = train(params.train, workspace)
        qat(params.qat, workspace)
        export(params.export, workspace)
        export_onnx(params.export, workspace)
        metrics = evaluate(params.evaluate, workspace)
        seconds = time.perf_counter() - start
        config = torch.load(workspace.train_model, weights_only=True)["config"]
        baseline = linear_baseline(workspace.prepared)
    return {
        "dataset": case.name, "source": params.data.source, "layout": meta.layout,
        "input_shape": meta.input_shape, "samples": meta.samples,
        "family": config["family"], "widths": config["widths"], "parameters": trained["parameters"],
        "fp32_accuracy": metrics["fp32"]["accuracy"], "int8_accuracy": metrics["int8"]["accuracy"],
        "ptq_accuracy": metrics["ptq"]["accuracy"], "accuracy_drop_pp": metrics["accuracy_drop"],
        "linear_baseline": baseline, "fp32_bytes": metrics["fp32_ts"]["size_bytes"],
        "int8_bytes": metrics["int8"]["size_bytes"], "seconds": round(seconds, 1),
        "params": overrides,
    }


def print_table(rows: list[dict]) -> None:
    table = Table(title="Model families on real data (test split)")
    for column in ("dataset", "family", "test n", "fp32", "int8 (QAT)", "ptq", "linear baseline",
                   "fp32.pt", "int8.pt", "time"):
        table.add_column(column, justify="left" if column in ("dataset", "family") else "right")
    for r in rows:
        table.add_row(
            r["dataset"], r["family"], str(r["samples"]["test"]), f"{r['fp32_accuracy']:.2%}",
            f"{r['int8_accuracy']:.2%}", f"{r['ptq_accuracy']:.2%}",
            f"{r['linear_baseline']['accuracy']:.2%}", f"{r['fp32_bytes'] / 1024:.0f} KiB",
            f"{r['int8_bytes'] / 1024:.0f} KiB", f"{r['seconds']:.0f} s",
        )
    Console(width=150).print(table)


# How docs/your-data.md names each dataset (its source and layout are in the JSON).
DESCRIPTIONS = {"digits": "`builtin:digits`", "breast_cancer": "breast cancer CSV",
                "wine": "wine CSV, string labels", "waveforms": "waveforms .npz, (N, 128) as sequences"}


def markdown(result: dict) -> str:
    """docs/your-data.md's table of bench/families.json (bench/tables.py)."""
    lines = ["| dataset (test samples) | family | fp32 | int8 QAT | int8 PTQ | baseline | fp32.pt → int8.pt |",
             "|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        name = DESCRIPTIONS.get(r["dataset"], f"`{r['source']}`")
        lines.append(f"| {name} ({r['samples']['test']}) | {r['family']} | {r['fp32_accuracy']:.2%} | "
                     f"{r['int8_accuracy']:.2%} | {r['ptq_accuracy']:.2%} | logistic regression "
                     f"{r['linear_baseline']['accuracy']:.2%} | {r['fp32_bytes'] / 1024:,.0f} → "
                     f"{r['int8_bytes'] / 1024:,.0f} KiB |")
    tests = [r["samples"]["test"] for r in result["results"]]
    lines += ["", f"Measured on {result['cpu']}, torch {result['torch_version']}. Small test splits: one "
              f"sample moves a figure by {100 / max(tests):.1f}-{100 / min(tests):.1f} pp."]
    return "\n".join(lines)


def main() -> None:
    os.environ.setdefault("QATFLOW_RUN_NAME", "bench-families")
    chosen = set(sys.argv[1:])  # dataset names to run only those (the JSON then holds only them)
    rows = [run_case(case) for case in cases() if not chosen or case.name in chosen]
    print_table(rows)
    RESULTS.write_text(json.dumps(
        {"torch_version": torch.__version__, "cpu": cpu_name(), "results": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
