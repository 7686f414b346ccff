"""Stage 2, train: fit the fp32 model (a built-in family or your own net from nets/) with early
stopping on validation accuracy.

Writes models/train/fp32_state.pt (best epoch's weights + the model config that rebuilds it),
metrics/train.json and plots/train/history.csv, all together once training has finished;
TensorBoard logs go to runs/train/<run>. Before any epoch, the preflight (tasks/preflight.py) takes
the net through every target the pipeline builds and refuses one that cannot go. After every
epoch it saves models/train/checkpoint.pt (not a DVC output), from which a killed run resumes; the
checkpoint is removed once the outputs are published.
"""

from __future__ import annotations

import torch

from tasks.cli import run_stage
from tasks.distributed import DataParallel, processes
from tasks.contracts import read_prepared_meta
from tasks.environment import environment
from tasks.model import build_model, load_weights, model_config, save_checkpoint
from tasks.params import TrainParams, load_params
from tasks.preflight import preflight
from tasks.training.fit import StageInputs
from tasks.training.runner import Recipe, run_training
from tasks.workspace import Workspace, project_workspace


def make_optimizer(params: TrainParams, model: torch.nn.Module) -> torch.optim.Optimizer:
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=params.lr, momentum=0.9, nesterov=True,
            weight_decay=params.weight_decay,
        )
    return torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)


def make_scheduler(params: TrainParams, optimizer, steps_per_epoch: int):
    total = params.epochs * steps_per_epoch
    if params.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=params.lr, total_steps=total)
    if params.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return None


def train(params: TrainParams, workspace: Workspace, parallel: DataParallel | None = None) -> dict | None:
    """Under DDP (`parallel`), every rank trains; rank 0 alone writes and returns the metrics."""
    meta = read_prepared_meta(workspace.prepared)
    config = model_config(meta.layout, meta.input_shape, len(meta.class_names), params.model)
    if parallel is None or parallel.is_main:
        preflight(config)

    def build(inputs: StageInputs, generator: torch.Generator) -> torch.nn.Module:
        model = build_model(config)
        if params.model.weights is not None:
            load_weights(model, workspace.root / params.model.weights, config.net)
        return model

    def optimize(model: torch.nn.Module, steps_per_epoch: int):
        optimizer = make_optimizer(params, model)
        return optimizer, make_scheduler(params, optimizer, steps_per_epoch)

    def finish(model, result, inputs):
        best = result.history[result.best_epoch - 1]
        metrics = {
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "val_accuracy": round(best.val_accuracy, 6),
            "val_loss": round(best.val_loss, 6),
            "parameters": sum(p.numel() for p in model.parameters()),
            # Weights are bitwise repeatable on one CPU kind with these versions only: recorded
            # so that `dvc exp show` and `dvc metrics diff` show where a run was made.
            "environment": environment(),
        }
        print(f"train: best epoch {result.best_epoch}/{len(result.history)}, val accuracy "
              f"{best.val_accuracy:.4f}, {result.seconds:.1f}s")
        return metrics, lambda out: out.write_with(workspace.train_model,
                                                    lambda f: save_checkpoint(f, model, config))

    recipe = Recipe(
        "train", params, build, optimize, finish, checkpoint=workspace.train_checkpoint,
        augment_shift=params.augment_shift, patience=params.patience,
        hparams=params.model_dump(exclude={"model", "distributed"}) | {
            "net": config.net, "kwargs": str(config.kwargs)},
        title="train: validation, best epoch",
    )
    return run_training(recipe, workspace, parallel)


def main(args) -> None:
    """Train the fp32 model on data/prepared."""
    params = load_params(args.params).train
    with processes(params.distributed.nproc, "tasks.train", params.threads,
                   params.device) as parallel:
        train(params, project_workspace(), parallel)


if __name__ == "__main__":
    run_stage("train", main)
