"""Stage 4c, export_executorch: the PT2E int8 model as an ExecuTorch program for edge devices
(tasks/runtimes/executorch.py): qat_pt2e's converted program (models/qat_pt2e/int8.pt2) lowered
to XNNPACK, as models/int8.pte.

A fresh `python -I` process that never imports qatflow runs the .pte with ExecuTorch's runtime:
its argmax must agree with the program it was lowered from (run here, with torch) on at least
export.int8_min_agreement of the samples. Then the deployment gate, as for int8.pt: at most
export.max_accuracy_drop pp of test accuracy lost against the eager fp32 model. The file and
metrics/export_executorch.json replace the previous ones only if both pass.

It checks against its own PT2E program, not against models/int8.pt: the two engines fine-tune
separately, so their int8 models may disagree on a few samples without either being wrong.
"""

from __future__ import annotations

from tasks.cli import run_stage
from tasks.contracts import read_prepared_meta, read_test_split
from tasks.inference import predict_logits
from tasks.model import load_checkpoint
from tasks.params import ExportParams, load_params
from tasks.quant import pt2e
from tasks.runtimes import executorch
from tasks.runtimes.gates import accuracy_gate
from tasks.runtimes.publish import Reference, check_and_publish, export_variant
from tasks.variants import written_by
from tasks.workspace import Workspace, project_workspace

STAGE = "export_executorch"


def export_executorch(params: ExportParams, workspace: Workspace):
    source = workspace.qat_pt2e_dir / "int8.pt2"
    workspace.require(workspace.train_model, source)
    prepared = read_prepared_meta(workspace.prepared)
    test = read_test_split(workspace.prepared)
    fp32, config = load_checkpoint(workspace.train_model)
    program = pt2e.load_program(source)
    (name, variant), = written_by(STAGE).items()

    exported = {name: export_variant(variant, program, test.x, None, prepared, config)}
    logits = predict_logits(program.module(), test.x[: params.parity_samples]).numpy()
    references = {name: Reference(str(source.relative_to(workspace.root)), logits=logits)}

    def gate(payloads: dict[str, bytes]):
        pte = executorch.load(variant.path(workspace), payloads[name])[0]
        return accuracy_gate(fp32, pte, test.x, test.y, params, name, variant.file)

    return check_and_publish(STAGE, {name: variant}, exported, references,
                             test.x_raw[: params.parity_samples], params, workspace, gate)


def main(args) -> None:
    """Lower the PT2E int8 model to an ExecuTorch program (XNNPACK), check it with ExecuTorch's
    runtime in a fresh process, and gate it on its test accuracy."""
    export_executorch(load_params(args.params).export, project_workspace())


if __name__ == "__main__":
    run_stage(STAGE, main)
