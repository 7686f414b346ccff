"""The gates a model file passes before it is published: parity (the file, run in isolation,
against what it was made from) and accuracy (int8 against the eager fp32 model, on the test split).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from tasks.contracts import Gate
from tasks.errors import GateFailed
from tasks.inference import Model, predict_logits
from tasks.params import ExportParams

ISOLATED_SCRIPT = Path(__file__).with_name("isolated.py")


def run_isolated(model_paths: list[Path], inputs_path: Path, workdir: Path) -> dict[str, np.ndarray]:
    """Each model's logits on the inputs (by file name), computed in one fresh `python -I` process
    that never imports qatflow (isolated.py)."""
    # Its stderr is libtorch's deprecation chatter unless something fails; then it is the reason.
    run = subprocess.run(
        [sys.executable, "-I", str(ISOLATED_SCRIPT), str(inputs_path), str(workdir), *map(str, model_paths)],
        cwd=workdir, capture_output=True, text=True,
    )
    if run.returncode != 0:
        raise GateFailed(
            f"an exported model does not load or run outside qatflow (exit {run.returncode}):\n"
            + run.stderr.strip()[-2000:]
        )
    logits = {}
    for path in model_paths:
        with np.load(workdir / f"{path.name}.logits.npz", allow_pickle=False) as data:
            logits[path.name] = data["logits"]
    return logits


def parity(precision: str, reference: np.ndarray, loaded: np.ndarray, params: ExportParams) -> dict:
    """fp32 files must match their reference within export.fp32_tolerance; int8 files must agree
    with its argmax on at least export.int8_min_agreement of the samples."""
    result = {
        "max_abs_diff": round(float(np.abs(loaded - reference).max()), 8),
        "argmax_agreement": round(float((loaded.argmax(1) == reference.argmax(1)).mean()), 6),
    }
    if precision == "fp32":
        tol = params.fp32_tolerance
        result["allclose"] = bool(np.allclose(loaded, reference, rtol=tol, atol=tol))
        result["passed"] = result["allclose"]
    else:
        result["passed"] = result["argmax_agreement"] >= params.int8_min_agreement
    return result


def accuracy_gate(fp32: torch.nn.Module, int8: Model, x: torch.Tensor, y: torch.Tensor,
                  params: ExportParams, variant: str, file: str) -> Gate:
    """Test accuracy of the eager fp32 model against the int8 file about to be published (loaded
    from its bytes), as evaluate will measure them; GateFailed if int8 loses more than the limit."""
    fp32_correct = int((predict_logits(fp32.eval(), x).argmax(1) == y).sum())
    int8_correct = int((predict_logits(int8, x).argmax(1) == y).sum())
    # From counts, so that a drop of exactly the limit compares equal to it.
    drop = round(100 * (fp32_correct - int8_correct) / len(y), 4)
    if drop > params.max_accuracy_drop:
        raise GateFailed(
            f"{variant} ({file}) test accuracy is {drop:g} pp below fp32 ({int8_correct / len(y):.2%} "
            f"vs {fp32_correct / len(y):.2%}), over export.max_accuracy_drop = "
            f"{params.max_accuracy_drop:g} pp; previous models and metrics left in place"
        )
    return Gate(variant=variant, accuracy_drop=drop, max_accuracy_drop=params.max_accuracy_drop, passed=True)
