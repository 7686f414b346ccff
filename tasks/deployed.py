"""Loading an exported model the way a deployment must: metadata first, then the quantized engine,
then the weights (int8 weights are packed for whichever engine is active when the file is read).
An .onnx file (export_onnx) runs in ONNX Runtime instead, and a .pte file (export_executorch) in
ExecuTorch's runtime, each behind the same torch-tensor call."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import IO

import torch

import numpy as np

from tasks.contracts import ExportedMeta, parse_json, read_exported_meta
from tasks.errors import DataError
from tasks.runtimes.threads import ort_session_config  # issue 22 §4

ONNX_META_KEY = "qatflow.meta"  # metadata_props key of the ExportedMeta JSON in an .onnx file
# A .pte has no free-form metadata; the ExportedMeta JSON is what this constant method returns.
PTE_META_METHOD = "qatflow_meta"
# ExecuTorch plans a program's memory for its largest batch; export_executorch plans for this many.
PTE_MAX_BATCH = 256


def load_deployed(path: Path, data: bytes | None = None) -> tuple[torch.nn.Module | OnnxModel, ExportedMeta]:
    """A TorchScript file (.pt), a torch.export program (.pt2) or an ONNX model (.onnx, in ONNX
    Runtime) and the metadata it carries; from `data`, the file's bytes, when the caller has read
    (and checked) them already."""
    if data is None and not path.is_file():
        raise DataError(f"{path}: model file not found")
    if path.suffix == ".onnx":
        return load_onnx(path, data)
    if path.suffix == ".pte":
        return load_pte(path, data)
    meta = read_exported_meta(path, data)
    if meta.backend:  # process-global, like the engine choice in any deployment
        torch.backends.quantized.engine = meta.backend
    return load_module(io.BytesIO(data) if data is not None else str(path), path), meta


def load_module(source: str | IO[bytes], path: Path) -> torch.nn.Module:
    """torch's loader for `path` (.pt2: torch.export, else TorchScript) on `source` (its name, or
    its bytes as a file object); a file torch cannot load is a DataError naming `path`."""
    failures = _LoaderFailures()
    logger = logging.getLogger("torch.export")
    logger.addFilter(failures)
    try:
        if path.suffix == ".pt2":
            return torch.export.load(source).module()
        return torch.jit.load(source, map_location="cpu")
    except (RuntimeError, ValueError, KeyError, EOFError) as exc:
        # The metadata was fine but the model itself is missing or damaged (a hand-made zip, a
        # truncated copy): torch's message is lines of C++ context; the first one of the first
        # error says why (torch.export logs that one and raises a vaguer one of its own).
        raise DataError(f"{path}: has qatflow metadata but no loadable model "
                        f"({_first_line(failures.first or exc)}); re-run export (dvc repro)") from None
    finally:
        logger.removeFilter(failures)


class _LoaderFailures(logging.Filter):
    """Keeps the traceback torch.export.load logs before trying its older format off the terminal
    and remembers the error: if loading then fails, it is the one worth naming."""

    first: BaseException | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            self.first = self.first or record.exc_info[1]
            return False
        return True


def _first_line(exc: BaseException, limit: int = 120) -> str:
    line = next((part.strip() for part in str(exc).splitlines() if part.strip()), type(exc).__name__)
    line = line.split("(Could this error message be improved?")[0].strip()
    return line if len(line) <= limit else line[:limit] + "…"


def read_meta(path: Path, data: bytes | None = None) -> ExportedMeta:
    """The ExportedMeta a model file carries, without loading the model: meta.json of a
    TorchScript/torch.export archive, the "qatflow.meta" metadata_props of an .onnx file, or what
    the qatflow_meta method of a .pte returns."""
    if path.suffix == ".onnx":
        return read_onnx_meta(path, data)
    if path.suffix == ".pte":
        return _open_pte(path, data)[1]
    return read_exported_meta(path, data)


def read_onnx_meta(path: Path, data: bytes | None = None) -> ExportedMeta:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.ModelProto()
        model.ParseFromString(data if data is not None else path.read_bytes())
    except (DecodeError, OSError) as exc:
        raise DataError(f"{path}: not an ONNX model qatflow exported (damaged or truncated: "
                        f"{_first_line(exc)}); re-run export_onnx (dvc repro)") from None
    props = {p.key: p.value for p in model.metadata_props}
    if ONNX_META_KEY not in props:
        raise DataError(f"{path}: no {ONNX_META_KEY} metadata inside; not an ONNX model qatflow "
                        "exported (or a damaged one); re-run export_onnx (dvc repro)")
    return parse_json(ExportedMeta, props[ONNX_META_KEY], f"{path}: {ONNX_META_KEY}",
                      "re-run export_onnx (dvc repro)")


class OnnxModel:
    """An ONNX Runtime session called like a torch model: float32 tensor in, logits tensor out."""

    def __init__(self, session) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        try:
            out = self.session.run(None, {self.input_name: batch})[0]
        except Exception as exc:
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            # ONNX Runtime's errors subclass Exception only; a failing torch model raises
            # RuntimeError, which is what callers (predict's one-sample check) expect.
            raise RuntimeError(str(exc)) from None
        return torch.from_numpy(out)


def load_onnx(path: Path, data: bytes | None = None) -> tuple[OnnxModel, ExportedMeta]:
    """An .onnx file in ONNX Runtime on CPU, with as many threads as torch uses now (evaluate's
    thread setting applies to it too), and the ExportedMeta it carries."""
    import onnxruntime as ort

    source = data if data is not None else path.read_bytes()
    meta = read_onnx_meta(path, source)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: they are raised, not logged
    # issue 22 §4: no spinning thread pool where the process serves with a passive OpenMP wait policy.
    for key, value in ort_session_config(options.intra_op_num_threads).items():
        options.add_session_config_entry(key, value)
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind types (Fail, InvalidGraph, ...)
        raise DataError(f"{path}: has qatflow metadata but ONNX Runtime cannot load it "
                        f"({_first_line(exc)}); re-run export_onnx (dvc repro)") from None
    return OnnxModel(session), meta


class PteModel:
    """An ExecuTorch program's forward method called like a torch model."""

    def __init__(self, program) -> None:
        # The method runs on memory the program owns: it must live as long as the method does.
        self.program = program
        self.method = program.load_method("forward")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if len(x) <= PTE_MAX_BATCH:
            return self.method.execute([x.contiguous()])[0]
        return torch.cat([self.method.execute([x[i : i + PTE_MAX_BATCH].contiguous()])[0]
                          for i in range(0, len(x), PTE_MAX_BATCH)])


def _open_pte(path: Path, data: bytes | None):
    """The ExecuTorch program in `path` (or `data`) and the ExportedMeta it returns."""
    from executorch.runtime import Runtime

    source = data if data is not None else path.read_bytes()
    try:
        program = Runtime.get().load_program(source)
        if PTE_META_METHOD not in program.method_names:
            raise DataError(f"{path}: no {PTE_META_METHOD} method inside; not an ExecuTorch program "
                            "qatflow exported; re-run export_executorch (dvc repro)")
        meta_text = program.load_method(PTE_META_METHOD).execute([])[0]
    except RuntimeError as exc:  # the runtime's verification of a damaged or truncated file
        raise DataError(f"{path}: not an ExecuTorch program qatflow exported (damaged or truncated: "
                        f"{_first_line(exc)}); re-run export_executorch (dvc repro)") from None
    return program, parse_json(ExportedMeta, meta_text, f"{path}: {PTE_META_METHOD}",
                               "re-run export_executorch (dvc repro)")


def load_pte(path: Path, data: bytes | None = None) -> tuple[PteModel, ExportedMeta]:
    """A .pte file in ExecuTorch's runtime (XNNPACK kernels on CPU), with as many threads as torch
    uses now, and the ExportedMeta it carries."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    program, meta = _open_pte(path, data)
    # XNNPACK's thread pool is process-wide; evaluate's and the bench's thread setting applies to
    # it as it does to torch and ONNX Runtime.
    _unsafe_reset_threadpool(torch.get_num_threads())
    return PteModel(program), meta
