"""prepare, then one epoch of train, on a large .npz: time and peak memory of each (a benchmark,
not a timed test).

    python -m bench.prepare_large [--quick] [--rows N] [--features F] [--out bench/prepare_large.json]

Stream-writes a dataset (default 1,000,000 x 256 float32 = 1.02 GB, plus int64 labels) into a
scratch project in the temp folder, runs `python -m tasks.prepare` on it as a user would, and
reports the source size over the wall time (MB/s) and the stage's peak resident memory, also as a
multiple of the data size (the bound is ~2x). Then `python -m tasks.train` for one epoch on the
prepared splits (the MLP the vectors get, threads 2): its epoch time and peak resident memory,
which the memory-mapped splits keep under 0.5x the data size. `--quick` uses a tiny dataset.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from bench.scratch import default_params
from tasks.atomic import write_json
from tasks.npyio import NpzWriter

REPO = Path(__file__).resolve().parents[1]
MB = 1e6
CLASSES = 10


def write_dataset(path: Path, rows: int, features: int, seed: int = 0) -> int:
    """x (rows, features) float32 and y (rows,) int64, written chunk by chunk; returns the bytes
    of x and y. Each class has its own mean, so the data is not pure noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, rows)
    centres = rng.normal(0, 1, (CLASSES, features)).astype(np.float32)
    step = max(1, (32 << 20) // (4 * features))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        npz = NpzWriter(f)
        with npz.member("x", (rows, features), np.float32) as x:
            for start in range(0, rows, step):
                labels = y[start : start + step]
                x.write(rng.standard_normal((len(labels), features), dtype=np.float32) + centres[labels])
        npz.array("y", y)
        npz.close()
    return rows * features * 4 + y.nbytes


def run_stage(project: Path, stage: str) -> tuple[float, int, str]:
    """Wall time, peak RSS (bytes, of that process alone) and stdout of `python -m tasks.STAGE`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", f"tasks.{stage}"], cwd=project, env=env,
                               stdout=subprocess.PIPE, text=True)
    output = process.stdout.read()
    # wait4: this child's own rusage (Linux reports ru_maxrss in KiB).
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"prepare_large: {stage} failed (exit {process.returncode}):\n{output}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024, output


def measure(rows: int, features: int, scratch: Path) -> dict:
    data_bytes = rows * features * 4 + rows * 8
    # The source, the prepared copy of it and the test split's side file.
    needed = 2.3 * data_bytes
    free = shutil.disk_usage(scratch).free
    if free < needed:
        sys.exit(f"prepare_large: needs {needed / 1e9:.1f} GB free in {scratch}, has {free / 1e9:.1f} GB")
    with tempfile.TemporaryDirectory(prefix="qatflow-bench-prepare-", dir=scratch) as tmp:
        project = Path(tmp)
        start = time.perf_counter()
        write_dataset(project / "data/raw/large.npz", rows, features)
        written = time.perf_counter() - start
        params = {"data": {"source": "data/raw/large.npz"}, "train": {"epochs": 1, "patience": 1}}
        (project / "params.yaml").write_text(yaml.safe_dump(default_params(**params)))
        seconds, peak, _ = run_stage(project, "prepare")
        prepared = sum(p.stat().st_size for p in (project / "data/prepared").iterdir())
        _, train_peak, output = run_stage(project, "train")
        epoch_s = float(re.search(r"^train: best epoch 1/1, .*, ([0-9.]+)s$", output, re.M).group(1))
    return {
        "rows": rows, "features": features, "dtype": "float32",
        "data_mb": round(data_bytes / MB, 1),
        "prepared_mb": round(prepared / MB, 1),
        "generate_s": round(written, 2),
        "prepare_s": round(seconds, 2),
        "throughput_mb_s": round(data_bytes / MB / seconds, 1),
        "peak_rss_mb": round(peak / MB, 1),
        "peak_rss_over_data": round(peak / data_bytes, 3),
        "train_epoch_s": round(epoch_s, 2),
        "train_peak_rss_mb": round(train_peak / MB, 1),
        "train_peak_rss_over_data": round(train_peak / data_bytes, 3),
        "cpus": os.cpu_count(),
        # Other work on the machine slows the figures down; this says how busy it was.
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def table(result: dict) -> str:
    shape = f"{result['rows']:,} x {result['features']} float32 + int64 labels"
    rows = [("source data", f"{result['data_mb']:,.1f} MB ({shape})"),
            ("prepare wall time", f"{result['prepare_s']:.2f} s"),
            ("throughput", f"{result['throughput_mb_s']:,.1f} MB/s of source data"),
            ("peak RSS", f"{result['peak_rss_mb']:,.1f} MB"),
            ("peak RSS / data size", f"{result['peak_rss_over_data']:.3f}"),
            ("train: one epoch", f"{result['train_epoch_s']:.2f} s (threads 2)"),
            ("train: peak RSS", f"{result['train_peak_rss_mb']:,.1f} MB"),
            ("train: peak RSS / data size", f"{result['train_peak_rss_over_data']:.3f}")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _machine(result: dict) -> str:
    return f"`bench/prepare_large.json`: {result['cpus']} CPUs, 1-min load average {result['load_average_1min']}."


def markdown_prepare(result: dict) -> str:
    """docs/your-data.md's prepare table of bench/prepare_large.json (bench/tables.py)."""
    return "\n".join([
        "| data | prepare time | throughput | peak RSS | peak RSS / data size |", "|---|---|---|---|---|",
        f"| {result['data_mb']:,.0f} MB ({result['rows']:,} x {result['features']} {result['dtype']} + int64 labels) "
        f"| {result['prepare_s']:.1f} s (two passes) | {result['throughput_mb_s']:,.0f} MB/s "
        f"| {result['peak_rss_mb']:,.0f} MB | {result['peak_rss_over_data']:.2f} |",
        "", _machine(result)])


def markdown_train(result: dict) -> str:
    """docs/your-data.md's train table of bench/prepare_large.json (bench/tables.py)."""
    return "\n".join([
        "| data | train: one epoch (MLP, threads 2) | train: peak RSS | peak RSS / data size |", "|---|---|---|---|",
        f"| {result['data_mb']:,.0f} MB, its training split | {result['train_epoch_s']:.1f} s "
        f"| {result['train_peak_rss_mb']:,.0f} MB | {result['train_peak_rss_over_data']:.3f} |",
        "", _machine(result)])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prepare_large", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny dataset (20,000 x 32), for tests")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the scratch project goes (default: the temp folder)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "prepare_large.json")
    args = parser.parse_args()
    rows, features = (20_000, 32) if args.quick else (args.rows, args.features)
    result = measure(rows, features, args.scratch)
    print(table(result))
    write_json(args.out, result)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
