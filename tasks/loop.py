"""The training loop shared by train and qat: deterministic batches, augmentation, TensorBoard,
a progress bar, the per-epoch history DVC plots, and a resumable checkpoint after every epoch."""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tasks.atomic import write_with
from tasks.augment import random_shift
from tasks.figures import confusion_figure
from tasks.scores import confusion_matrix


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor


def load_split(prepared: Path, name: str) -> Split:
    with np.load(prepared / f"{name}.npz", allow_pickle=False) as data:
        return Split(torch.from_numpy(data["x"]), torch.from_numpy(data["y"]))


def seed_everything(seed: int, threads: int) -> torch.Generator:
    """Same seed + threads => bitwise-identical weights (changing the thread count changes them)."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    return torch.Generator().manual_seed(seed)


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    # Only around training: int8 inference raises under deterministic mode (quantized_resize_cpu_).
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float


@dataclass(frozen=True)
class Checkpointing:
    """Where fit saves its resumable state after every epoch, and what that state depends on:
    a checkpoint whose fingerprint differs in any entry (params, data, code...) is not resumed."""

    path: Path
    fingerprint: dict[str, str]


TASKS = Path(__file__).parent


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


def fingerprint(section: str, params: BaseModel, inputs: dict[str, list[Path]],
                code: list[str]) -> dict[str, str]:
    """What a stage's training depends on, one entry each, named so that a mismatch says what
    changed: its params section, its input files, its code (tasks/<name>.py) and torch itself."""
    return {
        f"{section} params": hashlib.sha256(params.model_dump_json().encode()).hexdigest(),
        **{name: files_digest(paths) for name, paths in inputs.items()},
        f"code (tasks/{{{','.join(code)}}}.py)": files_digest([TASKS / f"{name}.py" for name in code]),
        "torch version": str(torch.__version__),  # a TorchVersion would not load weights_only
    }


@dataclass
class FitResult:
    history: list[EpochRecord]
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    val_confusion: np.ndarray  # of the best model
    seconds: float


@dataclass
class FitState:
    """What fit carries from one epoch to the next besides the modules' own state."""

    best_state: dict[str, torch.Tensor]
    history: list[EpochRecord] = field(default_factory=list)
    best_accuracy: float = -1.0
    best_loss: float = float("inf")
    best_epoch: int = 0
    best_confusion: np.ndarray | None = None
    stopped: bool = False  # early stop: a resumed run has nothing left to train


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    *,
    stage: str,
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    generator: torch.Generator,
    writer: SummaryWriter,
    augment_shift: int = 0,
    label_smoothing: float = 0.0,
    patience: int | None = None,
    on_epoch_start: Callable[[nn.Module, int], None] | None = None,
    checkpoint: Checkpointing | None = None,
) -> FitResult:
    """Train for `epochs` (fewer if validation accuracy stalls for `patience` epochs) and return
    the history plus the best epoch's weights. The scheduler is stepped once per batch.

    With `checkpoint`, everything the next epoch depends on is saved after each one, and a run
    that finds a checkpoint with the same fingerprint carries on after its last epoch, ending with
    the weights an uninterrupted run would have. The caller removes it once its outputs are out.
    """
    num_classes = int(torch.max(torch.cat([train.y, val.y]))) + 1
    state = FitState(copy.deepcopy(model.state_dict()))
    if checkpoint is not None:
        state = resume(checkpoint, stage, model, optimizer, scheduler, generator) or state
    if on_epoch_start:
        # Replayed for the epochs a resumed run skips: what they set (frozen BatchNorm statistics,
        # for one) is module state that a state_dict does not hold.
        for epoch in range(len(state.history)):
            on_epoch_start(model, epoch)
    steps_per_epoch = (len(train.y) + batch_size - 1) // batch_size
    start = time.perf_counter()
    columns = (TextColumn(f"{stage} epoch {{task.fields[epoch]}}"), BarColumn(),
               MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
               TimeRemainingColumn())
    with Progress(*columns) as progress, deterministic_algorithms():
        for epoch in range(len(state.history), epochs if not state.stopped else 0):
            if on_epoch_start:
                on_epoch_start(model, epoch)
            model.train()
            order = torch.randperm(len(train.y), generator=generator)
            task = progress.add_task("", total=steps_per_epoch, epoch=f"{epoch + 1}/{epochs}", loss=0.0)
            loss_sum, correct = 0.0, 0
            for step in range(steps_per_epoch):
                batch = order[step * batch_size : (step + 1) * batch_size]
                inputs = random_shift(train.x[batch], augment_shift, generator)
                logits = model(inputs)
                loss = F.cross_entropy(logits, train.y[batch], label_smoothing=label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                step_loss = loss.item()
                loss_sum += step_loss * len(batch)
                correct += int((logits.argmax(1) == train.y[batch]).sum())
                writer.add_scalar("loss/train_step", step_loss, epoch * steps_per_epoch + step)
                progress.update(task, advance=1, loss=step_loss)
            progress.remove_task(task)

            model.eval()
            val_logits = predict_logits(model, val.x)
            val_pred = val_logits.argmax(1)
            record = EpochRecord(
                epoch=epoch + 1,
                train_loss=loss_sum / len(train.y),
                train_accuracy=correct / len(train.y),
                val_loss=F.cross_entropy(val_logits, val.y).item(),
                val_accuracy=(val_pred == val.y).float().mean().item(),
                lr=optimizer.param_groups[0]["lr"],
            )
            state.history.append(record)
            log_epoch(writer, model, record)
            progress.console.print(
                f"{stage} epoch {record.epoch}/{epochs}: loss {record.train_loss:.4f} "
                f"acc {record.train_accuracy:.4f} | val loss {record.val_loss:.4f} "
                f"acc {record.val_accuracy:.4f} | lr {record.lr:.2e}",
                soft_wrap=True,
            )
            # Higher accuracy wins, lower loss breaks ties.
            if (record.val_accuracy, -record.val_loss) > (state.best_accuracy, -state.best_loss):
                state.best_accuracy, state.best_loss = record.val_accuracy, record.val_loss
                state.best_epoch, state.best_state = record.epoch, copy.deepcopy(model.state_dict())
                state.best_confusion = confusion_matrix(val.y.numpy(), val_pred.numpy(), num_classes)
            elif patience is not None and record.epoch - state.best_epoch >= patience:
                state.stopped = True
            if checkpoint is not None:
                save_resumable(checkpoint, state, model, optimizer, scheduler, generator)
            if state.stopped:
                progress.console.print(
                    f"{stage}: early stop, no val improvement for {patience} epochs", soft_wrap=True
                )
                break
    return FitResult(state.history, state.best_epoch, state.best_state, state.best_confusion,
                     time.perf_counter() - start)


def save_resumable(checkpoint: Checkpointing, state: FitState, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, generator: torch.Generator) -> None:
    # Plain containers and tensors only, so that it loads with weights_only=True.
    saved = {
        "fingerprint": checkpoint.fingerprint,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "torch_rng": torch.get_rng_state(),  # dropout draws from the global generator
        "generator": generator.get_state(),  # shuffling and augmentation
        "history": [asdict(record) for record in state.history],
        "best": {
            "accuracy": state.best_accuracy, "loss": state.best_loss, "epoch": state.best_epoch,
            "state_dict": state.best_state, "confusion": torch.from_numpy(state.best_confusion),
        },
        "stopped": state.stopped,
    }
    write_with(checkpoint.path, lambda f: torch.save(saved, f))


def resume(checkpoint: Checkpointing, stage: str, model: nn.Module, optimizer: torch.optim.Optimizer,
           scheduler, generator: torch.Generator) -> FitState | None:
    """Load the checkpoint into the modules and return the loop's state, or None (saying why when
    a checkpoint exists) to start from scratch."""
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
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    generator.set_state(saved["generator"])
    best = saved["best"]
    state = FitState(
        best_state=best["state_dict"],
        history=[EpochRecord(**record) for record in saved["history"]],
        best_accuracy=best["accuracy"], best_loss=best["loss"], best_epoch=best["epoch"],
        best_confusion=best["confusion"].numpy(), stopped=saved["stopped"],
    )
    print(f"{stage}: resuming from {checkpoint.path.name} after epoch {len(state.history)}")
    return state


def log_epoch(writer: SummaryWriter, model: nn.Module, record: EpochRecord) -> None:
    step = record.epoch
    writer.add_scalar("loss/train", record.train_loss, step)
    writer.add_scalar("loss/val", record.val_loss, step)
    writer.add_scalar("accuracy/train", record.train_accuracy, step)
    writer.add_scalar("accuracy/val", record.val_accuracy, step)
    writer.add_scalar("lr", record.lr, step)
    for name, param in model.named_parameters():
        writer.add_histogram(f"weights/{name}", param.detach(), step)
        if param.grad is not None:
            writer.add_histogram(f"grads/{name}", param.grad, step)


def history_csv(history: list[EpochRecord]) -> str:
    out = io.StringIO()
    fields = list(asdict(history[0]))
    rows = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    rows.writeheader()
    for record in history:
        rows.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(record).items()})
    return out.getvalue()


def log_run_summary(
    writer: SummaryWriter,
    result: FitResult,
    class_names: list[str],
    hparams: dict,
    metrics: dict,
    title: str,
) -> None:
    """What a run ends with in TensorBoard: validation confusion figure and hparams + results."""
    figure = confusion_figure(result.val_confusion, class_names, title)
    writer.add_figure("val_confusion", figure, result.best_epoch)
    scalar_metrics = {f"hparam/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
    writer.add_hparams(hparams, scalar_metrics, run_name=".")
