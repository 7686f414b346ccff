"""TorchScript (.pt): traced, frozen, loaded by torch.jit.load in Python or by libtorch in C++
(deploy/cpp). The ExportedMeta JSON rides along as the archive's extra file meta.json.

The file is frozen but not passed through `torch.jit.optimize_for_inference`: its MKLDNN-prepacked
weights do not survive `torch.jit.save` (loading fails with "required keyword attribute 'value' is
undefined"). A deployment applies it after loading (tasks/variants.py: Variant.optimize).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import IO

import torch

from tasks.contracts import ExportedMeta, exported_meta_text, read_exported_meta
from tasks.errors import DataError
from tasks.quant.coverage import fx_float_ops
from tasks.runtimes.interface import ExportedFile

NAME = "torchscript"
LABEL = "TorchScript"  # for people: in messages
SUFFIX = ".pt"
STAGE = "export"


def describe() -> dict[str, str]:
    return {"runtime": NAME, "runtime_version": torch.__version__.split("+")[0]}


def to_torchscript(model: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with torch.no_grad():
        return torch.jit.freeze(torch.jit.trace(model.eval(), example))


def export(model: torch.nn.Module, example: torch.Tensor, meta: ExportedMeta) -> ExportedFile:
    """The file, and for an int8 model the ops TorchScript runs in float.

    The archive is saved without its *.debug_pkl records.

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
    return ExportedFile(portable.getvalue(), fx_float_ops(model) if meta.backend else None)


def read_meta(path: Path, data: bytes | None = None) -> ExportedMeta:
    return read_exported_meta(path, data)


def load(path: Path, data: bytes | None = None) -> tuple[torch.nn.Module, ExportedMeta]:
    """The module and its metadata. The quantized engine is set first: int8 weights are packed for
    whichever engine is active when the file is read (process-global, as in any deployment)."""
    meta = read_meta(path, data)
    if meta.backend:
        torch.backends.quantized.engine = meta.backend
    return load_archive(torch.jit.load, path, data), meta


def load_archive(loader, path: Path, data: bytes | None):
    """`loader` (torch.jit.load, or torch.export.load's module) on `path` or its bytes; a file
    torch cannot load is a DataError naming `path`."""
    source: str | IO[bytes] = io.BytesIO(data) if data is not None else str(path)
    failures = _LoaderFailures()
    logger = logging.getLogger("torch.export")
    logger.addFilter(failures)
    try:
        return loader(source)
    except (RuntimeError, ValueError, KeyError, EOFError) as exc:
        # The metadata was fine but the model itself is missing or damaged (a hand-made zip, a
        # truncated copy): torch's message is lines of C++ context; the first one of the first
        # error says why (torch.export logs that one and raises a vaguer one of its own).
        raise DataError(f"{path}: has qatflow metadata but no loadable model "
                        f"({first_line(failures.first or exc)}); re-run export (dvc repro)") from None
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


def first_line(exc: BaseException, limit: int = 120) -> str:
    """The first line of a runtime's error message, without torch's boilerplate."""
    line = next((part.strip() for part in str(exc).splitlines() if part.strip()), type(exc).__name__)
    line = line.split("(Could this error message be improved?")[0].strip()
    return line if len(line) <= limit else line[:limit] + "…"
