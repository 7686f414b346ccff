"""Loading an exported model the way a deployment must: metadata first, then the quantized engine,
then the weights (int8 weights are packed for whichever engine is active when the file is read)."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import IO

import torch

from tasks.contracts import ExportedMeta, read_exported_meta
from tasks.errors import DataError


def load_deployed(path: Path, data: bytes | None = None) -> tuple[torch.nn.Module, ExportedMeta]:
    """A TorchScript file (.pt) or a torch.export program (.pt2) and the meta.json it carries;
    from `data`, the file's bytes, when the caller has read (and checked) them already."""
    if data is None and not path.is_file():
        raise DataError(f"{path}: model file not found")
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
