"""Stage 4, export: model files that a deployment loads with torch alone.

The variants tasks/variants.py lists for this stage: models/fp32.pt, models/int8.pt (QAT) and
models/ptq_int8.pt (PTQ baseline) as TorchScript, and models/fp32.pt2 as a torch.export program
(tasks/runtimes/), each carrying its ExportedMeta (class names, input shape, normalization,
quantization backend, torch version, model config). Every file runs in a fresh interpreter that
never imports qatflow and is compared with the eager model it was made from; then the deployment
gate: int8 QAT may lose at most export.max_accuracy_drop percentage points of test accuracy
against the eager fp32 model. The files and metrics/export.json (each file's sha256, which predict
checks) replace the previous ones only if every check passes (tasks/runtimes/publish.py).
"""

from __future__ import annotations

import torch

from tasks.cli import run_stage
from tasks.contracts import read_prepared_meta, read_test_split
from tasks.inference import predict_logits
from tasks.model import load_checkpoint
from tasks.params import ExportParams, load_params
from tasks.quant.fx import load_int8
from tasks.runtimes import torchscript
from tasks.runtimes.gates import accuracy_gate
from tasks.runtimes.publish import Reference, check_and_publish, export_variant
from tasks.variants import DEPLOYED, REFERENCE, VARIANTS, written_by
from tasks.workspace import Workspace, project_workspace

STAGE = "export"


def export(params: ExportParams, workspace: Workspace):
    qat_state, ptq_state = workspace.qat_dir / "qat_state.pt", workspace.qat_dir / "ptq_state.pt"
    workspace.require(workspace.train_model, qat_state, ptq_state)
    prepared = read_prepared_meta(workspace.prepared)
    test = read_test_split(workspace.prepared)
    x = test.x[: params.parity_samples]
    fp32, config = load_checkpoint(workspace.train_model)
    # Each eager model, and the quantized engine its weights are packed for (None: fp32).
    eager = {"fp32": (fp32, None), "qat": load_int8(qat_state), "ptq": load_int8(ptq_state)}

    variants = written_by(STAGE)
    exported, references = {}, {}
    for name, variant in variants.items():
        module, backend = eager[variant.made_from]
        exported[name] = export_variant(variant, module, x, backend, prepared, config)
        references[name] = Reference(f"eager {variant.made_from}", logits=predict_logits(module, x).numpy())

    def gate(payloads: dict[str, bytes]):
        int8 = torchscript.load_archive(torch.jit.load, VARIANTS[DEPLOYED].path(workspace), payloads[DEPLOYED])
        return accuracy_gate(eager[REFERENCE][0], int8, test.x, test.y, params, DEPLOYED, VARIANTS[DEPLOYED].file)

    return check_and_publish(STAGE, variants, exported, references, test.x_raw[: params.parity_samples],
                             params, workspace, gate)


def main(args) -> None:
    """Export fp32 and int8 TorchScript models, parity-check them in a fresh process, and gate
    deployment on the int8 model's test accuracy."""
    export(load_params(args.params).export, project_workspace())


if __name__ == "__main__":
    run_stage(STAGE, main)
