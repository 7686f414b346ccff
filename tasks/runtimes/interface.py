"""What every runtime module in tasks/runtimes/ provides: the interface the export stages,
variants, evaluate, predict and the bench call, and nothing runtime-specific."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from tasks.contracts import ExportedMeta


@dataclass(frozen=True)
class ExportedFile:
    payload: bytes  # the file, exactly as it will be published
    float_ops: list[str] | None  # int8 files: each op the runtime runs in float; None for fp32


class Runtime(Protocol):
    NAME: str  # in variants and manifests, e.g. "onnxruntime"
    LABEL: str  # for people, e.g. "ONNX Runtime"
    SUFFIX: str  # its files' extension: how predict and the isolated check tell runtimes apart
    STAGE: str  # the dvc.yaml stage that writes its files; metrics/<STAGE>.json lists their sha256

    def describe(self) -> dict[str, str]:
        """The runtime and its version, recorded beside each file in the manifest."""

    def export(self, model: Any, example: torch.Tensor, meta: ExportedMeta) -> ExportedFile:
        """`model` (an eager or converted module; for ExecuTorch a PT2E program) as this runtime's
        file, `meta` embedded so the file describes itself."""

    def read_meta(self, path: Path, data: bytes | None = None) -> ExportedMeta:
        """The metadata a file carries, without loading the model (predict checks inputs first)."""

    def load(self, path: Path, data: bytes | None = None) -> tuple[Any, ExportedMeta]:
        """A model called like a torch module (float32 batch in, logits out), with as many
        threads as torch uses now, and its metadata; `data`: the file's bytes, already read."""
