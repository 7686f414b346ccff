import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tasks.errors import GateFailed
from tasks.export import export
from tasks.runtimes.gates import ISOLATED_SCRIPT
from tasks.variants import VARIANTS, written_by

EXPORTED = written_by("export")

# A consumer that has never heard of qatflow: only torch, numpy and the file.
CONSUMER = """
import json, sys
import numpy as np, torch
extra = {"meta.json": ""}
model = torch.jit.load(sys.argv[1], _extra_files=extra)
meta = json.loads(extra["meta.json"])
if meta["backend"]:
    torch.backends.quantized.engine = meta["backend"]
norm = meta["normalization"]
x = torch.from_numpy(np.load(sys.argv[2])["x_raw"]).float()
x = (x / norm["scale"] - torch.tensor(norm["mean"]).view(1, -1, 1, 1)) / torch.tensor(norm["std"]).view(1, -1, 1, 1)
pred = model(x).argmax(1)
assert not any(m == "tasks" or m.startswith("tasks.") for m in sys.modules)
print(json.dumps({"meta": meta, "pred": pred.tolist()}))
"""


def run_consumer(model_path, inputs, tmp_path) -> dict:
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER)
    out = subprocess.run(
        [sys.executable, "-I", str(script), str(model_path), str(inputs)],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )
    return json.loads(out.stdout)


def test_exported_files_load_without_qatflow_and_carry_metadata(tiny_workspace, tmp_path):
    workspace, _ = tiny_workspace
    with np.load(workspace.prepared / "test.npz") as test:
        np.savez(tmp_path / "inputs.npz", x_raw=test["x_raw"][:20])
        labels = test["y"][:20]
    prepared = json.loads((workspace.prepared / "meta.json").read_text())
    results = {}
    for path in (VARIANTS[name].path(workspace) for name in ("fp32_ts", "int8", "ptq")):
        results[path.name] = run_consumer(path, tmp_path / "inputs.npz", tmp_path)
        meta = results[path.name]["meta"]
        assert meta["class_names"] == prepared["class_names"]
        assert meta["input_shape"] == [1, 28, 28]
        assert meta["normalization"] == prepared["normalization"]
        assert meta["torch_version"] == torch.__version__
    assert results["fp32.pt"]["meta"]["backend"] is None
    assert results["int8.pt"]["meta"]["backend"] == "x86"
    assert np.mean(np.array(results["int8.pt"]["pred"]) == labels) > 0.5


def test_int8_file_is_much_smaller_and_quantized(tiny_workspace):
    workspace, _ = tiny_workspace
    assert VARIANTS["fp32_ts"].path(workspace).stat().st_size / VARIANTS["int8"].path(workspace).stat().st_size > 3
    graph = str(torch.jit.load(str(VARIANTS["int8"].path(workspace))).inlined_graph)
    assert "quantized::conv2d_relu" in graph and "quantize_per_tensor" in graph


def test_export_report_records_parity(tiny_workspace):
    workspace, params = tiny_workspace
    report = json.loads(workspace.metrics("export").read_text())
    assert set(report) == {*EXPORTED, "gate"}
    assert report["fp32_ts"]["allclose"] and report["fp32_ts"]["max_abs_diff"] <= params.export.fp32_tolerance
    assert report["int8"]["argmax_agreement"] >= params.export.int8_min_agreement
    assert report["int8"]["size_bytes"] == VARIANTS["int8"].path(workspace).stat().st_size
    gate = report["gate"]
    assert gate["passed"] is True and gate["max_accuracy_drop"] == params.export.max_accuracy_drop
    assert gate["accuracy_drop"] <= gate["max_accuracy_drop"]


def test_failed_parity_keeps_previous_models(tiny_workspace):
    workspace, params = tiny_workspace
    kept = (*(v.path(workspace) for v in EXPORTED.values()), workspace.metrics("export"))
    before = {p: p.read_bytes() for p in kept}
    impossible = params.export.model_copy(update={"fp32_tolerance": 1e-30})
    with pytest.raises(GateFailed, match="parity check failed.*previous models left in place"):
        export(impossible, workspace)
    assert before == {p: p.read_bytes() for p in before}
    assert not [p for p in workspace.root.rglob(".*") if p.name.endswith(".staged")]


def test_fp32_exported_program_matches_torchscript_with_any_batch(tiny_workspace):
    workspace, _ = tiny_workspace
    extra = {"meta.json": ""}
    program = torch.export.load(str(VARIANTS["fp32_pt2"].path(workspace)), extra_files=extra)
    assert json.loads(extra["meta.json"])["variant"] == "fp32_pt2"
    scripted = torch.jit.load(str(VARIANTS["fp32_ts"].path(workspace)))
    with np.load(workspace.prepared / "test.npz") as test:
        x = torch.from_numpy(test["x"])
    for batch in (1, 7, len(x)):
        torch.testing.assert_close(program.module()(x[:batch]), scripted(x[:batch]), rtol=1e-4, atol=1e-4)
    report = json.loads(workspace.metrics("export").read_text())
    assert report["fp32_pt2"]["allclose"] is True


def test_parity_script_stands_alone():
    source = ISOLATED_SCRIPT.read_text()
    assert "from tasks" not in source and "import tasks" not in source


def test_exported_files_hold_no_paths_of_this_machine(tiny_workspace, reproduced):
    # Traced ops remember their Python stack; export drops that debug info so the same model
    # saved from any checkout has the same bytes (and the same DVC hash).
    workspace, _ = tiny_workspace
    made_in = reproduced  # the checkout whose `dvc repro` wrote tiny_workspace's files
    for path in (v.path(workspace) for v in EXPORTED.values()):
        data = path.read_bytes()
        assert str(made_in).encode() not in data and b"site-packages" not in data, path.name
        if path.suffix == ".pt":
            records = torch._C.PyTorchFileReader(str(path)).get_all_records()
            assert not [r for r in records if r.endswith(".debug_pkl")], path.name
