"""ExecuTorch (.pte), XNNPACK delegate: for phones and boards.

The source is qat_pt2e's converted program (models/qat_pt2e/int8.pt2): the quantized convolutions
and linear layers run as XNNPACK's int8 kernels with the scales QAT learned. The batch dimension
is dynamic up to MAX_BATCH. A .pte has no metadata slot, so the ExportedMeta JSON is what the
program's constant method qatflow_meta returns.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from tasks.contracts import ExportedMeta, exported_meta_text, parse_json
from tasks.errors import DataError
from tasks.runtimes.interface import ExportedFile
from tasks.runtimes.torchscript import first_line

NAME = "executorch"
LABEL = "ExecuTorch (XNNPACK)"  # for people: in messages
SUFFIX = ".pte"
STAGE = "export_executorch"
META_METHOD = "qatflow_meta"
# ExecuTorch plans a program's memory for its largest batch: the lowering plans for this many.
MAX_BATCH = 256
REMEDY = "re-run export_executorch (dvc repro)"


def describe() -> dict[str, str]:
    from importlib.metadata import version

    return {"runtime": NAME, "runtime_version": version("executorch")}


def lower(program: torch.export.ExportedProgram, example: torch.Tensor, meta: ExportedMeta):
    """The program lowered to XNNPACK (an EdgeProgramManager), with the metadata embedded."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from tasks.quant import pt2e

    # Re-captured on a full-size example batch: the lowering plans memory for the example's batch
    # size, whatever the program's own dynamic range says.
    batch = example[torch.arange(MAX_BATCH) % len(example)]
    program = torch.export.export(program.module(), (batch,), dynamic_shapes=(pt2e.batch_dim(),))
    with warnings.catch_warnings():  # executorch 1.5 on torch 2.13: pytree deprecation notices
        warnings.simplefilter("ignore", FutureWarning)
        return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                           constant_methods={META_METHOD: exported_meta_text(meta)})


def export(program: torch.export.ExportedProgram, example: torch.Tensor, meta: ExportedMeta) -> ExportedFile:
    """The .pte bytes, and the ops it runs in float outside XNNPACK's int8 kernels."""
    from tasks.quant.coverage import executorch_float_ops

    lowered = lower(program, example, meta)
    float_ops = executorch_float_ops(lowered)  # before to_executorch, which consumes it
    return ExportedFile(lowered.to_executorch().buffer, float_ops)


def _open(path: Path, data: bytes | None):
    """The ExecuTorch program in `path` (or `data`) and the ExportedMeta it returns."""
    from executorch.runtime import Runtime

    source = data if data is not None else path.read_bytes()
    try:
        program = Runtime.get().load_program(source)
        if META_METHOD not in program.method_names:
            raise DataError(f"{path}: no {META_METHOD} method inside; not an ExecuTorch program "
                            f"qatflow exported; {REMEDY}")
        meta_text = program.load_method(META_METHOD).execute([])[0]
    except RuntimeError as exc:  # the runtime's verification of a damaged or truncated file
        raise DataError(f"{path}: not an ExecuTorch program qatflow exported (damaged or truncated: "
                        f"{first_line(exc)}); {REMEDY}") from None
    return program, parse_json(ExportedMeta, meta_text, f"{path}: {META_METHOD}", REMEDY)


def read_meta(path: Path, data: bytes | None = None) -> ExportedMeta:
    return _open(path, data)[1]


class PteModel:
    """An ExecuTorch program's forward method called like a torch model."""

    def __init__(self, program) -> None:
        # The method runs on memory the program owns: it must live as long as the method does.
        self.program = program
        self.method = program.load_method("forward")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if len(x) <= MAX_BATCH:
            return self.method.execute([x.contiguous()])[0]
        return torch.cat([self.method.execute([x[i : i + MAX_BATCH].contiguous()])[0]
                          for i in range(0, len(x), MAX_BATCH)])


def load(path: Path, data: bytes | None = None) -> tuple[PteModel, ExportedMeta]:
    """The program in ExecuTorch's runtime (XNNPACK kernels on CPU), with as many threads as torch
    uses now, and the ExportedMeta it carries."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    program, meta = _open(path, data)
    # XNNPACK's thread pool is process-wide; evaluate's and the bench's thread setting applies to
    # it as it does to torch and ONNX Runtime.
    _unsafe_reset_threadpool(torch.get_num_threads())
    return PteModel(program), meta
