"""export_onnx on every model family: real exports, real ONNX Runtime, in tiny hand-built projects
(an eager model trained for a few steps, its QAT-prepared copy, the TorchScript files export
would publish) that need no other stage to run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_families import CLASSES, N, images, sequences, vectors, write_prepared

import tasks.runtimes.publish
from tasks.atomic import write_with
from tasks.contracts import ExportedMeta, Normalization, read_prepared_meta, report_dict
from tasks.errors import DataError, GateFailed
from tasks.export_onnx import export_onnx
from tasks.model import build_model, load_checkpoint, model_config, save_checkpoint
from tasks.predict import predict
from tasks.quant.fx import convert, load_int8, prepare, save_prepared
from tasks.runtimes import onnx as onnx_runtime
from tasks.runtimes import read_meta, torchscript
from tasks.runtimes.onnx import META_KEY as ONNX_META_KEY
from tasks.runtimes.onnx import OnnxModel
from tasks.variants import VARIANTS, written_by
from tasks.workspace import Workspace

from conftest import REPO, section

PARAMS = section("export", parity_samples=36)  # the default gates: fp32 1e-4, int8 argmax 99.5 %
FAMILIES = {  # family: (layout, data, widths)
    "mlp": ("vectors", vectors, [32]),
    "cnn1d": ("sequences", sequences, [8, 16]),
    "cnn2d": ("images", images, [8, 16]),
}


def make_project(root: Path, family: str) -> Workspace:
    """data/prepared, models/train, models/qat and models/{fp32,int8}.pt as the stages before
    export_onnx leave them, from a model trained for a few full-batch steps."""
    layout, make, widths = FAMILIES[family]
    rng = np.random.default_rng(0)
    y = rng.permutation(np.arange(N) % len(CLASSES))
    write_prepared(root, layout, make(rng, y), y)
    workspace = Workspace(root)
    prepared = read_prepared_meta(workspace.prepared)
    with np.load(workspace.prepared / "train.npz") as train:
        x, y_train = torch.from_numpy(train["x"]), torch.from_numpy(train["y"])
    torch.manual_seed(0)
    config = model_config(layout, prepared.input_shape, len(CLASSES), section("train.model", widths=widths, dropout=0.0))
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(15):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y_train).backward()
        optimizer.step()
    model.eval()
    write_with(workspace.train_model, lambda f: save_checkpoint(f, model, config))
    fp32, _ = load_checkpoint(workspace.train_model)
    qat_model = prepare(load_checkpoint(workspace.train_model)[0], "qat", "x86", x[:1])
    with torch.no_grad():  # the fake-quant observers learn their scales from the training data
        for start in range(0, len(x), 32):
            qat_model(x[start : start + 32])
    workspace.qat_dir.mkdir(parents=True)
    write_with(workspace.qat_dir / "qat_state.pt",
               lambda f: save_prepared(f, qat_model, config, "qat", "x86"))
    int8, backend = load_int8(workspace.qat_dir / "qat_state.pt")
    meta = ExportedMeta(variant="fp32_ts", class_names=prepared.class_names, input_shape=prepared.input_shape,
                        normalization=prepared.normalization, backend=None,
                        torch_version=str(torch.__version__), model=config)
    write_with(VARIANTS["fp32_ts"].path(workspace),
               lambda f: f.write(torchscript.export(fp32, x, meta).payload))
    write_with(VARIANTS["int8"].path(workspace), lambda f: f.write(torchscript.export(
        int8, x, meta.model_copy(update={"variant": "int8", "backend": backend})).payload))
    return workspace


@pytest.fixture(scope="module")
def projects(tmp_path_factory) -> dict[str, tuple[Workspace, dict]]:
    made = {}
    for family in FAMILIES:
        workspace = make_project(tmp_path_factory.mktemp(family), family)
        made[family] = workspace, report_dict(export_onnx(PARAMS, workspace))
    return made


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_exports_qdq_int8_and_passes_parity(projects, family):
    workspace, report = projects[family]
    assert set(report) == set(written_by("export_onnx"))
    fp32, int8 = report["fp32_onnx"], report["int8_onnx"]
    assert fp32["allclose"] and fp32["max_abs_diff"] <= PARAMS.fp32_tolerance, fp32
    assert fp32["against"] == "models/fp32.pt" and int8["against"] == "models/int8.pt"
    assert int8["passed"] and int8["argmax_agreement"] >= PARAMS.int8_min_agreement, int8
    assert json.loads(workspace.metrics("export_onnx").read_text()) == report
    graph = onnx.load(str(VARIANTS["int8_onnx"].path(workspace))).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and ops & {"Conv", "Gemm"}, ops
    constants = [onnx.numpy_helper.to_array(a.t) for n in graph.node if n.op_type == "Constant"
                 for a in n.attribute if a.name == "value"]
    assert any(c.dtype == np.int8 and c.size > 16 for c in constants), "no int8 weights"  # QAT's, not fp32


# Only onnxruntime and numpy: the file alone says how to feed it and what its outputs mean.
CONSUMER = """
import json, sys
import numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
props = session.get_modelmeta().custom_metadata_map
meta = json.loads(props["qatflow.meta"])
norm = meta["normalization"]
x = np.load(sys.argv[2])["x_raw"].astype(np.float32) / norm["scale"]
shape = (1, -1) + (1,) * (x.ndim - 2)
x = (x - np.float32(norm["mean"]).reshape(shape)) / np.float32(norm["std"]).reshape(shape)
logits = session.run(None, {"input": x.astype(np.float32)})[0]
assert not any(m == "tasks" or m.startswith("tasks.") or m == "torch" for m in sys.modules)
names = json.loads(props["class_names"])
print(json.dumps({"meta": meta, "class_names": names, "pred": logits.argmax(1).tolist()}))
"""


def test_onnx_files_run_without_qatflow_or_torch_and_carry_metadata(projects, tmp_path):
    workspace, _ = projects["cnn2d"]
    with np.load(workspace.prepared / "test.npz") as test:
        np.savez(tmp_path / "inputs.npz", x_raw=test["x_raw"])
        labels = test["y"]
    prepared = read_prepared_meta(workspace.prepared)
    (tmp_path / "consumer.py").write_text(CONSUMER)
    for name in written_by("export_onnx"):
        done = subprocess.run([sys.executable, "-I", str(tmp_path / "consumer.py"),
                               str(VARIANTS[name].path(workspace)), str(tmp_path / "inputs.npz")],
                              capture_output=True, text=True, check=True, cwd=tmp_path)
        result = json.loads(done.stdout)
        assert result["meta"]["variant"] == name
        assert result["meta"]["class_names"] == result["class_names"] == prepared.class_names
        assert result["meta"]["input_shape"] == prepared.input_shape
        assert result["meta"]["normalization"] == prepared.normalization.model_dump()
        assert np.mean(np.array(result["pred"]) == labels) > 0.8, name
    assert read_meta(VARIANTS["int8_onnx"].path(workspace)).backend == "x86"


def test_export_gives_the_same_bytes_and_no_paths(projects):
    workspace, report = projects["cnn1d"]
    prepared = read_prepared_meta(workspace.prepared)
    fp32, config = load_checkpoint(workspace.train_model)
    int8, backend = load_int8(workspace.qat_dir / "qat_state.pt")
    with np.load(workspace.prepared / "test.npz") as test:
        x = torch.from_numpy(test["x"][:1])
    for name, module, engine in (("fp32_onnx", fp32, None), ("int8_onnx", int8, backend)):
        meta = ExportedMeta(variant=name, class_names=prepared.class_names, input_shape=prepared.input_shape,
                            normalization=prepared.normalization, backend=engine,
                            torch_version=str(torch.__version__), model=config)
        again = onnx_runtime.export(module, x, meta).payload
        published = VARIANTS[name].path(workspace).read_bytes()
        assert again == published, name  # DVC hashes these bytes
        assert str(workspace.root).encode() not in again and b"site-packages" not in again
        assert json.loads(read_meta(VARIANTS[name].path(workspace)).model_dump_json()) == json.loads(
            {p.key: p.value for p in onnx.load_from_string(again).metadata_props}[ONNX_META_KEY])


def test_failed_parity_keeps_previous_onnx_files(projects, monkeypatch):
    workspace, _ = projects["cnn1d"]  # its fp32 files differ by ~1e-6 (the MLP's match exactly)
    kept = [*(v.path(workspace) for v in written_by("export_onnx").values()), workspace.metrics("export_onnx")]
    before = {p: p.read_bytes() for p in kept}
    real = tasks.runtimes.publish.run_isolated

    def int8_disagrees(*args):  # as if ONNX Runtime ranked every sample's classes backwards
        logits = real(*args)
        logits["int8.onnx"] = -logits["int8.onnx"]
        return logits

    monkeypatch.setattr(tasks.runtimes.publish, "run_isolated", int8_disagrees)
    with pytest.raises(GateFailed, match=r"export_onnx: parity check failed \(fp32_onnx vs models/fp32.pt: .*; "
                                         r"int8_onnx vs models/int8.pt: .*argmax agreement 0\.\d+\); "
                                         r"previous models left in place"):
        export_onnx(PARAMS.model_copy(update={"fp32_tolerance": 1e-30}), workspace)
    assert before == {p: p.read_bytes() for p in kept}
    assert not [p for p in workspace.root.rglob(".*") if p.name.endswith(".staged")]


def test_the_variants_load_as_torch_callables_with_evaluates_threads(projects):
    workspace, _ = projects["cnn2d"]
    with np.load(workspace.prepared / "test.npz") as test:
        x = torch.from_numpy(test["x"])
    reference = torch.jit.load(str(VARIANTS["fp32_ts"].path(workspace)))(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        model = VARIANTS["fp32_onnx"].load(workspace, CLASSES)
    finally:
        torch.set_num_threads(threads)
    assert isinstance(model, OnnxModel)
    assert model.session.get_session_options().intra_op_num_threads == 1
    with torch.inference_mode():
        out = model(x[:5])
        assert isinstance(out, torch.Tensor) and out.shape == (5, len(CLASSES))
        torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-4)
    with pytest.raises(DataError, match="class names differ"):
        VARIANTS["int8_onnx"].load(workspace, ["x", "y", "z"])


def test_predict_takes_onnx_files_verified_by_export_onnx_manifest(projects, tmp_path):
    workspace, report = projects["cnn2d"]
    with np.load(workspace.prepared / "test.npz") as test:
        np.savez(tmp_path / "inputs.npz", x=test["x_raw"])
    torchscript = {name: predict(VARIANTS[name].path(workspace), tmp_path / "inputs.npz", trust=True)
                   for name in ("fp32_ts", "int8")}
    fp32 = predict(VARIANTS["fp32_onnx"].path(workspace), tmp_path / "inputs.npz")  # metrics/export_onnx.json
    int8 = predict(VARIANTS["int8_onnx"].path(workspace), tmp_path / "inputs.npz")
    np.testing.assert_allclose(fp32, torchscript["fp32_ts"], atol=1e-4)
    assert np.mean(int8.argmax(1) == torchscript["int8"].argmax(1)) >= report["int8_onnx"]["argmax_agreement"]


def predict_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks.predict", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)


def test_a_corrupted_onnx_file_is_refused_in_one_line(projects, tmp_path):
    workspace, _ = projects["mlp"]
    project = tmp_path / "project"
    shutil.copytree(workspace.root / "models", project / "models")
    shutil.copytree(workspace.root / "metrics", project / "metrics")
    model = project / "models" / "int8.onnx"
    with np.load(workspace.prepared / "test.npz") as test:
        np.savez(tmp_path / "inputs.npz", x=test["x_raw"][:4])
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # truncated, say by a full disk

    done = predict_cli(model, tmp_path / "inputs.npz")  # the hash no longer matches export_onnx's
    assert done.returncode == 1 and done.stdout == "" and "Traceback" not in done.stderr
    assert f"predict: error: {model}: sha256 " in done.stderr and "export_onnx.json" in done.stderr
    done = predict_cli(model, tmp_path / "inputs.npz", "--trust")  # and it is no model either
    assert done.returncode == 1 and done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"predict: error: {model}: ") and len(done.stderr.strip().splitlines()) == 1
    graph_broken = onnx.load(str(workspace.root / "models" / "int8.onnx"))
    graph_broken.graph.node.pop(len(graph_broken.graph.node) // 2)  # metadata intact, graph not
    for damaged in (model.read_bytes(), b"not an onnx file at all", graph_broken.SerializeToString()):
        model.write_bytes(damaged)
        with pytest.raises(DataError, match=rf"^{model}: (not an ONNX model qatflow exported|no qatflow.meta"
                                            rf"|has qatflow metadata but ONNX Runtime cannot load it)"):
            predict(model, tmp_path / "inputs.npz", trust=True)
    assert (workspace.root / "models" / "int8.onnx").read_bytes() != model.read_bytes()  # the original stays


def test_a_1d_cnn_reading_vectors_exports_its_quantized_unsqueeze():
    # It adds the channel axis after FX quantized the input; ONNX has no quantized Unsqueeze.
    config = model_config("vectors", [10], 3, section("train.model", family="cnn1d", widths=[8], dropout=0.0))
    torch.manual_seed(0)
    x = torch.randn(64, 10)
    prepared = prepare(build_model(config), "qat", "x86", x[:1])
    with torch.no_grad():
        prepared(x)
    int8 = convert(prepared)
    expected = int8(x)
    meta = ExportedMeta(variant="int8_onnx", class_names=["a", "b", "c"], input_shape=[10],
                        normalization=Normalization(scale=1.0, mean=[0.0], std=[1.0]), backend="x86",
                        torch_version=str(torch.__version__), model=config)
    session = ort.InferenceSession(onnx_runtime.export(int8, x, meta).payload, providers=["CPUExecutionProvider"])
    assert torch.equal(int8(x), expected)  # the rewrite changed no int8 value
    logits = session.run(None, {"input": x.numpy()})[0]
    assert np.mean(logits.argmax(1) == expected.argmax(1).numpy()) >= PARAMS.int8_min_agreement
