"""Loading an exported model the way a deployment must: metadata first, then the quantized engine,
then the weights (int8 weights are packed for whichever engine is active when the file is read)."""

from __future__ import annotations

from pathlib import Path

import torch

from tasks.contracts import ExportedMeta, read_exported_meta
from tasks.errors import DataError


def load_deployed(path: Path) -> tuple[torch.nn.Module, ExportedMeta]:
    """A TorchScript file (.pt) or a torch.export program (.pt2) and the meta.json it carries."""
    if not path.is_file():
        raise DataError(f"{path}: model file not found")
    meta = read_exported_meta(path)
    if meta.backend:  # process-global, like the engine choice in any deployment
        torch.backends.quantized.engine = meta.backend
    if path.suffix == ".pt2":
        return torch.export.load(str(path)).module(), meta
    return torch.jit.load(str(path), map_location="cpu"), meta
