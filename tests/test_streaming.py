"""Training reads the prepared splits in place (tasks/npyio.py: StoredRows, tasks/loop.py:
SplitRows): a batch reads its rows from the file, and nothing read stays in the process."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.errors import DataError
from tasks.training.fit import load_split
from tasks.npyio import NpzWriter, StoredRows

MB = 1 << 20


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    with open(path, "wb") as f:
        npz = NpzWriter(f)
        for key, array in arrays.items():
            npz.array(key, array)
        npz.close()
    return path


def resident_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024


@pytest.mark.parametrize("key", ["x", "a_much_longer_member_name"])
def test_rows_read_in_place_are_what_numpy_loads(tmp_path, key):
    # An odd row size and another member in front: the rows start at no aligned offset.
    data = np.random.default_rng(0).standard_normal((1001, 3, 5)).astype(np.float32)
    path = write_npz(tmp_path / "split.npz", front=np.arange(7, dtype=np.int8), **{key: data})
    rows = StoredRows(path, key)
    assert (len(rows), rows.shape, rows.dtype) == (1001, data.shape, data.dtype)
    np.testing.assert_array_equal(rows[:], data)
    np.testing.assert_array_equal(rows[10:20], data[10:20])
    np.testing.assert_array_equal(rows[995:2000], data[995:])  # as numpy clips a slice
    np.testing.assert_array_equal(rows[::250], data[::250])
    picked = np.array([999, 0, 5, 5, -1])  # any order, repeats, from the end
    np.testing.assert_array_equal(rows[picked], data[picked])
    assert rows[np.array([], np.int64)].shape == (0, 3, 5)
    with pytest.raises(IndexError, match="out of range for 1001 rows"):
        rows[np.array([1001])]


def test_split_rows_index_like_the_tensor(tmp_path):
    x = np.random.default_rng(1).standard_normal((50, 1, 4, 4)).astype(np.float32)
    write_npz(tmp_path / "train.npz", x=x, y=np.arange(50, dtype=np.int64))
    split = load_split(tmp_path, "train")
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(split.x[order[:16]], torch.from_numpy(x)[order[:16]])
    assert torch.equal(split.x[:1], torch.from_numpy(x[:1]))
    assert split.x.shape == (50, 1, 4, 4) and len(split.x) == 50
    assert torch.equal(split.y, torch.arange(50))


def test_compressed_and_truncated_members_are_refused_by_name(tmp_path):
    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, x=np.zeros((10, 4), np.float32))
    with pytest.raises(DataError, match=r"compressed.npz: array 'x': compressed; only stored"):
        StoredRows(compressed, "x")
    whole = write_npz(tmp_path / "whole.npz", x=np.zeros((1000, 64), np.float32)).read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut.npz"):
        StoredRows(cut, "x")


def test_a_pass_over_a_split_keeps_one_batch_resident(tmp_path):
    rows = 128 * MB // (256 * 4)
    write_npz(tmp_path / "train.npz", x=np.ones((rows, 256), np.float32), y=np.zeros(rows, np.int64))
    split = load_split(tmp_path, "train")
    before = resident_mb()
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(0))
    total = sum(float(split.x[order[i : i + 64]].sum()) for i in range(0, rows, 64))
    assert total == rows * 256  # every row read once
    assert resident_mb() - before < 16  # of 128 MB read
