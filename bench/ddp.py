"""Data-parallel training: epoch time at nproc 1 and nproc 2, one thread per process, side by side
in one run (a benchmark, not a timed test).

    python -m bench.ddp [--quick] [--epochs N] [--out bench/ddp.json]

Prepares the built-in data (builtin:mnist5k, 4,000 training images) in a scratch project, then
runs the train stage (`python -m tasks.train`, as DVC does) with train.distributed.nproc 1 and 2,
threads 1, the same global batch of 64, every epoch run (no early stop). An epoch's time is the
training loop's own (the stage's "Ns" line over its epochs: validation included, process start
and imports left out). Scaling efficiency = t(1) / (2 * t(2)): 1.0 is perfect, 0.5 no gain.

What the machine itself allows is measured alongside: two independent single-process runs at once
(no DDP, nothing shared). Their throughput over one run alone is the ceiling any 2-process job has
here; DDP's speedup is put against it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.scratch import default_params
from tasks.atomic import write_json

REPO = Path(__file__).resolve().parents[1]
SECONDS = re.compile(r"^train: best epoch \d+/(\d+), val accuracy ([0-9.]+), ([0-9.]+)s$", re.M)


def start_train(project: Path, nproc: int, epochs: int) -> subprocess.Popen:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"] |= {"epochs": epochs, "threads": 1, "patience": epochs, "distributed": {"nproc": nproc}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO), "QATFLOW_RUN_NAME": f"nproc{nproc}"}
    return subprocess.Popen([sys.executable, "-m", "tasks.train"], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def result_of(run: subprocess.Popen, nproc: int) -> dict:
    output, _ = run.communicate()
    if run.returncode != 0:
        sys.exit(f"bench.ddp: train with nproc {nproc} failed:\n{output}")
    epochs_run, accuracy, seconds = SECONDS.search(output).groups()
    return {"nproc": nproc, "epoch_s": round(float(seconds) / int(epochs_run), 3),
            "val_accuracy": float(accuracy)}


def measure(epochs: int, max_samples: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="qatflow-bench-ddp-") as tmp:
        project = Path(tmp)
        (project / "data" / "raw").mkdir(parents=True)
        (project / "params.yaml").write_text(yaml.safe_dump(default_params(data={"max_samples": max_samples})))
        subprocess.run([sys.executable, "-m", "tasks.prepare"], cwd=project, check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
        runs = [result_of(start_train(project, nproc, epochs), nproc) for nproc in (1, 2)]
        twin = project.with_name(project.name + "-twin")
        shutil.copytree(project, twin)
        try:
            pair = [start_train(where, 1, epochs) for where in (project, twin)]
            side_by_side = [result_of(run, 1)["epoch_s"] for run in pair]
        finally:
            shutil.rmtree(twin)
    one, two = runs
    # Two runs' samples in the time of their mean epoch, against one run's in its own.
    ceiling = 2 * one["epoch_s"] / (sum(side_by_side) / 2)
    return {
        "runs": runs,
        "speedup": round(one["epoch_s"] / two["epoch_s"], 3),
        "scaling_efficiency": round(one["epoch_s"] / (2 * two["epoch_s"]), 3),
        "independent_pair_epoch_s": side_by_side,
        "machine_speedup_ceiling": round(ceiling, 3),
        "epochs": epochs,
        "cpus": os.cpu_count(),
        # Other work on the machine slows the figures down; this says how busy it was.
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def table(result: dict) -> str:
    lines = [f"{'processes':>9}  {'epoch (s)':>9}  {'val accuracy':>12}"]
    lines += [f"{r['nproc']:>9}  {r['epoch_s']:>9.3f}  {r['val_accuracy']:>12.4f}" for r in result["runs"]]
    lines.append(f"speedup {result['speedup']:.2f}x, scaling efficiency {result['scaling_efficiency']:.2f} "
                 f"({result['cpus']} CPUs, load {result['load_average_1min']})")
    pair = " and ".join(f"{s:.3f}" for s in result["independent_pair_epoch_s"])
    lines.append(f"two independent 1-process runs at once: {pair} s per epoch, so this machine gives "
                 f"any 2 processes at most {result['machine_speedup_ceiling']:.2f}x")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """docs/scaling-out.md's table of bench/ddp.json (bench/tables.py)."""
    lines = ["| run (builtin:mnist5k, 4,000 images, batch 64, 1 thread per process) | epoch | val accuracy |",
             "|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| nproc {r['nproc']}{' (DDP)' if r['nproc'] > 1 else ''} | {r['epoch_s']:.2f} s | "
                     f"{r['val_accuracy']:.2%} |")
    pair = result["independent_pair_epoch_s"]
    lines.append(f"| two independent nproc-1 runs at the same time | {', '.join(f'{s:.2f} s' for s in pair)} | |")
    alone = next(r["epoch_s"] for r in result["runs"] if r["nproc"] == 1)
    slower = sum(pair) / len(pair) / alone
    lines += ["", f"Speedup {result['speedup']:.2f}x, scaling efficiency {result['scaling_efficiency']:.2f} "
              f"({result['epochs']} epochs, {result['cpus']} CPUs, 1-min load average "
              f"{result['load_average_1min']}). Two independent single-process runs at once each took "
              f"{slower:.2f}x as long as one alone, so this machine gives any two busy processes at most "
              f"{result['machine_speedup_ceiling']:.2f}x the work of one; the rest, "
              f"{result['machine_speedup_ceiling']:.2f}x against {result['speedup']:.2f}x, is DDP's own cost."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ddp", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 images, 1 epoch: for tests")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "ddp.json")
    args = parser.parse_args()
    epochs, samples = (1, 1000) if args.quick else (args.epochs, None)
    result = measure(epochs, samples)
    print(table(result))
    write_json(args.out, result)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
