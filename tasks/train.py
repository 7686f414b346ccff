"""Stage 2, train: fit the fp32 CNN with early stopping on validation accuracy.

Writes models/train/fp32_state.pt (best epoch's weights + model config), metrics/train.json and
plots/train/history.csv, all together once training has finished; TensorBoard logs go to
runs/train/<run>. After every epoch it saves models/train/checkpoint.pt (not a DVC output), from
which a killed run resumes; the checkpoint is removed once the outputs are published.
"""

from __future__ import annotations

import torch

from tasks.checkpoint import Checkpointing, TrainingState, fingerprint
from tasks.cli import run_stage
from tasks.distributed import DataParallel, processes, steps_per_epoch
from tasks.environment import environment
from tasks.loop import (
    FitConfig,
    fit,
    load_stage_inputs,
    log_run_summary,
    publish_run,
    seed_everything,
    tensorboard,
)
from tasks.model import build_model, model_config, save_checkpoint
from tasks.params import TrainParams, load_params
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
    """Under DDP (`parallel`), every rank trains; rank 0 alone goes on to write and returns the
    metrics, the others None."""
    generator = seed_everything(params.seed, params.threads)
    inputs = load_stage_inputs(workspace)
    meta, train_set = inputs.meta, inputs.train
    config = model_config(meta.layout, meta.input_shape, len(meta.class_names), params.model)
    model = build_model(config)
    world = 1 if parallel is None else parallel.world_size
    if parallel is not None:
        generator = parallel.seed_rank(params.seed)
    optimizer = make_optimizer(params, model)
    scheduler = make_scheduler(params, optimizer, steps_per_epoch(len(train_set.y), params.batch_size, world))
    training = TrainingState(model, optimizer, scheduler, generator)
    resumable = Checkpointing(workspace.train_checkpoint,
                              fingerprint("train", params, workspace.root, world))
    fit_config = FitConfig("train", params.epochs, params.batch_size, params.augment_shift,
                           params.label_smoothing, params.patience, seed=params.seed)

    with tensorboard(workspace, "train", parallel) as writer:
        writer.add_graph(model.eval(), train_set.x[:1])
        result = fit(training, train_set, inputs.val, fit_config, writer, resumable=resumable,
                     parallel=parallel)
        if parallel is not None and not parallel.writes_outputs("train", result.best_state):
            return None
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
        hparams = params.model_dump(exclude={"model", "distributed"}) | {"processes": world,
            "family": config.family, "widths": str(config.widths),
            "convs_per_stage": config.convs_per_stage, "dropout": config.dropout,
        }
        log_run_summary(writer, result, meta.class_names, hparams, metrics,
                        "train: validation, best epoch")

    model.load_state_dict(result.best_state)
    publish_run(workspace, "train", result, metrics,
                lambda out: out.write_with(workspace.train_model,
                                           lambda f: save_checkpoint(f, model, config)),
                resumable)
    print(
        f"train: best epoch {result.best_epoch}/{len(result.history)}, val accuracy "
        f"{best.val_accuracy:.4f}, {result.seconds:.1f}s"
    )
    return metrics


def main(args) -> None:
    """Train the fp32 model on data/prepared."""
    params = load_params(args.params).train
    with processes(params.distributed.nproc, "tasks.train", params.threads) as parallel:
        train(params, project_workspace(), parallel)


if __name__ == "__main__":
    run_stage("train", main)
