import csv
import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib import format as npy
from PIL import Image

import tasks.npyio
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
        (lambda d: (d / "bad.csv").write_text("label,a," + ",".join(f"p{i}" for i in range(783)) + "\n1,x7" + ",0" * 783 + "\n"),
         "row 2, column 'a': 'x7' is not a number"),  # the shape (784 values) is checked first
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


def scripted_model(path: Path, input_shape: list[int], classes: int = 3, names: int | None = None,
                   class_names: list[str] | None = None) -> Path:
    """A TorchScript model as export writes it (meta.json inside), for any input shape, made
    without running the pipeline: predict must handle every layout the same way. Export did not
    list it, so predict takes it only with trust=True. `names`: how many class names its meta.json
    lists (c0, c1, ...), unless `class_names` gives them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(input_shape)), classes)).eval()
    meta = ExportedMeta(
        variant="fp32_ts", class_names=class_names or [f"c{i}" for i in range(names or classes)],
        input_shape=input_shape,
        normalization=Normalization(scale=1.0, mean=[0.5] * input_shape[0], std=[2.0] * input_shape[0]),
        backend=None, torch_version=str(torch.__version__),
        model=ModelConfig(net="tasks.model:mlp", input_shape=input_shape, num_classes=classes,
                          kwargs={"widths": [classes], "dropout": 0.0}))
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
    assert np.array_equal(predict(model, tmp_path / "in.npz", out=tmp_path / "a.jsonl", trust=True).argmax(1), expected)
    if len(given) == 1:
        with open(tmp_path / "in.csv", "w", newline="") as f:
            csv.writer(f).writerows([[f"v{i}" for i in range(given[0])], *x.reshape(16, -1).tolist()])
        assert np.array_equal(predict(model, tmp_path / "in.csv", out=tmp_path / "b.jsonl", trust=True).argmax(1), expected)


def test_images_given_to_a_vector_model_are_refused(tmp_path):
    model = scripted_model(tmp_path / "m.pt", [6])
    Image.new("L", (4, 4)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"a.png: images given, but m.pt takes vectors of shape \(6,\)"):
        predict(model, tmp_path / "a.png", trust=True)
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 7)))
    with pytest.raises(DataError, match=r"samples have shape \(7,\), but m.pt expects \(6,\)"):
        predict(model, tmp_path / "bad.npz", trust=True)


# --- only files export wrote are loaded -------------------------------------------------------

def project_copy(workspace, root: Path) -> Path:
    """The tiny workspace's int8.pt and metrics/export.json, as a user's project holds them."""
    (root / "models").mkdir(parents=True)
    (root / "metrics").mkdir()
    shutil.copy(VARIANTS["int8"].path(workspace), root / "models" / "int8.pt")
    shutil.copy(workspace.metrics("export"), root / "metrics" / "export.json")
    return root / "models" / "int8.pt"


def test_export_records_the_hash_that_predict_checks(tiny_workspace, samples, tmp_path):
    workspace, _ = tiny_workspace
    root, x, _ = samples
    report = json.loads(workspace.metrics("export").read_text())
    import hashlib
    assert report["int8"]["sha256"] == hashlib.sha256(VARIANTS["int8"].path(workspace).read_bytes()).hexdigest()
    model = project_copy(workspace, tmp_path / "project")
    assert np.array_equal(predict(model, root / "inputs.npz").argmax(1), expected_labels(model, x))
    # Elsewhere, with the manifest named.
    shutil.copy(model, tmp_path / "int8.pt")
    proba = predict(tmp_path / "int8.pt", root / "inputs.npz", manifest=tmp_path / "project/metrics/export.json")
    assert np.array_equal(proba.argmax(1), expected_labels(model, x))


def test_the_exported_program_is_verified_and_loaded_from_the_same_bytes(tiny_workspace, samples):
    workspace, _ = tiny_workspace
    root, x, _ = samples
    proba = predict(VARIANTS["fp32_pt2"].path(workspace), root / "inputs.npz")
    assert np.array_equal(proba.argmax(1), expected_labels(VARIANTS["fp32_ts"].path(workspace), x))


def test_a_changed_model_file_is_refused_unless_trusted(tiny_workspace, samples, tmp_path):
    workspace, _ = tiny_workspace
    root, _, _ = samples
    model = project_copy(workspace, tmp_path / "project")
    data = bytearray(model.read_bytes())
    at = data.index(b'"class_names"') + len(b'"class_names":["')
    data[at] ^= 1  # one byte of meta.json: class "0" becomes "1"
    model.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"int8.pt: sha256 [0-9a-f]{16}\.\.\. is not listed in .*export.json: "
                       r"not a file qatflow exported, or changed since; --trust loads it anyway"):
        predict(model, root / "inputs.npz", out=tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
    done = subprocess.run([sys.executable, "-m", "tasks.predict", str(model), str(root / "inputs.npz")],
                          check=False, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 1 and done.stdout == "" and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("predict: error:")] == [
        line for line in done.stderr.splitlines() if "predict" in line]
    assert "is not listed in" in done.stderr and "--trust loads it anyway" in done.stderr
    helped = subprocess.run([sys.executable, "-m", "tasks.predict", "--help"], check=False, capture_output=True, text=True, cwd=REPO)
    assert "--trust" in helped.stdout and "runs code from it" in " ".join(helped.stdout.split())


def test_trust_loads_a_model_export_did_not_list(tmp_path):
    model = scripted_model(tmp_path / "m.pt", [6])
    np.savez(tmp_path / "in.npz", x=np.zeros((4, 6), np.float32))
    with pytest.raises(DataError, match=r"m.pt: cannot check that qatflow exported it: .*metrics/export.json "
                       r"not found; give --manifest PATH, or --trust loads it anyway \(it runs code from the file\)"):
        predict(model, tmp_path / "in.npz")
    listed = {"runtime": "torchscript", "runtime_version": "2", "against": "eager qat", "max_abs_diff": 0.0,
              "argmax_agreement": 1.0, "passed": True, "size_bytes": 1, "sha256": "0" * 64}
    (tmp_path / "export.json").write_text(json.dumps({"int8": listed}))
    with pytest.raises(DataError, match="is not listed in"):
        predict(model, tmp_path / "in.npz", manifest=tmp_path / "export.json")
    assert predict(model, tmp_path / "in.npz", trust=True).shape == (4, 3)
    done = subprocess.run([sys.executable, "-m", "tasks.predict", str(model), str(tmp_path / "in.npz"), "--trust"],
                          check=False, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 4


def test_a_model_whose_outputs_do_not_match_its_class_names_is_refused(tmp_path):
    model = scripted_model(tmp_path / "m.pt", [6], classes=3, names=4)
    np.savez(tmp_path / "in.npz", x=np.zeros((2, 6), np.float32))
    with pytest.raises(DataError, match=r"m.pt: outputs 3 scores per sample, but its meta.json lists 4 class names"):
        predict(model, tmp_path / "in.npz", trust=True)


# --- bounded memory: headers first, then chunks -----------------------------------------------

def compressed_zeros(path: Path, shape: tuple[int, ...], dtype=np.float32) -> Path:
    """An .npz whose array `x` of zeros is written (and deflated) block by block: a few hundred KB
    on disk for hundreds of MB declared, never all in memory here."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, \
            archive.open("x.npy", "w", force_zip64=True) as f:
        npy.write_array_header_1_0(f, {"descr": npy.dtype_to_descr(np.dtype(dtype)),
                                       "fortran_order": False, "shape": shape})
        left, block = int(np.prod(shape)) * np.dtype(dtype).itemsize, bytes(16 << 20)
        while left:
            f.write(block[: min(left, len(block))])
            left -= min(left, len(block))
    return path


PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    import tasks.npyio
    from tasks.errors import DataError
    from tasks.predict import predict
    model, warm, given, out = map(Path, sys.argv[1:5])
    tasks.npyio.CHUNK_BYTES = int(sys.argv[5])
    predict(model, warm, out, trust=True, collect=False)  # torch, the model, the threads: warmed up

    def status(field):  # kB, from Linux's /proc/self/status
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

    try:  # restart the high-water mark at the current RSS (Linux 4.0+), so import peaks do not hide ours
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before, peak = status("VmRSS:"), lambda: status("VmHWM:")
    except OSError:  # the peak so far: the growth is measured above the imports' peak
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        predict(model, given, out, trust=True, collect=False)
        error = None
    except DataError as exc:
        error = str(exc)
    seconds = time.perf_counter() - start
    grew_mb = (peak() - before) / 1024  # KiB on Linux
    print(json.dumps({"error": error, "grew_mb": grew_mb, "seconds": seconds}))
""")


def peak_growth(model: Path, given: Path, tmp_path: Path, input_shape: list[int],
                chunk_bytes: int = tasks.npyio.CHUNK_BYTES) -> dict:
    """predict(model, given) in a fresh process: how far its peak RSS grew over a warmed-up run."""
    np.savez(tmp_path / "warm.npz", x=np.zeros((2, *input_shape), np.float32))
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(model), str(tmp_path / "warm.npz"), str(given),
                           str(tmp_path / "out.jsonl"), str(chunk_bytes)], check=False, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def huge_zeros(tmp_path_factory) -> Path:
    """(200_000, 1, 28, 28) float32 declared: 627 MB of data in a file of well under 1 MB."""
    path = compressed_zeros(tmp_path_factory.mktemp("huge") / "zeros.npz", (200_000, 1, 28, 28))
    assert path.stat().st_size < 2 << 20
    return path


def test_a_huge_input_of_the_wrong_shape_is_refused_from_its_header(huge_zeros, tmp_path):
    model = scripted_model(tmp_path / "m.pt", [1, 32, 32])
    result = peak_growth(model, huge_zeros, tmp_path, [1, 32, 32])
    print("refused:", result)
    assert result["error"] == f"{huge_zeros}: samples have shape (1, 28, 28), but m.pt expects (1, 32, 32)"
    assert result["grew_mb"] < 100 and result["seconds"] < 2


def test_a_large_input_of_the_right_shape_streams_in_bounded_memory(tmp_path):
    # 188 MB of float32 in chunks of 16 MB counted as float64 (2,560 rows, 24 chunks): the peak
    # follows the chunk, not the input (the default 64 MB chunks add about 160 MB to a 627 MB input, measured).
    given = compressed_zeros(tmp_path / "zeros.npz", (60_000, 1, 28, 28))
    model = scripted_model(tmp_path / "m.pt", [1, 28, 28])
    result = peak_growth(model, given, tmp_path, [1, 28, 28], chunk_bytes=16 << 20)
    print("streamed:", result)
    assert result["error"] is None and result["grew_mb"] < 100
    with open(tmp_path / "out.jsonl") as f:
        first, count = json.loads(f.readline()), 1 + sum(1 for _ in f)
    assert count == 60_000 and first["id"] == "0"


def test_a_header_promising_more_rows_than_stored_is_refused_before_reading(tmp_path):
    model = scripted_model(tmp_path / "m.pt", [6])
    with zipfile.ZipFile(tmp_path / "short.npz", "w", zipfile.ZIP_DEFLATED) as archive, archive.open("x.npy", "w") as f:
        npy.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 6)})
        f.write(bytes(4 * 6 * 5))
    with pytest.raises(DataError, match=r"short.npz: array 'x': truncated: the header says 1000000000 rows, "
                       r"the data ends after 5"):
        predict(model, tmp_path / "short.npz", trust=True)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_streamed_chunks_give_the_records_of_one_pass(tmp_path, monkeypatch, suffix):
    model = scripted_model(tmp_path / "m.pt", [1, 12])
    x = np.random.default_rng(1).normal(size=(103, 12)).astype(np.float32)
    np.savez_compressed(tmp_path / "in.npz", x=x)
    whole = predict(model, tmp_path / "in.npz", out=tmp_path / f"whole{suffix}", batch_size=8, trust=True)
    monkeypatch.setattr(tasks.npyio, "CHUNK_BYTES", 8 * 12 * 20)  # 20 rows: 16 a chunk, 2 batches of 8
    chunked = predict(model, tmp_path / "in.npz", out=tmp_path / f"chunked{suffix}", batch_size=8, trust=True)
    assert (tmp_path / f"chunked{suffix}").read_text() == (tmp_path / f"whole{suffix}").read_text()
    assert np.array_equal(chunked, whole) and np.array_equal(whole.argmax(1), own_predictions(model, x[:, None]))
    lines = (tmp_path / f"chunked{suffix}").read_text().splitlines()
    assert len(lines) == 103 + (suffix == ".csv")
    x[70, 0, ] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)  # found in the fifth chunk; the sample number is the file's
    with pytest.raises(DataError, match="nan.npz: sample 70 contains NaN or inf"):
        predict(model, tmp_path / "nan.npz", out=tmp_path / "nan.jsonl", batch_size=8, trust=True)
    assert not (tmp_path / "nan.jsonl").exists()


def test_a_csv_streams_in_chunks_with_the_row_numbers_of_the_file(tmp_path, monkeypatch):
    import tasks.readers
    model = scripted_model(tmp_path / "m.pt", [12])
    x = np.random.default_rng(2).normal(size=(53, 12)).astype(np.float32)
    rows = [["label", *(f"v{i}" for i in range(12))], *([7, *r] for r in x.tolist())]
    with open(tmp_path / "in.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with open(tmp_path / "in.csv", "a") as f:
        f.write("\n\n")  # blank lines at the end are not rows
    whole = predict(model, tmp_path / "in.csv", out=tmp_path / "whole.jsonl", batch_size=8, trust=True)
    monkeypatch.setattr(tasks.readers, "CSV_CHUNK_CELLS", 13 * 20)  # 20 rows: chunks of 16
    chunked = predict(model, tmp_path / "in.csv", out=tmp_path / "chunked.jsonl", batch_size=8, trust=True)
    assert (tmp_path / "chunked.jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()
    assert np.array_equal(chunked, whole) and np.array_equal(whole.argmax(1), own_predictions(model, x))
    rows[40][5] = "x7"  # in the third chunk; CSV row 41 (the header is row 1)
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows[:30] + [[]] + rows[30:])
    with pytest.raises(DataError, match=r"bad.csv: row 31 has 0 cells, the header has 13"):
        predict(model, tmp_path / "bad.csv", trust=True)
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError, match=r"bad.csv: row 41, column 'v4': 'x7' is not a number"):
        predict(model, tmp_path / "bad.csv", out=tmp_path / "bad.jsonl", batch_size=8, trust=True)
    assert not (tmp_path / "bad.jsonl").exists()
