"""Stage 4, export: model files that a deployment loads with torch alone.

Every exported variant of tasks/variants.py: models/fp32.pt, models/int8.pt (QAT) and
models/ptq_int8.pt (PTQ baseline) as TorchScript (trace -> freeze), and models/fp32.pt2
(torch.export, TorchScript's successor), each carrying meta.json (ExportedMeta: class names, input
shape, normalization, quantization backend, torch version, model config) as an extra file. A parity check runs every file in a fresh interpreter
that never imports qatflow and compares it with the eager model. Then the deployment gate: int8
QAT (the exported file) may lose at most export.max_accuracy_drop percentage points of test
accuracy against the eager fp32 model. The files and metrics/export.json replace the previous ones
only if every check passes. metrics/export.json records each file's sha256 (of the exact bytes
published): predict loads only files listed there, unless told --trust.

fp32.pt is frozen but not passed through `torch.jit.optimize_for_inference`: its MKLDNN-prepacked
weights do not survive `torch.jit.save` (loading fails with "required keyword attribute 'value' is
undefined"). Apply optimize_for_inference after loading, as evaluate does (Variant.optimize).
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from tasks.atomic import staged_outputs
from tasks.cli import run_stage
from tasks.contracts import ExportedMeta, exported_meta_text, read_prepared_meta
from tasks.errors import GateFailed
from tasks.inference import Model, predict_logits
from tasks.model import load_checkpoint
from tasks.params import ExportParams, load_params
from tasks.quant.coverage import counted, fx_float_ops, say_float_ops
from tasks.quant.fx import load_int8
from tasks.variants import DEPLOYED, EXPORTED, REFERENCE, Variant
from tasks.workspace import Workspace, project_workspace

PARITY_SCRIPT = Path(__file__).with_name("parity_check.py")
MAX_BATCH = 4096  # the ExportedProgram's batch dimension is dynamic up to this


def to_torchscript(model: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with torch.no_grad():
        return torch.jit.freeze(torch.jit.trace(model.eval(), example))


def torchscript_bytes(model: torch.nn.Module, example: torch.Tensor, meta: ExportedMeta) -> bytes:
    """The saved TorchScript archive without its *.debug_pkl records.

    Those records hold the Python stack of every traced op, with absolute paths of this checkout
    and of site-packages, so the same model saved from two clones would differ byte for byte (and
    so would its DVC hash). Loading and running do not need them; error messages from inside the
    model lose their Python line numbers, which a deployed file has no use for.
    """
    saved = io.BytesIO()
    torch.jit.save(to_torchscript(model, example[:1]), saved,
                   _extra_files={"meta.json": exported_meta_text(meta)})
    reader = torch._C.PyTorchFileReader(io.BytesIO(saved.getvalue()))
    portable = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(portable)
    writer.set_min_version(int(reader.get_record("version")))
    written_by_writer = {"version", "byteorder", ".data/serialization_id"}
    for name in reader.get_all_records():
        if name.endswith(".debug_pkl") or name in written_by_writer:
            continue
        payload = reader.get_record(name)
        writer.write_record(name, payload, len(payload))
    writer.write_end_of_file()
    return portable.getvalue()


def exported_program_bytes(model: torch.nn.Module, example: torch.Tensor, meta: ExportedMeta) -> bytes:
    """fp32 as a torch.export ExportedProgram (the successor of TorchScript), batch size dynamic.

    Node stack traces are dropped for the reason torchscript_bytes drops debug records: they hold
    this checkout's absolute paths, so the file would differ from clone to clone.
    """
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # Two samples (a size-1 example would pin the batch dim to 1), cloned: the program stores its
    # example, and a view would drag the whole test split along.
    program = torch.export.export(model.eval(), (example[:2].clone(),), dynamic_shapes=({0: batch},))
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
    saved = io.BytesIO()
    torch.export.save(program, saved, extra_files={"meta.json": exported_meta_text(meta)})
    return saved.getvalue()


# How each runtime's file is written from an eager model, an example batch and its metadata.
EXPORTERS = {"torchscript": torchscript_bytes, "torch.export": exported_program_bytes}


def run_isolated(model_paths: list[Path], inputs_path: Path, workdir: Path,
                 script: Path = PARITY_SCRIPT) -> dict[str, np.ndarray]:
    """Each model's logits on the inputs (by file name), computed in one fresh `python -I` process."""
    # Its stderr is libtorch's deprecation chatter unless something fails; then it is the reason.
    run = subprocess.run(
        [sys.executable, "-I", str(script), str(inputs_path), str(workdir), *map(str, model_paths)],
        cwd=workdir, capture_output=True, text=True,
    )
    if run.returncode != 0:
        raise GateFailed(
            f"an exported model does not load or run outside qatflow (exit {run.returncode}):\n"
            + run.stderr.strip()[-2000:]
        )
    logits = {}
    for path in model_paths:
        with np.load(workdir / f"{path.name}.logits.npz", allow_pickle=False) as data:
            logits[path.name] = data["logits"]
    return logits


def parity(variant: Variant, reference: np.ndarray, loaded: np.ndarray, params: ExportParams) -> dict:
    result = {
        "max_abs_diff": round(float(np.abs(loaded - reference).max()), 8),
        "argmax_agreement": round(float((loaded.argmax(1) == reference.argmax(1)).mean()), 6),
    }
    if variant.precision == "fp32":
        tol = params.fp32_tolerance
        result["allclose"] = bool(np.allclose(loaded, reference, rtol=tol, atol=tol))
        result["passed"] = result["allclose"]
    else:
        result["passed"] = result["argmax_agreement"] >= params.int8_min_agreement
    return result


def export(params: ExportParams, workspace: Workspace) -> dict:
    qat_state, ptq_state = workspace.qat_dir / "qat_state.pt", workspace.qat_dir / "ptq_state.pt"
    workspace.require(workspace.train_model, qat_state, ptq_state)
    prepared = read_prepared_meta(workspace.prepared)
    with np.load(workspace.prepared / "test.npz", allow_pickle=False) as test:
        x_test, y_test = torch.from_numpy(test["x"]), torch.from_numpy(test["y"])
        x_raw = test["x_raw"][: params.parity_samples]
    x = x_test[: params.parity_samples]
    fp32, config = load_checkpoint(workspace.train_model)
    # Each eager model, and the quantized engine its weights are packed for (None: fp32).
    eager = {"fp32": (fp32, None), "qat": load_int8(qat_state), "ptq": load_int8(ptq_state)}

    report: dict = {}
    payloads: dict[str, bytes] = {}
    # The parity check runs on copies in a scratch folder: nothing reaches models/ unless every
    # file passes it and the gate.
    with tempfile.TemporaryDirectory(prefix="qatflow-export-") as tmp:
        workdir = Path(tmp)
        inputs = workdir / "inputs.npz"
        np.savez(inputs, x_raw=x_raw)
        for name, variant in EXPORTED.items():
            module, backend = eager[variant.made_from]
            if backend:  # int8 runs on the engine its weights were packed for
                torch.backends.quantized.engine = backend
            meta = ExportedMeta(
                variant=name, class_names=prepared.class_names, input_shape=prepared.input_shape,
                normalization=prepared.normalization, backend=backend,
                torch_version=str(torch.__version__), model=config,
            )
            payloads[name] = EXPORTERS[variant.runtime](module, x, meta)
            (workdir / Path(variant.file).name).write_bytes(payloads[name])
        loaded = run_isolated([workdir / Path(v.file).name for v in EXPORTED.values()], inputs, workdir)
        for name, variant in EXPORTED.items():
            module, _ = eager[variant.made_from]
            report[name] = parity(variant, predict_logits(module, x).numpy(),
                                  loaded[Path(variant.file).name], params)
            report[name]["size_bytes"] = len(payloads[name])
            # The exact bytes published: predict refuses a model file whose hash is not listed.
            report[name]["sha256"] = hashlib.sha256(payloads[name]).hexdigest()
            if variant.precision == "int8":  # ops TorchScript runs in float ({}: none)
                report[name]["float_ops"] = counted(fx_float_ops(module))

    failed = {name: r for name, r in report.items() if not r["passed"]}
    if failed:
        details = "; ".join(
            f"{name}: max |diff| {r['max_abs_diff']:g}, argmax agreement {r['argmax_agreement']:.4f}"
            for name, r in failed.items()
        )
        raise GateFailed(f"parity check failed ({details}); previous models left in place")
    int8 = torch.jit.load(io.BytesIO(payloads[DEPLOYED]), map_location="cpu")
    report["gate"] = accuracy_gate(eager[REFERENCE][0], int8, x_test, y_test, params)

    with staged_outputs() as out:
        for name, variant in EXPORTED.items():
            out.write_with(variant.path(workspace), lambda f, b=payloads[name]: f.write(b))
        out.write_json(workspace.metrics("export"), report)

    sizes = ", ".join(f"{name} {report[name]['size_bytes'] / 1024:.0f} KiB" for name in EXPORTED)
    print(f"export: parity passed for {', '.join(EXPORTED)} ({sizes}); int8 accuracy drop "
          f"{report['gate']['accuracy_drop']:g} pp (limit {params.max_accuracy_drop:g})")
    say_float_ops("export", {n: r["float_ops"] for n, r in report.items() if "float_ops" in r},
                  "TorchScript (FX, x86)")
    return report


def accuracy_gate(fp32: torch.nn.Module, int8: Model, x: torch.Tensor, y: torch.Tensor,
                  params: ExportParams, what: str = "int8") -> dict:
    """Test accuracy of the eager fp32 model against the int8 file about to be published (loaded
    from its bytes), as evaluate will measure them; GateFailed if int8 loses more than the limit."""
    fp32_correct = int((predict_logits(fp32.eval(), x).argmax(1) == y).sum())
    int8_correct = int((predict_logits(int8, x).argmax(1) == y).sum())
    # From counts, so that a drop of exactly the limit compares equal to it.
    drop = round(100 * (fp32_correct - int8_correct) / len(y), 4)
    if drop > params.max_accuracy_drop:
        raise GateFailed(
            f"{what} test accuracy is {drop:g} pp below fp32 ({int8_correct / len(y):.2%} vs "
            f"{fp32_correct / len(y):.2%}), over export.max_accuracy_drop = "
            f"{params.max_accuracy_drop:g} pp; previous models and metrics left in place"
        )
    return {"accuracy_drop": drop, "max_accuracy_drop": params.max_accuracy_drop, "passed": True}


def main(args) -> None:
    """Export fp32 and int8 TorchScript models, parity-check them in a fresh process, and gate
    deployment on the int8 model's test accuracy."""
    export(load_params(args.params).export, project_workspace())


if __name__ == "__main__":
    run_stage("export", main)
