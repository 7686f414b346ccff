"""The PT2E QAT engine (qat_pt2e) and the ExecuTorch int8 target (export_executorch): real torchao,
real lowering to XNNPACK, real ExecuTorch runtime, on the tiny workspace's models."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import tasks.runtimes.publish
from tasks.contracts import ModelConfig, read_prepared_meta
from tasks.errors import DataError, GateFailed
from tasks.export_executorch import export_executorch
from tasks.model import build_model
from tasks.predict import predict
from tasks.qat_pt2e import qat_pt2e
from tasks.quant import pt2e
from tasks.runtimes import read_meta
from tasks.runtimes.executorch import MAX_BATCH as PTE_MAX_BATCH
from tasks.runtimes.executorch import PteModel
from tasks.variants import VARIANTS
from tasks.workspace import Workspace

from conftest import REPO, dies_in_epoch

PTE = VARIANTS["int8_pte"]
QDQ = {torch.ops.quantized_decomposed.quantize_per_tensor.default,
       torch.ops.quantized_decomposed.dequantize_per_tensor.default}


def copy_project(workspace: Workspace, root, *names: str) -> Workspace:
    for name in ("data/prepared", *names):
        source, target = workspace.root / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
    return Workspace(root)


def test_qat_pt2e_writes_an_int8_program_and_qats_metrics(tiny_workspace):
    workspace, params = tiny_workspace
    metrics = json.loads(workspace.metrics("qat_pt2e").read_text())
    assert metrics["engine"] == "pt2e" and metrics["quantizer"] == "xnnpack"
    for key in ("fp32_val_accuracy", "fake_quant_val_accuracy", "int8_val_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["int8_val_accuracy"] >= metrics["fp32_val_accuracy"] - 0.1
    history = (workspace.plots("qat_pt2e") / "history.csv").read_text().splitlines()
    assert len(history) == 1 + params.qat.epochs
    program = pt2e.load_program(workspace.qat_pt2e_dir / "int8.pt2")
    targets = {node.target for node in program.graph.nodes}
    assert QDQ <= targets, "no quantize/dequantize pairs"
    assert not targets & pt2e.BATCH_NORMS, "BatchNorm was not folded into the convolutions"
    # Folded away whole: no in-place update of its state left for ExecuTorch to keep.
    assert not program.graph_signature.buffers_to_mutate
    assert torch.ops.aten.add_.Tensor not in targets
    assert not workspace.qat_pt2e_checkpoint.exists()


def test_freezing_batchnorm_and_observers_holds_across_train_and_eval():
    config = ModelConfig(net="tasks.model:cnn2d", input_shape=[1, 8, 8], num_classes=3,
                         kwargs={"widths": [4], "convs_per_stage": 1, "dropout": 0.0})
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    prepared = pt2e.prepare(build_model(config), x)
    stats = [name for name in prepared.state_dict() if name.endswith("running_mean")]
    scales = [name for name in prepared.state_dict() if name.endswith("activation_post_process_0.scale")]
    assert stats and scales

    def step() -> dict[str, torch.Tensor]:
        prepared.train()
        prepared(x + torch.randn_like(x))
        prepared.eval()
        return {k: v.clone() for k, v in prepared.state_dict().items()}

    before = step()
    assert not torch.equal(step()[stats[0]], before[stats[0]])  # BatchNorm still learning
    pt2e.freeze_bn_stats(prepared)
    frozen = step()
    assert all(torch.equal(step()[k], frozen[k]) for k in stats)  # train() did not undo it
    assert not torch.equal(step()[scales[0]], frozen[scales[0]])  # observers still moving
    pt2e.freeze_observers(prepared)
    settled = step()
    assert all(torch.equal(step()[k], settled[k]) for k in scales)


def test_pte_passed_parity_and_gate_and_records_its_bytes(tiny_workspace, reproduced):
    workspace, params = tiny_workspace
    report = json.loads(workspace.metrics("export_executorch").read_text())
    pte = report["int8_pte"]
    assert pte["passed"] and pte["argmax_agreement"] >= params.export.int8_min_agreement
    assert pte["against"] == "models/qat_pt2e/int8.pt2"
    data = PTE.path(workspace).read_bytes()
    assert pte["size_bytes"] == len(data)
    assert pte["sha256"] == hashlib.sha256(data).hexdigest()
    assert report["gate"]["passed"] and report["gate"]["max_accuracy_drop"] == params.export.max_accuracy_drop
    assert str(reproduced).encode() not in data  # the checkout whose `dvc repro` wrote it


# Only ExecuTorch's runtime (which brings torch for its tensors) and numpy: the file says the rest.
CONSUMER = """
import json, sys
import numpy as np, torch
from executorch.runtime import Runtime
program = Runtime.get().load_program(sys.argv[1])
meta = json.loads(program.load_method("qatflow_meta").execute([])[0])
norm = meta["normalization"]
x = np.load(sys.argv[2])["x_raw"].astype(np.float32) / norm["scale"]
shape = (1, -1) + (1,) * (x.ndim - 2)
x = (x - np.float32(norm["mean"]).reshape(shape)) / np.float32(norm["std"]).reshape(shape)
logits = program.load_method("forward").execute([torch.from_numpy(x.astype(np.float32))])[0]
assert not any(m == "tasks" or m.startswith("tasks.") for m in sys.modules)
print(json.dumps({"meta": meta, "pred": logits.argmax(1).tolist()}))
"""


def test_pte_runs_outside_qatflow_and_carries_its_metadata(tiny_workspace, tmp_path):
    workspace, _ = tiny_workspace
    prepared = read_prepared_meta(workspace.prepared)
    with np.load(workspace.prepared / "test.npz") as test:
        np.savez(tmp_path / "inputs.npz", x_raw=test["x_raw"][:PTE_MAX_BATCH])
        labels = test["y"][:PTE_MAX_BATCH]
    (tmp_path / "consumer.py").write_text(CONSUMER)
    done = subprocess.run([sys.executable, "-I", str(tmp_path / "consumer.py"), str(PTE.path(workspace)),
                           str(tmp_path / "inputs.npz")], capture_output=True, text=True, check=True, cwd=tmp_path)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["meta"]["variant"] == "int8_pte" and result["meta"]["class_names"] == prepared.class_names
    assert result["meta"]["normalization"] == prepared.normalization.model_dump()
    assert np.mean(np.array(result["pred"]) == labels) > 0.5
    assert read_meta(PTE.path(workspace)).input_shape == prepared.input_shape


def test_pte_loads_with_evaluates_threads_and_takes_any_batch(tiny_workspace):
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count

    workspace, _ = tiny_workspace
    names = read_prepared_meta(workspace.prepared).class_names
    with np.load(workspace.prepared / "test.npz") as test:
        x = torch.from_numpy(test["x"])
    x = x[torch.arange(PTE_MAX_BATCH + 20) % len(x)]  # more than the program's planned batch
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        model = PTE.load(workspace, names)
        assert _threadpool_get_thread_count() == 1
    finally:
        torch.set_num_threads(threads)
    assert isinstance(model, PteModel)
    whole = model(x)
    assert whole.shape == (len(x), len(names))
    torch.testing.assert_close(whole[-5:], model(x[-5:]))
    with pytest.raises(DataError, match="class names differ"):
        PTE.load(workspace, ["x", "y"])


def test_predict_takes_the_pte_and_refuses_a_damaged_one_in_one_line(tiny_workspace, tmp_path):
    workspace, _ = tiny_workspace
    with np.load(workspace.prepared / "test.npz") as test:
        np.savez(tmp_path / "inputs.npz", x=test["x_raw"][:30])
    by_pte = predict(PTE.path(workspace), tmp_path / "inputs.npz")  # metrics/export_executorch.json
    by_int8 = predict(VARIANTS["int8"].path(workspace), tmp_path / "inputs.npz")
    assert by_pte.shape == by_int8.shape and np.mean(by_pte.argmax(1) == by_int8.argmax(1)) > 0.5

    project = tmp_path / "project"
    shutil.copytree(workspace.root / "models", project / "models")
    shutil.copytree(workspace.root / "metrics", project / "metrics")
    model = project / PTE.file
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    for extra, says in (((), "export_executorch.json"), (("--trust",), "not an ExecuTorch program")):
        done = subprocess.run([sys.executable, "-m", "tasks.predict", str(model), str(tmp_path / "inputs.npz"),
                               *extra], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 1 and done.stdout == "" and "Traceback" not in done.stderr, done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("predict: error: ")]
        assert len(errors) == 1 and says in errors[0], done.stderr
    model.write_bytes(b"not a program at all")
    with pytest.raises(DataError, match=rf"^{model}: not an ExecuTorch program qatflow exported"):
        predict(model, tmp_path / "inputs.npz", trust=True)


def test_failed_parity_keeps_the_previous_pte(tiny_workspace, tmp_path, monkeypatch):
    workspace, params = tiny_workspace
    project = copy_project(workspace, tmp_path, "models/train", "models/qat_pt2e", PTE.file,
                           "metrics/export_executorch.json")
    kept = [PTE.path(project), project.metrics("export_executorch")]
    before = {p: p.read_bytes() for p in kept}
    real = tasks.runtimes.publish.run_isolated

    def backwards(*args):  # as if ExecuTorch ranked every sample's classes backwards
        return {name: -logits for name, logits in real(*args).items()}

    monkeypatch.setattr(tasks.runtimes.publish, "run_isolated", backwards)
    with pytest.raises(GateFailed, match=r"export_executorch: parity check failed \(int8_pte vs models/qat_pt2e/int8.pt2: "
                                         r".*argmax agreement 0\.\d+\); previous models left in place"):
        export_executorch(params.export, project)
    assert before == {p: p.read_bytes() for p in kept}
    assert not [p for p in project.root.rglob(".*") if p.name.endswith(".staged")]


def test_a_killed_qat_pt2e_resumes_to_the_uninterrupted_model(tiny_workspace, tmp_path):
    workspace, params = tiny_workspace
    project = copy_project(workspace, tmp_path, "models/train")
    with dies_in_epoch(2):
        qat_pt2e(params.qat, project)
    assert not project.qat_pt2e_dir.exists() and project.qat_pt2e_checkpoint.exists()
    qat_pt2e(params.qat, project)
    for name in ("metrics/qat_pt2e.json", "plots/qat_pt2e/history.csv"):
        assert (project.root / name).read_bytes() == (workspace.root / name).read_bytes(), name
    # Tensor for tensor: the file's bytes also hold torch.export's symbol names, which count up
    # within a process (a fresh process, as under DVC, writes the same bytes: test_pipeline_e2e).
    resumed, whole = ({**program.state_dict, **program.constants} for program in
                      (pt2e.load_program(w.qat_pt2e_dir / "int8.pt2") for w in (project, workspace)))
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert not project.qat_pt2e_checkpoint.exists()
