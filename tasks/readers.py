"""Reading samples from the files users have: .npz/.npy arrays, CSV tables, image files and
folders. Every reader refuses pickle and names the file (and row/column) it cannot read."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np

from tasks.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def read_array_file(path: Path, key: str = "x") -> np.ndarray:
    """Array `key` of an .npz (or its only array), or the array in an .npy."""
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as data:
            names = list(data.files)
            if key not in names and len(names) != 1:
                raise DataError(f"{path}: no array {key!r} (arrays: {', '.join(names) or 'none'})")
            return data[key if key in names else names[0]]
    except ValueError as exc:
        if "pickle" not in str(exc):
            raise DataError(f"{path}: not a readable NumPy file ({exc})") from None
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic[:2] == b"PK" or magic == b"\x93NUMPY":
            raise DataError(f"{path}: holds object arrays, which need pickle; qatflow reads "
                            "numeric arrays only") from None
        raise DataError(f"{path}: not a NumPy .npz/.npy file (no zip or NPY header)") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable NumPy file ({exc})") from None


def read_csv_features(path: Path, label_column: str = "label") -> np.ndarray:
    """Every column but `label_column` (if present) as float32; the first row is the header."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read as CSV ({exc})") from None
    if len(rows) < 2:
        raise DataError(f"{path}: needs a header row and at least one data row")
    header, body = rows[0], rows[1:]
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(f"{path}: row {number} has {len(row)} cells, the header has {len(header)}")
    keep = [i for i, name in enumerate(header) if name != label_column]
    table = np.array(body, dtype=object)[:, keep]
    try:
        return table.astype(np.float32)
    except ValueError:
        for (r, c), cell in np.ndenumerate(table):  # only on the error path: find the culprit
            try:
                float(cell)
            except ValueError:
                raise DataError(f"{path}: row {r + 2}, column {header[keep[c]]!r}: "
                                f"{cell!r} is not a number") from None
        raise


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
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise DataError(f"{file}: not a readable image ({exc})") from None
        out[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return out


def conform(x: np.ndarray, input_shape: list[int], origin: str, expected_by: str) -> np.ndarray:
    """Samples shaped as the model expects: a missing channel axis is added and flat rows (a CSV of
    pixels) are reshaped when the sizes agree; anything else is refused."""
    shape = tuple(input_shape)
    if x.ndim >= 1 and x.shape[1:] == shape:
        return x
    if x.ndim >= 1 and shape[0] == 1 and x.shape[1:] == shape[1:]:
        return x[:, None]
    if x.ndim == 2 and x.shape[1] == int(np.prod(shape)):
        return x.reshape(len(x), *shape)
    raise DataError(f"{origin}: samples have shape {x.shape[1:]}, but {expected_by} expects "
                    f"{shape}")
