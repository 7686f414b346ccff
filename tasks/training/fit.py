"""The training loop that train, qat and qat_pt2e share (through tasks/training/runner.py):
deterministic batches, augmentation, the device and precision it runs on, a progress bar, the
per-epoch history DVC plots, and a resumable checkpoint after every epoch (tasks/checkpoint.py)."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tasks import checkpoint
from tasks.augment import random_shift
from tasks.checkpoint import Checkpointing, EpochRecord, LoopState, TrainingState
from tasks.contracts import PreparedMeta, read_prepared_meta
from tasks.distributed import DataParallel
from tasks.inference import predict_logits
from tasks.npyio import NpyStream, StoredRows
from tasks.scores import confusion_matrix
from tasks.training.device import Hardware, cpu_state
from tasks.workspace import Workspace

CPU = Hardware.of("cpu", "fp32", False)


class SplitRows:
    """A prepared split's x, read from data/prepared as it is indexed (tasks/npyio.py: StoredRows):
    training holds one batch of it at a time, whatever the size of the data. Indexing (a slice, or
    a tensor of row numbers) gives a tensor."""

    def __init__(self, rows: StoredRows) -> None:
        self.rows = rows
        self.shape = torch.Size(rows.shape)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: slice | torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.rows[index.numpy() if isinstance(index, torch.Tensor) else index])


@dataclass(frozen=True)
class Samples:
    x: torch.Tensor | SplitRows
    y: torch.Tensor


def load_split(prepared: Path, name: str) -> Samples:
    """A prepared split: its labels in memory, its samples read as they are used."""
    path = prepared / f"{name}.npz"
    return Samples(SplitRows(StoredRows(path, "x")), torch.from_numpy(NpyStream(path, "y").load()))


@dataclass(frozen=True)
class StageInputs:
    meta: PreparedMeta
    train: Samples
    val: Samples


def load_stage_inputs(workspace: Workspace) -> StageInputs:
    """What every training stage reads: the prepared meta and the train and val splits."""
    meta = read_prepared_meta(workspace.prepared)
    return StageInputs(meta, load_split(workspace.prepared, "train"), load_split(workspace.prepared, "val"))


@dataclass(frozen=True)
class FitConfig:
    stage: str  # names the run in messages and TensorBoard
    epochs: int
    batch_size: int
    augment_shift: int = 0
    label_smoothing: float = 0.0
    patience: int | None = None  # stop after this many epochs without a val improvement
    seed: int = 0  # of the shuffled order under DDP, the same on every rank (DistributedSampler)
    hardware: Hardware = CPU


@dataclass
class FitResult:
    history: list[EpochRecord]
    best_epoch: int
    best_state: dict[str, torch.Tensor]  # on the CPU, whatever the device trained on
    val_confusion: np.ndarray  # of the best model
    seconds: float


def fit(training: TrainingState, train: Samples, val: Samples, config: FitConfig, writer: SummaryWriter,
        on_epoch_start: Callable[[nn.Module, int], None] | None = None,
        resumable: Checkpointing | None = None, parallel: DataParallel | None = None) -> FitResult:
    """Train for `config.epochs` (fewer if validation accuracy stalls for `patience` epochs) and
    return the history plus the best epoch's weights.

    With `resumable`, everything the next epoch depends on is saved after each one, and a run
    that finds a checkpoint with the same fingerprint carries on after its last epoch, ending with
    the weights an uninterrupted run would have. With `parallel` (DDP under torchrun), each rank
    trains on its shard in slices of batch_size / world_size, so one step still sees batch_size
    samples; only rank 0 shows progress and writes to `writer` and the checkpoint.
    """
    model, stage, epochs = training.model, config.stage, config.epochs
    num_classes = int(torch.max(torch.cat([train.y, val.y]))) + 1
    state = LoopState(cpu_state(model))
    if resumable is not None:
        state = checkpoint.resume(resumable, stage, training, parallel) or state
    shows = parallel is None or parallel.is_main
    trained = model if parallel is None else parallel.wrap(model)
    # Replayed for the epochs a resumed run skips: what they set (frozen BatchNorm statistics,
    # for one) is module state that a state_dict does not hold.
    for epoch in range(len(state.history)):
        if on_epoch_start:
            on_epoch_start(model, epoch)
    start = time.perf_counter()
    with Progress(TextColumn(f"{stage} epoch {{task.fields[epoch]}}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                  disable=not shows) as progress, config.hardware.deterministic():
        for epoch in range(len(state.history), epochs if not state.stopped else 0):
            if on_epoch_start:
                on_epoch_start(model, epoch)
            train_loss, train_accuracy = train_epoch(training, trained, train, config, epoch, writer, progress,
                                                     parallel)
            val_logits = validate(model, val.x, config.hardware)
            record = EpochRecord(epoch=epoch + 1, train_loss=train_loss, train_accuracy=train_accuracy,
                                 val_loss=F.cross_entropy(val_logits, val.y).item(),
                                 val_accuracy=(val_logits.argmax(1) == val.y).float().mean().item(),
                                 lr=training.optimizer.param_groups[0]["lr"])
            state.history.append(record)
            if shows:
                log_epoch(writer, model, record)
                progress.console.print(
                    f"{stage} epoch {record.epoch}/{epochs}: loss {record.train_loss:.4f} "
                    f"acc {record.train_accuracy:.4f} | val loss {record.val_loss:.4f} "
                    f"acc {record.val_accuracy:.4f} | lr {record.lr:.2e}", soft_wrap=True)
            # Higher accuracy wins, lower loss breaks ties.
            if (record.val_accuracy, -record.val_loss) > (state.best_accuracy, -state.best_loss):
                state.best_accuracy, state.best_loss = record.val_accuracy, record.val_loss
                state.best_epoch, state.best_state = record.epoch, cpu_state(model)
                state.best_confusion = confusion_matrix(val.y.numpy(), val_logits.argmax(1).numpy(), num_classes)
            elif config.patience is not None and record.epoch - state.best_epoch >= config.patience:
                state.stopped = True
                if shows:
                    progress.console.print(f"{stage}: early stop, no val improvement for "
                                           f"{config.patience} epochs", soft_wrap=True)
            if resumable is not None:
                checkpoint.save(resumable, state, training, parallel)
            if state.stopped:
                break
    return FitResult(state.history, state.best_epoch, state.best_state, state.best_confusion,
                     time.perf_counter() - start)


def train_epoch(training: TrainingState, trained: nn.Module, train: Samples, config: FitConfig, epoch: int,
                writer: SummaryWriter, progress: Progress, parallel: DataParallel | None) -> tuple[float, float]:
    """One pass of `trained` (the model, or its DDP wrapper) over this rank's shuffled samples; the
    scheduler steps once per batch. Returns the epoch's mean loss and accuracy over every rank's
    samples."""
    model, optimizer, scheduler, hardware = training.model, training.optimizer, training.scheduler, config.hardware
    batch_size = config.batch_size if parallel is None else parallel.rank_batch(config.batch_size)
    if parallel is None:
        order = torch.randperm(len(train.y), generator=training.generator)
    else:
        order = parallel.epoch_order(len(train.y), epoch, config.seed)
    steps = -(-len(order) // batch_size)
    task = progress.add_task("", total=steps, epoch=f"{epoch + 1}/{config.epochs}", loss=0.0)
    trained.train()
    scaler = hardware.scaler()
    loss_sum, correct = 0.0, 0
    for step in range(steps):
        batch = order[step * batch_size : (step + 1) * batch_size]
        inputs = hardware.batch(random_shift(train.x[batch], config.augment_shift, training.generator))
        labels = hardware.batch(train.y[batch])
        with hardware.autocast():
            logits = trained(inputs)
            loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        step_loss = loss.item()
        loss_sum += step_loss * len(batch)
        correct += int((logits.argmax(1) == labels).sum())
        writer.add_scalar("loss/train_step", step_loss, epoch * steps + step)
        progress.update(task, advance=1, loss=step_loss)
    progress.remove_task(task)
    seen = len(order)
    if parallel is not None:
        parallel.sync_buffers(model)
        loss_sum, correct, seen = parallel.sum(loss_sum, correct, seen)
    return loss_sum / seen, correct / seen


def validate(model: nn.Module, x: torch.Tensor | SplitRows, hardware: Hardware) -> torch.Tensor:
    """The model's float32 logits for every sample, on the CPU, in eval mode."""
    model.eval()

    def run(batch: torch.Tensor) -> torch.Tensor:
        with hardware.autocast():
            return model(hardware.batch(batch)).float().cpu()

    return predict_logits(run, x)


def log_epoch(writer: SummaryWriter, model: nn.Module, record: EpochRecord) -> None:
    step = record.epoch
    writer.add_scalar("loss/train", record.train_loss, step)
    writer.add_scalar("loss/val", record.val_loss, step)
    writer.add_scalar("accuracy/train", record.train_accuracy, step)
    writer.add_scalar("accuracy/val", record.val_accuracy, step)
    writer.add_scalar("lr", record.lr, step)
    for name, param in model.named_parameters():
        writer.add_histogram(f"weights/{name}", param.detach().cpu(), step)
        if param.grad is not None:
            writer.add_histogram(f"grads/{name}", param.grad.cpu(), step)


def history_csv(history: list[EpochRecord]) -> str:
    out = io.StringIO()
    rows = csv.DictWriter(out, fieldnames=list(asdict(history[0])), lineterminator="\n")
    rows.writeheader()
    for record in history:
        rows.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(record).items()})
    return out.getvalue()
