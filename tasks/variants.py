"""Every model variant qatflow measures, defined once: name, label, file, runtime, what it is made
from. A variant is a model in a runtime (tasks/runtimes/): the runtime's stage writes its file,
evaluate and the benchmark score and time every entry, the flow's report lists them, the figures
colour them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tasks import runtimes
from tasks.errors import DataError
from tasks.inference import Model
from tasks.model import load_checkpoint
from tasks.workspace import Workspace

EAGER = "pytorch"  # the training checkpoint, run by the Python that made it: not a deployment
# The train checkpoint, qat's prepared FX models (QAT, PTQ), or qat_pt2e's converted program.
Source = Literal["fp32", "qat", "ptq", "pt2e"]


@dataclass(frozen=True)
class Variant:
    name: str  # its key in metrics/*.json
    label: str  # in tables and figures
    file: str  # relative to the project root, as dvc.yaml names it
    runtime: str  # EAGER, or a name in tasks.runtimes.RUNTIMES
    precision: Literal["fp32", "int8"]  # fp32 files must match their reference; int8 its argmax
    color: str
    made_from: Source = "fp32"
    # The published file whose outputs this one must match (by default: the model it is made from).
    parity_with: str | None = None
    # What a deployment does after loading and before serving; timings include it. fp32 TorchScript
    # is optimized in memory only: MKLDNN-prepacked weights do not survive torch.jit.save.
    optimize: Callable[[Model], Model] | None = None

    @property
    def stage(self) -> str:
        """The dvc.yaml stage that writes the file."""
        return "train" if self.runtime == EAGER else runtimes.RUNTIMES[self.runtime].STAGE

    def path(self, workspace: Workspace) -> Path:
        return workspace.root / self.file

    def load(self, workspace: Workspace, class_names: list[str] | None = None) -> Model:
        """A freshly loaded model; an exported file must carry the class names given."""
        path = self.path(workspace)
        if self.runtime == EAGER:
            return load_checkpoint(path)[0]
        model, meta = runtimes.RUNTIMES[self.runtime].load(path)
        if class_names is not None and meta.class_names != class_names:
            raise DataError(f"{path}: class names differ from data/prepared/meta.json; re-run {self.stage}")
        return model

    def load_for_serving(self, workspace: Workspace, class_names: list[str] | None = None) -> Model:
        model = self.load(workspace, class_names)
        return self.optimize(model) if self.optimize else model


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("fp32", "fp32, eager", "models/train/fp32_state.pt", EAGER, "fp32", "tab:blue"),
    Variant("fp32_ts", "fp32 TorchScript", "models/fp32.pt", "torchscript", "fp32", "tab:cyan",
            optimize=torch.jit.optimize_for_inference),
    Variant("fp32_pt2", "fp32 torch.export", "models/fp32.pt2", "torch.export", "fp32", "tab:green"),
    Variant("ptq", "int8 PTQ TorchScript", "models/ptq_int8.pt", "torchscript", "int8", "tab:orange",
            made_from="ptq"),
    Variant("int8", "int8 QAT TorchScript", "models/int8.pt", "torchscript", "int8", "tab:red",
            made_from="qat"),
    Variant("fp32_onnx", "fp32 ONNX Runtime", "models/fp32.onnx", "onnxruntime", "fp32", "tab:olive",
            parity_with="fp32_ts"),
    Variant("int8_onnx", "int8 QAT ONNX Runtime", "models/int8.onnx", "onnxruntime", "int8", "tab:pink",
            made_from="qat", parity_with="int8"),
    # PT2E QAT (qat_pt2e), not FX: its own fine-tune, checked against its own program.
    Variant("int8_pte", "int8 PT2E ExecuTorch (XNNPACK)", "models/int8.pte", "executorch", "int8",
            "tab:purple", made_from="pt2e"),
)}


def written_by(stage: str) -> dict[str, Variant]:
    """The variants whose files `stage` writes, in table order."""
    return {name: v for name, v in VARIANTS.items() if v.stage == stage}


# The roles the reports compare: accuracy against the eager fp32 model, speed and size against the
# best fp32 file (optimized TorchScript: the eager ratio would flatter int8), and the deployable.
REFERENCE, BASELINE, DEPLOYED = "fp32", "fp32_ts", "int8"
