"""Streaming .npy/.npz reading and writing: arrays larger than memory pass through in row chunks.

Readers parse the NPY header themselves (from a file, or from a zip member's stream) and refuse
anything that is not plain numbers, so pickle is never involved. `chunks()` re-opens the file on
each call: prepare reads its source twice (validate, then write) and holds one chunk at a time.
Writers emit an NPY header, then the rows, into an uncompressed zip member, with fixed timestamps:
the same arrays always give the same bytes.
"""

from __future__ import annotations

import os
import struct
import weakref
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Protocol

import numpy as np
from numpy.lib import format as npy

from tasks.errors import DataError

CHUNK_BYTES = 64 << 20  # working-set size of one chunk, counted in float64 (the widest we use)
NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float; no complex, text, object or records
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # zip's epoch: no clock in the bytes
# A zip member's local header: signature, versions, flags, sizes, CRC... name and extra lengths.
_LOCAL_HEADER = struct.Struct(zipfile.structFileHeader)


class Rows(Protocol):
    """An (N, ...) array that can be read front to back in row chunks, more than once."""

    name: str  # for messages: "data/raw/x.npz: array 'x'"
    shape: tuple[int, ...]
    dtype: np.dtype

    def chunks(self, rows: int) -> Iterator[np.ndarray]: ...


def chunk_rows(sample_shape: tuple[int, ...]) -> int:
    return max(1, CHUNK_BYTES // (8 * max(1, int(np.prod(sample_shape)))))


class InMemory:
    """An array already in memory (built-in data, CSV, images), read like a file."""

    def __init__(self, array: np.ndarray, name: str) -> None:
        self.array, self.name = array, name
        self.shape, self.dtype = array.shape, array.dtype

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.array), rows):
            yield self.array[start : start + rows]


class NpyStream:
    """An array stored as NPY bytes: an .npy file, or member `key` of an .npz (zip) file."""

    def __init__(self, path: Path, key: str | None = None) -> None:
        self.path, self.key = path, key
        self.name = f"{path}: array {key!r}" if key else str(path)
        with self._open() as f:
            self.shape, self.dtype, fortran = _read_header(f, self.name)
            self.header_bytes = f.tell()
        self.fortran_order = fortran

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * int(np.prod(self.shape[1:]))

    def stored_bytes(self) -> int:
        """How many data bytes follow the header, from the file's size or the zip member's
        declared size: nothing is read or decompressed."""
        try:
            if self.key is None:
                size = self.path.stat().st_size
            else:
                with zipfile.ZipFile(self.path) as archive:
                    size = archive.getinfo(f"{self.key}.npy").file_size
        except (zipfile.BadZipFile, KeyError, OSError) as exc:
            raise DataError(f"{self.name}: cannot read ({exc})") from None
        return size - self.header_bytes

    def check_complete(self) -> None:
        """Refuse an array whose header declares more rows than the file (or zip member) holds,
        before reading any of them."""
        declared = self.shape[0] * self.row_bytes
        stored = self.stored_bytes()
        if stored < declared:
            got = max(0, stored) // max(1, self.row_bytes)
            raise DataError(f"{self.name}: truncated: the header says {self.shape[0]} rows, "
                            f"the data ends after {got}")

    @contextmanager
    def _open(self) -> Iterator[IO[bytes]]:
        try:
            if self.key is None:
                with open(self.path, "rb") as f:
                    yield f
            else:
                with zipfile.ZipFile(self.path) as archive, archive.open(f"{self.key}.npy") as f:
                    yield f
        # zipfile checks a member's CRC as its last bytes are read; zlib fails on a cut-off
        # stream; NumPy's reader says ValueError when the data ends early.
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise DataError(f"{self.name}: corrupt or truncated ({exc})") from None
        except ValueError as exc:
            raise DataError(f"{self.name}: not readable ({exc})") from None
        except OSError as exc:
            raise DataError(f"{self.name}: cannot read ({exc.strerror or exc})") from None

    def load(self) -> np.ndarray:
        """The whole array (small arrays, and Fortran-order ones, which are stored column-first)."""
        with self._open() as f:
            return npy.read_array(f, allow_pickle=False)

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        if self.fortran_order:
            yield from InMemory(self.load(), self.name).chunks(rows)
            return
        row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:]))
        with self._open() as f:
            _read_header(f, self.name)
            for start in range(0, self.shape[0], rows):
                count = min(rows, self.shape[0] - start)
                data = f.read(count * row_bytes)
                if len(data) != count * row_bytes:
                    got = start + len(data) // max(1, row_bytes)
                    raise DataError(f"{self.name}: truncated: the header says {self.shape[0]} rows, "
                                    f"the data ends after {got}")
                yield np.frombuffer(data, self.dtype).reshape(count, *self.shape[1:])


class StoredRows:
    """Array `key` of an .npz whose members are stored uncompressed (as NpzWriter writes the
    prepared splits), read in place: indexing reads just the rows asked for, with positional reads
    (pread) at their offsets in the file, so a pass over the array holds one batch at a time.

    Not a memory map, measured: random 64-row batches from a mapped 800 MB split kept ~600 KB
    resident per row read (Linux maps whole large page-cache folios into the process), 600 MB of
    resident memory after 16 batches; read like this, the pages stay in the page cache, outside
    the process, and a second epoch reads them from memory all the same.
    """

    def __init__(self, path: Path, key: str) -> None:
        stream = NpyStream(path, key)
        stream.check_complete()
        self.name, self.shape, self.dtype = stream.name, stream.shape, stream.dtype
        if stream.fortran_order:
            raise DataError(f"{self.name}: stored column-first (Fortran order); cannot be read in place")
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            raise DataError(f"{self.name}: compressed; only stored (uncompressed) members can be read "
                            "in place (prepare writes them so)")
        self._row_bytes = stream.row_bytes
        self._fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)
        local = os.pread(self._fd, _LOCAL_HEADER.size, info.header_offset)
        signature, *_, name_length, extra_length = _LOCAL_HEADER.unpack(local)
        if signature != zipfile.stringFileHeader:
            raise DataError(f"{self.name}: corrupt zip (no member header where its directory says)")
        self._start = (info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
                       + stream.header_bytes)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice | np.ndarray) -> np.ndarray:
        """Rows `index` (a slice, or an array of row numbers) as a new array."""
        if isinstance(index, slice):
            first, stop, step = index.indices(len(self))
            if step == 1:
                out = np.empty((max(0, stop - first), *self.shape[1:]), self.dtype)
                self._read_into(out, first)
                return out
            index = np.arange(first, stop, step)
        rows = np.asarray(index, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"{self.name}: row index out of range for {len(self)} rows")
        rows = np.where(rows < 0, rows + len(self), rows)
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        for position in np.argsort(rows, kind="stable"):  # in file order: the kernel reads ahead
            self._read_into(out[position : position + 1], int(rows[position]))
        return out

    def _read_into(self, out: np.ndarray, first_row: int) -> None:
        view = memoryview(out).cast("B")
        got = os.preadv(self._fd, [view], self._start + first_row * self._row_bytes) if out.size else 0
        if got != view.nbytes:
            raise DataError(f"{self.name}: the file ended while reading rows from {first_row}: "
                            "changed on disk since it was opened?")


def _read_header(f: IO[bytes], name: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    try:
        version = npy.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(f)
        else:  # 3.0 exists only for record field names that need UTF-8
            raise DataError(f"{name}: NPY format {version[0]}.{version[1]} is not supported")
    except ValueError as exc:
        raise DataError(f"{name}: not an NPY array ({exc})") from None
    if dtype.kind not in NUMERIC_KINDS or dtype.names is not None or dtype.subdtype is not None:
        raise DataError(f"{name}: holds {_describe(dtype)} values; qatflow reads plain numeric "
                        "arrays only (no object, text, complex or record arrays, nothing that "
                        "needs pickle)")
    if len(shape) == 0:
        raise DataError(f"{name}: a single value, not an array of samples")
    return tuple(shape), dtype, fortran


def _describe(dtype: np.dtype) -> str:
    kinds = {"O": "object", "U": "text", "S": "bytes", "c": "complex", "V": "record",
             "M": "datetime", "m": "timedelta"}
    return f"{kinds.get(dtype.kind, 'non-numeric')} ({dtype.str})"


def npz_members(path: Path) -> list[str]:
    """Array names in an .npz, refusing what is not one."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        raise DataError(f"{path}: not an .npz file (no zip archive; truncated or another format)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return [n[: -len(".npy")] for n in names if n.endswith(".npy")]


class NpzWriter:
    """Writes an .npz member by member, each streamed: header first, then rows in order."""

    def __init__(self, f: IO[bytes]) -> None:
        self._zip = zipfile.ZipFile(f, "w", zipfile.ZIP_STORED)

    @contextmanager
    def member(self, key: str, shape: tuple[int, ...], dtype: np.dtype) -> Iterator[RowWriter]:
        with self._zip.open(_member_info(key), "w", force_zip64=True) as f:
            rows = RowWriter(f, shape, np.dtype(dtype), f"{key}.npy")
            yield rows
            rows.finish()

    def array(self, key: str, array: np.ndarray) -> None:
        with self.member(key, array.shape, array.dtype) as rows:
            rows.write(array)

    def copy_npy(self, key: str, npy_file: Path) -> None:
        """Put a finished .npy file into the archive as member `key`, streamed in chunks."""
        with open(npy_file, "rb") as src, self._zip.open(_member_info(key), "w", force_zip64=True) as dst:
            while block := src.read(CHUNK_BYTES):
                dst.write(block)

    def close(self) -> None:
        self._zip.close()


class RowWriter:
    """An NPY header for `shape`, then exactly shape[0] rows, appended chunk by chunk."""

    def __init__(self, f: IO[bytes], shape: tuple[int, ...], dtype: np.dtype, name: str) -> None:
        self.f, self.shape, self.dtype, self.name = f, tuple(shape), dtype, name
        self.written = 0
        header = {"descr": npy.dtype_to_descr(dtype), "fortran_order": False, "shape": self.shape}
        npy.write_array_header_1_0(f, header)

    def write(self, rows: np.ndarray) -> None:
        if rows.shape[1:] != self.shape[1:] or rows.dtype != self.dtype:
            raise ValueError(f"{self.name}: rows {rows.dtype}{rows.shape[1:]} do not match "
                             f"{self.dtype}{self.shape[1:]}")
        self.f.write(np.ascontiguousarray(rows).data)
        self.written += len(rows)

    def finish(self) -> None:
        if self.written != self.shape[0]:
            raise ValueError(f"{self.name}: {self.written} rows written, the header says {self.shape[0]}")


def _member_info(key: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
    info.external_attr = 0o644 << 16
    return info
