"""A short check for a machine with a CUDA GPU: the pipeline's stages on a tiny project, trained on
the GPU and then on the CPU, with accuracy and step time side by side.

    python -m bench.gpu_check [--device cuda|cpu] [--precision fp32|bf16|fp16] [--channels-last]

In a temp folder (no DVC, no git: the stages as `python -m tasks.<stage>`, this checkout on
PYTHONPATH) it runs prepare, train, qat, qat_pt2e and export with tiny params, once with the
training stages on --device and once on cpu. qat_pt2e is skipped, saying why, where torchao or
executorch does not import (their wheels pin the torch they were built for). The device's
precision applies to train only: qat stays fp32, as the fused fake-quant kernel takes fp32 inputs
only (tests/test_device.py). Stops at once, saying why, when CUDA is asked for and missing, when a
package the stages import is missing (carry wheels: pip install --no-index --find-links DIR), or
when this checkout's params schema does not take the device keys yet. `--device cpu` checks the
plumbing on any machine; there the device keys are left out while the schema refuses them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench.scratch import default_params
from tasks.errors import QatflowError
from tasks.params import parse_params
from tasks.training.device import Hardware

REPO = Path(__file__).resolve().parents[1]
# The params keys that choose the device, by section; the schema owns their names.
DEVICE, PRECISION, CHANNELS_LAST = "device", "precision", "channels_last"
TRAINED_BY = {"train": "train", "qat": "qat", "qat_pt2e": "qat"}  # stage: its params section
STAGES = ["prepare", "train", "qat", "qat_pt2e", "export"]
TINY_PARAMS = default_params(**{
    "data": {"source": "builtin:mnist5k", "max_samples": 1000},
    "prepare": {"seed": 0, "split": {"train": 0.7, "val": 0.15, "test": 0.15}},
    "train": {"epochs": 3, "batch_size": 32, "lr": 0.01, "patience": 5,
              "model": {"widths": [32, 64], "dropout": 0.1}},
    "qat": {"epochs": 2, "freeze_bn_epoch": 1, "freeze_observers_epoch": 1, "ptq_calibration_batches": 4},
    "export": {"parity_samples": 40, "max_accuracy_drop": 100.0},
})


def fail(message: str) -> None:
    sys.exit(f"gpu_check: {message}")


def check_imports() -> str | None:
    """Fails on what the stages cannot run without; returns why qat_pt2e cannot run, if so."""
    for module in ("tasks.prepare", "tasks.train", "tasks.qat", "tasks.export"):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            fail(f"{module} does not import ({exc}); carry the wheels and install them with "
                 "pip install --no-index --find-links DIR")
    try:
        importlib.import_module("tasks.quant.pt2e")
    except Exception as exc:  # a wheel built for another torch fails in its own way
        return f"tasks.quant.pt2e does not import on torch {torch.__version__}: {type(exc).__name__}: {exc}"
    return None


def with_device(params: dict, device: str, precision: str, channels_last: bool) -> dict:
    return {**params,
            "train": {**params["train"], DEVICE: device, PRECISION: precision, CHANNELS_LAST: channels_last},
            "qat": {**params["qat"], DEVICE: device, PRECISION: "fp32"}}


def params_for(device: str, precision: str, channels_last: bool, strict: bool) -> dict:
    """The tiny params with the device keys; without them (said once) where the schema refuses them
    and `strict` is off, so that the plumbing can be checked on CPU before the schema lands."""
    params = with_device(TINY_PARAMS, device, precision, channels_last)
    try:
        parse_params(params)
    except QatflowError as exc:
        if strict:
            fail(f"this checkout's params schema does not take the device keys yet:\n{exc}")
        print(f"gpu_check: the params schema refuses the device keys; running without them, on CPU\n{exc}")
        return TINY_PARAMS
    return params


def run_stage(project: Path, stage: str) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "QATFLOW_RUN_NAME": "gpu_check"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", f"tasks.{stage}"], cwd=project, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        fail(f"{stage} failed in {project}:\n{done.stdout[-4000:]}")
    return time.perf_counter() - start, done.stdout


def loop_seconds(output: str, stage: str) -> float:
    """The training loop's own seconds, the last figure of the stage's closing line."""
    line = next(line for line in reversed(output.splitlines()) if line.startswith(f"{stage}: "))
    return float(line.rsplit(", ", 1)[1].rstrip("s"))


def run_project(label: str, params: dict, pt2e_skipped: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"qatflow-gpu-check-{label}-") as tmp:
        project = Path(tmp)
        (project / "data" / "raw").mkdir(parents=True)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        results = {}
        for stage in STAGES:
            if stage == "qat_pt2e" and pt2e_skipped:
                continue
            wall, output = run_stage(project, stage)
            results[stage] = {"wall_s": round(wall, 1)}
            if stage in TRAINED_BY:
                batch_size = getattr(parse_params(params), TRAINED_BY[stage]).batch_size
                results[stage] |= step_figures(project, stage, batch_size, output)
        results["train"]["val_accuracy"] = metrics(project, "train")["val_accuracy"]
        results["qat"]["val_accuracy"] = metrics(project, "qat")["int8_val_accuracy"]
        if "qat_pt2e" in results:
            results["qat_pt2e"]["val_accuracy"] = metrics(project, "qat_pt2e")["int8_val_accuracy"]
        results["export"]["int8_test_drop_pp"] = metrics(project, "export")["gate"]["accuracy_drop"]
        print(f"gpu_check: {label} done: " + json.dumps(results))
        return results


def metrics(project: Path, stage: str) -> dict:
    return json.loads((project / "metrics" / f"{stage}.json").read_text())


def step_figures(project: Path, stage: str, batch_size: int, output: str) -> dict:
    train_samples = json.loads((project / "data" / "prepared" / "meta.json").read_text())["samples"]["train"]
    epochs = len((project / "plots" / stage / "history.csv").read_text().splitlines()) - 1
    steps = epochs * -(-train_samples // batch_size)
    seconds = loop_seconds(output, stage)
    return {"loop_s": seconds, "ms_per_step": round(1e3 * seconds / steps, 2)}


def table(runs: dict[str, dict]) -> str:
    labels = list(runs)
    head = f"{'stage':<9} " + " ".join(f"{f'{label} acc':>14} {f'{label} ms/step':>16}" for label in labels)
    lines = [head]
    for stage in ("train", "qat", "qat_pt2e"):
        if all(stage in run for run in runs.values()):
            lines.append(f"{stage:<9} " + " ".join(
                f"{runs[label][stage]['val_accuracy']:>14.4f} {runs[label][stage]['ms_per_step']:>16.2f}"
                for label in labels))
    lines.append(f"{'export':<9} " + " ".join(
        f"{runs[label]['export']['int8_test_drop_pp']:>11.2f} pp {'(int8 test drop)':>16}"
        for label in labels))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="where the first run trains (cpu: a plumbing check on any machine)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="train's precision on --device (qat stays fp32)")
    parser.add_argument("--channels-last", action="store_true", help="train's conv layout on --device")
    args = parser.parse_args()
    try:
        hardware = Hardware.of(args.device, args.precision, args.channels_last)
    except QatflowError as exc:
        fail(str(exc))
    print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), Python "
          f"{sys.version.split()[0]}; first run on {hardware.describe()}")
    pt2e_skipped = check_imports()
    if pt2e_skipped:
        print(f"gpu_check: skipping qat_pt2e: {pt2e_skipped}")
    labels = dict.fromkeys([args.device, "cpu"])
    runs = {}
    for label in labels:
        on_device = label == args.device
        precision, channels_last = (args.precision, args.channels_last) if on_device else ("fp32", False)
        runs[label] = run_project(label, params_for(label, precision, channels_last, args.device == "cuda"),
                                  pt2e_skipped)
    print(table(runs))


if __name__ == "__main__":
    main()
