"""Reading samples from the files users have: .npz/.npy arrays, CSV tables, image files and
folders. Every reader refuses pickle and names the file (and row/column) it cannot read."""

from __future__ import annotations

import csv
import itertools
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.errors import QUOTED_CHARS, DataError, quoted
from tasks.npyio import NpyStream, npz_members

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
# Images with more pixels (width * height, from the header, before decoding) are refused: 40 MP is
# a 7,300 x 5,500 photo, more than any camera image a classifier is trained on, and decoding it as
# RGB takes 120 MB, so a folder of them cannot exhaust memory one by one. Below PIL's own
# decompression-bomb limit (about 89 MP), which read_images enforces too. data.max_image_pixels.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


def array_stream(path: Path, key: str) -> NpyStream:
    """Array `key` of an .npz, streamed; the error lists the arrays there are."""
    names = npz_members(path)
    if key not in names:
        raise DataError(f"{path}: array {key!r} missing (arrays: {', '.join(names) or 'none'})")
    return NpyStream(path, key)


def open_array_file(path: Path, key: str = "x") -> NpyStream:
    """Array `key` of an .npz (or its only array), or the array in an .npy, streamed: only its
    header is read here, so shape and dtype can be checked before any data is."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".npy":
        return NpyStream(path)
    names = npz_members(path)
    if key not in names and len(names) == 1:
        key = names[0]
    return array_stream(path, key)


@dataclass(frozen=True)
class CsvTable:
    features: np.ndarray  # (N, F) float32, every column but the label column
    labels: list[str] | None  # the label column's cells, None when there is none
    columns: list[str]  # the feature columns' names


@contextmanager
def _csv_reader(path: Path) -> Iterator[Iterator[list[str]]]:
    try:
        # utf-8-sig: spreadsheet programs often start a CSV with a byte-order mark.
        with open(path, newline="", encoding="utf-8-sig") as f:
            yield csv.reader(f)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read as CSV ({exc})") from None


def _scan_csv(path: Path, label_column: str, require_labels: bool,
              body: list[list[str]] | None = None) -> tuple[list[str], int]:
    """The one CSV parser, for prepare's sources (read_csv) and predict's input (CsvRows): one pass
    checks the header row and that every row is as wide as it, naming the first row that is not;
    blank lines are allowed only at the end. Returns the header (names stripped) and the number of
    rows, which are appended to `body` if given, else kept nowhere."""
    with _csv_reader(path) as reader:
        first = next(reader, None)
        if first is None:
            raise DataError(f"{path}: empty file; a CSV needs a header row and data rows")
        header = [name.strip() for name in first]
        if header and require_labels:
            _check_label_column(path, header, label_column)
        count, blank_at = 0, None  # blank lines count only at the end of the file
        for number, row in enumerate(reader, start=2):
            if not row:
                blank_at = blank_at or number
                continue
            if not header and require_labels:  # a blank first line, and more than blank lines after it
                _check_label_column(path, header, label_column)
            if blank_at is not None:
                raise DataError(f"{path}: row {blank_at} has 0 cells, the header has {len(header)}")
            if len(row) != len(header):
                raise DataError(f"{path}: row {number} has {len(row)} cells, the header has {len(header)}")
            count += 1
            if body is not None:
                body.append(row)
    if not header:  # only blank lines (a first row that is blank with more rows fails above)
        raise DataError(f"{path}: empty file; a CSV needs a header row and data rows")
    if not any(name != label_column for name in header):
        raise DataError(f"{path}: no feature columns besides {label_column!r}")
    return header, count


def _check_label_column(path: Path, header: list[str], label_column: str) -> None:
    if label_column not in header:
        names = ", ".join(header)
        if len(names) > QUOTED_CHARS:  # a header of a million columns is not one line
            names = names[:QUOTED_CHARS] + "…"
        raise DataError(f"{path}: no label column {label_column!r} (columns: {names}); set data.label_column")


def read_csv(path: Path, label_column: str, require_labels: bool) -> CsvTable:
    """A CSV with a header row (_scan_csv), read whole; a header alone gives no rows."""
    body: list[list[str]] = []
    header, _ = _scan_csv(path, label_column, require_labels, body)
    keep = [i for i, name in enumerate(header) if name != label_column]
    cells = np.array(body, dtype=str).reshape(len(body), len(header))
    labels = None
    if label_column in header:
        labels = [cell.strip() for cell in cells[:, header.index(label_column)]]
    columns = [header[i] for i in keep]
    return CsvTable(_numbers(cells[:, keep], path, columns), labels, columns)


def _numbers(cells: np.ndarray, path: Path, columns: list[str], first_row: int = 2) -> np.ndarray:
    """`cells` as float32; `first_row` is the CSV row number of cells[0] (the header is row 1)."""
    try:
        return cells.astype(np.float32)
    except ValueError:
        for (r, c), cell in np.ndenumerate(cells):  # only on the error path: find the culprit
            try:
                float(cell)
            except ValueError:
                raise DataError(f"{path}: row {r + first_row}, column {quoted(columns[c])}: "
                                f"{quoted(str(cell))} is not a number") from None
        raise


CSV_CHUNK_CELLS = 250_000  # cells parsed at a time by CsvRows.chunks (about 40 MB at peak)


class CsvRows:
    """Every column but `label_column` (if present) of a CSV as float32, streamed
    (tasks.npyio.Rows): one pass here (_scan_csv) checks the header and every row's width and counts
    the rows, keeping none; chunks() parses `rows` rows at a time."""

    def __init__(self, path: Path, label_column: str = "label") -> None:
        self.path, self.name, self.dtype = path, str(path), np.dtype(np.float32)
        header, count = _scan_csv(path, label_column, require_labels=False)
        if count == 0:
            raise DataError(f"{path}: needs a header row and at least one data row")
        self.keep = [i for i, name in enumerate(header) if name != label_column]
        self.columns = [header[i] for i in self.keep]
        self.width = len(header)
        self.shape = (count, len(self.keep))
        # Parsed cells are Python strings (about 60 bytes each) before they are numbers.
        self.max_rows = max(1, CSV_CHUNK_CELLS // self.width)

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        with _csv_reader(self.path) as reader:
            next(reader)
            done = 0
            while done < self.shape[0]:
                body = list(itertools.islice(reader, min(rows, self.shape[0] - done)))
                if len(body) == 0 or any(len(row) != self.width for row in body):
                    raise DataError(f"{self.path}: changed while being read")
                cells = np.array(body, dtype=str).reshape(len(body), self.width)[:, self.keep]
                yield _numbers(cells, self.path, self.columns, first_row=2 + done)
                done += len(body)


def image_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no PNG or JPEG images in this folder")
        return files
    return [path]


def available_memory() -> int:
    """Bytes a new allocation can take without swapping: the kernel's MemAvailable, which counts
    reclaimable page cache; free pages alone (sysconf) where there is no /proc, an underestimate."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gib(size: int) -> str:
    return f"{size / 2**30:,.1f} GiB"


def check_images_fit(count: int, channels: int, height: int, width: int,
                     size_key: str | None = None) -> None:
    """Refuse, before anything is allocated, images that cannot fit in memory once they are float32
    (4 bytes a value), as prepare standardizes them and training holds them; `size_key` is the
    params key that sets height and width, if any."""
    need, have = count * channels * height * width * 4, available_memory()
    if need > have:
        setting = f"{size_key} [{height}, {width}]" if size_key else f"{height} x {width} images"
        raise DataError(f"{setting}: {count:,} image(s) x {channels} channel(s) x {height:,} x {width:,} "
                        f"x 4 bytes (float32) = {_gib(need)}, more than the {_gib(have)} of memory "
                        "available")


def read_images(files: list[Path], height: int, width: int, channels: int,
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                max_pixels_key: str | None = None, size_key: str | None = None) -> np.ndarray:
    """Images resized to height x width, grayscale (1 channel) or RGB (3), as uint8 (N, C, H, W).

    Images too many or too large for memory (check_images_fit) are refused before any is read. An
    image of more than `max_pixels` (the params key `max_pixels_key` sets it, if any), or one PIL
    takes for a decompression bomb, is refused by its header, before it is decoded."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise DataError(f"images can become 1 (grayscale) or 3 (RGB) channels, not {channels}")
    check_images_fit(len(files), channels, height, width, size_key)
    out = np.empty((len(files), channels, height, width), dtype=np.uint8)
    for i, file in enumerate(files):
        try:
            with warnings.catch_warnings():
                # PIL only warns between its limit and twice it; here both refuse the file.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(file) as image:
                    w, h = image.size
                    if w * h > max_pixels:
                        setting = f" ({max_pixels_key})" if max_pixels_key else ""
                        raise DataError(f"{file}: {w} x {h} image has {w * h:,} pixels, over the "
                                        f"limit of {max_pixels:,}{setting}")
                    image = image.convert("L" if channels == 1 else "RGB")
                    pixels = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DataError(f"{file}: refused as a possible decompression bomb ({exc})") from None
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


def read_image_folder(path: Path, height: int, width: int, channels: int,
                      max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                      max_pixels_key: str | None = None, size_key: str | None = None) -> ImageFolder:
    """One sub-folder per class (sorted names are the classes), images anywhere below it. A
    sub-folder whose name begins with "." is hidden, as tools' own folders (.git, .ipynb_checkpoints)
    are: it is no class, and a warning names it when it holds images."""
    folders = sorted(p for p in path.iterdir() if p.is_dir())
    classes = [p for p in folders if not p.name.startswith(".")]
    for hidden in (p for p in folders if p.name.startswith(".")):
        count = sum(1 for p in hidden.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if count:
            print(f"prepare: warning: {hidden} is skipped, with its {count} image(s): a folder whose "
                  "name begins with '.' is hidden, not a class; rename it to train on it", file=sys.stderr)
    if not classes:
        raise DataError(f"{path}: no class sub-folders; put each class's images in a sub-folder "
                        "named after the class")
    files, labels = [], []
    for label, folder in enumerate(classes):
        found = image_files(folder)
        files += found
        labels += [label] * len(found)
    x = read_images(files, height, width, channels, max_pixels, max_pixels_key, size_key)
    return ImageFolder(x, np.array(labels, np.int64),
                       [p.name for p in classes], files)


def conform(x: np.ndarray, input_shape: list[int], origin: str, expected_by: str) -> np.ndarray:
    """Samples shaped as the model expects: a missing channel axis is added, flat rows (a CSV of
    pixels or of a signal) are reshaped, and vectors take any shape of the right size, as prepare
    flattens them; anything else is refused."""
    check_conformable(x.shape, input_shape, origin, expected_by)
    shape = tuple(input_shape)
    return x if x.shape[1:] == shape else x.reshape(len(x), *shape)


def check_conformable(array_shape: tuple[int, ...], input_shape: list[int], origin: str,
                      expected_by: str) -> None:
    """conform's test on an array's shape alone (an NPY header's, before any data is read): every
    shape it accepts is a row-major reshape of each sample to `input_shape`."""
    shape, given = tuple(input_shape), tuple(array_shape)
    ndim, samples = len(given), given[1:]
    if ndim >= 2 and samples == shape:
        return
    if ndim >= 2 and len(shape) > 1 and shape[0] == 1 and samples == shape[1:]:
        return
    size = int(np.prod(shape))
    if ndim >= 2 and int(np.prod(samples)) == size and (ndim == 2 or len(shape) == 1):
        return
    raise DataError(f"{origin}: samples have shape {samples}, but {expected_by} expects "
                    f"{shape}")
