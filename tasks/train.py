"""Stage 2, train: fit the fp32 CNN with early stopping on validation accuracy.

Writes models/train/fp32_state.pt (best epoch's weights + model config), metrics/train.json and
plots/train/history.csv, all together once training has finished; TensorBoard logs go to
runs/train/<run>. After every epoch it saves models/train/checkpoint.pt (not a DVC output), from
which a killed run resumes; the checkpoint is removed once the outputs are published.
"""

from __future__ import annotations

import json

import torch
from torch.utils.tensorboard import SummaryWriter

from tasks.atomic import staged_outputs
from tasks.cli import run_stage
from tasks.layout import Layout, project_layout
from tasks.loop import (
    Checkpointing, fingerprint, fit, history_csv, load_split, log_run_summary, seed_everything,
)
from tasks.model import build_model, model_config, save_checkpoint
from tasks.params import TrainParams, load_params


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


def train(params: TrainParams, layout: Layout) -> dict:
    layout.require(layout.prepared / "meta.json")
    generator = seed_everything(params.seed, params.threads)
    meta = json.loads((layout.prepared / "meta.json").read_text())
    train_set, val_set = load_split(layout.prepared, "train"), load_split(layout.prepared, "val")
    config = model_config(meta["layout"], meta["input_shape"], len(meta["class_names"]), params.model)
    model = build_model(config)
    optimizer = make_optimizer(params, model)
    steps_per_epoch = -(-len(train_set.y) // params.batch_size)
    scheduler = make_scheduler(params, optimizer, steps_per_epoch)

    with SummaryWriter(layout.tensorboard("train")) as writer:
        writer.add_graph(model.eval(), train_set.x[:1])
        result = fit(
            model, train_set, val_set, stage="train", epochs=params.epochs,
            batch_size=params.batch_size, optimizer=optimizer, scheduler=scheduler,
            generator=generator, writer=writer, augment_shift=params.augment_shift,
            label_smoothing=params.label_smoothing, patience=params.patience,
            checkpoint=Checkpointing(layout.train_checkpoint, fingerprint(
                "train", params, {"data": [layout.prepared]}, ["train", "loop", "model", "augment"])),
        )
        best = result.history[result.best_epoch - 1]
        metrics = {
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "val_accuracy": round(best.val_accuracy, 6),
            "val_loss": round(best.val_loss, 6),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        hparams = params.model_dump(exclude={"model"}) | {
            "family": config["family"], "widths": str(config["widths"]),
            "convs_per_stage": config["convs_per_stage"], "dropout": config["dropout"],
        }
        log_run_summary(
            writer, result, meta["class_names"], hparams, metrics, "train: validation, best epoch"
        )

    model.load_state_dict(result.best_state)
    with staged_outputs() as out:
        out.write_with(layout.train_model, lambda f: save_checkpoint(f, model, config))
        out.write_text(layout.plots("train") / "history.csv", history_csv(result.history))
        out.write_json(layout.metrics("train"), metrics)
    layout.train_checkpoint.unlink(missing_ok=True)
    print(
        f"train: best epoch {result.best_epoch}/{len(result.history)}, val accuracy "
        f"{best.val_accuracy:.4f}, {result.seconds:.1f}s"
    )
    return metrics


def main(args) -> None:
    """Train the fp32 model on data/prepared."""
    train(load_params(args.params).train, project_layout())


if __name__ == "__main__":
    run_stage("train", main)
