"""Stage 3, qat: quantization-aware fine-tuning of the trained fp32 model, plus a post-training
quantization (calibration only) baseline from the same weights for comparison.

Recipe: FX fuses conv/bn/relu and inserts fake-quant; fine-tune at a low LR; freeze BatchNorm
statistics, then observers, partway through; convert to real int8 kernels.

Writes models/qat/{qat,ptq}_state.pt (prepared-model state_dicts that tasks.quantize.load_int8
converts), metrics/qat.json and plots/qat/history.csv, all together once it has finished;
TensorBoard logs go to runs/qat/<run>. Like train, it resumes a killed run from the checkpoint it
saves after every epoch (models/qat_checkpoint.pt, removed once the outputs are published).
"""

from __future__ import annotations

import copy

import torch
from torch.ao.nn.intrinsic.qat import freeze_bn_stats
from torch.ao.quantization import disable_observer

from tasks.checkpoint import Checkpointing, fingerprint
from tasks.cli import run_stage
from tasks.distributed import DataParallel, processes
from tasks.inference import predict_logits
from tasks.loop import (
    FitConfig,
    fine_tuning,
    fit,
    load_stage_inputs,
    log_run_summary,
    publish_run,
    seed_everything,
    tensorboard,
)
from tasks.model import load_checkpoint
from tasks.params import QatParams, load_params
from tasks.quantize import convert, prepare, save_prepared
from tasks.workspace import Workspace, project_workspace


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return round((predict_logits(model.eval(), x).argmax(1) == y).float().mean().item(), 6)


@torch.no_grad()
def calibrate(prepared: torch.nn.Module, x: torch.Tensor, batches: int, batch_size: int) -> None:
    prepared.eval()
    for i in range(0, min(len(x), batches * batch_size), batch_size):
        prepared(x[i : i + batch_size])


def qat(params: QatParams, workspace: Workspace, parallel: DataParallel | None = None) -> dict | None:
    """Under DDP (`parallel`), every rank trains; rank 0 alone goes on to write and returns the
    metrics, the others None."""
    workspace.require(workspace.train_model)
    generator = seed_everything(params.seed, params.threads)
    inputs = load_stage_inputs(workspace)
    train_set, val_set = inputs.train, inputs.val
    fp32, config = load_checkpoint(workspace.train_model)
    example = train_set.x[:1]

    # Calibrate on a fixed, shuffled slice of the training set (the raw order is class-sorted).
    order = torch.randperm(len(train_set.y), generator=generator)
    calibration = train_set.x[order[: params.ptq_calibration_batches * params.batch_size]]
    ptq = prepare(copy.deepcopy(fp32), "ptq", params.backend, example)
    calibrate(ptq, calibration, params.ptq_calibration_batches, params.batch_size)

    model = prepare(copy.deepcopy(fp32), "qat", params.backend, example)
    world = 1 if parallel is None else parallel.world_size
    if parallel is not None:
        generator = parallel.seed_rank(params.seed)
    training = fine_tuning(model, params.lr, params.epochs, params.batch_size, len(train_set.y), generator,
                          world)
    resumable = Checkpointing(workspace.qat_checkpoint, fingerprint("qat", params, workspace.root, world))
    fit_config = FitConfig("qat", params.epochs, params.batch_size,
                           label_smoothing=params.label_smoothing, seed=params.seed)

    def freeze_on_schedule(module: torch.nn.Module, epoch: int) -> None:
        if epoch == params.freeze_bn_epoch:
            module.apply(freeze_bn_stats)
        if epoch == params.freeze_observers_epoch:
            module.apply(disable_observer)

    with tensorboard(workspace, "qat", parallel) as writer:
        result = fit(training, train_set, val_set, fit_config, writer,
                     on_epoch_start=freeze_on_schedule, resumable=resumable,
                     parallel=parallel)
        if parallel is not None and not parallel.writes_outputs("qat", model.state_dict()):
            return None
        # The recipe keeps the final weights: earlier epochs ran with observers still moving.
        metrics = {
            "backend": params.backend,
            "fp32_val_accuracy": accuracy(fp32, val_set.x, val_set.y),
            "ptq_val_accuracy": accuracy(convert(ptq), val_set.x, val_set.y),
            "fake_quant_val_accuracy": round(result.history[-1].val_accuracy, 6),
            "int8_val_accuracy": accuracy(convert(model), val_set.x, val_set.y),
        }
        log_run_summary(writer, result, inputs.meta.class_names,
                        params.model_dump(exclude={"distributed"}), metrics,
                        "qat: validation (fake-quant)")
        # A copy: tracing runs a forward pass, which would move observers that are not frozen yet.
        writer.add_graph(copy.deepcopy(model).eval(), example)

    def write_models(out) -> None:
        models = out.path(workspace.qat_dir, directory=True)
        for kind, prepared in (("qat", model), ("ptq", ptq)):
            with open(models / f"{kind}_state.pt", "wb") as f:
                save_prepared(f, prepared, config, kind, params.backend)

    publish_run(workspace, "qat", result, metrics, write_models, resumable)
    print(
        f"qat: val accuracy fp32 {metrics['fp32_val_accuracy']:.4f}, ptq int8 "
        f"{metrics['ptq_val_accuracy']:.4f}, qat int8 {metrics['int8_val_accuracy']:.4f}, "
        f"{result.seconds:.1f}s"
    )
    return metrics


def main(args) -> None:
    """Quantization-aware fine-tuning (and a PTQ baseline) of the trained model."""
    params = load_params(args.params).qat
    with processes(params.distributed.nproc, "tasks.qat", params.threads) as parallel:
        qat(params, project_workspace(), parallel)


if __name__ == "__main__":
    run_stage("qat", main)
