import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import tasks.npyio
from bench.prepare_large import write_dataset
from tasks.contracts import Normalization, read_prepared_meta
from tasks.errors import DataError
from tasks.npyio import NpyStream, NpzWriter
from tasks.params import SplitFractions
from tasks.prepare import (
    ChannelStats,
    prepare,
    split_fractions,
    stratified_split,
    stratified_subset,
)
from tasks.sources import load_source
from tasks.workspace import Workspace

from conftest import REPO, params_of, section, write_params

THREE_WAY = split_fractions(SplitFractions(train=0.6, val=0.2, test=0.2), fixed_test=False)


def test_builtin_mnist_is_the_real_5k_sample():
    raw = load_source(params_of({}).data, Path.cwd())
    assert raw.x.shape == (5000, 1, 28, 28) and raw.x.dtype == np.uint8
    assert np.bincount(raw.y).tolist() == [500] * 10
    assert raw.x.array.max() == 255 and raw.scale == 255.0


def test_unknown_builtin_lists_the_known_ones():
    data = params_of({"data": {"source": "builtin:mnist"}}).data
    known = r"\(known: builtin:digits, builtin:mnist5k\)"
    with pytest.raises(DataError, match=rf"data.source: unknown source 'builtin:mnist' {known}"):
        load_source(data, Path.cwd())


def test_stratified_split_is_disjoint_complete_proportional_and_seeded():
    y = np.repeat(np.arange(4), [100, 50, 30, 20])
    parts = stratified_split(y, THREE_WAY, seed=3, class_names=list("abcd"))
    joined = np.concatenate(list(parts.values()))
    assert np.array_equal(np.sort(joined), np.arange(len(y)))
    for name, fraction in (("val", 0.2), ("test", 0.2)):
        counts = np.bincount(y[parts[name]], minlength=4)
        assert np.array_equal(counts, np.round(np.bincount(y) * fraction))
    again = stratified_split(y, THREE_WAY, seed=3, class_names=list("abcd"))
    other = stratified_split(y, THREE_WAY, seed=4, class_names=list("abcd"))
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    assert not np.array_equal(parts["test"], other["test"])


def test_split_refuses_a_class_too_small_for_it():
    y = np.array([0] * 50 + [1] * 2)
    with pytest.raises(DataError, match=r"class 'b' has 2 samples: too few for a 0.1 val fraction"):
        stratified_split(y, split_fractions(section("prepare.split"), fixed_test=False), seed=0, class_names=["a", "b"])


def test_a_fixed_test_set_leaves_train_and_val_in_proportion():
    fractions = split_fractions(SplitFractions(train=0.6, val=0.2, test=0.2), fixed_test=True)
    assert fractions == pytest.approx({"train": 0.75, "val": 0.25})
    parts = stratified_split(np.repeat(np.arange(2), 40), fractions, seed=0, class_names=["a", "b"])
    assert {name: len(idx) for name, idx in parts.items()} == {"train": 60, "val": 20}


def test_stratified_subset_keeps_class_shares():
    y = np.repeat(np.arange(3), [300, 200, 100])
    keep = stratified_subset(y, 60, seed=0)
    assert np.bincount(y[keep]).tolist() == [30, 20, 10]
    assert np.array_equal(keep, np.unique(keep))


def test_standardize_uses_per_channel_statistics_merged_over_chunks():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(64, 3, 4, 4)).astype(np.uint8)
    x[:, 2] = 7  # a constant channel must not divide by zero
    stats = ChannelStats(3)
    for chunk in (x[:5], x[5:40], x[40:]):  # uneven chunks
        stats.add(chunk.astype(np.float32) / 255)
    mean, std = stats.result()
    unit = x.astype(np.float64) / 255
    np.testing.assert_allclose(mean[:2], unit[:, :2].mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(std[:2], unit[:, :2].std(axis=(0, 2, 3)), rtol=1e-6)
    z = Normalization(scale=255.0, mean=mean.tolist(), std=std.tolist()).apply(x)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z[:, :2].mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, :2].std(axis=(0, 2, 3)), 1, atol=1e-4)
    assert np.all(z[:, 2] == 0)


def test_stats_merge_stays_exact_far_from_zero():
    """A large offset with a small spread: a running sum of squares would lose the spread."""
    x = (1e4 + np.random.default_rng(0).normal(0, 1e-2, (10_000, 1))).astype(np.float32)
    stats = ChannelStats(1)
    for chunk in np.array_split(x, 37):
        stats.add(chunk)
    assert stats.result()[1][0] == pytest.approx(x.astype(np.float64).std(), rel=1e-5)


def test_streamed_npz_matches_numpy_and_is_deterministic(tmp_path):
    x = np.arange(24, dtype=np.int16).reshape(6, 2, 2)
    for name in ("a.npz", "b.npz"):
        with open(tmp_path / name, "wb") as f:
            npz = NpzWriter(f)
            with npz.member("x", x.shape, x.dtype) as rows:
                rows.write(x[:4])
                rows.write(x[4:])
            npz.array("y", np.arange(6))
            npz.close()
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as loaded:
        assert np.array_equal(loaded["x"], x) and np.array_equal(loaded["y"], np.arange(6))
    with zipfile.ZipFile(tmp_path / "a.npz") as archive:  # stored, and no clock in the bytes
        assert {(i.compress_type, i.date_time) for i in archive.infolist()} == {
            (zipfile.ZIP_STORED, (1980, 1, 1, 0, 0, 0))}
    stream = NpyStream(tmp_path / "a.npz", "x")
    assert stream.shape == (6, 2, 2) and [len(c) for c in stream.chunks(4)] == [4, 2]


def test_prepare_writes_standardized_splits_from_training_statistics(tmp_path):
    params = params_of({"data": {"max_samples": 500}})
    workspace = Workspace(tmp_path)
    meta = prepare(params.data, params.prepare, workspace)
    assert meta.samples == {"train": 400, "val": 50, "test": 50}
    saved = json.loads((workspace.prepared / "meta.json").read_text())
    assert read_prepared_meta(workspace.prepared) == meta and saved["layout"] == "images"
    assert saved["input_shape"] == [1, 28, 28] and saved["class_names"] == [str(d) for d in range(10)]
    with np.load(workspace.prepared / "train.npz") as train, np.load(workspace.prepared / "test.npz") as test:
        assert train["x"].dtype == np.float32 and train["y"].dtype == np.int64
        assert abs(float(train["x"].mean())) < 1e-5 and abs(float(train["x"].std()) - 1) < 1e-4
        rebuilt = meta.normalization.apply(test["x_raw"])
        np.testing.assert_array_equal(rebuilt, test["x"])
    first = {p.name: p.read_bytes() for p in workspace.prepared.iterdir()}
    prepare(params.data, params.prepare, workspace)
    assert first == {p.name: p.read_bytes() for p in workspace.prepared.iterdir()}


def test_a_large_x_is_streamed_never_loaded_whole(tmp_path, monkeypatch):
    write_dataset(tmp_path / "d.npz", rows=3000, features=8)
    loaded = []
    real_load = NpyStream.load
    monkeypatch.setattr(NpyStream, "load", lambda self: loaded.append(self.key) or real_load(self))
    monkeypatch.setattr(tasks.npyio, "CHUNK_BYTES", 8 * 8 * 500)  # 500 rows a chunk
    params = params_of({"data": {"source": str(tmp_path / "d.npz")}})
    meta = prepare(params.data, params.prepare, Workspace(tmp_path))
    assert loaded == ["y"] and sum(meta.samples.values()) == 3000


def _prepare_process(project: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "tasks.prepare"], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigkill_mid_write_leaves_the_previous_outputs(tmp_path):
    project = tmp_path
    small = params_of({"data": {"source": "builtin:digits"}})
    prepare(small.data, small.prepare, Workspace(project))
    before = {p.name: p.read_bytes() for p in (project / "data/prepared").iterdir()}

    write_dataset(project / "data/raw/large.npz", rows=150_000, features=256)  # 154 MB
    write_params(project / "params.yaml", {"data": {"source": "data/raw/large.npz"}})
    process = _prepare_process(project)
    staged = project / f"data/.prepared.{process.pid}.staged"
    deadline = time.monotonic() + 60
    while not (staged.is_dir() and any(p.stat().st_size > 1 << 20 for p in staged.iterdir())):
        assert process.poll() is None, "prepare finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert staged.is_dir()  # killed mid-write, its half-written folder left behind

    assert {p.name: p.read_bytes() for p in (project / "data/prepared").iterdir()} == before
    rerun = _prepare_process(project)
    _, err = rerun.communicate()
    assert rerun.returncode == 0, err
    assert sorted(p.name for p in (project / "data").iterdir()) == ["prepared", "raw"]  # no leftovers
    assert sum(json.loads((project / "data/prepared/meta.json").read_text())["samples"].values()) == 150_000


def test_quick_large_data_benchmark(tmp_path):
    out = tmp_path / "prepare_large.json"
    done = subprocess.run([sys.executable, "-m", "bench.prepare_large", "--quick", "--scratch", str(tmp_path),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["rows"] == 20_000 and result["throughput_mb_s"] > 0 and result["peak_rss_mb"] > 0
    assert "peak RSS / data size" in done.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["prepare_large.json"]  # the scratch project is gone
