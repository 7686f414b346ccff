"""Resumable training: what the loop carries from epoch to epoch, what that state depends on (its
fingerprint), and saving and resuming it. train and qat save after every epoch; a killed run
started again with the same fingerprint carries on after its last finished epoch and ends with the
weights an uninterrupted run would have.

Checkpoints are plain containers and tensors, loaded with weights_only=True: no pickled code.
They are neither DVC outputs (DVC would delete them before the stage runs) nor git-tracked.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch
import yaml
from pydantic import BaseModel
from torch import nn

from tasks.atomic import write_with
from tasks.distributed import DataParallel

# dvc.yaml and tasks/ sit side by side; the stage's data deps resolve against the workspace it
# runs in, which in-process tests put elsewhere.
PROJECT = Path(__file__).resolve().parents[1]
CODE = ("tasks/", "nets")  # the project's code, and the user's nets


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float


@dataclass
class LoopState:
    """What fit carries from one epoch to the next besides the modules' own state."""

    best_state: dict[str, torch.Tensor]
    history: list[EpochRecord] = field(default_factory=list)
    best_accuracy: float = -1.0
    best_loss: float = float("inf")
    best_epoch: int = 0
    best_confusion: np.ndarray | None = None
    stopped: bool = False  # early stop: a resumed run has nothing left to train


@dataclass
class TrainingState:
    """The objects whose state the next epoch depends on; a checkpoint saves and restores them."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    generator: torch.Generator  # shuffling and augmentation


@dataclass(frozen=True)
class Checkpointing:
    """Where fit saves its resumable state, and what that state depends on: a checkpoint whose
    fingerprint differs in any entry (params, data, code...) is not resumed."""

    path: Path
    fingerprint: dict[str, str]


def files_digest(paths: list[Path]) -> str:
    """sha256 over the names and bytes of these files, folders expanded (hidden files left out)."""
    digest = hashlib.sha256()
    for path in paths:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.name.startswith("."):
                continue
            digest.update(file.name.encode() + b"\0")
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


@cache
def stage_deps(stage: str) -> tuple[str, ...]:
    """The stage's deps as dvc.yaml declares them: the one list of what a stage reads."""
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    return tuple(stages[stage]["deps"])


def fingerprint(stage: str, params: BaseModel, workspace_root: Path, processes: int = 1) -> dict[str, str]:
    """What a stage's training depends on, one entry each, named so that a mismatch says what
    changed: its params section, each of its dvc.yaml deps (data, upstream models, code), torch and
    the number of DDP processes (a torchrun started by hand need not match the params' nproc)."""
    entries = {f"{stage} params": hashlib.sha256(params.model_dump_json().encode()).hexdigest()}
    if processes > 1:
        entries["DDP processes"] = str(processes)
    for dep in stage_deps(stage):
        base = PROJECT if dep.startswith(CODE) else workspace_root
        entries[dep] = files_digest([base / dep]) if (base / dep).exists() else "missing"
    entries["torch version"] = str(torch.__version__)  # a TorchVersion would not load weights_only
    return entries


def _random_state(training: TrainingState) -> dict[str, torch.Tensor]:
    # Dropout draws from the global generator (on CUDA, the device's), shuffling and augmentation
    # from the loop's.
    state = {"torch_rng": torch.get_rng_state(), "generator": training.generator.get_state()}
    if torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def save(checkpoint: Checkpointing, loop: LoopState, training: TrainingState,
         parallel: DataParallel | None = None) -> None:
    """Under DDP every rank calls it (its random state is gathered) and rank 0 writes."""
    random = _random_state(training)
    if parallel is not None:
        ranks = parallel.gather(random)
        if not parallel.is_main:
            return
        random = {"ranks": ranks}
    saved = {
        "fingerprint": checkpoint.fingerprint,
        "model": training.model.state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "scheduler": training.scheduler.state_dict() if training.scheduler is not None else None,
        **random,
        "history": [asdict(record) for record in loop.history],
        "best": {
            "accuracy": loop.best_accuracy, "loss": loop.best_loss, "epoch": loop.best_epoch,
            "state_dict": loop.best_state, "confusion": torch.from_numpy(loop.best_confusion),
        },
        "stopped": loop.stopped,
    }
    write_with(checkpoint.path, lambda f: torch.save(saved, f))


def resume(checkpoint: Checkpointing, stage: str, training: TrainingState,
           parallel: DataParallel | None = None) -> LoopState | None:
    """Load the checkpoint into the training objects and return the loop's state, or None (saying
    why when a checkpoint exists) to start from scratch. Under DDP, rank 0 reads it and every rank
    gets rank 0's reading: the other ranks may run where the file is not."""
    if parallel is None:
        saved = _read(checkpoint, stage)
    else:
        saved = parallel.from_main(_read(checkpoint, stage) if parallel.is_main else None)
        if saved is not None:
            saved |= saved["ranks"][parallel.rank]
    if saved is None:
        return None
    training.model.load_state_dict(saved["model"])
    training.optimizer.load_state_dict(saved["optimizer"])
    if training.scheduler is not None:
        training.scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    if "cuda_rng" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda_rng"])
    training.generator.set_state(saved["generator"])
    best = saved["best"]
    loop = LoopState(
        best_state=best["state_dict"],
        history=[EpochRecord(**record) for record in saved["history"]],
        best_accuracy=best["accuracy"], best_loss=best["loss"], best_epoch=best["epoch"],
        best_confusion=best["confusion"].numpy(), stopped=saved["stopped"],
    )
    if parallel is None or parallel.is_main:
        print(f"{stage}: resuming from {checkpoint.path.name} after epoch {len(loop.history)}")
    return loop


def _read(checkpoint: Checkpointing, stage: str) -> dict | None:
    """The saved state if it is readable and made with the same fingerprint; None (saying why
    when a checkpoint exists) otherwise."""
    if not checkpoint.path.exists():
        return None
    try:
        saved = torch.load(checkpoint.path, map_location="cpu", weights_only=True)
        made_with = dict(saved["fingerprint"])
    except Exception as exc:  # whatever is wrong with the file, starting over is safe
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"{stage}: ignoring {checkpoint.path.name}: unreadable ({reason}); starting over")
        return None
    changed = [key for key in sorted(checkpoint.fingerprint.keys() | made_with.keys())
               if checkpoint.fingerprint.get(key) != made_with.get(key)]
    if changed:
        print(f"{stage}: ignoring {checkpoint.path.name}: made with other {', '.join(changed)}; "
              "starting over")
        return None
    return saved
