"""Reading samples from the files users have: .npz/.npy arrays, CSV tables, image files and
folders. Every reader refuses pickle and names the file (and row/column) it cannot read."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.errors import DataError
from tasks.npyio import NpyStream, npz_members

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def array_stream(path: Path, key: str) -> NpyStream:
    """Array `key` of an .npz, streamed; the error lists the arrays there are."""
    names = npz_members(path)
    if key not in names:
        raise DataError(f"{path}: array {key!r} missing (arrays: {', '.join(names) or 'none'})")
    return NpyStream(path, key)


def read_array_file(path: Path, key: str = "x") -> np.ndarray:
    """Array `key` of an .npz (or its only array), or the array in an .npy."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".npy":
        return NpyStream(path).load()
    names = npz_members(path)
    if key not in names and len(names) == 1:
        key = names[0]
    return array_stream(path, key).load()


@dataclass(frozen=True)
class CsvTable:
    features: np.ndarray  # (N, F) float32, every column but the label column
    labels: list[str] | None  # the label column's cells, None when there is none
    columns: list[str]  # the feature columns' names


def read_csv(path: Path, label_column: str, require_labels: bool) -> CsvTable:
    """A CSV with a header row; a row of another width is refused, naming its line."""
    try:
        # utf-8-sig: spreadsheet programs often start a CSV with a byte-order mark.
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read as CSV ({exc})") from None
    while rows and not rows[-1]:  # blank lines at the end
        rows.pop()
    if not rows:
        raise DataError(f"{path}: empty file; a CSV needs a header row and data rows")
    header, body = [name.strip() for name in rows[0]], rows[1:]
    if label_column not in header and require_labels:
        raise DataError(f"{path}: no label column {label_column!r} (columns: {', '.join(header)}); "
                        "set data.label_column")
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(f"{path}: row {number} has {len(row)} cells, the header has {len(header)}")
    keep = [i for i, name in enumerate(header) if name != label_column]
    if not keep:
        raise DataError(f"{path}: no feature columns besides {label_column!r}")
    cells = np.array(body, dtype=str).reshape(len(body), len(header))
    labels = None
    if label_column in header:
        labels = [cell.strip() for cell in cells[:, header.index(label_column)]]
    columns = [header[i] for i in keep]
    return CsvTable(_numbers(cells[:, keep], path, columns), labels, columns)


def _numbers(cells: np.ndarray, path: Path, columns: list[str]) -> np.ndarray:
    try:
        return cells.astype(np.float32)
    except ValueError:
        for (r, c), cell in np.ndenumerate(cells):  # only on the error path: find the culprit
            try:
                float(cell)
            except ValueError:
                raise DataError(f"{path}: row {r + 2}, column {columns[c]!r}: "
                                f"{str(cell)!r} is not a number") from None
        raise


def read_csv_features(path: Path, label_column: str = "label") -> np.ndarray:
    """Every column but `label_column` (if present) as float32; the first row is the header."""
    table = read_csv(path, label_column, require_labels=False)
    if len(table.features) == 0:
        raise DataError(f"{path}: needs a header row and at least one data row")
    return table.features


def image_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no PNG or JPEG images in this folder")
        return files
    return [path]


def read_images(files: list[Path], height: int, width: int, channels: int) -> np.ndarray:
    """Images resized to height x width, grayscale (1 channel) or RGB (3), as uint8 (N, C, H, W)."""
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise DataError(f"images can become 1 (grayscale) or 3 (RGB) channels, not {channels}")
    out = np.empty((len(files), channels, height, width), dtype=np.uint8)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as image:
                image = image.convert("L" if channels == 1 else "RGB")
                pixels = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{file}: not a readable image ({exc})") from None
        out[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return out


@dataclass(frozen=True)
class ImageFolder:
    x: np.ndarray  # (N, C, H, W) uint8
    y: np.ndarray  # (N,) int64 index into class_names
    class_names: list[str]
    files: list[Path]


def read_image_folder(path: Path, height: int, width: int, channels: int) -> ImageFolder:
    """One sub-folder per class (sorted names are the classes), images anywhere below it."""
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{path}: no class sub-folders; put each class's images in a sub-folder "
                        "named after the class")
    files, labels = [], []
    for label, folder in enumerate(classes):
        found = image_files(folder)
        files += found
        labels += [label] * len(found)
    return ImageFolder(read_images(files, height, width, channels), np.array(labels, np.int64),
                       [p.name for p in classes], files)


def conform(x: np.ndarray, input_shape: list[int], origin: str, expected_by: str) -> np.ndarray:
    """Samples shaped as the model expects: a missing channel axis is added, flat rows (a CSV of
    pixels or of a signal) are reshaped, and vectors take any shape of the right size, as prepare
    flattens them; anything else is refused."""
    shape = tuple(input_shape)
    if x.ndim >= 2 and x.shape[1:] == shape:
        return x
    if x.ndim >= 2 and len(shape) > 1 and shape[0] == 1 and x.shape[1:] == shape[1:]:
        return x[:, None]
    size = int(np.prod(shape))
    if x.ndim >= 2 and int(np.prod(x.shape[1:])) == size and (x.ndim == 2 or len(shape) == 1):
        return x.reshape(len(x), *shape)
    raise DataError(f"{origin}: samples have shape {x.shape[1:]}, but {expected_by} expects "
                    f"{shape}")
