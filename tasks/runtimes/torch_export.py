"""torch.export (.pt2): an ExportedProgram, TorchScript's successor, with a dynamic batch
dimension; loaded by torch.export.load. The ExportedMeta JSON is the archive's extra meta.json."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from tasks.contracts import ExportedMeta, exported_meta_text, read_exported_meta
from tasks.runtimes.interface import ExportedFile
from tasks.runtimes.torchscript import load_archive

NAME = "torch.export"
LABEL = "torch.export"  # for people: in messages
SUFFIX = ".pt2"
STAGE = "export"
MAX_BATCH = 4096  # the program's batch dimension is dynamic up to this


def describe() -> dict[str, str]:
    return {"runtime": NAME, "runtime_version": torch.__version__.split("+")[0]}


def export(model: torch.nn.Module, example: torch.Tensor, meta: ExportedMeta) -> ExportedFile:
    """fp32 only (no int8 engine exports to it here). Node stack traces are dropped for the reason torchscript.write drops debug records: they
    hold this checkout's absolute paths, so the file would differ from clone to clone."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # Two samples (a size-1 example would pin the batch dim to 1), cloned: the program stores its
    # example, and a view would drag the whole test split along.
    program = torch.export.export(model.eval(), (example[:2].clone(),), dynamic_shapes=({0: batch},))
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
    saved = io.BytesIO()
    torch.export.save(program, saved, extra_files={"meta.json": exported_meta_text(meta)})
    return ExportedFile(saved.getvalue(), None)


def read_meta(path: Path, data: bytes | None = None) -> ExportedMeta:
    return read_exported_meta(path, data)


def load(path: Path, data: bytes | None = None) -> tuple[torch.nn.Module, ExportedMeta]:
    meta = read_meta(path, data)
    return load_archive(lambda source: torch.export.load(source).module(), path, data), meta
