import json

import numpy as np
import pytest

from tasks.errors import DataError
from tasks.layout import Layout
from tasks.params import Split, parse_params
from tasks.prepare import channel_stats, prepare, standardize, stratified_split, stratified_subset
from tasks.sources import RawDataset, load_source, validate


def test_builtin_mnist_is_the_real_5k_sample():
    raw = load_source("builtin:mnist5k")
    assert raw.x.shape == (5000, 1, 28, 28) and raw.x.dtype == np.uint8
    assert np.bincount(raw.y).tolist() == [500] * 10
    assert raw.x.max() == 255 and raw.scale == 255.0


def test_unknown_source_lists_the_known_ones():
    with pytest.raises(DataError, match=r"data.source: unknown source 'mnist'.*builtin:mnist5k"):
        load_source("mnist")


def test_stratified_split_is_disjoint_complete_proportional_and_seeded():
    y = np.repeat(np.arange(4), [100, 50, 30, 20])
    split = Split(train=0.6, val=0.2, test=0.2)
    parts = stratified_split(y, split, seed=3, class_names=list("abcd"))
    joined = np.concatenate(list(parts.values()))
    assert np.array_equal(np.sort(joined), np.arange(len(y)))
    for name, fraction in (("val", 0.2), ("test", 0.2)):
        counts = np.bincount(y[parts[name]], minlength=4)
        assert np.array_equal(counts, np.round(np.bincount(y) * fraction))
    again = stratified_split(y, split, seed=3, class_names=list("abcd"))
    other = stratified_split(y, split, seed=4, class_names=list("abcd"))
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    assert not np.array_equal(parts["test"], other["test"])


def test_split_refuses_a_class_too_small_for_it():
    y = np.array([0] * 50 + [1] * 2)
    with pytest.raises(DataError, match=r"class 'b' has 2 samples: too few for a 0.1 val fraction"):
        stratified_split(y, Split(train=0.8, val=0.1, test=0.1), seed=0, class_names=["a", "b"])


def test_stratified_subset_keeps_class_shares():
    y = np.repeat(np.arange(3), [300, 200, 100])
    keep = stratified_subset(y, 60, seed=0)
    assert np.bincount(y[keep]).tolist() == [30, 20, 10]
    assert np.array_equal(keep, np.unique(keep))


def test_standardize_uses_per_channel_statistics():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(64, 3, 4, 4)).astype(np.uint8)
    x[:, 2] = 7  # a constant channel must not divide by zero
    mean, std = channel_stats(x.astype(np.float32) / 255)
    z = standardize(x, 255.0, mean, std)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z[:, :2].mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, :2].std(axis=(0, 2, 3)), 1, atol=1e-4)
    assert np.all(z[:, 2] == 0)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros((0, 1, 2, 2)), np.zeros(0, np.int64), "empty"),
        (np.zeros((3, 1, 2, 2)), np.array([0, 1], np.int64), "3 samples but 2 labels"),
        (np.array([[[[np.nan]]], [[[0.0]]]]), np.array([0, 1]), "sample 0 contains NaN or inf"),
        (np.zeros((2, 1, 1, 1)), np.array([0, 5]), r"labels must lie in \[0, 1\]"),
        (np.zeros((2, 1, 1, 1)), np.array([1, 1]), "only one class"),
    ],
)
def test_validate_refuses_bad_datasets(x, y, message):
    with pytest.raises(DataError, match=message):
        validate(RawDataset(x, y, ["a", "b"], 1.0, "in-memory"))


def test_prepare_writes_standardized_splits_from_training_statistics(tmp_path):
    params = parse_params({"data": {"max_samples": 500}})
    layout = Layout(tmp_path)
    meta = prepare(params.data, params.prepare, layout)
    assert meta["samples"] == {"train": 400, "val": 50, "test": 50}
    saved = json.loads((layout.prepared / "meta.json").read_text())
    assert saved["input_shape"] == [1, 28, 28] and saved["class_names"] == [str(d) for d in range(10)]
    with np.load(layout.prepared / "train.npz") as train, np.load(layout.prepared / "test.npz") as test:
        assert train["x"].dtype == np.float32 and train["y"].dtype == np.int64
        assert abs(float(train["x"].mean())) < 1e-5 and abs(float(train["x"].std()) - 1) < 1e-4
        norm = saved["normalization"]
        rebuilt = standardize(test["x_raw"], norm["scale"], np.array(norm["mean"]), np.array(norm["std"]))
        np.testing.assert_array_equal(rebuilt, test["x"])
    first = {p.name: p.read_bytes() for p in layout.prepared.iterdir()}
    prepare(params.data, params.prepare, layout)
    assert first == {p.name: p.read_bytes() for p in layout.prepared.iterdir()}
