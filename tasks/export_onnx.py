"""Stage 4b, export_onnx: the same models as ONNX files that ONNX Runtime runs on CPU.

models/int8.onnx is the FX-converted QAT model (the one models/int8.pt is traced from) in QDQ form:
QuantizeLinear/DequantizeLinear around Conv/Gemm with int8 weights, carrying the scales and zero
points QAT learned (no fresh calibration). models/fp32.onnx is the eager fp32 model. Both carry the
ExportedMeta JSON as metadata_props "qatflow.meta" (plus readable class_names, input_shape and
normalization keys), so a file is self-describing like the TorchScript ones.

Only torch's legacy (TorchScript-based) exporter handles the converted int8 graph: the traced
TorchScript file fails ("Quantized weight value not found"), and so do the reference and the
prepared (fake-quant) models. fp32 goes the same way, which needs no onnxscript and gives the same
bytes for the same weights (DVC hashes them).

A fresh `python -I` process that never imports qatflow (tasks/runtime_parity_check.py) runs every
.onnx with ONNX Runtime and the TorchScript files export published with torch: fp32 must match
models/fp32.pt within export.fp32_tolerance, int8 must agree with models/int8.pt's argmax on at
least export.int8_min_agreement of the samples. The files and metrics/export_onnx.json (each file's
sha256, which predict checks, and the parity figures) replace the previous ones only if every
check passes.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from tasks.atomic import staged_outputs
from tasks.cli import run_stage
from tasks.contracts import ExportedMeta, exported_meta_text, read_prepared_meta
from tasks.deployed import ONNX_META_KEY
from tasks.errors import GateFailed
from tasks.export import parity, run_isolated
from tasks.model import load_checkpoint
from tasks.params import ExportParams, load_params
from tasks.quant.coverage import counted, onnx_float_ops, say_float_ops
from tasks.quant.fx import load_int8
from tasks.variants import ONNX_EXPORTED, VARIANTS
from tasks.workspace import Workspace, project_workspace

PARITY_SCRIPT = Path(__file__).with_name("runtime_parity_check.py")
OPSET = 17


def unsqueeze_before_quantize(module: torch.nn.Module) -> torch.nn.Module:
    """Move an unsqueeze of a freshly quantized input to before its quantize_per_tensor, in place.

    A 1-D CNN reading vectors adds the channel axis after the input is quantized (FX quantizes
    the model's input first), and torch's ONNX symbolics have no quantized Unsqueeze. Quantizing
    per tensor is elementwise, so unsqueeze-then-quantize gives the same int8 values.
    """
    if not isinstance(module, torch.fx.GraphModule):
        return module
    graph = module.graph
    for node in list(graph.nodes):
        unsqueeze = (node.op == "call_method" and node.target == "unsqueeze") or (
            node.op == "call_function" and node.target is torch.unsqueeze)
        quantize = node.args[0] if unsqueeze else None
        if not (isinstance(quantize, torch.fx.Node) and quantize.target is torch.quantize_per_tensor
                and len(quantize.users) == 1):
            continue
        with graph.inserting_before(quantize):
            moved = graph.create_node(node.op, node.target, (quantize.args[0], *node.args[1:]), node.kwargs)
        quantize.replace_input_with(quantize.args[0], moved)
        node.replace_all_uses_with(quantize)
        graph.erase_node(node)
    graph.lint()
    module.recompile()
    return module


def onnx_bytes(module: torch.nn.Module, example: torch.Tensor, meta: ExportedMeta) -> bytes:
    """`module` as an ONNX model with a dynamic batch dimension and `meta` in its metadata_props.
    An FX int8 module may be rewritten in place (unsqueeze_before_quantize)."""
    module = unsqueeze_before_quantize(module)
    saved = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter's deprecation notice: it is the one that works
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module.eval(), (example[:1].clone(),), saved, dynamo=False, opset_version=OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    model = onnx.load_from_string(saved.getvalue())
    # Nothing that names this machine or run: the same weights give the same bytes.
    model.doc_string = model.graph.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""
    del model.metadata_props[:]
    props = {
        ONNX_META_KEY: exported_meta_text(meta),
        "class_names": json.dumps(meta.class_names),
        "input_shape": json.dumps(meta.input_shape),
        "normalization": meta.normalization.model_dump_json(),
    }
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


def export_onnx(params: ExportParams, workspace: Workspace) -> dict:
    qat_state = workspace.qat_dir / "qat_state.pt"
    references = {name: VARIANTS[v.parity_with].path(workspace) for name, v in ONNX_EXPORTED.items()}
    workspace.require(workspace.train_model, qat_state, *references.values())
    prepared = read_prepared_meta(workspace.prepared)
    with np.load(workspace.prepared / "test.npz", allow_pickle=False) as test:
        x = torch.from_numpy(test["x"][:1])
        x_raw = test["x_raw"][: params.parity_samples]
    fp32, config = load_checkpoint(workspace.train_model)
    eager = {"fp32": (fp32, None), "qat": load_int8(qat_state)}

    payloads: dict[str, bytes] = {}
    report: dict = {}
    with tempfile.TemporaryDirectory(prefix="qatflow-export-onnx-") as tmp:
        workdir = Path(tmp)
        inputs = workdir / "inputs.npz"
        np.savez(inputs, x_raw=x_raw)
        for name, variant in ONNX_EXPORTED.items():
            module, backend = eager[variant.made_from]
            if backend:
                torch.backends.quantized.engine = backend
            meta = ExportedMeta(
                variant=name, class_names=prepared.class_names, input_shape=prepared.input_shape,
                normalization=prepared.normalization, backend=backend,
                torch_version=str(torch.__version__), model=config,
            )
            payloads[name] = onnx_bytes(module, x, meta)
            (workdir / Path(variant.file).name).write_bytes(payloads[name])
        files = [workdir / Path(v.file).name for v in ONNX_EXPORTED.values()]
        loaded = run_isolated([*files, *references.values()], inputs, workdir, PARITY_SCRIPT)
        for name, variant in ONNX_EXPORTED.items():
            report[name] = {"against": VARIANTS[variant.parity_with].file,
                            **parity(variant, loaded[references[name].name],
                                     loaded[Path(variant.file).name], params)}
            report[name]["size_bytes"] = len(payloads[name])
            report[name]["sha256"] = hashlib.sha256(payloads[name]).hexdigest()
            if variant.precision == "int8":  # ops ONNX Runtime runs in float ({}: none)
                report[name]["float_ops"] = counted(onnx_float_ops(payloads[name]))

    failed = {name: r for name, r in report.items() if not r["passed"]}
    if failed:
        details = "; ".join(
            f"{name} vs {r['against']}: max |diff| {r['max_abs_diff']:g}, argmax agreement "
            f"{r['argmax_agreement']:.4f}" for name, r in failed.items()
        )
        raise GateFailed(f"ONNX parity check failed ({details}); previous ONNX models left in place")

    with staged_outputs() as out:
        for name, variant in ONNX_EXPORTED.items():
            out.write_with(variant.path(workspace), lambda f, b=payloads[name]: f.write(b))
        out.write_json(workspace.metrics("export_onnx"), report)

    figures = ", ".join(f"{name} {r['size_bytes'] / 1024:.0f} KiB (max |diff| {r['max_abs_diff']:g}, "
                        f"argmax agreement {r['argmax_agreement']:.4f})" for name, r in report.items())
    print(f"export_onnx: parity passed: {figures}")
    say_float_ops("export_onnx", {n: r["float_ops"] for n, r in report.items() if "float_ops" in r},
                  "ONNX Runtime")
    return report


def main(args) -> None:
    """Export fp32 and int8 (QAT, QDQ) ONNX models and check them with ONNX Runtime in a fresh
    process against the published TorchScript files."""
    export_onnx(load_params(args.params).export, project_workspace())


if __name__ == "__main__":
    run_stage("export_onnx", main)
