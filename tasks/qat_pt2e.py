"""Stage 3b, qat_pt2e: the same quantization-aware fine-tuning as qat, on torchao's PT2E flow
(tasks/pt2e.py) instead of the deprecated FX one, for the ExecuTorch (XNNPACK) int8 target.

From the same trained fp32 weights, with qat's params (its section of params.yaml: seed, threads,
epochs, batch size, LR, label smoothing, and the epochs at which BatchNorm statistics and then
observers freeze) and the same loop (tasks/loop.py), so the two engines differ only in how they
quantize. No PTQ baseline here: qat's already compares calibration against QAT.

Writes models/qat_pt2e/int8.pt2 (the converted int8 program, torch.export format, batch dynamic),
metrics/qat_pt2e.json and plots/qat_pt2e/history.csv together once it has finished; TensorBoard
logs go to runs/qat_pt2e/<run>. Resumes a killed run from models/qat_pt2e_checkpoint.pt, like qat.
"""

from __future__ import annotations

import torch

from tasks import pt2e
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
from tasks.workspace import Workspace, project_workspace

STAGE = "qat_pt2e"


def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    # Not qat's: that one calls eval(), which a program's module (converted in eval mode) lacks,
    # and importing qat would tie this stage to the FX flow it replaces.
    return round((predict_logits(model, x).argmax(1) == y).float().mean().item(), 6)


def qat_pt2e(params: QatParams, workspace: Workspace, parallel: DataParallel | None = None) -> dict | None:
    """Under DDP (`parallel`), every rank trains; rank 0 alone goes on to write and returns the
    metrics, the others None."""
    workspace.require(workspace.train_model)
    generator = seed_everything(params.seed, params.threads)
    inputs = load_stage_inputs(workspace)
    train_set, val_set = inputs.train, inputs.val
    fp32, _ = load_checkpoint(workspace.train_model)
    fp32_val_accuracy = accuracy(fp32.eval(), val_set.x, val_set.y)

    model = pt2e.prepare(fp32, train_set.x)
    world = 1 if parallel is None else parallel.world_size
    if parallel is not None:
        generator = parallel.seed_rank(params.seed)
    # qat's optimizer and schedule: the engines differ only in how they quantize.
    training = fine_tuning(model, params.lr, params.epochs, params.batch_size, len(train_set.y), generator,
                          world)
    resumable = Checkpointing(workspace.qat_pt2e_checkpoint, fingerprint(STAGE, params, workspace.root, world))
    fit_config = FitConfig(STAGE, params.epochs, params.batch_size, label_smoothing=params.label_smoothing,
                           seed=params.seed)

    def freeze_on_schedule(module: torch.fx.GraphModule, epoch: int) -> None:
        if epoch == params.freeze_bn_epoch:
            pt2e.freeze_bn_stats(module)
        if epoch == params.freeze_observers_epoch:
            pt2e.freeze_observers(module)

    with tensorboard(workspace, STAGE, parallel) as writer:
        result = fit(training, train_set, val_set, fit_config, writer,
                     on_epoch_start=freeze_on_schedule, resumable=resumable,
                     parallel=parallel)
        if parallel is not None and not parallel.writes_outputs(STAGE, model.state_dict()):
            return None
        program = pt2e.convert(model, train_set.x)
        metrics = {
            "engine": "pt2e",
            "quantizer": pt2e.QUANTIZER,
            "fp32_val_accuracy": fp32_val_accuracy,
            "fake_quant_val_accuracy": round(result.history[-1].val_accuracy, 6),
            "int8_val_accuracy": accuracy(program.module(), val_set.x, val_set.y),
        }
        log_run_summary(writer, result, inputs.meta.class_names,
                        params.model_dump(exclude={"distributed"}), metrics,
                        "qat_pt2e: validation (fake-quant)")

    payload = pt2e.program_bytes(program)

    def write_models(out) -> None:
        models = out.path(workspace.qat_pt2e_dir, directory=True)
        (models / "int8.pt2").write_bytes(payload)

    publish_run(workspace, STAGE, result, metrics, write_models, resumable)
    print(f"qat_pt2e: val accuracy fp32 {metrics['fp32_val_accuracy']:.4f}, pt2e int8 "
          f"{metrics['int8_val_accuracy']:.4f}, {result.seconds:.1f}s")
    return metrics


def main(args) -> None:
    """Quantization-aware fine-tuning of the trained model on torchao's PT2E flow (XNNPACK)."""
    params = load_params(args.params).qat
    with processes(params.distributed.nproc, "tasks.qat_pt2e", params.threads) as parallel:
        qat_pt2e(params, project_workspace(), parallel)


if __name__ == "__main__":
    run_stage(STAGE, main)
