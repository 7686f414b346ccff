"""Training speed and outcome of the default CNN per CPU mode: fp32, bf16 autocast, channels_last and
both, side by side in one run (a benchmark, not a timed test).

    python -m bench.train_speed [--quick] [--epochs N] [--rounds N] [--out bench/train_speed.json]

The step is the train stage's: the default cnn2d ([32, 64, 128], 2 convs per stage) on 1x28x28
inputs, batch 64, 2 threads, AdamW, label smoothing 0.1, under deterministic algorithms, each mode
through tasks/training/device.py. Speed: after a warm-up, rounds of steps on one batch, the modes
interleaved in a rotating order, so that other work on the machine slows them all alike; the
median of the rounds. Outcome: each mode trains from the same seed on the built-in MNIST (prepared
in a temp folder) with the stage's one-cycle schedule and shift augmentation, 2 epochs by default
(a CPU without bf16 instructions emulates bf16 ~10x slower than fp32: the whole bench then takes
~25 min on 2 cores, against minutes where bf16 is native); its weights are then scored on the test
split in fp32, as export and evaluate will run them. Bitwise: whether a second run from the same seed repeats the first's
weights after its first epoch, and whether a mode's final weights equal fp32's.

The recommended default is the fastest mode that keeps both contracts: runs repeat bitwise, and
test accuracy within the export gate's default drop (0.5 pp) of fp32's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.scratch import default_params
from tasks.atomic import write_json
from tasks.augment import random_shift
from tasks.contracts import read_prepared_meta
from tasks.environment import cpu_name
from tasks.inference import predict_logits
from tasks.training.fit import load_split
from tasks.training.runner import seed_everything
from tasks.model import build_model, model_config
from tasks.params import parse_params
from tasks.prepare import prepare
from tasks.training.device import Hardware, cpu_state, native_cpu_bf16
from tasks.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("train_speed.json")
MODES = {  # name: (precision, channels_last)
    "fp32": ("fp32", False),
    "bf16": ("bf16", False),
    "channels_last": ("fp32", True),
    "bf16+channels_last": ("bf16", True),
}
PARAMS = parse_params(default_params())  # params.yaml's
STAGE = PARAMS.train  # the train stage's batch, threads, optimizer, LR, smoothing, shift
MAX_DROP_PP = PARAMS.export.max_accuracy_drop


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, hardware: Hardware,
         x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with hardware.autocast():
        loss = F.cross_entropy(model(hardware.batch(x)), hardware.batch(y),
                               label_smoothing=STAGE.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def default_cnn(data: dict) -> torch.nn.Module:
    return build_model(model_config(data["layout"], data["input_shape"], data["classes"], STAGE.model))


def fresh(mode: str, data: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer, Hardware]:
    precision, channels_last = MODES[mode]
    hardware = Hardware.of("cpu", precision, channels_last)
    model = hardware.module(default_cnn(data))
    optimizer = torch.optim.AdamW(model.parameters(), lr=STAGE.lr, weight_decay=STAGE.weight_decay)
    return model.train(), optimizer, hardware


def measure_speed(data: dict, rounds: int, steps: int, warmup: int = 3) -> dict:
    seed_everything(STAGE.seed, STAGE.threads)
    x, y = (part[: STAGE.batch_size] for part in data["train"])
    runs = {mode: fresh(mode, data) for mode in MODES}
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    names = list(MODES)
    for mode, (model, optimizer, hardware) in runs.items():
        with hardware.deterministic():
            for _ in range(warmup):  # oneDNN builds its kernels for the shapes on the first calls
                step(model, optimizer, hardware, x, y)
    for round_ in range(rounds):
        for mode in names[round_ % len(names):] + names[: round_ % len(names)]:
            model, optimizer, hardware = runs[mode]
            with hardware.deterministic():
                start = time.perf_counter()
                for _ in range(steps):
                    step(model, optimizer, hardware, x, y)
                seconds[mode].append((time.perf_counter() - start) / steps)
    base = float(np.median(seconds["fp32"]))
    return {mode: {"step_ms": round(1e3 * float(np.median(s)), 2),
                   "samples_per_s": round(len(x) / float(np.median(s)), 1),
                   "vs_fp32": round(base / float(np.median(s)), 3),
                   "rounds_ms": [round(1e3 * v, 2) for v in s]}
            for mode, s in seconds.items()}


def train(mode: str, data: dict, epochs: int, stop_after: int | None = None) -> tuple[list[dict], float]:
    """The weights after each epoch (up to `stop_after`, of a schedule for `epochs`) and the
    seconds taken."""
    generator = seed_everything(STAGE.seed, STAGE.threads)
    x, y = data["train"]
    model, optimizer, hardware = fresh(mode, data)
    steps = -(-len(y) // STAGE.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=STAGE.lr, total_steps=epochs * steps)
    states = []
    start = time.perf_counter()
    with hardware.deterministic():
        for _ in range(stop_after or epochs):
            order = torch.randperm(len(y), generator=generator)
            for i in range(steps):
                batch = order[i * STAGE.batch_size : (i + 1) * STAGE.batch_size]
                step(model, optimizer, hardware, random_shift(x[batch], STAGE.augment_shift, generator),
                     y[batch])
                scheduler.step()
            states.append(cpu_state(model))
    return states, time.perf_counter() - start


def test_accuracy(data: dict, state: dict[str, torch.Tensor]) -> float:
    """In fp32 on CPU, as export and evaluate will run the weights."""
    model = default_cnn(data)
    model.load_state_dict(state)
    x, y = data["test"]
    return (predict_logits(model.eval(), x).argmax(1) == y).float().mean().item()


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def measure_training(data: dict, epochs: int) -> dict:
    """Each mode's run, then its repeat: over its first epoch only, which takes every code path a
    full run does (bf16 emulated on a CPU without bf16 instructions is ~10x slower than fp32)."""
    runs, repeats = {}, {}
    for mode in MODES:
        runs[mode] = train(mode, data, epochs)
        print(f"train_speed: {mode} trained {epochs} epochs in {runs[mode][1]:.0f} s", flush=True)
    for mode in MODES:
        repeats[mode] = train(mode, data, epochs, stop_after=1)
    reference = runs["fp32"][0][-1]
    return {mode: {"test_accuracy": round(test_accuracy(data, states[-1]), 4),
                   "train_s": round(seconds, 1),
                   "bitwise_repeatable": same(states[0], repeats[mode][0][0]),
                   "equals_fp32": same(states[-1], reference),
                   "max_weight_diff_vs_fp32": max_difference(states[-1], reference)}
            for mode, (states, seconds) in runs.items()}


def recommend(speed: dict, training: dict) -> dict:
    floor = training["fp32"]["test_accuracy"] - MAX_DROP_PP / 100
    keeps = [m for m in MODES if training[m]["bitwise_repeatable"] and training[m]["test_accuracy"] >= floor]
    best = max(keeps, key=lambda m: speed[m]["samples_per_s"])
    dropped = [m for m in MODES if m not in keeps]
    reason = (f"{best} is the fastest mode ({speed[best]['vs_fp32']:.2f}x fp32's samples/s) whose runs "
              f"repeat bitwise and whose test accuracy ({training[best]['test_accuracy']:.4f}) is within "
              f"{MAX_DROP_PP} pp of fp32's ({training['fp32']['test_accuracy']:.4f})")
    if dropped:
        reason += f"; {', '.join(dropped)} failed one of the two"
    return {"mode": best, "precision": MODES[best][0], "channels_last": MODES[best][1], "reason": reason}


def load_data(max_samples: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="qatflow-bench-train-speed-") as tmp:
        workspace = Workspace(Path(tmp))
        (workspace.root / "data" / "raw").mkdir(parents=True)
        params = parse_params(default_params(data={"max_samples": max_samples}))
        prepare(params.data, params.prepare, workspace)
        meta = read_prepared_meta(workspace.prepared)
        data = {"layout": meta.layout, "input_shape": meta.input_shape, "classes": len(meta.class_names)}
        for name in ("train", "test"):
            split = load_split(workspace.prepared, name)
            data[name] = (split.x[: len(split.y)], split.y)
    return data


def table(result: dict) -> str:
    lines = [f"{'mode':<20} {'step ms':>8} {'samples/s':>10} {'vs fp32':>8} {'test acc':>9} "
             f"{'repeat':>7} {'== fp32':>8} {'max |dw|':>9}"]
    for mode in MODES:
        s, t = result["speed"][mode], result["training"][mode]
        lines.append(f"{mode:<20} {s['step_ms']:>8.2f} {s['samples_per_s']:>10.1f} {s['vs_fp32']:>7.2f}x "
                     f"{t['test_accuracy']:>9.4f} {'yes' if t['bitwise_repeatable'] else 'NO':>7} "
                     f"{'yes' if t['equals_fp32'] else 'no':>8} {t['max_weight_diff_vs_fp32']:>9.2e}")
    machine = result["machine"]
    lines.append(f"{machine['cpu']} ({machine['cpu_capability']}, native bf16: {machine['native_bf16']}), "
                 f"{STAGE.threads} threads, load {machine['load_average_1min']}; "
                 f"{result['epochs']} epochs on {result['train_samples']} images")
    lines.append(f"recommended: {result['recommended']['mode']}: {result['recommended']['reason']}")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """docs/your-hardware.md's table (bench/tables.py)."""
    machine = result["machine"]
    lines = ["| mode | ms per step | samples/s | vs fp32 | test accuracy | repeats bitwise | weights = fp32's |",
             "|---|---|---|---|---|---|---|"]
    for mode in MODES:
        s, t = result["speed"][mode], result["training"][mode]
        lines.append(f"| {mode} | {s['step_ms']:g} | {s['samples_per_s']:,.0f} | {s['vs_fp32']:.2f}x | "
                     f"{100 * t['test_accuracy']:.2f}% | {'yes' if t['bitwise_repeatable'] else '**no**'} | "
                     f"{'yes' if t['equals_fp32'] else 'no'} |")
    lines += ["", f"{machine['cpu']} ({machine['cpu_capability']}, native bf16: "
              f"{'yes' if machine['native_bf16'] else 'no'}), torch {machine['torch']}, {machine['threads']} "
              f"threads, 1-min load average {machine['load_average_1min']}; batch {result['batch_size']}, "
              f"{result['rounds']} interleaved rounds of {result['steps_per_round']} steps per mode (medians); "
              f"accuracy after {result['epochs']} epoch{'s' * (result['epochs'] != 1)} on {result['train_samples']:,} "
              f"training images. "
              f"Recommended: **{result['recommended']['mode']}**: {result['recommended']['reason']}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200 images, 1 epoch, one step per mode")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=4, help="steps per mode per round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    epochs, rounds, steps, warmup, samples = ((1, 1, 1, 1, 200) if args.quick
                                              else (args.epochs, args.rounds, args.steps, 3, None))
    data = load_data(samples)
    speed = measure_speed(data, rounds, steps, warmup)
    print("train_speed: samples/s " + ", ".join(f"{m} {s['samples_per_s']}" for m, s in speed.items()),
          flush=True)
    training = measure_training(data, epochs)
    result = {
        "machine": {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "native_bf16": native_cpu_bf16(),
                    "torch": torch.__version__, "threads": STAGE.threads,
                    "load_average_1min": round(os.getloadavg()[0], 2)},
        "batch_size": STAGE.batch_size, "epochs": epochs, "train_samples": len(data["train"][1]),
        "rounds": rounds, "steps_per_round": steps,
        "speed": speed, "training": training, "recommended": recommend(speed, training),
    }
    print(table(result))
    write_json(args.out, result)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
