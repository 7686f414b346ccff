"""Hostile or unlucky inputs, with the real tools on files made here: YAML alias bombs in params,
images too large to decode, read-only output folders, and model files that are not what their
metadata says. Each stops with one line naming the file, exit 1, and nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.atomic import staged_outputs
from tasks.errors import DataError, ParamsError, QatflowError
from tasks.params import load_params, safe_yaml
from tasks.prepare import prepare
from tasks.readers import DEFAULT_MAX_IMAGE_PIXELS, read_images
from tasks.workspace import Workspace

from conftest import REPO, params_of, write_params

RAW = "data/raw"


def cli(*args: str, cwd: Path, user: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "QATFLOW_DEBUG": "0"}
    return subprocess.run([*(user or []), sys.executable, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def one_line_error(done: subprocess.CompletedProcess, stage: str, match: str) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[0].startswith(f"{stage}: error: "), lines[0]
    assert match in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and "raw" not in p.parts}


# -- 1. YAML alias bombs ---------------------------------------------------------------------

BILLION_LAUGHS = """\
data:
  source: builtin:digits
train:
  lr: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
  epochs: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
  batch_size: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
  patience: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
  seed: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
  threads: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
  weight_decay: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
  label_smoothing: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
  augment_shift: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_billion_laughs_params_are_refused_fast_with_a_short_message(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(BILLION_LAUGHS)
    start = time.perf_counter()
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert time.perf_counter() - start < 0.5
    message = str(caught.value)
    assert message == (f"{path}: line 4: YAML anchors (&a) and aliases are not allowed in params")
    assert len(message) < 200


def test_an_alias_alone_is_refused_naming_its_line():
    with pytest.raises(ParamsError, match=r"^--set train.lr: line 2: YAML aliases \(\*x\) are not"):
        safe_yaml("a: 1\nb: *x\n", "--set train.lr")


def test_billion_laughs_through_a_stage_cli_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(BILLION_LAUGHS)
    start = time.perf_counter()
    done = cli("-m", "tasks.prepare", cwd=tmp_path)
    assert time.perf_counter() - start < 60
    one_line_error(done, "prepare", "params.yaml: line 4: YAML anchors (&a) and aliases are not "
                                    "allowed in params")
    assert not (tmp_path / "data").exists()


def test_safe_yaml_reads_what_params_use():
    assert safe_yaml("train: {lr: 0.01, model: {widths: [8, 16]}}\nx: null\n", "p") == {
        "train": {"lr": 0.01, "model": {"widths": [8, 16]}}, "x": None}
    with pytest.raises(ParamsError, match=r"^p: not valid YAML"):
        safe_yaml("a: [1, 2\n", "p")
    with pytest.raises(ParamsError, match=r"^p: not valid YAML"):  # no python/object tags
        safe_yaml("!!python/object/apply:os.system ['true']\n", "p")


def test_long_values_in_validation_errors_are_cut():
    with pytest.raises(ParamsError) as caught:
        params_of({"train": {"optimizer": "x" * 100_000, "epochs": list(range(100_000))}})
    message = str(caught.value)
    assert len(message) < 600, message
    optimizer = next(line for line in message.splitlines() if "train.optimizer" in line)
    assert optimizer.endswith("(got '" + "x" * 79 + "…)")
    epochs = next(line for line in message.splitlines() if "train.epochs" in line)
    assert len(epochs) < 160 and "..." in epochs  # a huge list is cut while written, too
    with pytest.raises(ParamsError, match=r"\(got -0.01\)$"):  # short values stay whole
        params_of({"train": {"lr": -0.01}})


# -- 2. Images too large ---------------------------------------------------------------------


def test_max_image_pixels_default_is_defined_once():
    assert load_params(REPO / "params.yaml").data.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS


@pytest.fixture
def image_project(tmp_path, monkeypatch) -> Path:
    """A project whose data/prepared holds a good run on a folder of small PNGs (two classes)."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        folder = tmp_path / RAW / "pets" / label
        folder.mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (12, 10), np.uint8)).save(folder / f"{i}.png")
    run_prepare(tmp_path, source=f"{RAW}/pets", image_size=[8, 8])
    assert (tmp_path / "data" / "prepared" / "meta.json").is_file()
    return tmp_path


def run_prepare(root: Path, **data) -> None:
    params = params_of({"data": data})
    prepare(params.data, params.prepare, Workspace(root))


def test_an_image_over_max_image_pixels_is_refused_by_prepare(image_project):
    Image.new("L", (40, 30)).save(image_project / RAW / "pets" / "dog" / "big.png")
    before = snapshot(image_project / "data")
    write_params(image_project / "params.yaml", {"data": {
        "source": f"{RAW}/pets", "image_size": [8, 8], "max_image_pixels": 1000}})
    done = cli("-m", "tasks.prepare", cwd=image_project)
    one_line_error(done, "prepare", "data/raw/pets/dog/big.png: 40 x 30 image has 1,200 pixels, "
                                    "over the limit of 1,000 (data.max_image_pixels)")
    assert snapshot(image_project / "data") == before
    assert not [p for p in (image_project / "data").iterdir() if p.name.startswith(".")]


def test_max_image_pixels_is_checked_before_decoding(tmp_path):
    # A PNG whose header claims 9,000 x 9,000 (81 MP, under PIL's limit) and has almost no data:
    # refused from the header; decoding it would need 81 MB.
    bomb = forged_png(tmp_path / "claims_huge.png", 9_000, 9_000)
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"claims_huge.png: 9000 x 9000 image has 81,000,000 "
                                        r"pixels, over the limit of 40,000,000$"):
        read_images([bomb], 8, 8, 1)
    assert time.perf_counter() - start < 1


def forged_png(path: Path, width: int, height: int) -> Path:
    """A small real PNG with its IHDR rewritten to claim width x height (CRC fixed up)."""
    import struct
    import zlib

    Image.new("L", (4, 4)).save(path)
    data = bytearray(path.read_bytes())
    start = 8 + 8  # signature, then the IHDR chunk's length and type
    data[start:start + 8] = struct.pack(">II", width, height)
    data[start + 13:start + 17] = struct.pack(">I", zlib.crc32(bytes(data[start - 4:start + 13])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("pil_limit", [1000, 400])  # over PIL's limit (a warning); over 2x (an error)
def test_a_decompression_bomb_is_refused_by_prepare(image_project, monkeypatch, pil_limit):
    # PIL's own limit set low in-process: the 40 x 30 image trips it as a huge one would.
    Image.new("L", (40, 30)).save(image_project / RAW / "pets" / "cat" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    before = snapshot(image_project / "data")
    with pytest.raises(DataError, match=r"^data/raw/pets/cat/bomb.png: refused as a possible "
                                        r"decompression bomb \(Image size \(1200 pixels\) exceeds"):
        run_prepare(image_project, source=f"{RAW}/pets", image_size=[8, 8])
    assert snapshot(image_project / "data") == before
    assert not [p for p in (image_project / "data").iterdir() if p.name.startswith(".")]


def test_a_forged_huge_png_is_refused_by_prepare_from_its_header(image_project):
    # With the project's cap raised, PIL's own decompression-bomb check (2 x 89 MP) still refuses it.
    forged_png(image_project / RAW / "pets" / "cat" / "forged.png", 20_000, 20_000)
    before = snapshot(image_project / "data")
    write_params(image_project / "params.yaml", {"data": {
        "source": f"{RAW}/pets", "image_size": [8, 8], "max_image_pixels": 10**9}})
    done = cli("-m", "tasks.prepare", cwd=image_project)
    one_line_error(done, "prepare", "data/raw/pets/cat/forged.png: refused as a possible "
                                    "decompression bomb (Image size (400000000 pixels) exceeds")
    assert snapshot(image_project / "data") == before


# -- 4 (model files) first: predict needs one; 2's predict test uses it too ------------------


META = {"variant": "int8", "class_names": ["cat", "dog"], "input_shape": [1, 8, 8],
        "normalization": {"scale": 255.0, "mean": [0.5], "std": [0.25]}, "backend": None,
        "torch_version": "2.0", "model": {"net": "tasks.model:cnn2d", "input_shape": [1, 8, 8],
                                          "num_classes": 2, "kwargs": {"widths": [4]}}}


def meta_only_model(path: Path, meta: object = META) -> Path:
    """A zip that holds only archive/extra/meta.json: what export embeds, but no TorchScript."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/extra/meta.json", meta if isinstance(meta, str) else json.dumps(meta))
    return path


def tiny_scripted_model(path: Path) -> Path:
    """A real TorchScript file for 1 x 8 x 8 images, with META embedded as export embeds it."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(64, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1))

    torch.manual_seed(0)
    scripted = torch.jit.script(Net())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(scripted, str(path), _extra_files={"meta.json": json.dumps(META)})
    return path


def predict_cli(model: Path, inputs: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli("-m", "tasks.predict", str(model), str(inputs), "--trust", *extra, cwd=cwd)


def test_predict_refuses_an_image_over_its_pixel_cap_and_a_bomb(tmp_path):
    model = tiny_scripted_model(tmp_path / "models" / "int8.pt")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("L", (8, 8)).save(images / "ok.png")
    forged_png(images / "huge.png", 9_000, 9_000)  # 81 MP: over the 40 MP cap, under PIL's limit
    out = tmp_path / "out.jsonl"
    done = predict_cli(model, images, tmp_path, "--out", str(out))
    one_line_error(done, "predict", f"{images / 'huge.png'}: 9000 x 9000 image has 81,000,000 "
                                    "pixels, over the limit of 40,000,000")
    assert not out.exists()
    forged_png(images / "huge.png", 20_000, 20_000)  # over PIL's 2 x 89 MP too: its check wins
    done = predict_cli(model, images, tmp_path, "--out", str(out))
    one_line_error(done, "predict", f"{images / 'huge.png'}: ")
    assert not out.exists()
    (images / "huge.png").unlink()
    done = predict_cli(model, images, tmp_path, "--out", str(out))  # the control: it works
    assert done.returncode == 0, done.stderr
    assert len(out.read_text().splitlines()) == 1


@pytest.mark.parametrize("meta, match", [
    ("{not json", "meta.json: not valid JSON"),
    ({k: v for k, v in META.items() if k != "class_names"}, "meta.json: class_names: Field required"),
])
def test_predict_refuses_a_model_with_malformed_meta_in_one_line(tmp_path, meta, match):
    model = meta_only_model(tmp_path / "models" / "int8.pt", meta)
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 1, 8, 8), np.float32))
    one_line_error(predict_cli(model, tmp_path / "x.npz", tmp_path), "predict", match)


def test_predict_refuses_a_model_without_torchscript_in_one_line(tmp_path):
    model = meta_only_model(tmp_path / "models" / "int8.pt")
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 1, 8, 8), np.float32))
    out = tmp_path / "out.jsonl"
    done = predict_cli(model, tmp_path / "x.npz", tmp_path, "--out", str(out))
    one_line_error(done, "predict", f"{model}: has qatflow metadata but no loadable model (")
    assert not out.exists()


@pytest.mark.parametrize("name", ["int8", "fp32_pt2"])
def test_evaluate_loader_refuses_a_model_without_code(tmp_path, name, capfd):
    from tasks.variants import VARIANTS

    workspace = Workspace(tmp_path)
    path = meta_only_model(VARIANTS[name].path(workspace))
    with pytest.raises(DataError, match=rf"^{path}: has qatflow metadata but no loadable model "
                                        r"\(Expected hasRecord\(\"version\"\) to be true"):
        VARIANTS[name].load(workspace)
    assert "Traceback" not in capfd.readouterr().err  # torch.export logs none either


# -- 3. Read-only output folders -------------------------------------------------------------


def _chattr(flag: str, path: Path) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True, check=False).returncode == 0


@pytest.fixture
def immutable():
    """chattr +i: a folder even root cannot write (EPERM); undone after the test."""
    if shutil.which("chattr") is None:
        pytest.skip("no chattr here")
    made: list[Path] = []

    def make(path: Path) -> Path:
        if not _chattr("+i", path):
            pytest.skip(f"this filesystem does not support chattr +i ({path})")
        made.append(path)
        return path

    yield make
    for path in reversed(made):
        _chattr("-i", path)


def test_staged_outputs_into_an_immutable_folder_change_nothing(tmp_path, monkeypatch, immutable):
    monkeypatch.chdir(tmp_path)
    models = tmp_path / "models"
    models.mkdir()
    (models / "int8.pt").write_bytes(b"previous")
    (tmp_path / "metrics").mkdir()
    immutable(models)
    refused = r"^models: not writable \(Operation not permitted\); previous outputs left in place$"
    with pytest.raises(QatflowError, match=refused), staged_outputs() as out:
        out.write_json(tmp_path / "metrics" / "export.json", {"ok": True})
        out.write_with(models / "int8.pt", lambda f: f.write(b"new"))
    assert (models / "int8.pt").read_bytes() == b"previous"
    assert sorted(p.name for p in models.iterdir()) == ["int8.pt"]
    assert list((tmp_path / "metrics").iterdir()) == []  # the other output was not published


def test_prepare_into_an_immutable_data_folder_is_one_line(image_project, immutable):
    write_params(image_project / "params.yaml", {"data": {"source": f"{RAW}/pets",
                                                          "image_size": [6, 6]}})
    before = snapshot(image_project / "data")
    immutable(image_project / "data")
    done = cli("-m", "tasks.prepare", cwd=image_project)
    one_line_error(done, "prepare", "prepare: error: data: not writable (Operation not permitted); "
                                    "previous outputs left in place")
    assert snapshot(image_project / "data") == before


def test_prepare_over_an_immutable_data_prepared_is_one_line(image_project, immutable):
    # data/ is writable (the new folder is staged there), data/prepared is not: the old folder
    # could not be moved aside and deleted, so nothing is published at all.
    write_params(image_project / "params.yaml", {"data": {"source": f"{RAW}/pets",
                                                          "image_size": [6, 6]}})
    before = snapshot(image_project / "data")
    immutable(image_project / "data" / "prepared")
    done = cli("-m", "tasks.prepare", cwd=image_project)
    one_line_error(done, "prepare", "prepare: error: data/prepared: not writable (Operation not "
                                    "permitted); previous outputs left in place")
    assert snapshot(image_project / "data") == before
    assert not [p for p in (image_project / "data").iterdir() if p.name.startswith(".")]


def _unprivileged() -> list[str] | None:
    """A command prefix that runs as nobody, if this system has one and we are root."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        return None
    prefix = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    if subprocess.run([*prefix, "true"], capture_output=True, check=False).returncode != 0:
        return None
    return prefix


def test_prepare_as_a_user_who_may_not_write_data_is_one_line():
    """The everyday case, for real: a folder the user has no write permission on (EACCES)."""
    user = _unprivileged()
    if user is None:
        pytest.skip("needs root and setpriv to run the stage as an unprivileged user")
    # Not under tmp_path: pytest's base folder is private to root, so nobody could not even read.
    root = Path(tempfile.mkdtemp(prefix="qatflow-readonly-"))
    try:
        os.chmod(root, 0o755)
        (root / RAW).mkdir(parents=True)
        rng = np.random.default_rng(0)
        np.savez(root / RAW / "good.npz", x=rng.normal(size=(40, 3)), y=np.arange(40) % 2)
        write_params(root / "params.yaml", {"data": {"source": f"{RAW}/good.npz"}})
        shutil.copytree(REPO / "tasks", root / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
        for folder in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
            os.chmod(folder, 0o755)  # everything readable and nothing writable by nobody
        if subprocess.run([*user, sys.executable, "-c", "import torch"], cwd=root,
                          capture_output=True, check=False).returncode != 0:
            pytest.skip("the unprivileged user cannot run this virtualenv's Python")
        before = snapshot(root / "data")
        env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1",
               "HOME": str(root), "MPLCONFIGDIR": str(root)}
        done = subprocess.run([*user, sys.executable, "-m", "tasks.prepare"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        one_line_error(done, "prepare", "prepare: error: data: not writable (Permission denied); "
                                        "previous outputs left in place")
        assert snapshot(root / "data") == before
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_train_into_an_immutable_models_folder_is_one_line(tmp_path, monkeypatch, immutable):
    monkeypatch.chdir(tmp_path)
    (tmp_path / RAW).mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / RAW / "good.npz", x=rng.normal(size=(40, 3)), y=np.arange(40) % 2)
    write_params(tmp_path / "params.yaml", {"data": {"source": f"{RAW}/good.npz"},
                                            "train": {"epochs": 1, "batch_size": 8}})
    assert cli("-m", "tasks.prepare", cwd=tmp_path).returncode == 0
    models = tmp_path / "models"
    models.mkdir()
    (models / "int8.pt").write_bytes(b"previous")
    immutable(models)
    done = cli("-m", "tasks.train", cwd=tmp_path)
    one_line_error(done, "train", "train: error: models: not writable (Operation not permitted); "
                                  "previous outputs left in place")
    assert sorted(p.name for p in models.iterdir()) == ["int8.pt"]
    assert (models / "int8.pt").read_bytes() == b"previous"
