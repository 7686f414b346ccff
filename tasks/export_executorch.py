"""Stage 4c, export_executorch: the PT2E int8 model as an ExecuTorch program for edge devices.

models/int8.pte is qat_pt2e's converted program (models/qat_pt2e/int8.pt2) lowered to ExecuTorch's
XNNPACK delegate: the quantized convolutions and linear layers run as XNNPACK's int8 kernels with
the scales QAT learned. The batch dimension is dynamic up to tasks.quant.pt2e.MAX_BATCH. A .pte has no
metadata slot, so the ExportedMeta JSON is a constant method of the program, qatflow_meta.

A fresh `python -I` process that never imports qatflow (tasks/runtime_parity_check.py) runs the
.pte with ExecuTorch's runtime: its argmax must agree with the program it was lowered from (run
here, with torch) on at least export.int8_min_agreement of the samples. Then the deployment gate,
as for int8.pt: the .pte may lose at most export.max_accuracy_drop pp of test accuracy against the
eager fp32 model. The file and metrics/export_executorch.json (its sha256, which predict checks,
the parity figures and the gate) replace the previous ones only if both pass.

It checks against its own PT2E program, not against models/int8.pt: the two engines fine-tune
separately, so their int8 models may disagree on a few samples without either being wrong.
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from tasks.atomic import staged_outputs
from tasks.cli import run_stage
from tasks.contracts import ExportedMeta, exported_meta_text, read_prepared_meta
from tasks.deployed import PTE_META_METHOD, load_pte
from tasks.errors import GateFailed
from tasks.export import accuracy_gate, parity, run_isolated
from tasks.inference import predict_logits
from tasks.model import load_checkpoint
from tasks.params import ExportParams, load_params
from tasks.quant import pt2e
from tasks.quant.coverage import counted, executorch_float_ops, say_float_ops
from tasks.variants import EXECUTORCH_EXPORTED
from tasks.workspace import Workspace, project_workspace

PARITY_SCRIPT = Path(__file__).with_name("runtime_parity_check.py")
NAME, VARIANT = next(iter(EXECUTORCH_EXPORTED.items()))


def pte_bytes(program: torch.export.ExportedProgram, example: torch.Tensor, meta: ExportedMeta) -> bytes:
    return lower(program, example, meta).to_executorch().buffer


def lower(program: torch.export.ExportedProgram, example: torch.Tensor, meta: ExportedMeta):
    """The program lowered to XNNPACK (an EdgeProgramManager), with the metadata embedded."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    # Re-captured on a full-size example batch: the lowering plans memory for the example's batch
    # size (tasks/pt2e.py: MAX_BATCH), whatever the program's own dynamic range says.
    batch = example[torch.arange(pt2e.MAX_BATCH) % len(example)]
    program = torch.export.export(program.module(), (batch,), dynamic_shapes=(pt2e.batch_dim(),))
    with warnings.catch_warnings():  # executorch 1.5 on torch 2.13: pytree deprecation notices
        warnings.simplefilter("ignore", FutureWarning)
        return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                           constant_methods={PTE_META_METHOD: exported_meta_text(meta)})


def export_executorch(params: ExportParams, workspace: Workspace) -> dict:
    source = workspace.qat_pt2e_dir / "int8.pt2"
    workspace.require(workspace.train_model, source)
    prepared = read_prepared_meta(workspace.prepared)
    with np.load(workspace.prepared / "test.npz", allow_pickle=False) as test:
        x_test, y_test = torch.from_numpy(test["x"]), torch.from_numpy(test["y"])
        x_raw = test["x_raw"][: params.parity_samples]
    fp32, config = load_checkpoint(workspace.train_model)
    program = pt2e.load_program(source)
    meta = ExportedMeta(
        variant=NAME, class_names=prepared.class_names, input_shape=prepared.input_shape,
        normalization=prepared.normalization, backend=None, torch_version=str(torch.__version__),
        model=config,
    )
    lowered = lower(program, x_test, meta)
    float_ops = counted(executorch_float_ops(lowered))  # before to_executorch, which consumes it
    payload = lowered.to_executorch().buffer

    with tempfile.TemporaryDirectory(prefix="qatflow-export-executorch-") as tmp:
        workdir = Path(tmp)
        inputs, pte = workdir / "inputs.npz", workdir / Path(VARIANT.file).name
        np.savez(inputs, x_raw=x_raw)
        pte.write_bytes(payload)
        loaded = run_isolated([pte], inputs, workdir, PARITY_SCRIPT)[pte.name]
    reference = predict_logits(program.module(), x_test[: params.parity_samples]).numpy()
    report = {NAME: {"against": str(source.relative_to(workspace.root)),
                     **parity(VARIANT, reference, loaded, params),
                     "size_bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
                     # Ops ExecuTorch runs in float, outside XNNPACK's int8 kernels ({}: none).
                     "float_ops": float_ops}}
    if not report[NAME]["passed"]:
        raise GateFailed(f"ExecuTorch parity check failed ({NAME} vs {report[NAME]['against']}: argmax "
                         f"agreement {report[NAME]['argmax_agreement']:.4f}); previous model left in place")
    report["gate"] = accuracy_gate(fp32, load_pte(VARIANT.path(workspace), payload)[0], x_test, y_test,
                                   params, what=f"{NAME} ({VARIANT.file})")

    with staged_outputs() as out:
        out.write_with(VARIANT.path(workspace), lambda f: f.write(payload))
        out.write_json(workspace.metrics("export_executorch"), report)
    print(f"export_executorch: parity passed: {NAME} {len(payload) / 1024:.0f} KiB (argmax agreement "
          f"{report[NAME]['argmax_agreement']:.4f}); accuracy drop {report['gate']['accuracy_drop']:g} pp "
          f"(limit {params.max_accuracy_drop:g})")
    say_float_ops("export_executorch", {NAME: float_ops}, "ExecuTorch (XNNPACK)")
    return report


def main(args) -> None:
    """Lower the PT2E int8 model to an ExecuTorch program (XNNPACK), check it with ExecuTorch's
    runtime in a fresh process, and gate it on its test accuracy."""
    export_executorch(load_params(args.params).export, project_workspace())


if __name__ == "__main__":
    run_stage("export_executorch", main)
