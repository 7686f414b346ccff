"""Predict with an exported model: `python -m tasks.predict MODEL INPUT [--out FILE]`
(also installed as `qatflow-predict`).

MODEL is models/int8.pt, models/fp32.pt or models/fp32.pt2, loaded with torch alone (no qatflow model code): its
embedded meta.json says the input shape, the normalization and the class names. INPUT is an .npz
(array `x`) or .npy, a CSV (a header row; a `label` column, if any, is ignored), or, for image
models, an image file or a folder of images. Samples are shaped as prepare shaped the training
data: vectors [F] take rows of any shape with F values, sequences [C, L] take (N, L) when C is 1
or flat rows of C * L values, images [C, H, W] take (N, H, W) when C is 1. Writes one record per sample (id, label, class, probabilities) as JSON lines, or
CSV when FILE ends in .csv; to stdout without --out.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from tasks.atomic import write_text
from tasks.cli import run_command
from tasks.deployed import load_deployed
from tasks.errors import DataError
from tasks.inference import predict_logits, probabilities
from tasks.readers import (
    IMAGE_SUFFIXES,
    conform,
    image_files,
    read_array_file,
    read_csv_features,
    read_images,
)

PROGRESS_FROM = 10_000  # samples; below this a bar only flickers


def read_inputs(path: Path, input_shape: list[int], model_name: str) -> tuple[np.ndarray, list[str]]:
    """Raw samples in source units, shaped like the model's input, and an id for each."""
    if not path.exists():
        raise DataError(f"{path}: input not found")
    if path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES:
        if len(input_shape) != 3:
            raise DataError(f"{path}: images given, but {model_name} takes "
                            f"{'vectors' if len(input_shape) == 1 else 'sequences'} of shape "
                            f"{tuple(input_shape)}")
        files = image_files(path)
        ids = [str(f.relative_to(path)) if path.is_dir() else f.name for f in files]
        return read_images(files, input_shape[1], input_shape[2], input_shape[0]), ids
    if path.suffix in (".npz", ".npy"):
        x = read_array_file(path)
    elif path.suffix == ".csv":
        x = read_csv_features(path)
    else:
        raise DataError(f"{path}: unsupported input; give .npz, .npy, .csv, an image or a folder")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{path}: holds {x.dtype} values; expected real numbers")
    x = conform(x, input_shape, str(path), model_name)
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0])
        raise DataError(f"{path}: sample {bad} contains NaN or inf")
    return x, [str(i) for i in range(len(x))]


def predict_proba(model, x: torch.Tensor, batch_size: int) -> np.ndarray:
    with Progress(console=Console(stderr=True), disable=len(x) < PROGRESS_FROM) as progress:
        task = progress.add_task("predict", total=len(x))
        logits = predict_logits(model, x, batch_size, on_batch=lambda n: progress.advance(task, n))
    return probabilities(logits)


def format_records(ids: list[str], proba: np.ndarray, class_names: list[str], as_csv: bool) -> str:
    labels = proba.argmax(axis=1)
    out = io.StringIO()
    if as_csv:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["id", "label", "class", *(f"p_{name}" for name in class_names)])
        for i, label in enumerate(labels):
            writer.writerow([ids[i], int(label), class_names[label], *(f"{p:.6f}" for p in proba[i])])
    else:
        for i, label in enumerate(labels):
            record = {"id": ids[i], "label": int(label), "class": class_names[label],
                      "probabilities": [round(float(p), 6) for p in proba[i]]}
            out.write(json.dumps(record) + "\n")
    return out.getvalue()


def predict(model_path: Path, input_path: Path, out: Path | None = None, batch_size: int = 256) -> np.ndarray:
    """Class probabilities for every sample of `input_path`; written to `out` (or stdout)."""
    model, meta = load_deployed(model_path)
    x_raw, ids = read_inputs(input_path, meta.input_shape, model_path.name)
    # prepare's own normalization, from the file's metadata: inputs scaled as training data was.
    x = torch.from_numpy(meta.normalization.apply(x_raw))
    proba = predict_proba(model, x, batch_size)
    text = format_records(ids, proba, meta.class_names, as_csv=bool(out and out.suffix == ".csv"))
    if out is None:
        sys.stdout.write(text)
    else:
        write_text(out, text)
        print(f"predict: {len(ids)} predictions -> {out}", file=sys.stderr)
    return proba


def _arguments(parser) -> None:
    parser.add_argument("model", type=Path, help="models/int8.pt, models/fp32.pt or models/fp32.pt2")
    parser.add_argument("input", type=Path, help=".npz/.npy, .csv, an image, or a folder of images")
    parser.add_argument("--out", type=Path, help="write here (.csv: CSV, else JSON lines)")
    parser.add_argument("--batch-size", type=int, default=256)


def _main(args) -> None:
    """Predict classes with an exported qatflow model."""
    if args.batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {args.batch_size}")
    predict(args.model, args.input, args.out, args.batch_size)


def main() -> None:
    run_command("predict", _main, _arguments, prog="qatflow-predict")


if __name__ == "__main__":
    main()
