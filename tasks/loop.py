"""The training loop shared by train and qat: deterministic batches, augmentation, TensorBoard,
a progress bar, the per-epoch history DVC plots, a resumable checkpoint after every epoch
(tasks/checkpoint.py), and the common ending of both stages (publish_run)."""

from __future__ import annotations

import copy
import csv
import io
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tasks import checkpoint
from tasks.atomic import StagedOutputs, staged_outputs
from tasks.augment import random_shift
from tasks.checkpoint import Checkpointing, EpochRecord, LoopState, TrainingState
from tasks.contracts import PreparedMeta, read_prepared_meta
from tasks.distributed import DataParallel, NoWriter, steps_per_epoch
from tasks.figures import confusion_figure
from tasks.inference import predict_logits
from tasks.npyio import NpyStream, StoredRows
from tasks.scores import confusion_matrix
from tasks.workspace import Workspace


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
    """What train and qat both read: the prepared meta and the train and val splits."""
    meta = read_prepared_meta(workspace.prepared)
    return StageInputs(meta, load_split(workspace.prepared, "train"), load_split(workspace.prepared, "val"))


def tensorboard(workspace: Workspace, stage: str, parallel: DataParallel | None) -> SummaryWriter | NoWriter:
    """The stage's TensorBoard run; under DDP, rank 0's alone."""
    if parallel is not None and not parallel.is_main:
        return NoWriter()
    return SummaryWriter(workspace.tensorboard(stage))


def fine_tuning(model: nn.Module, lr: float, epochs: int, batch_size: int, samples: int,
                generator: torch.Generator, world_size: int = 1) -> TrainingState:
    """The QAT recipe's optimizer and schedule, one for both engines (qat, qat_pt2e): SGD with
    momentum at a low LR, cosine-annealed to zero over every step of every epoch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    steps = epochs * steps_per_epoch(samples, batch_size, world_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    return TrainingState(model, optimizer, scheduler, generator)


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


@dataclass(frozen=True)
class FitConfig:
    stage: str  # names the run in messages and TensorBoard
    epochs: int
    batch_size: int
    augment_shift: int = 0
    label_smoothing: float = 0.0
    patience: int | None = None  # stop after this many epochs without a val improvement
    seed: int = 0  # of the shuffled order under DDP, the same on every rank (DistributedSampler)


@dataclass
class FitResult:
    history: list[EpochRecord]
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    val_confusion: np.ndarray  # of the best model
    seconds: float


def fit(
    training: TrainingState,
    train: Samples,
    val: Samples,
    config: FitConfig,
    writer: SummaryWriter,
    on_epoch_start: Callable[[nn.Module, int], None] | None = None,
    resumable: Checkpointing | None = None,
    parallel: DataParallel | None = None,
) -> FitResult:
    """Train for `config.epochs` (fewer if validation accuracy stalls for `patience` epochs) and
    return the history plus the best epoch's weights. The scheduler is stepped once per batch.

    With `resumable`, everything the next epoch depends on is saved after each one, and a run
    that finds a checkpoint with the same fingerprint carries on after its last epoch, ending with
    the weights an uninterrupted run would have. publish_run removes it once the outputs are out.

    With `parallel` (DDP under torchrun, tasks/distributed.py), each rank trains on its shard in
    slices of batch_size / world_size, so one step still sees batch_size samples; only rank 0
    shows progress and writes to `writer` and the checkpoint.
    """
    model, optimizer, scheduler = training.model, training.optimizer, training.scheduler
    stage, epochs, batch_size = config.stage, config.epochs, config.batch_size
    num_classes = int(torch.max(torch.cat([train.y, val.y]))) + 1
    state = LoopState(copy.deepcopy(model.state_dict()))
    if resumable is not None:
        state = checkpoint.resume(resumable, stage, training, parallel) or state
    shows = parallel is None or parallel.is_main
    trained = model if parallel is None else parallel.wrap(model)
    if parallel is not None:
        batch_size = parallel.rank_batch(batch_size)
    if on_epoch_start:
        # Replayed for the epochs a resumed run skips: what they set (frozen BatchNorm statistics,
        # for one) is module state that a state_dict does not hold.
        for epoch in range(len(state.history)):
            on_epoch_start(model, epoch)
    start = time.perf_counter()
    columns = (TextColumn(f"{stage} epoch {{task.fields[epoch]}}"), BarColumn(),
               MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
               TimeRemainingColumn())
    with Progress(*columns, disable=not shows) as progress, deterministic_algorithms():
        for epoch in range(len(state.history), epochs if not state.stopped else 0):
            if on_epoch_start:
                on_epoch_start(model, epoch)
            trained.train()
            if parallel is None:
                order = torch.randperm(len(train.y), generator=training.generator)
            else:
                order = parallel.epoch_order(len(train.y), epoch, config.seed)
            steps_per_epoch = -(-len(order) // batch_size)
            task = progress.add_task("", total=steps_per_epoch, epoch=f"{epoch + 1}/{epochs}", loss=0.0)
            loss_sum, correct = 0.0, 0
            for step in range(steps_per_epoch):
                batch = order[step * batch_size : (step + 1) * batch_size]
                inputs = random_shift(train.x[batch], config.augment_shift, training.generator)
                logits = trained(inputs)
                loss = F.cross_entropy(logits, train.y[batch], label_smoothing=config.label_smoothing)
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
            seen = len(order)
            if parallel is not None:
                parallel.sync_buffers(model)
                loss_sum, correct, seen = parallel.sum(loss_sum, correct, seen)

            model.eval()
            val_logits = predict_logits(model, val.x)
            val_pred = val_logits.argmax(1)
            record = EpochRecord(
                epoch=epoch + 1,
                train_loss=loss_sum / seen,
                train_accuracy=correct / seen,
                val_loss=F.cross_entropy(val_logits, val.y).item(),
                val_accuracy=(val_pred == val.y).float().mean().item(),
                lr=optimizer.param_groups[0]["lr"],
            )
            state.history.append(record)
            if shows:
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
            elif config.patience is not None and record.epoch - state.best_epoch >= config.patience:
                state.stopped = True
            if resumable is not None:
                checkpoint.save(resumable, state, training, parallel)
            if state.stopped and shows:
                progress.console.print(
                    f"{stage}: early stop, no val improvement for {config.patience} epochs",
                    soft_wrap=True,
                )
            if state.stopped:
                break
    return FitResult(state.history, state.best_epoch, state.best_state, state.best_confusion,
                     time.perf_counter() - start)


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


def publish_run(workspace: Workspace, stage: str, result: FitResult, metrics: dict,
                write_models: Callable[[StagedOutputs], None], resumable: Checkpointing) -> None:
    """The ending train and qat share: their models (`write_models`), history and metrics published
    together, then the resumable checkpoint removed, as it has nothing left to resume."""
    with staged_outputs() as out:
        write_models(out)
        out.write_text(workspace.plots(stage) / "history.csv", history_csv(result.history))
        out.write_json(workspace.metrics(stage), metrics)
    resumable.path.unlink(missing_ok=True)


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
