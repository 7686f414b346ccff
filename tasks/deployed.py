"""Loading an exported model the way a deployment must: metadata first, then the quantized engine,
then the weights (int8 weights are packed for whichever engine is active when the file is read)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch

from tasks.errors import DataError


def read_meta(path: Path) -> dict:
    """meta.json embedded by the export stage, read from the archive without loading the model."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/extra/meta.json")), None)
            if name is None:
                raise DataError(f"{path}: no meta.json inside; not a qatflow export")
            return json.loads(archive.read(name))
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a TorchScript file ({exc})") from None


def load_deployed(path: Path) -> tuple[torch.jit.ScriptModule, dict]:
    if not path.is_file():
        raise DataError(f"{path}: model file not found")
    meta = read_meta(path)
    if meta.get("backend"):  # process-global, like the engine choice in any deployment
        torch.backends.quantized.engine = meta["backend"]
    return torch.jit.load(str(path), map_location="cpu"), meta
