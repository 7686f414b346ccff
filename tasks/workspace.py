"""Where each stage reads and writes, relative to the project root; the exported model files are
listed with their variants (tasks/variants.py). dvc.yaml names the same paths (tests/test_workspace.py
keeps the two in step)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import QatflowError


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def train_model(self) -> Path:
        return self.root / "models" / "train" / "fp32_state.pt"

    @property
    def train_checkpoint(self) -> Path:
        """Resumable training state, rewritten every epoch. Not a DVC output: DVC would delete
        it before the stage runs, and it is removed once training has finished."""
        return self.root / "models" / "train" / "checkpoint.pt"

    @property
    def qat_dir(self) -> Path:
        return self.root / "models" / "qat"

    @property
    def qat_checkpoint(self) -> Path:
        """As train_checkpoint, for qat; outside models/qat, which DVC tracks as a whole."""
        return self.root / "models" / "qat_checkpoint.pt"

    @property
    def qat_pt2e_dir(self) -> Path:
        return self.root / "models" / "qat_pt2e"

    @property
    def qat_pt2e_checkpoint(self) -> Path:
        return self.root / "models" / "qat_pt2e_checkpoint.pt"

    def require(self, *paths: Path) -> None:
        """Fail with one clear line when an upstream stage's output is missing."""
        for path in paths:
            if not path.exists():
                shown = path.relative_to(self.root) if path.is_relative_to(self.root) else path
                raise QatflowError(f"{shown}: missing; run the stages before this one (dvc repro)")

    def metrics(self, stage: str) -> Path:
        return self.root / "metrics" / f"{stage}.json"

    @property
    def latency(self) -> Path:
        return self.root / "metrics" / "latency.json"

    def plots(self, stage: str) -> Path:
        return self.root / "plots" / stage

    def tensorboard(self, stage: str) -> Path:
        """A fresh TensorBoard run directory: runs/<stage>/<run name>.

        The run name comes from QATFLOW_RUN_NAME (set by the Prefect flow), else from DVC's
        experiment name, else from the clock, so every run keeps its own curves.
        """
        name = (
            os.environ.get("QATFLOW_RUN_NAME")
            or os.environ.get("DVC_EXP_NAME")
            or time.strftime("%Y%m%d-%H%M%S")
        )
        return self.root / "runs" / stage / name


def project_workspace() -> Workspace:
    return Workspace(Path.cwd())
