"""Stage 4b, export_onnx: the same models as ONNX files that ONNX Runtime runs on CPU
(tasks/runtimes/onnx.py): models/fp32.onnx from the eager fp32 model, models/int8.onnx from the
FX-converted QAT model (the one models/int8.pt is traced from), in QDQ form with QAT's scales.

A fresh `python -I` process that never imports qatflow runs every .onnx with ONNX Runtime beside
the TorchScript file export published for the same model: fp32 must match models/fp32.pt within
export.fp32_tolerance, int8 must agree with models/int8.pt's argmax on at least
export.int8_min_agreement of the samples. The files and metrics/export_onnx.json replace the
previous ones only if every check passes.
"""

from __future__ import annotations

from tasks.cli import run_stage
from tasks.contracts import read_prepared_meta, read_test_split
from tasks.model import load_checkpoint
from tasks.params import ExportParams, load_params
from tasks.quant.fx import load_int8
from tasks.runtimes.publish import Reference, check_and_publish, export_variant
from tasks.variants import VARIANTS, written_by
from tasks.workspace import Workspace, project_workspace

STAGE = "export_onnx"


def export_onnx(params: ExportParams, workspace: Workspace):
    qat_state = workspace.qat_dir / "qat_state.pt"
    variants = written_by(STAGE)
    published = {name: VARIANTS[v.parity_with] for name, v in variants.items()}
    workspace.require(workspace.train_model, qat_state, *(v.path(workspace) for v in published.values()))
    prepared = read_prepared_meta(workspace.prepared)
    test = read_test_split(workspace.prepared)
    fp32, config = load_checkpoint(workspace.train_model)
    eager = {"fp32": (fp32, None), "qat": load_int8(qat_state)}

    exported = {}
    for name, variant in variants.items():
        module, backend = eager[variant.made_from]
        exported[name] = export_variant(variant, module, test.x[:1], backend, prepared, config)
    references = {name: Reference(v.file, file=v.path(workspace)) for name, v in published.items()}
    return check_and_publish(STAGE, variants, exported, references, test.x_raw[: params.parity_samples],
                             params, workspace)


def main(args) -> None:
    """Export fp32 and int8 (QAT, QDQ) ONNX models and check them with ONNX Runtime in a fresh
    process against the published TorchScript files."""
    export_onnx(load_params(args.params).export, project_workspace())


if __name__ == "__main__":
    run_stage(STAGE, main)
