import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.contracts import ExportedMeta, ModelConfig, Normalization, exported_meta_text
from tasks.errors import DataError
from tasks.predict import predict
from tasks.variants import VARIANTS

from conftest import REPO


@pytest.fixture(scope="module")
def samples(tiny_workspace, tmp_path_factory):
    """The tiny test split as the files a user would bring: npz, CSV of pixels, PNG folder."""
    workspace, _ = tiny_workspace
    root = tmp_path_factory.mktemp("inputs")
    with np.load(workspace.prepared / "test.npz") as test:
        x_raw, x, y = test["x_raw"][:24], test["x"][:24], test["y"][:24]
    np.savez(root / "inputs.npz", x=x_raw)
    with open(root / "inputs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", *(f"px{i}" for i in range(784))])
        writer.writerows([int(label), *row] for label, row in zip(y, x_raw.reshape(len(y), -1).tolist()))
    (root / "images").mkdir()
    for i, image in enumerate(x_raw):
        Image.fromarray(image[0]).save(root / "images" / f"{i:03d}.png")
    return root, x, y


def expected_labels(model_path: Path, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.jit.load(str(model_path))(torch.from_numpy(x)).argmax(1).numpy()


@pytest.mark.parametrize("source", ["inputs.npz", "inputs.csv", "images"])
def test_every_input_format_gives_the_models_own_predictions(tiny_workspace, samples, source):
    workspace, _ = tiny_workspace
    root, x, _ = samples
    for model in (VARIANTS["int8"].path(workspace), VARIANTS["fp32_ts"].path(workspace)):
        proba = predict(model, root / source, out=root / f"{source}.{model.stem}.jsonl")
        assert np.array_equal(proba.argmax(1), expected_labels(model, x)), (source, model.name)
        records = [json.loads(line) for line in (root / f"{source}.{model.stem}.jsonl").read_text().splitlines()]
        assert len(records) == len(x) and records[0]["class"] == str(records[0]["label"])
        assert abs(sum(records[0]["probabilities"]) - 1) < 1e-4


def test_csv_output_and_image_ids(tiny_workspace, samples):
    workspace, _ = tiny_workspace
    root, x, _ = samples
    predict(VARIANTS["int8"].path(workspace), root / "images", out=root / "out.csv")
    rows = list(csv.DictReader((root / "out.csv").open()))
    assert len(rows) == len(x) and rows[0]["id"] == "000.png"
    assert list(rows[0])[:3] == ["id", "label", "class"] and "p_9" in rows[0]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: np.savez(d / "bad.npz", x=np.zeros((2, 3, 32, 32))), r"samples have shape \(3, 32, 32\), but int8.pt expects \(1, 28, 28\)"),
        (lambda d: (d / "bad.npz").write_bytes(b"random bytes, not a zip"), r"not an .npz file \(no zip archive"),
        (lambda d: np.savez(d / "bad.npz", x=np.array([{"a": 1}], dtype=object)), "holds object .* nothing that needs pickle"),
        (lambda d: np.savez(d / "bad.npz", x=np.full((1, 1, 28, 28), np.nan)), "sample 0 contains NaN or inf"),
        (lambda d: (d / "bad.csv").write_text("label,a,b\n1,2\n"), "row 2 has 2 cells, the header has 3"),
        (lambda d: (d / "bad.csv").write_text("label,a\n1,x7\n"), "row 2, column 'a': 'x7' is not a number"),
    ],
)
def test_bad_inputs_are_refused_with_the_reason(tiny_workspace, tmp_path, make, message):
    workspace, _ = tiny_workspace
    make(tmp_path)
    bad = next(tmp_path.glob("bad.*"))
    with pytest.raises(DataError, match=message):
        predict(VARIANTS["int8"].path(workspace), bad, out=tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_a_corrupt_image_is_named(tiny_workspace, tmp_path):
    workspace, _ = tiny_workspace
    (tmp_path / "ok.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"ok.png: not a readable image"):
        predict(VARIANTS["int8"].path(workspace), tmp_path)


def test_console_script_exits_non_zero_with_one_line(tiny_workspace, tmp_path):
    workspace, _ = tiny_workspace
    done = subprocess.run(
        [sys.executable, "-m", "tasks.predict", str(VARIANTS["int8"].path(workspace)), str(tmp_path / "missing.npz")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"predict: error: {tmp_path / 'missing.npz'}: input not found" in done.stderr


def scripted_model(path: Path, input_shape: list[int], classes: int = 3) -> Path:
    """A TorchScript model as export writes it (meta.json inside), for any input shape, made
    without running the pipeline: predict must handle every layout the same way."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(input_shape)), classes)).eval()
    meta = ExportedMeta(
        variant="fp32_ts", class_names=[f"c{i}" for i in range(classes)], input_shape=input_shape,
        normalization=Normalization(scale=1.0, mean=[0.5] * input_shape[0], std=[2.0] * input_shape[0]),
        backend=None, torch_version=str(torch.__version__),
        model=ModelConfig(family="mlp", input_shape=input_shape, num_classes=classes, widths=[classes],
                          convs_per_stage=1, dropout=0.0))
    torch.jit.save(torch.jit.script(model), str(path), _extra_files={"meta.json": exported_meta_text(meta)})
    return path


def own_predictions(model_path: Path, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.jit.load(str(model_path))((torch.from_numpy(x) - 0.5) / 2).argmax(1).numpy()


@pytest.mark.parametrize(("input_shape", "given"), [
    ([6], (6,)), ([6], (2, 3)),  # vectors: any sample shape of the right size, as prepare flattens
    ([1, 12], (12,)), ([2, 6], (2, 6)), ([2, 6], (12,)),  # sequences: a missing channel, flat rows
])
def test_vector_and_sequence_models_take_arrays_and_csv(tmp_path, input_shape, given):
    model = scripted_model(tmp_path / "m.pt", input_shape)
    x = np.random.default_rng(0).normal(size=(16, *input_shape)).astype(np.float32)
    expected = own_predictions(model, x)
    np.savez(tmp_path / "in.npz", x=x.reshape(16, *given))
    assert np.array_equal(predict(model, tmp_path / "in.npz", out=tmp_path / "a.jsonl").argmax(1), expected)
    if len(given) == 1:
        with open(tmp_path / "in.csv", "w", newline="") as f:
            csv.writer(f).writerows([[f"v{i}" for i in range(given[0])], *x.reshape(16, -1).tolist()])
        assert np.array_equal(predict(model, tmp_path / "in.csv", out=tmp_path / "b.jsonl").argmax(1), expected)


def test_images_given_to_a_vector_model_are_refused(tmp_path):
    model = scripted_model(tmp_path / "m.pt", [6])
    Image.new("L", (4, 4)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"a.png: images given, but m.pt takes vectors of shape \(6,\)"):
        predict(model, tmp_path / "a.png")
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 7)))
    with pytest.raises(DataError, match=r"samples have shape \(7,\), but m.pt expects \(6,\)"):
        predict(model, tmp_path / "bad.npz")
