"""The one skeleton of the three training stages (train, qat, qat_pt2e): seed, read the prepared
splits, build what to train, set up the optimizer, resume, fit on the chosen device and precision,
check DDP ranks agree, log to TensorBoard, and publish the models, history and metrics together.
A stage is a Recipe: the few things that differ between them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tasks.atomic import StagedOutputs, staged_outputs
from tasks.checkpoint import Checkpointing, TrainingState, fingerprint
from tasks.distributed import DataParallel, NoWriter, steps_per_epoch
from tasks.figures import confusion_figure
from tasks.params import QatParams, TrainParams
from tasks.training.device import Hardware
from tasks.training.fit import FitConfig, FitResult, StageInputs, fit, history_csv, load_stage_inputs
from tasks.workspace import Workspace

Optimization = tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]


@dataclass
class Recipe:
    """What makes a training stage itself; everything else is the runner's."""

    stage: str
    params: TrainParams | QatParams
    # The model to train, from the prepared inputs (it may draw from the stage's generator first).
    build: Callable[[StageInputs, torch.Generator], nn.Module]
    # Its optimizer and LR schedule, given the optimizer steps in one epoch.
    optimize: Callable[[nn.Module, int], Optimization]
    # After training, on the CPU: the metrics and the writer of the stage's model files.
    finish: Callable[[nn.Module, FitResult, StageInputs], tuple[dict, Callable[[StagedOutputs], None]]]
    checkpoint: Path = Path()  # where the resumable checkpoint is saved after every epoch
    on_epoch_start: Callable[[nn.Module, int], None] | None = None
    augment_shift: int = 0
    patience: int | None = None
    graph: bool = True  # trace the trained model into TensorBoard's graph view
    keep: str = "best"  # best: the best validation epoch's weights; last: the final ones (QAT)
    hparams: dict = field(default_factory=dict)
    title: str = ""  # of the TensorBoard confusion figure


def seed_everything(seed: int, threads: int) -> torch.Generator:
    """Same seed + threads => bitwise-identical weights (changing the thread count changes them)."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    return torch.Generator().manual_seed(seed)


def tensorboard(workspace: Workspace, stage: str, parallel: DataParallel | None) -> SummaryWriter | NoWriter:
    """The stage's TensorBoard run; under DDP, rank 0's alone."""
    if parallel is not None and not parallel.is_main:
        return NoWriter()
    return SummaryWriter(workspace.tensorboard(stage))


def run_training(recipe: Recipe, workspace: Workspace, parallel: DataParallel | None = None) -> dict | None:
    """Run a training stage. Under DDP (`parallel`), every rank trains; rank 0 alone goes on to
    write and returns the metrics, the others None."""
    params, stage = recipe.params, recipe.stage
    hardware = Hardware.of(params.device, params.precision, params.channels_last)
    generator = seed_everything(params.seed, params.threads)
    inputs = load_stage_inputs(workspace)
    model = recipe.build(inputs, generator)
    world = 1 if parallel is None else parallel.world_size
    if parallel is not None:
        generator = parallel.seed_rank(params.seed)
    model = hardware.module(model)
    optimizer, scheduler = recipe.optimize(model, steps_per_epoch(len(inputs.train.y), params.batch_size, world))
    training = TrainingState(model, optimizer, scheduler, generator)
    resumable = Checkpointing(recipe.checkpoint,
                              fingerprint(stage, params, workspace.root, world))
    config = FitConfig(stage, params.epochs, params.batch_size, recipe.augment_shift, params.label_smoothing,
                       recipe.patience, seed=params.seed, hardware=hardware)
    with tensorboard(workspace, stage, parallel) as writer:
        result = fit(training, inputs.train, inputs.val, config, writer, recipe.on_epoch_start, resumable,
                     parallel)
        kept = result.best_state if recipe.keep == "best" else None
        model = model.to("cpu")  # conversion, export and evaluation run on the CPU
        if kept is not None:
            model.load_state_dict(kept)
        if parallel is not None and not parallel.writes_outputs(stage, model.state_dict()):
            return None
        metrics, write_models = recipe.finish(model, result, inputs)
        if recipe.graph:
            # A copy: tracing runs a forward pass, which would move observers that are not frozen.
            writer.add_graph(copy.deepcopy(model).eval(), inputs.train.x[:1])
        hparams = recipe.hparams | {"processes": world, "hardware": hardware.describe()}
        log_run_summary(writer, result, inputs.meta.class_names, hparams, metrics, recipe.title)

    with staged_outputs() as out:
        write_models(out)
        out.write_text(workspace.plots(stage) / "history.csv", history_csv(result.history))
        out.write_json(workspace.metrics(stage), metrics)
    # Nothing left to resume once the outputs are out.
    resumable.path.unlink(missing_ok=True)
    return metrics


def log_run_summary(writer: SummaryWriter, result: FitResult, class_names: list[str], hparams: dict,
                    metrics: dict, title: str) -> None:
    """What a run ends with in TensorBoard: validation confusion figure and hparams + results."""
    writer.add_figure("val_confusion", confusion_figure(result.val_confusion, class_names, title),
                      result.best_epoch)
    scalar_metrics = {f"hparam/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
    writer.add_hparams(hparams, scalar_metrics, run_name=".")
