"""Every kind of data source, prepared end to end into the one prepared format."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tasks.npyio
from tasks.contracts import PreparedMeta, prepared_meta_text
from tasks.errors import DataError
from tasks.layout import resolve_layout
from tasks.npyio import InMemory
from tasks.prepare import prepare
from tasks.workspace import Workspace

from conftest import params_of


def run_prepare(root: Path, **data) -> PreparedMeta:
    params = params_of({"data": data})
    return prepare(params.data, params.prepare, Workspace(root))


def prepared(root: Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    meta = json.loads((root / "data/prepared/meta.json").read_text())
    arrays = {}
    for name in ("train", "val", "test"):
        with np.load(root / f"data/prepared/{name}.npz", allow_pickle=False) as split:
            arrays[name] = {key: split[key] for key in split.files}
    return meta, arrays


def labelled(n: int, classes: int, shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(3, 2, (n, *shape)).astype(np.float32), np.arange(n) % classes


def test_npz_vectors_are_split_standardized_and_kept_raw(tmp_path):
    x, y = labelled(200, 4, (6,))
    (tmp_path / "data/raw").mkdir(parents=True)
    np.savez(tmp_path / "data/raw/table.npz", x=x, y=y)
    meta = run_prepare(tmp_path, source="data/raw/table.npz")
    saved, arrays = prepared(tmp_path)
    assert saved == json.loads(prepared_meta_text(meta)) and meta.layout == "vectors" and meta.input_shape == [6]
    assert meta.class_names == ["0", "1", "2", "3"] and meta.samples == {"train": 160, "val": 20, "test": 20}
    norm = meta.normalization
    assert norm.scale == 1.0 and len(norm.mean) == 6
    train = arrays["train"]["x"]
    np.testing.assert_allclose(train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(train.std(0), 1, atol=1e-4)
    test = arrays["test"]
    rows = [int(np.flatnonzero((x == row).all(1))[0]) for row in test["x_raw"]]  # source order kept
    assert rows == sorted(rows) and np.array_equal(y[rows], test["y"])
    assert np.array_equal(norm.apply(test["x_raw"]), test["x"])


def test_npz_with_its_own_test_split_and_class_names(tmp_path):
    x, y = labelled(100, 2, (3, 40))
    x_test, y_test = labelled(30, 2, (3, 40), seed=1)
    np.savez_compressed(tmp_path / "s.npz", x=x, y=y, x_test=x_test, y_test=y_test,
                        class_names=np.array(["quiet", "loud"]))
    meta = run_prepare(tmp_path, source="s.npz")
    _, arrays = prepared(tmp_path)
    assert meta.class_names == ["quiet", "loud"] and meta.layout == "sequences"
    # train:val keep their 0.8:0.1 proportion; the test split is x_test, whole and in order.
    assert meta.samples == {"train": 88, "val": 12, "test": 30} and meta.input_shape == [3, 40]
    assert np.array_equal(arrays["test"]["x_raw"], x_test) and np.array_equal(arrays["test"]["y"], y_test)
    assert len(meta.normalization.mean) == 3  # per channel


@pytest.mark.parametrize(("labels", "names"), [
    (["cat", "dog", "ant"], ["ant", "cat", "dog"]),
    (["10", "2", "1"], ["1", "2", "10"]),  # integers sort as numbers
])
def test_csv_labels_become_sorted_class_names(tmp_path, labels, names):
    rows = [f"{labels[i % 3]},{i % 7},{i * 0.5}" for i in range(60)]
    (tmp_path / "t.csv").write_text("\ufeffkind,f1,f2\n" + "\n".join(rows) + "\n", encoding="utf-8")  # with a BOM
    meta = run_prepare(tmp_path, source="t.csv", label_column="kind")
    _, arrays = prepared(tmp_path)
    assert meta.class_names == names and meta.layout == "vectors" and meta.input_shape == [2]
    first = [r for r in rows if r.split(",")[0] == labels[0]]
    assert (np.concatenate([a["y"] for a in arrays.values()]) == names.index(labels[0])).sum() == len(first)


@pytest.mark.parametrize(("mode", "channels"), [("grayscale", 1), ("rgb", 3)])
def test_image_folder_of_mixed_sizes(tmp_path, mode, channels):
    rng = np.random.default_rng(0)
    for c, name in enumerate(["circle", "square"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(10):
            size = (12 + i, 9 + 2 * i)
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            image = Image.fromarray(pixels) if i % 2 else Image.fromarray(pixels[..., 0])  # RGB and L
            image.save(tmp_path / "imgs" / name / f"{i}.{'png' if i % 3 else 'jpg'}")
    meta = run_prepare(tmp_path, source="imgs", image_size=[10, 14], image_mode=mode)
    _, arrays = prepared(tmp_path)
    assert meta.class_names == ["circle", "square"] and meta.layout == "images"
    assert meta.input_shape == [channels, 10, 14] and meta.normalization.scale == 255.0
    assert arrays["test"]["x_raw"].dtype == np.uint8 and arrays["test"]["x_raw"].shape[1:] == (channels, 10, 14)


def test_builtin_digits(tmp_path):
    meta = run_prepare(tmp_path, source="builtin:digits")
    _, arrays = prepared(tmp_path)
    assert meta.input_shape == [1, 8, 8] and meta.normalization.scale == 16.0
    assert sum(meta.samples.values()) == 1797 and arrays["test"]["x_raw"].max() == 16


def zeros(shape: tuple[int, ...]) -> InMemory:
    return InMemory(np.zeros((4, *shape), np.float32), "x.npz")


@pytest.mark.parametrize(("requested", "shape", "layout", "canonical"), [
    ("auto", (), "vectors", (1,)),
    # (N, F) is the one shape auto decides from the values (tests/test_layout.py); constant columns
    # show no column order, so they stay vectors.
    ("auto", (20,), "vectors", (20,)),
    ("auto", (3, 100), "sequences", (3, 100)),
    ("auto", (4, 16), "sequences", (4, 16)),  # 4 * 4 <= 16
    ("auto", (5, 16), "images", (1, 5, 16)),
    ("auto", (28, 28), "images", (1, 28, 28)),
    ("auto", (3, 32, 32), "images", (3, 32, 32)),
    ("vectors", (3, 32, 32), "vectors", (3072,)),
    ("sequences", (50,), "sequences", (1, 50)),
    ("sequences", (28, 28), "sequences", (28, 28)),
    ("images", (8, 100), "images", (1, 8, 100)),
])
def test_layouts(requested, shape, layout, canonical):
    choice = resolve_layout(requested, zeros(shape))
    assert (choice.layout, choice.shape) == (layout, canonical)
    if requested != "auto":
        assert choice.reason == "set in params (data.layout)"


@pytest.mark.parametrize(("requested", "shape"), [
    ("sequences", (3, 4, 5)), ("images", (10,)), ("auto", (2, 3, 4, 5)),
])
def test_impossible_layouts_name_the_param(requested, shape):
    with pytest.raises(DataError, match=rf"x.npz: data.layout {requested}"):
        resolve_layout(requested, zeros(shape))


def test_npz_of_waveforms_becomes_sequences_by_auto(tmp_path):
    """An (N, 128) array of signals: auto sees the column order and picks sequences (-> cnn1d)."""
    rng = np.random.default_rng(0)
    y = np.arange(400) % 2
    t = np.arange(128) / 128
    frequency, phase = rng.uniform(2, 6, (400, 1)), rng.uniform(0, 1, (400, 1))
    wave = np.sin(2 * np.pi * (frequency * t + phase))
    x = np.where(y[:, None] == 0, wave, np.sign(wave)) + rng.normal(0, 0.3, (400, 128))
    np.savez(tmp_path / "w.npz", x=x.astype(np.float32), y=y)
    meta = run_prepare(tmp_path, source="w.npz")
    saved, arrays = prepared(tmp_path)
    assert meta.layout == "sequences" and meta.input_shape == [1, 128]
    assert meta.layout_reason.startswith("auto: an ordered signal: over 400 rows")
    assert saved["layout_reason"] == meta.layout_reason
    assert arrays["test"]["x"].shape[1:] == (1, 128)


def test_explicit_layout_reshapes_on_the_way(tmp_path):
    x, y = labelled(60, 3, (4, 5))
    np.savez(tmp_path / "d.npz", x=x, y=y)
    meta = run_prepare(tmp_path, source="d.npz", layout="vectors")
    _, arrays = prepared(tmp_path)
    assert meta.input_shape == [20] and arrays["test"]["x_raw"].shape[1:] == (20,)
    meta = run_prepare(tmp_path, source="d.npz", layout="images")
    assert meta.input_shape == [1, 4, 5] and meta.layout == "images"


def test_uint8_images_scale_by_255_other_arrays_by_1(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (60, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "u.npz", x=x, y=np.arange(60) % 2)
    assert run_prepare(tmp_path, source="u.npz").normalization.scale == 255.0
    assert run_prepare(tmp_path, source="u.npz", layout="vectors").normalization.scale == 1.0


def test_chunked_reading_gives_the_same_bytes(tmp_path, monkeypatch):
    """Many small chunks (stats merged across them, rows routed per chunk) == one big chunk."""
    x, y = labelled(500, 5, (2, 30))
    x = x.astype(">f4")  # big-endian on disk: read as is, written native
    np.savez(tmp_path / "d.npz", x=x, y=y)
    run_prepare(tmp_path / "one", source=str(tmp_path / "d.npz"))
    monkeypatch.setattr(tasks.npyio, "CHUNK_BYTES", 7 * 8 * 60)  # 7 rows per chunk
    run_prepare(tmp_path / "many", source=str(tmp_path / "d.npz"))
    one, many = tmp_path / "one/data/prepared", tmp_path / "many/data/prepared"
    for name in ("train.npz", "val.npz", "test.npz"):
        assert (one / name).read_bytes() == (many / name).read_bytes(), name
    meta_one, meta_many = (json.loads((d / "meta.json").read_text()) for d in (one, many))
    np.testing.assert_allclose(meta_one["normalization"]["std"], meta_many["normalization"]["std"], rtol=1e-6)


def test_fortran_order_array_is_read(tmp_path):
    x, y = labelled(80, 2, (5,))
    np.savez(tmp_path / "f.npz", x=np.asfortranarray(x), y=y)
    run_prepare(tmp_path / "f", source=str(tmp_path / "f.npz"))
    np.savez(tmp_path / "c.npz", x=x, y=y)
    run_prepare(tmp_path / "c", source=str(tmp_path / "c.npz"))
    assert (tmp_path / "f/data/prepared/train.npz").read_bytes() == (tmp_path / "c/data/prepared/train.npz").read_bytes()


def test_sources_outside_data_raw_get_a_warning(tmp_path, capsys):
    x, y = labelled(40, 2, (3,))
    (tmp_path / "data/raw").mkdir(parents=True)
    np.savez(tmp_path / "data/raw/in.npz", x=x, y=y)
    np.savez(tmp_path / "out.npz", x=x, y=y)
    run_prepare(tmp_path, source="data/raw/in.npz")
    assert "warning" not in capsys.readouterr().err
    run_prepare(tmp_path, source="out.npz")
    assert f"{tmp_path / 'out.npz'} lies outside data/raw" in capsys.readouterr().err
