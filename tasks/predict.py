"""Predict with an exported model: `python -m tasks.predict MODEL INPUT [--out FILE]`
(also installed as `qatflow-predict`).

MODEL is any file an export stage wrote, run in its runtime (tasks/runtimes/, by extension: .pt
TorchScript, .pt2 torch.export, .onnx ONNX Runtime, .pte ExecuTorch), with no qatflow model code:
the metadata embedded in it says the input
shape, the normalization and the class names. INPUT is an .npz (array `x`) or .npy, a CSV (a header
row; a `label` column, if any, is ignored), or, for image models, an image file or a folder of
images. Samples are shaped as prepare shaped the training data: vectors [F] take rows of any shape
with F values, sequences [C, L] take (N, L) when C is 1 or flat rows of C * L values, images
[C, H, W] take (N, H, W) when C is 1. Writes one record per sample (id, label, class,
probabilities) as JSON lines, or CSV when FILE ends in .csv; to stdout without --out.

MODEL must be a file an export stage wrote: its sha256 must be listed in that stage's report in
its project (MODEL/../../metrics/<stage>.json: export.json for .pt and .pt2, export_onnx.json for
.onnx, export_executorch.json for .pte; or --manifest),
since loading TorchScript runs code from the file; --trust skips that check. Its output width
must match its class names. Array inputs are checked from their NPY header (shape, dtype, size)
before any data is read, then streamed in chunks: memory stays bounded by the chunk size, whatever
the input's size.
"""

from __future__ import annotations

if __name__ == "__main__":  # a serving process: OpenMP reads its wait policy once, as torch loads it
    from tasks.serving import use_serving_wait_policy

    use_serving_wait_policy()

import csv
import hashlib
import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from tasks import runtimes
from tasks.atomic import atomic_open
from tasks.cli import run_command
from tasks.contracts import ExportedMeta, ExportReport, read_report
from tasks.csvsafe import safe_cell
from tasks.errors import DataError
from tasks.inference import predict_logits, probabilities
from tasks.npyio import CHUNK_BYTES, InMemory, NpyStream, Rows, chunk_rows
from tasks.serving import serving_threads
from tasks.readers import (
    IMAGE_SUFFIXES,
    CsvRows,
    check_conformable,
    conform,
    image_files,
    open_array_file,
    read_images,
)

PROGRESS_FROM = 10_000  # samples; below this a bar only flickers


def default_manifest(model_path: Path) -> Path:
    """metrics/<stage>.json of the project the model lies in (models/<file> -> models/..), the
    report of the stage that writes the file's runtime: metrics/export.json for .pt and .pt2.
    Not resolved: DVC may link models/ into its cache, and the cache has no metrics/ beside it."""
    stage = runtimes.for_file(model_path).STAGE
    return Path(os.path.abspath(model_path)).parent.parent / "metrics" / f"{stage}.json"


def verify_exported(model_path: Path, data: bytes, manifest: Path | None) -> None:
    """Refuse a model file whose sha256 export did not record: loading TorchScript runs its code."""
    listed = manifest or default_manifest(model_path)
    digest = hashlib.sha256(data).hexdigest()
    anyway = "--trust loads it anyway (it runs code from the file)"
    if not listed.is_file():
        raise DataError(f"{model_path}: cannot check that qatflow exported it: {listed} not found; "
                        f"give --manifest PATH, or {anyway}")
    try:
        report = read_report(ExportReport, listed)
    except DataError as exc:
        raise DataError(f"{exc}; or {anyway}") from None
    if digest not in {check.sha256 for check in report.files.values()}:
        raise DataError(f"{model_path}: sha256 {digest[:16]}... is not listed in {listed}: not a file "
                        f"qatflow exported, or changed since; {anyway}")


def read_model_file(path: Path, manifest: Path | None, trust: bool) -> bytes:
    """The model file's bytes, verified against export's hashes unless `trust`."""
    if not path.is_file():
        raise DataError(f"{path}: model file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not trust:
        verify_exported(path, data, manifest)
    return data


def load_model(data: bytes, path: Path) -> tuple[torch.nn.Module, ExportedMeta]:
    """The model from the verified bytes; it must give one score per class name on one zero
    sample."""
    model, meta = runtimes.load(path, data)
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *meta.input_shape))
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:  # TorchScript: RuntimeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: does not run on one sample of its meta.json's input shape "
                        f"{tuple(meta.input_shape)} ({first})") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"{path}: gives {shape} for one sample, not one row of class scores")
    if out.shape[1] != len(meta.class_names):
        raise DataError(f"{path}: outputs {out.shape[1]} scores per sample, but its meta.json "
                        f"lists {len(meta.class_names)} class names")
    return model, meta


def open_inputs(path: Path, input_shape: list[int], model_name: str) -> tuple[Rows, list[str] | None]:
    """The samples as rows to stream, in source units, and an id for each (None: the row number).

    An .npz/.npy is only opened: its shape, dtype and size are checked from its header (and the
    zip member's declared size) before any data is read or decompressed."""
    if not path.exists():
        raise DataError(f"{path}: input not found")
    if path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES:
        if len(input_shape) != 3:
            raise DataError(f"{path}: images given, but {model_name} takes "
                            f"{'vectors' if len(input_shape) == 1 else 'sequences'} of shape "
                            f"{tuple(input_shape)}")
        files = image_files(path)
        ids = [str(f.relative_to(path)) if path.is_dir() else f.name for f in files]
        images = read_images(files, input_shape[1], input_shape[2], input_shape[0])
        return InMemory(images, str(path)), ids
    if path.suffix in (".npz", ".npy"):
        rows: Rows = open_array_file(path)
    elif path.suffix == ".csv":
        rows = CsvRows(path)
    else:
        raise DataError(f"{path}: unsupported input; give .npz, .npy, .csv, an image or a folder")
    if not np.issubdtype(rows.dtype, np.number) or np.issubdtype(rows.dtype, np.complexfloating):
        raise DataError(f"{path}: holds {rows.dtype} values; expected real numbers")
    check_conformable(rows.shape, input_shape, str(path), model_name)
    if isinstance(rows, NpyStream):
        rows.check_complete()
        if rows.fortran_order and rows.shape[0] * rows.row_bytes > CHUNK_BYTES:
            raise DataError(f"{path}: stored in column-major (Fortran) order, which cannot be read "
                            f"row by row; save it with np.save(f, np.ascontiguousarray(x))")
    return rows, None


def checked(chunk: np.ndarray, input_shape: list[int], origin: str, first: int) -> np.ndarray:
    """A chunk of rows shaped like the model's input; NaN or inf refused, naming the sample."""
    x = conform(chunk, input_shape, origin, "the model")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0])
        raise DataError(f"{origin}: sample {first + bad} contains NaN or inf")
    return x


def stream_proba(model, rows: Rows, meta: ExportedMeta, batch_size: int,
                 origin: str) -> Iterator[tuple[int, np.ndarray]]:
    """(first sample, class probabilities) per chunk of rows: one chunk is in memory at a time.

    A chunk is a whole number of batches, so the model sees the batches an unchunked run would."""
    most = min(chunk_rows(tuple(meta.input_shape)), getattr(rows, "max_rows", sys.maxsize))
    per_chunk = max(1, most // batch_size) * batch_size
    first = 0
    with Progress(console=Console(stderr=True), disable=rows.shape[0] < PROGRESS_FROM) as progress:
        task = progress.add_task("predict", total=rows.shape[0])
        for chunk in rows.chunks(per_chunk):
            x_raw = checked(chunk, meta.input_shape, origin, first)
            # prepare's own normalization, from the file's metadata: inputs scaled as training data was.
            x = torch.from_numpy(meta.normalization.apply(x_raw))
            del x_raw
            logits = predict_logits(model, x, batch_size, on_batch=lambda n: progress.advance(task, n))
            yield first, probabilities(logits)
            first += len(x)


def format_records(ids: list[str], proba: np.ndarray, class_names: list[str], as_csv: bool,
                   header: bool = True) -> str:
    labels = proba.argmax(axis=1)
    out = io.StringIO()
    if as_csv:
        writer = csv.writer(out, lineterminator="\n")
        if header:
            writer.writerow(["id", "label", "class", *(safe_cell(f"p_{name}") for name in class_names)])
        for i, label in enumerate(labels):
            writer.writerow([safe_cell(ids[i]), int(label), safe_cell(class_names[label]),
                             *(f"{p:.6f}" for p in proba[i])])
    else:
        for i, label in enumerate(labels):
            record = {"id": ids[i], "label": int(label), "class": class_names[label],
                      "probabilities": [round(float(p), 6) for p in proba[i]]}
            out.write(json.dumps(record) + "\n")
    return out.getvalue()


def predict(model_path: Path, input_path: Path, out: Path | None = None, batch_size: int = 256, *,
            manifest: Path | None = None, trust: bool = False, collect: bool = True) -> np.ndarray | None:
    """Class probabilities for every sample of `input_path`; written to `out` (or stdout).

    The model file must be listed (by sha256) in `manifest`, by default the metrics/export.json
    of its project, unless `trust`. Inputs stream through in chunks; with `collect` False nothing
    is kept and None is returned (the command line: memory bounded by the chunk size)."""
    data = read_model_file(model_path, manifest, trust)
    # The inputs are checked against the metadata before the model is loaded (and its code runs).
    meta = runtimes.read_meta(model_path, data)
    rows, ids = open_inputs(input_path, meta.input_shape, model_path.name)
    torch.set_num_threads(serving_threads(batch_size, os.cpu_count() or 1))  # before loading: ORT sizes its pool then
    model, _ = load_model(data, model_path)
    del data
    as_csv = bool(out and out.suffix == ".csv")
    kept: list[np.ndarray] = []

    def write_all(write: Callable[[str], object]) -> None:
        if as_csv:  # the header row, even for no samples
            write(format_records([], np.empty((0, len(meta.class_names))), meta.class_names, True))
        for first, proba in stream_proba(model, rows, meta, batch_size, str(input_path)):
            names = ids[first : first + len(proba)] if ids else [str(first + i) for i in range(len(proba))]
            write(format_records(names, proba, meta.class_names, as_csv, header=False))
            if collect:
                kept.append(proba)

    if out is None:
        write_all(sys.stdout.write)
    else:
        with atomic_open(out, "w") as f:  # nothing at `out` unless every sample was predicted
            write_all(f.write)
        print(f"predict: {rows.shape[0]} predictions -> {out}", file=sys.stderr)
    if not collect:
        return None
    return np.concatenate(kept) if kept else np.empty((0, len(meta.class_names)))


def _arguments(parser) -> None:
    parser.add_argument("model", type=Path, help="models/int8.pt, models/fp32.pt, models/fp32.pt2, "
                                                 "models/int8.onnx, models/fp32.onnx (ONNX Runtime), or "
                                                 "models/int8.pte (ExecuTorch)")
    parser.add_argument("input", type=Path, help=".npz/.npy, .csv, an image, or a folder of images")
    parser.add_argument("--out", type=Path, help="write here (.csv: CSV, else JSON lines)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--manifest", type=Path,
                        help="export's report listing the sha256 of the files it wrote (default: "
                             "metrics/export.json beside MODEL's folder, i.e. MODEL/../../metrics; "
                             "metrics/export_onnx.json there for an .onnx MODEL, "
                             "metrics/export_executorch.json for a .pte)")
    parser.add_argument("--trust", action="store_true",
                        help="load MODEL even if the manifest does not list it. Loading a model "
                             "file runs code from it: use only with files you trust")


def _main(args) -> None:
    """Predict classes with an exported qatflow model (verified against export's sha256 list)."""
    if args.batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {args.batch_size}")
    predict(args.model, args.input, args.out, args.batch_size, manifest=args.manifest,
            trust=args.trust, collect=False)


def main() -> None:
    run_command("predict", _main, _arguments, prog="qatflow-predict")


if __name__ == "__main__":
    main()
