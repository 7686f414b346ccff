"""Stage 3b, qat_pt2e: the same quantization-aware fine-tuning as qat, on torchao's PT2E engine
(tasks/quant/engine.py) instead of the deprecated FX one, for the ExecuTorch (XNNPACK) int8 target.

From the same trained fp32 weights, with qat's params and the same runner (tasks/training/), so
the two engines differ only in how they quantize. No PTQ baseline here: qat's already compares
calibration against QAT.

Writes models/qat_pt2e/int8.pt2 (the converted int8 program, torch.export format, batch dynamic),
metrics/qat_pt2e.json and plots/qat_pt2e/history.csv together once it has finished; TensorBoard
logs go to runs/qat_pt2e/<run>. Resumes a killed run from models/qat_pt2e_checkpoint.pt, like qat.
"""

from __future__ import annotations

import torch

from tasks.cli import run_stage
from tasks.distributed import DataParallel, processes
from tasks.inference import accuracy
from tasks.model import load_checkpoint
from tasks.params import QatParams, load_params
from tasks.quant import pt2e
from tasks.quant.engine import Pt2eEngine, fine_tuning, freeze_schedule
from tasks.training.fit import StageInputs
from tasks.training.runner import Recipe, run_training
from tasks.workspace import Workspace, project_workspace

STAGE = "qat_pt2e"


def qat_pt2e(params: QatParams, workspace: Workspace, parallel: DataParallel | None = None) -> dict | None:
    """Under DDP (`parallel`), every rank trains; rank 0 alone writes and returns the metrics."""
    workspace.require(workspace.train_model)
    engine = Pt2eEngine()
    config = fp32_val_accuracy = None

    def build(inputs: StageInputs, generator: torch.Generator) -> torch.nn.Module:
        nonlocal config, fp32_val_accuracy
        fp32, config = load_checkpoint(workspace.train_model)
        fp32_val_accuracy = accuracy(fp32.eval(), inputs.val.x, inputs.val.y)
        return engine.prepare(fp32, inputs.train.x)

    def finish(model, result, inputs):
        int8 = engine.convert(model, inputs.train.x)
        metrics = {
            "engine": "pt2e",
            "quantizer": pt2e.QUANTIZER,
            "fp32_val_accuracy": fp32_val_accuracy,
            "fake_quant_val_accuracy": round(result.history[-1].val_accuracy, 6),
            "int8_val_accuracy": accuracy(int8, inputs.val.x, inputs.val.y),
        }
        print(f"qat_pt2e: val accuracy fp32 {metrics['fp32_val_accuracy']:.4f}, pt2e int8 "
              f"{metrics['int8_val_accuracy']:.4f}, {result.seconds:.1f}s")
        return metrics, lambda out: engine.save(out.path(workspace.qat_pt2e_dir, directory=True),
                                                model, int8, config)

    recipe = Recipe(STAGE, params, build, fine_tuning(params), finish, checkpoint=workspace.qat_pt2e_checkpoint,
                    on_epoch_start=freeze_schedule(engine, params), keep="last", graph=False,
                    hparams=params.model_dump(exclude={"distributed"}), title="qat_pt2e: validation (fake-quant)")
    return run_training(recipe, workspace, parallel)


def main(args) -> None:
    """Quantization-aware fine-tuning of the trained model on torchao's PT2E flow (XNNPACK)."""
    params = load_params(args.params).qat
    with processes(params.distributed.nproc, "tasks.qat_pt2e", params.threads,
                   params.device) as parallel:
        qat_pt2e(params, project_workspace(), parallel)


if __name__ == "__main__":
    run_stage(STAGE, main)
