"""The training loop shared by train and qat: deterministic batches, augmentation, TensorBoard,
a progress bar, and the per-epoch history DVC plots."""

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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tasks.atomic import write_text
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


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels each way, filling with the edge pixels
    (background for centred digits). One gather for the whole batch, no per-sample loop."""
    if max_shift == 0 or x.ndim != 4:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


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


@dataclass
class FitResult:
    history: list[EpochRecord]
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    val_confusion: np.ndarray  # of the best model
    seconds: float


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
) -> FitResult:
    """Train for `epochs` (fewer if validation accuracy stalls for `patience` epochs) and return
    the history plus the best epoch's weights. The scheduler is stepped once per batch."""
    num_classes = int(torch.max(torch.cat([train.y, val.y]))) + 1
    history: list[EpochRecord] = []
    best = (-1.0, float("inf"))  # (val accuracy, -) higher accuracy wins, lower loss breaks ties
    best_epoch, best_state, best_confusion = 0, copy.deepcopy(model.state_dict()), None
    steps_per_epoch = (len(train.y) + batch_size - 1) // batch_size
    start = time.perf_counter()
    columns = (TextColumn(f"{stage} epoch {{task.fields[epoch]}}"), BarColumn(),
               MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
               TimeRemainingColumn())
    with Progress(*columns) as progress, deterministic_algorithms():
        for epoch in range(epochs):
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
            history.append(record)
            log_epoch(writer, model, record)
            progress.console.print(
                f"{stage} epoch {record.epoch}/{epochs}: loss {record.train_loss:.4f} "
                f"acc {record.train_accuracy:.4f} | val loss {record.val_loss:.4f} "
                f"acc {record.val_accuracy:.4f} | lr {record.lr:.2e}",
                soft_wrap=True,
            )
            if (record.val_accuracy, -record.val_loss) > (best[0], -best[1]):
                best = (record.val_accuracy, record.val_loss)
                best_epoch, best_state = record.epoch, copy.deepcopy(model.state_dict())
                best_confusion = confusion_matrix(val.y.numpy(), val_pred.numpy(), num_classes)
            elif patience is not None and record.epoch - best_epoch >= patience:
                progress.console.print(
                    f"{stage}: early stop, no val improvement for {patience} epochs", soft_wrap=True
                )
                break
    return FitResult(history, best_epoch, best_state, best_confusion, time.perf_counter() - start)


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


def write_history(path: Path, history: list[EpochRecord]) -> None:
    write_text(path, history_csv(history))


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
