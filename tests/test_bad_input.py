"""Every kind of bad input the issue lists: refused before anything is written, with one message
naming the file (and key, column or row), and the previous outputs left as they were."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.errors import DataError, ParamsError
from tasks.params import load_params
from tasks.prepare import prepare
from tasks.workspace import Workspace

from conftest import REPO, params_of, write_params

RAW = "data/raw"


def snapshot(root: Path) -> dict[str, bytes]:
    folder = root / "data"
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and "raw" not in p.parts}


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project whose data/prepared already holds a good run's outputs; the working directory,
    as for `python -m tasks.prepare`, so messages name files as the user does."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / RAW).mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / RAW / "good.npz", x=rng.normal(size=(40, 3)), y=np.arange(40) % 2)
    run_prepare(tmp_path, source=f"{RAW}/good.npz")
    return tmp_path


def run_prepare(root: Path, **data) -> dict:
    params = params_of({"data": data})
    return prepare(params.data, params.prepare, Workspace(root))


def refused(root: Path, match: str, **data) -> None:
    before = snapshot(root)
    with pytest.raises(DataError, match="^" + match):
        run_prepare(root, **data)
    assert snapshot(root) == before
    assert not [p for p in (root / "data").iterdir() if p.name.startswith(".")]  # nothing staged left


def npz(root: Path, name: str = "bad.npz", **arrays) -> str:
    np.savez(root / RAW / name, **arrays)
    return f"{RAW}/{name}"


X, Y = np.random.default_rng(1).normal(size=(30, 4)), np.arange(30) % 3


def test_missing_file(project):
    refused(project, r"data/raw/nope.npz: not found \(data.source", source=f"{RAW}/nope.npz")


def test_random_bytes_named_npz(project):
    (project / RAW / "bad.npz").write_bytes(os.urandom(2000))
    refused(project, r"data/raw/bad.npz: not an .npz file \(no zip archive", source=f"{RAW}/bad.npz")


def test_truncated_file(project):
    source = npz(project, x=X, y=Y)
    path = project / source
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(project, r"data/raw/bad.npz: not an .npz file \(no zip archive; truncated", source=source)


def test_member_shorter_than_its_header_says(project):
    """The zip is intact, but the array inside is cut short: named with the row it ends at."""
    full = project / "full.npy"
    np.save(full, X)
    with zipfile.ZipFile(project / RAW / "bad.npz", "w") as archive:
        archive.writestr("x.npy", full.read_bytes()[: -X.itemsize * 4 * 10 - 3])
        archive.writestr("y.npy", _npy(project, Y))
    refused(project, r"data/raw/bad.npz: array 'x': truncated: the header says 30 rows, the data ends after 19",
            source=f"{RAW}/bad.npz")


def test_crc_error(project):
    source = npz(project, x=X, y=Y)
    data = bytearray((project / source).read_bytes())
    data[200] ^= 0xFF  # inside x's data: the zip still opens, the member's checksum fails
    (project / source).write_bytes(bytes(data))
    refused(project, r"data/raw/bad.npz: array 'x': corrupt or truncated \(Bad CRC-32", source=source)


@pytest.mark.parametrize("missing", ["x", "y"])
def test_missing_array(project, missing):
    arrays = {"x": X, "y": Y}
    arrays["labels" if missing == "y" else "samples"] = arrays.pop(missing)
    source = npz(project, **arrays)
    refused(project, rf"data/raw/bad.npz: array '{missing}' missing \(arrays: ", source=source)


def test_length_mismatch(project):
    refused(project, r"data/raw/bad.npz: array 'x': 30 samples but 29 labels", source=npz(project, x=X, y=Y[:-1]))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf(project, value):
    x = X.copy()
    x[17, 2] = value
    refused(project, r"data/raw/bad.npz: array 'x': sample 17 contains NaN or inf", source=npz(project, x=x, y=Y))


@pytest.mark.parametrize(("labels", "match"), [
    (np.where(np.arange(30) == 4, -1, Y), r"array 'y': label -1 at sample 4 is negative"),
    (np.where(np.arange(30) == 5, 1.5, Y), r"array 'y': label 1.5 at sample 5 is not an integer"),
])
def test_bad_labels(project, labels, match):
    refused(project, "data/raw/bad.npz: " + match, source=npz(project, x=X, y=labels))


def test_label_out_of_range_of_class_names(project):
    source = npz(project, x=X, y=Y, class_names=np.array(["a", "b"]))
    refused(project, r"data/raw/bad.npz: array 'y': label 2 at sample 2 is out of range: class_names has 2 entries",
            source=source)


def test_a_class_without_samples(project):
    refused(project, r"data/raw/bad.npz: array 'x': class '1' \(label 1\) has no samples; labels must cover 0..2",
            source=npz(project, x=X, y=np.where(Y == 1, 0, Y)))


def test_one_class(project):
    refused(project, "data/raw/bad.npz: array 'x': only one class present",
            source=npz(project, x=X, y=np.zeros(30, np.int64)))


def test_empty_dataset(project):
    refused(project, r"data/raw/bad.npz: array 'x': the dataset is empty",
            source=npz(project, x=np.zeros((0, 4)), y=np.zeros(0, np.int64)))


def test_too_few_samples_of_a_class_for_the_split(project):
    y = np.where(np.arange(30) < 3, 2, np.arange(30) % 2)
    refused(project, r"data/raw/bad.npz: class '2' has 3 samples: too few for a 0.1 val fraction",
            source=npz(project, x=X, y=y))


@pytest.mark.parametrize(("x", "kind"), [
    (np.array([{"a": 1}] * 30, dtype=object), "object"),
    (np.array(["abc"] * 30), "text"),
    (np.ones(30, dtype=[("a", "f4"), ("b", "i4")]), "record"),
    (np.ones((30, 2), dtype=np.complex64), "complex"),
])
def test_object_and_text_arrays(project, x, kind):
    refused(project, rf"data/raw/bad.npz: array 'x': holds {kind} .* values; .*nothing that needs pickle",
            source=npz(project, x=x, y=Y))


@pytest.mark.parametrize(("text", "match"), [
    ("a,label,b\n1,0,2\n3,1,x7\n", r"data/raw/bad.csv: row 3, column 'b': 'x7' is not a number"),
    ("a,b\n1,2\n", r"data/raw/bad.csv: no label column 'label' \(columns: a, b\); set data.label_column"),
    ("a,label,b\n1,0,2\n3,1\n", r"data/raw/bad.csv: row 3 has 2 cells, the header has 3"),
    ("a,label\n1,0\n2,\n", r"data/raw/bad.csv: row 3, column 'label': empty label"),
    ("a,label\n" + "1,0\n" * 20 + "nan,1\n" * 20, r"data/raw/bad.csv: row 22 contains NaN or inf"),
])
def test_bad_csv(project, text, match):
    (project / RAW / "bad.csv").write_text(text)
    refused(project, match, source=f"{RAW}/bad.csv")


def test_binary_file_named_csv(project):
    (project / RAW / "bad.csv").write_bytes(b"\xff\xfe\x00\x81 not text")
    refused(project, r"data/raw/bad.csv: cannot read as CSV \(.* can't decode", source=f"{RAW}/bad.csv")


def test_corrupt_image_in_a_class_folder(project):
    for name in ("a", "b"):
        (project / RAW / "imgs" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (5, 5), i).save(project / RAW / "imgs" / name / f"{i}.png")
    (project / RAW / "imgs/b/1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    refused(project, r"data/raw/imgs/b/1.png: not a readable image", source=f"{RAW}/imgs")


@pytest.mark.parametrize(("params", "match"), [
    ({"data": {"sorce": "x.npz"}}, r"data.sorce: unknown key"),
    ({"train": {"epochs": "3"}}, r"train.epochs: Input should be a valid integer.*got '3'"),
    ({"train": {"lr": -0.1}}, r"train.lr: Input should be greater than 0 \(got -0.1\)"),
    ({"prepare": {"split": {"train": 0.8, "val": 0.1, "test": 0.2}}}, r"prepare.split: .*must sum to 1, got 1.1"),
    ({"data": {"layout": "table"}}, r"data.layout: Input should be 'auto', 'vectors', 'sequences' or 'images'"),
])
def test_bad_params(tmp_path, params, match):
    path = tmp_path / "params.yaml"
    write_params(path, params)
    with pytest.raises(ParamsError, match=rf"{path} is invalid:\n(.|\n)*{match}"):
        load_params(path)


def _npy(root: Path, array: np.ndarray) -> bytes:
    np.save(root / "tmp.npy", array)
    return (root / "tmp.npy").read_bytes()


def cli(root: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "tasks.prepare", "--params", "params.yaml", *flags],
                          cwd=root, env=env, capture_output=True, text=True)


@pytest.mark.parametrize(("params", "first_line"), [
    ({"data": {"source": f"{RAW}/bad.npz"}}, "prepare: error: data/raw/bad.npz: not an .npz file"),
    ({"data": {"source": f"{RAW}/good.npz"}, "train": {"lr": -1}}, "prepare: error: params.yaml is invalid:"),
])
def test_cli_prints_one_clear_message_and_keeps_the_outputs(project, params, first_line):
    (project / RAW / "bad.npz").write_bytes(b"PK not really")
    write_params(project / "params.yaml", params)
    before = snapshot(project)
    done = cli(project)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(first_line), done.stderr
    assert snapshot(project) == before
    debug = cli(project, "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert snapshot(project) == before
