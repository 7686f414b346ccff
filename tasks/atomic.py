"""Atomic output writes: a stage that dies mid-write never leaves a truncated file that looks valid.

Everything goes to a temporary file in the destination's folder (same filesystem), is fsynced, and
is renamed over the destination only when complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_with(path: str | Path, writer: Callable[[IO[bytes]], None]) -> Path:
    """Atomically write whatever `writer(fileobj)` produces.

    torch.save / torch.jit.save get a file object rather than a path on purpose: given a path they
    name the archive after the file, so a temp name would change the bytes.
    """
    with atomic_open(path, "wb") as f:
        writer(f)
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    with atomic_open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)
