"""Every model variant qatflow measures, defined once: name, label, file, runtime, how it is loaded.

export writes the entries made from an eager model (`made_from`) as TorchScript or torch.export
files, export_onnx the ONNX Runtime ones and export_executorch the ExecuTorch one (`made_by`), evaluate and the benchmark score
and time every entry, the flow's report lists them, the figures colour them. A new runtime is one
entry here plus its exporter in tasks/export.py (EXPORTERS, keyed by runtime).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tasks.contracts import ExportedMeta
from tasks.deployed import load_deployed
from tasks.errors import DataError
from tasks.inference import Model
from tasks.model import load_checkpoint
from tasks.workspace import Workspace

Runtime = Literal["pytorch", "torchscript", "torch.export", "onnxruntime", "executorch"]
EagerSource = Literal["fp32", "qat", "ptq"]  # the train checkpoint, or qat's prepared models


def _load_eager(path: Path) -> tuple[Model, ExportedMeta | None]:
    return load_checkpoint(path)[0], None


LOADERS: dict[Runtime, Callable[[Path], tuple[Model, ExportedMeta | None]]] = {
    "pytorch": _load_eager,
    "torchscript": load_deployed,
    "torch.export": load_deployed,
    "onnxruntime": load_deployed,  # by the .onnx extension
    "executorch": load_deployed,  # by the .pte extension
}


@dataclass(frozen=True)
class Variant:
    name: str  # its key in metrics/*.json
    label: str  # in tables and figures
    file: str  # relative to the project root, as dvc.yaml names it
    runtime: Runtime
    precision: Literal["fp32", "int8"]  # fp32 files must match their eager model; int8 its argmax
    color: str
    made_from: EagerSource | None = None  # exported from this eager model
    made_by: Literal["train", "export", "export_onnx", "export_executorch"] = "export"  # the stage that writes the file
    parity_with: str | None = None  # export_onnx: the variant whose file it must match
    # What a deployment does after loading and before serving; timings include it. fp32 TorchScript
    # is optimized in memory only: MKLDNN-prepacked weights do not survive torch.jit.save.
    optimize: Callable[[Model], Model] | None = None

    def path(self, workspace: Workspace) -> Path:
        return workspace.root / self.file

    def load(self, workspace: Workspace, class_names: list[str] | None = None) -> Model:
        """A freshly loaded model; an exported file must carry the class names given."""
        path = self.path(workspace)
        model, meta = LOADERS[self.runtime](path)
        if meta is not None and class_names is not None and meta.class_names != class_names:
            raise DataError(f"{path}: class names differ from data/prepared/meta.json; re-run export")
        return model

    def load_for_serving(self, workspace: Workspace, class_names: list[str] | None = None) -> Model:
        model = self.load(workspace, class_names)
        return self.optimize(model) if self.optimize else model


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("fp32", "fp32, eager", "models/train/fp32_state.pt", "pytorch", "fp32", "tab:blue",
            made_by="train"),
    Variant("fp32_ts", "fp32 TorchScript", "models/fp32.pt", "torchscript", "fp32", "tab:cyan",
            made_from="fp32", optimize=torch.jit.optimize_for_inference),
    Variant("fp32_pt2", "fp32 torch.export", "models/fp32.pt2", "torch.export", "fp32", "tab:green",
            made_from="fp32"),
    Variant("ptq", "int8 PTQ TorchScript", "models/ptq_int8.pt", "torchscript", "int8", "tab:orange",
            made_from="ptq"),
    Variant("int8", "int8 QAT TorchScript", "models/int8.pt", "torchscript", "int8", "tab:red",
            made_from="qat"),
    Variant("fp32_onnx", "fp32 ONNX Runtime", "models/fp32.onnx", "onnxruntime", "fp32", "tab:olive",
            made_from="fp32", made_by="export_onnx", parity_with="fp32_ts"),
    Variant("int8_onnx", "int8 QAT ONNX Runtime", "models/int8.onnx", "onnxruntime", "int8", "tab:pink",
            made_from="qat", made_by="export_onnx", parity_with="int8"),
    # PT2E QAT (qat_pt2e), not FX: its own fine-tune, checked against its own program.
    Variant("int8_pte", "int8 PT2E ExecuTorch (XNNPACK)", "models/int8.pte", "executorch", "int8",
            "tab:purple", made_by="export_executorch"),
)}
EXPORTED = {name: v for name, v in VARIANTS.items() if v.made_by == "export"}
ONNX_EXPORTED = {name: v for name, v in VARIANTS.items() if v.made_by == "export_onnx"}
EXECUTORCH_EXPORTED = {name: v for name, v in VARIANTS.items() if v.made_by == "export_executorch"}

# The roles the reports compare: accuracy against the eager fp32 model, speed and size against the
# best fp32 file (optimized TorchScript: the eager ratio would flatter int8), and the deployable.
REFERENCE, BASELINE, DEPLOYED = "fp32", "fp32_ts", "int8"
