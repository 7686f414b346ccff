"""Stage 3, qat: quantization-aware fine-tuning of the trained fp32 model on the FX engine
(tasks/quant/engine.py), plus a post-training quantization (calibration only) baseline from the
same weights for comparison.

Recipe: FX fuses conv/bn/relu and inserts fake-quant; fine-tune at a low LR; freeze BatchNorm
statistics, then observers, partway through; convert to real int8 kernels.

Writes models/qat/{qat,ptq}_state.pt (prepared-model state_dicts that tasks.quant.fx.load_int8
converts), metrics/qat.json and plots/qat/history.csv, all together once it has finished;
TensorBoard logs go to runs/qat/<run>. Like train, it resumes a killed run from the checkpoint it
saves after every epoch (models/qat_checkpoint.pt, removed once the outputs are published).
"""

from __future__ import annotations

import copy

import torch

from tasks.cli import run_stage
from tasks.distributed import DataParallel, processes
from tasks.inference import accuracy
from tasks.model import load_checkpoint
from tasks.params import QatParams, load_params
from tasks.quant import fx
from tasks.quant.engine import FxEngine, fine_tuning, freeze_schedule
from tasks.training.fit import StageInputs
from tasks.training.runner import Recipe, run_training
from tasks.workspace import Workspace, project_workspace


@torch.no_grad()
def calibrate(prepared: torch.nn.Module, x: torch.Tensor, batches: int, batch_size: int) -> None:
    prepared.eval()
    for i in range(0, min(len(x), batches * batch_size), batch_size):
        prepared(x[i : i + batch_size])


def qat(params: QatParams, workspace: Workspace, parallel: DataParallel | None = None) -> dict | None:
    """Under DDP (`parallel`), every rank trains; rank 0 alone writes and returns the metrics."""
    workspace.require(workspace.train_model)
    engine = FxEngine(params.backend)
    fp32 = config = ptq = None

    def build(inputs: StageInputs, generator: torch.Generator) -> torch.nn.Module:
        nonlocal fp32, config, ptq
        fp32, config = load_checkpoint(workspace.train_model)
        example = inputs.train.x[:1]
        # Calibrate on a fixed, shuffled slice of the training set (the raw order is class-sorted).
        order = torch.randperm(len(inputs.train.y), generator=generator)
        calibration = inputs.train.x[order[: params.ptq_calibration_batches * params.batch_size]]
        ptq = fx.prepare(copy.deepcopy(fp32), "ptq", params.backend, example)
        calibrate(ptq, calibration, params.ptq_calibration_batches, params.batch_size)
        return engine.prepare(copy.deepcopy(fp32), example)

    def finish(model, result, inputs):
        val = inputs.val
        example = inputs.train.x[:1]
        # The recipe keeps the final weights: earlier epochs ran with observers still moving.
        int8 = engine.convert(model, example)
        metrics = {
            "backend": params.backend,
            "fp32_val_accuracy": accuracy(fp32.eval(), val.x, val.y),
            "ptq_val_accuracy": accuracy(fx.convert(ptq), val.x, val.y),
            "fake_quant_val_accuracy": round(result.history[-1].val_accuracy, 6),
            "int8_val_accuracy": accuracy(int8, val.x, val.y),
        }
        print(f"qat: val accuracy fp32 {metrics['fp32_val_accuracy']:.4f}, ptq int8 "
              f"{metrics['ptq_val_accuracy']:.4f}, qat int8 {metrics['int8_val_accuracy']:.4f}, "
              f"{result.seconds:.1f}s")

        def write_models(out) -> None:
            models = out.path(workspace.qat_dir, directory=True)
            engine.save(models, model, int8, config)
            with open(models / "ptq_state.pt", "wb") as f:
                fx.save_prepared(f, ptq, config, "ptq", params.backend)

        return metrics, write_models

    recipe = Recipe("qat", params, build, fine_tuning(params), finish, checkpoint=workspace.qat_checkpoint,
                    on_epoch_start=freeze_schedule(engine, params), keep="last",
                    hparams=params.model_dump(exclude={"distributed"}), title="qat: validation (fake-quant)")
    return run_training(recipe, workspace, parallel)


def main(args) -> None:
    """Quantization-aware fine-tuning (and a PTQ baseline) of the trained model."""
    params = load_params(args.params).qat
    with processes(params.distributed.nproc, "tasks.qat", params.threads,
                   params.device) as parallel:
        qat(params, project_workspace(), parallel)


if __name__ == "__main__":
    run_stage("qat", main)
