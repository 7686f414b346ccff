"""Where a run was made: the CPU model and the versions that decide its weights' bits."""

from __future__ import annotations

import platform
from importlib.metadata import version
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, str]:
    # Package metadata, not imports: a stage must not pay for importing dvc or prefect.
    return {"cpu": cpu_name(), "python": platform.python_version(),
            **{name: version(name) for name in ("torch", "numpy", "dvc", "prefect")}}
