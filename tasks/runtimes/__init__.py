"""The runtimes qatflow ships to, one module each, all with the interface of interface.Runtime:

  torchscript   .pt    torch.jit / libtorch (C++: deploy/cpp)   written by the export stage
  torch_export  .pt2   torch.export                             written by the export stage
  onnx          .onnx  ONNX Runtime, CPU                        written by export_onnx
  executorch    .pte   ExecuTorch, XNNPACK                      written by export_executorch

isolated.py runs any of their files in a fresh interpreter that never imports qatflow (the parity
check every export stage runs), gates.py holds the parity and accuracy gates, publish.py the
export-check-publish sequence every export stage shares.

Adding a runtime: its module here and its line in RUNTIMES, its runner in isolated.py, its rows in
tasks/variants.py, and its stage (a thin tasks/export_<runtime>.py and its dvc.yaml entry).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.contracts import ExportedMeta
from tasks.errors import DataError
from tasks.runtimes import executorch, onnx, torch_export, torchscript
from tasks.runtimes.interface import Runtime

RUNTIMES: dict[str, Runtime] = {r.NAME: r for r in (torchscript, torch_export, onnx, executorch)}
BY_SUFFIX: dict[str, Runtime] = {r.SUFFIX: r for r in RUNTIMES.values()}


def for_file(path: Path) -> Runtime:
    """The runtime a model file belongs to, by its extension; TorchScript for any other one
    (.pth, .ptl, .torchscript: its files go by many names), whose reader says if it is not one."""
    return BY_SUFFIX.get(path.suffix, torchscript)


def read_meta(path: Path, data: bytes | None = None) -> ExportedMeta:
    return for_file(path).read_meta(path, data)


def load(path: Path, data: bytes | None = None) -> tuple[Any, ExportedMeta]:
    """Any exported file in its runtime, and the metadata it carries."""
    if data is None and not path.is_file():
        raise DataError(f"{path}: model file not found")
    return for_file(path).load(path, data)
