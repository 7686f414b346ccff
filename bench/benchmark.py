"""Inference and training benchmark: every model variant side by side, in one run.

    python -m bench.benchmark [--quick] [--root DIR] [--out DIR] [--runner PATH] [--threads 1,2]

Per thread count: latency (median, p90) at batch 1 and 64 of every variant in tasks/variants.py
(fp32 TorchScript timed after optimize_for_inference, the fair fp32 baseline) and of the C++ runner
on every TorchScript file; sizes, test
accuracy, the training loop's overhead over bare PyTorch and a no-op `dvc repro`, against targets.
Writes results.json and results.png to --out (default ROOT/bench). Other jobs share the machine and
its speed drifts, so all variants take turns in rounds and each latency is a median over rounds.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import redirect_stdout, suppress
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich import box
from rich.console import Console
from rich.table import Column, Table
from torch.utils.tensorboard import SummaryWriter

from bench.reference import format_ms
from tasks.atomic import write_json, write_with
from tasks.augment import random_shift
from tasks.checkpoint import TrainingState
from tasks.contracts import read_prepared_meta, read_test_split
from tasks.runtimes.onnx import OnnxModel
from tasks.deprecations import silence_torch_deprecations
from tasks.environment import cpu_name
from tasks.errors import QatflowError
from tasks.figures import tradeoff_figure
from tasks.inference import predict_logits, time_calls
from tasks.training.fit import FitConfig, fit, load_split
from tasks.training.runner import seed_everything
from tasks.model import build_model, model_config
from tasks.params import load_params
from tasks.train import make_optimizer, make_scheduler
from tasks.serving import SERVING_ENV, serving_threads
from tasks.variants import BASELINE, DEPLOYED, REFERENCE, VARIANTS
from tasks.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
BATCH_SIZES = [1, 64]
# The C++ runner loads every TorchScript file as saved: fp32.pt without optimize_for_inference.
CPP = {f"cpp_{name}": (name, f"C++ {Path(v.file).name}") for name, v in VARIANTS.items()
       if v.runtime == "torchscript"}
TARGETS = {"int8_vs_fp32ts_bs1": (2.0, "min"), "int8_vs_fp32ts_bs64": (3.0, "min"), "size_ratio": (3.7, "min"),
           "accuracy_drop_pp": (0.3, "max"), "train_overhead": (1.10, "max"), "noop_repro_s": (1.5, "max"),
           # int8.onnx (QAT's scales) against ONNX Runtime's own quantize_static of fp32.onnx (bench/ort_static.py):
           # the slowest of batch 1 and 64 at 1 and 2 threads, each file at its best session options.
           "onnx_int8_vs_ort_static": (1.0, "min"), "onnx_accuracy_vs_ort_static_pp": (0.0, "min"),
           # Under a competing CPU load the bench starts itself (LOAD): the deployed int8 paths as served
           # (tasks/serving.py), worst over variant, thread count and batch size.
           "load_p50_vs_quiet_bs1": (1.5, "max"), "load_p50_vs_quiet_bs64": (1.5, "max"),
           "load_p99_vs_1thread": (1.0, "max"),
           "onnx_size_ratio": (3.7, "min"),
           "onnx_accuracy_drop_pp": (0.3, "max"), "pte_size_ratio": (3.7, "min"), "pte_accuracy_drop_pp": (0.3, "max")}
# The other int8 files and the fp32 file each is measured against: ONNX's own fp32, and for the
# ExecuTorch program the fp32 torch.export program (the format it is lowered from; no fp32 .pte).
EDGE = {"onnx": ("int8_onnx", "fp32_onnx"), "pte": ("int8_pte", "fp32_pt2")}
# The ONNX files of the quantize_static comparison: ours (QAT's scales) and ONNX Runtime's own.
ORT_FILES = ("ours", "static")
# Timed under load: the deployed int8 paths and the fp32 baseline, each wait policy's workers.
LOADED = ("fp32_ts", "int8", "int8_onnx", "int8_pte")
WAIT_POLICIES = {"spin": {}, "passive": SERVING_ENV}  # libgomp's default (spins), and serving's
LOAD_STATS = {"p50_ms": 50, "p99_ms": 99}
# The competing load: this many busy-loop Python processes, one per core, started and stopped by PID.
COMPETITOR = [sys.executable, "-c", "while True: pass"]


def load_variants(workspace: Workspace) -> tuple[dict, torch.Tensor, np.ndarray]:
    """Loaders (each call loads a fresh model, ready to serve), test inputs and labels."""
    workspace.require(workspace.prepared / "test.npz", *(v.path(workspace) for v in VARIANTS.values()))
    names = read_prepared_meta(workspace.prepared).class_names
    test = read_test_split(workspace.prepared)
    loaders = {name: (lambda v=v: v.load_for_serving(workspace, names)) for name, v in VARIANTS.items()}
    return loaders, test.x, test.y.numpy()


def ort_loaders(onnx_files: dict[str, str], threads: int) -> dict:
    """bench/ort_static.py's comparison: every ONNX file (ours, quantize_static's) at every
    session variant (optimization level, first convolution padded or not)."""
    import onnx

    from bench import ort_static

    out = {}
    for name, path in onnx_files.items():
        model = onnx.load(path)
        for pad, proto in (("", model), ("_pad", ort_static.pad_first_conv(model))):
            data = proto.SerializeToString()
            for level in ort_static.LEVELS:
                out[f"{name}_{level}{pad}"] = lambda d=data, lv=level: OnnxModel(ort_static.session(d, threads, lv))
    return out


def latency_worker(conn, root: str, threads: int, repeats: int, onnx_files: dict[str, str] | None = None) -> None:
    """Times every variant once per request, each batch size on a freshly loaded model (time_model).
    One process per thread count, set before any inference, as in a deployment: a module that ran
    at another thread count or batch size can stay ~2x slower at int8 batch 1 (measured, torch 2.13)."""
    torch.set_num_threads(threads)
    silence_torch_deprecations()
    loaders, x, _ = load_variants(Workspace(Path(root)))
    loaders |= ort_loaders(onnx_files or {}, threads)
    while conn.recv():
        conn.send({k: time_calls(load, x, BATCH_SIZES, repeats) for k, load in loaders.items()})


def time_cpp(runner: Path, model: Path, inputs: Path, logits: Path, threads: int, repeats: int) -> dict:
    """One run of deploy/cpp's qatflow_runner; its last stdout line is a JSON report."""
    cmd = [str(runner), str(model), str(inputs), "--out", str(logits), "--threads", str(threads),
           "--repeats", str(repeats), "--batch-sizes", ",".join(map(str, BATCH_SIZES))]
    try:
        # The runner re-executes itself passive unless OMP_WAIT_POLICY is set: empty (libgomp's
        # default) unless the user set it, to time it as the Python workers beside it run.
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "")}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        report = json.loads(done.stdout.strip().splitlines()[-1])
        return {k: {"median_ms": t["median"], "p90_ms": t["p90"]} for k, t in report["latency_ms"].items()}
    except OSError as exc:
        raise RuntimeError(f"{runner}: {exc}") from None
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise RuntimeError(f"{' '.join(cmd)}: exit {done.returncode}, no report ({exc!r})\n"
                           f"{done.stderr[-1500:]}") from None


def time_rounds(root: Path, cpp: dict, threads: list[int], rounds: int, repeats: int,
                onnx_files: dict[str, str] | None = None) -> dict:
    """{variant: {"threads_N": {"batch_B": {"median_ms", "p90_ms"}}}}: each round times every thread
    count, variant and C++ run (`cpp`: name -> time_cpp arguments) in turn, while the other workers
    wait idle; a figure is the median over rounds of each round's median (p90)."""
    spawn, workers, runs = multiprocessing.get_context("spawn"), {}, defaultdict(list)
    for n in threads:
        conn, child = spawn.Pipe()
        workers[n] = conn, spawn.Process(target=latency_worker, args=(child, str(root), n, repeats, onnx_files),
                                         daemon=True)
        workers[n][1].start()
        child.close()  # the worker's end only: a worker that dies then reads as EOF here, not a hang
    try:
        for _ in range(rounds):
            for n, (conn, _) in workers.items():
                conn.send(True)
                try:
                    timed = conn.recv()
                except EOFError:
                    sys.exit(f"bench: error: the {n}-thread latency worker died (its traceback is above)")
                try:
                    timed |= {k: time_cpp(*args, threads=n, repeats=repeats) for k, args in cpp.items()}
                except RuntimeError as exc:  # someone else's work in progress: say so, go on without it
                    print(f"C++ runner failed, its figures are null: {exc}", file=sys.stderr)
                    cpp = {}
                for name, by_batch in timed.items():
                    for key, t in by_batch.items():
                        runs[name, n, key].append(t)
    finally:
        for conn, process in workers.values():
            with suppress(OSError):  # a worker that died has said why on stderr already
                conn.send(False)
            process.join()  # which also counts its CPU time as this run's own (cpu_seconds)
    out: dict = {}
    for (name, n, key), ts in runs.items():
        if name in VARIANTS or name in cpp or name.startswith(ORT_FILES):
            out.setdefault(name, {}).setdefault(f"threads_{n}", {})[key] = {
                stat: round(float(np.median([t[stat] for t in ts])), 4) for stat in ("median_ms", "p90_ms")}
    return out


def load_worker(conn, root: str, threads: int, repeats: int) -> None:
    """Times LOADED at batch 1 and 64 on `threads` threads, p50 and p99, once per request."""
    torch.set_num_threads(threads)
    silence_torch_deprecations()
    loaders, x, _ = load_variants(Workspace(Path(root)))
    while conn.recv():
        conn.send({k: time_calls(loaders[k], x, BATCH_SIZES, repeats, percentiles=LOAD_STATS) for k in LOADED})


class Competitor:
    """`processes` busy loops (COMPETITOR) while the block runs: the CPU load a shared host has."""

    def __init__(self, processes: int) -> None:
        self.processes, self.running = processes, []

    def __enter__(self) -> Competitor:
        self.running = [subprocess.Popen(COMPETITOR) for _ in range(self.processes)]
        time.sleep(0.2)  # on the run queue before the first timed call
        return self

    def __exit__(self, *_) -> None:
        for process in self.running:  # ours, by PID
            process.kill()
            process.wait()
        self.running = []


def load_rounds(root: Path, threads: list[int], rounds: int, repeats: int, competitors: int) -> dict:
    """{policy: {"quiet"|"load": {variant: {"threads_N": {"batch_B": {"p50_ms", "p99_ms"}}}}}}: one
    worker process per wait policy (its environment set before it starts, as libgomp needs) and
    thread count; each round times every worker quiet, then every worker beside `competitors` busy
    loops. A figure is the median over rounds."""
    spawn, workers, runs = multiprocessing.get_context("spawn"), {}, defaultdict(list)
    saved = dict(os.environ)
    try:
        for policy, env in WAIT_POLICIES.items():
            os.environ.clear()
            os.environ.update({k: v for k, v in saved.items() if k not in SERVING_ENV} | env)
            for n in threads:
                conn, child = spawn.Pipe()
                process = spawn.Process(target=load_worker, args=(child, str(root), n, repeats), daemon=True)
                process.start()
                child.close()
                workers[policy, n] = conn, process
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        for _ in range(rounds):
            for phase in ("quiet", "load"):
                with Competitor(competitors if phase == "load" else 0):
                    for (policy, n), (conn, _) in workers.items():
                        conn.send(True)
                        try:
                            timed = conn.recv()
                        except EOFError:
                            sys.exit(f"bench: error: the {policy} {n}-thread load worker died (its traceback is above)")
                        for name, by_batch in timed.items():
                            for key, t in by_batch.items():
                                runs[policy, phase, name, n, key].append(t)
    finally:
        for conn, process in workers.values():
            with suppress(OSError):
                conn.send(False)
            process.join()
    out: dict = {}
    for (policy, phase, name, n, key), ts in runs.items():
        out.setdefault(policy, {}).setdefault(phase, {}).setdefault(name, {}).setdefault(f"threads_{n}", {})[key] = {
            stat: round(float(np.median([t[stat] for t in ts])), 4) for stat in LOAD_STATS}
    return out


def served(timed: dict, threads: list[int]) -> dict:
    """The passive policy's figures as a deployment serves them: with N threads available, each
    batch size on serving_threads(batch, N) threads (measured at that count)."""
    return {phase: {name: {f"threads_{n}": {f"batch_{b}": by_n[f"threads_{serving_threads(b, n)}"][f"batch_{b}"]
                                            for b in BATCH_SIZES} for n in threads}
                    for name, by_n in variants.items()} for phase, variants in timed["passive"].items()}


def load_figures(timed: dict, threads: list[int]) -> dict:
    """The two under-load targets on the deployed int8 paths as served, worst case, and where."""
    serve = served(timed, threads)
    p50, p99 = {b: [] for b in BATCH_SIZES}, []
    for name in LOADED:
        if name == BASELINE:
            continue
        for n in threads:
            for b in BATCH_SIZES:
                quiet, load = (serve[ph][name][f"threads_{n}"][f"batch_{b}"] for ph in ("quiet", "load"))
                one = serve["load"][name]["threads_1"][f"batch_{b}"] if 1 in threads else load
                p50[b].append((load["p50_ms"] / quiet["p50_ms"], f"{name} {n}t b{b}"))
                p99.append((load["p99_ms"] / one["p99_ms"], f"{name} {n}t b{b}"))
    # Threads as asked (no per-batch cap), passive waits: what the thread cap at batch 1 adds.
    passive = timed["passive"]["load"]
    as_asked = max((passive[name][f"threads_{n}"][f"batch_{b}"]["p99_ms"] / passive[name]["threads_1"][f"batch_{b}"]["p99_ms"],
                    f"{name} {n}t b{b}") for name in LOADED if name != BASELINE for n in threads for b in BATCH_SIZES
                   if 1 in threads)
    r99, at99 = max(p99)
    return {"served": serve, **{f"load_p50_vs_quiet_bs{b}": round(max(p50[b])[0], 3) for b in BATCH_SIZES},
            **{f"load_p50_vs_quiet_bs{b}_at": max(p50[b])[1] for b in BATCH_SIZES},
            "load_p99_vs_1thread": round(r99, 3), "load_p99_vs_1thread_at": at99,
            "passive_as_asked_p99_vs_1thread": round(as_asked[0], 3), "passive_as_asked_p99_vs_1thread_at": as_asked[1]}


def ort_comparison(workspace: Workspace, params_path: Path, work: Path, x: torch.Tensor, y: np.ndarray) -> dict:
    """bench/ort_static.py's file built into `work`; both files' test accuracy and paths."""
    import onnx

    from bench import ort_static

    ours = VARIANTS["int8_onnx"].path(workspace)
    static = ort_static.build(VARIANTS["fp32_onnx"].path(workspace), work / "ort_static.onnx",
                              ort_static.calibration_samples(workspace, params_path))
    files = {"ours": str(ours), "static": str(static)}
    correct, padding_changed = {}, {}
    for name, path in files.items():
        model = onnx.load(path)
        plain = predict_logits(OnnxModel(ort_static.session(model, 2)), x).argmax(1).numpy()
        padded = predict_logits(OnnxModel(ort_static.session(ort_static.pad_first_conv(model), 2)), x).argmax(1).numpy()
        correct[name], padding_changed[name] = int((plain == y).sum()), int((plain != padded).sum())
    return {"files": files, "accuracy": {k: round(c / len(y), 6) for k, c in correct.items()},
            "accuracy_vs_static_pp": round(100 * (correct["ours"] - correct["static"]) / len(y), 4),
            # Test predictions the padded first convolution changes, per file (0: exact).
            "padding_changed_predictions": padding_changed, "static_size_bytes": static.stat().st_size,
            "calibration_samples": len(ort_static.calibration_samples(workspace, params_path)), "test_samples": len(y)}


def ort_speed(latency: dict, threads: list[int]) -> dict:
    """Per thread count and batch size: each file at its fastest session variant, and the ratio
    quantize_static's / ours (> 1: ours is faster)."""
    cells, ratios = {}, []
    for n in threads:
        for b in BATCH_SIZES:
            best = {}
            for name in ORT_FILES:
                timed = {k[len(name) + 1:]: v[f"threads_{n}"][f"batch_{b}"]["median_ms"]
                         for k, v in latency.items() if k.startswith(name + "_")}
                option = min(timed, key=timed.get)
                best[name] = {"options": option, "median_ms": timed[option], "all": timed}
            ratio = best["static"]["median_ms"] / best["ours"]["median_ms"]
            cells[f"threads_{n}_batch_{b}"] = {**best, "ratio": round(ratio, 3)}
            ratios.append(ratio)
    return {"cells": cells, "min_ratio": round(min(ratios), 3)}


def train_overhead(workspace: Workspace, params_path: Path, rounds: int = 5) -> dict:
    """One epoch of tasks.training.fit.fit as the train stage runs it (TensorBoard writer, progress bar,
    deterministic mode, per-epoch validation, history, best-state copy) against a bare loop doing
    the same training *and* the same validation pass: fit validates every epoch, and leaving that
    out of the bare loop would book validation as pipeline overhead. ABBA order after a warm-up."""
    p = load_params(params_path).train
    meta = read_prepared_meta(workspace.prepared)
    train, val = load_split(workspace.prepared, "train"), load_split(workspace.prepared, "val")
    config = model_config(meta.layout, meta.input_shape, len(meta.class_names), p.model)
    one_epoch = FitConfig("bench", 1, p.batch_size, p.augment_shift, p.label_smoothing)

    def setup() -> TrainingState:  # the train stage's seeds, init, optimizer and scheduler, afresh
        generator = seed_everything(p.seed, p.threads)
        model = build_model(config)
        optimizer = make_optimizer(p, model)
        return TrainingState(model, optimizer, make_scheduler(p, optimizer, -(-len(train.y) // p.batch_size)),
                             generator)

    def pipeline() -> float:
        training = setup()
        with tempfile.TemporaryDirectory() as logdir, redirect_stdout(io.StringIO()):
            start = time.perf_counter()  # the writer's setup and final flush are the pipeline's too
            with SummaryWriter(logdir) as writer:
                fit(training, train, val, one_epoch, writer)
            return time.perf_counter() - start

    def bare() -> float:
        training = setup()
        model, optimizer, scheduler, generator = (training.model, training.optimizer, training.scheduler,
                                                  training.generator)
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(train.y), generator=generator)
        for i in range(0, len(train.y), p.batch_size):
            batch = order[i : i + p.batch_size]
            logits = model(random_shift(train.x[batch], p.augment_shift, generator))
            loss = F.cross_entropy(logits, train.y[batch], label_smoothing=p.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        model.eval()
        val_logits = predict_logits(model, val.x)  # the validation figures fit computes each epoch
        (val_logits.argmax(1) == val.y).float().mean().item(), F.cross_entropy(val_logits, val.y).item()
        return time.perf_counter() - start

    bare()  # warm-up: first-call costs (allocator, oneDNN kernels) belong to neither side
    seconds = defaultdict(list)
    for r in range(rounds):
        for name, run in [("bare", bare), ("fit", pipeline)][:: 1 if r % 2 == 0 else -1]:
            seconds[name].append(run())
    fit_s, bare_s = (float(np.median(seconds[k])) for k in ("fit", "bare"))
    return {"fit_epoch_s": round(fit_s, 3), "bare_epoch_s": round(bare_s, 3), "ratio": round(fit_s / bare_s, 3),
            "runs": rounds}


def noop_repro(root: Path, runs: int = 3) -> tuple[float | None, str]:
    """Median wall time of `dvc repro` with nothing stale, run as a user types it."""
    if not (root / "dvc.yaml").exists():
        return None, "not a DVC project"
    bin_dir = Path(sys.executable).parent
    dvc = [str(bin_dir / "dvc")] if (bin_dir / "dvc").exists() else [sys.executable, "-m", "dvc"]
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    # Only time a real no-op: on a stale workspace `dvc repro` would re-run stages and rewrite outputs.
    status = subprocess.run([*dvc, "status", "-q"], cwd=root, env=env, capture_output=True, text=True)
    if status.returncode != 0:
        return None, f"not measured: `dvc status` says the pipeline is not up to date {status.stderr[-300:]}"
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([*dvc, "repro"], cwd=root, env=env, capture_output=True, text=True)
        seconds.append(time.perf_counter() - start)
        if done.returncode != 0 or "Running stage" in done.stdout:
            return None, f"not measured: `dvc repro` was not a no-op: {(done.stdout + done.stderr)[-500:]}"
    return round(float(np.median(seconds)), 3), f"median of {runs} runs"


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU-seconds of the whole machine, of this process and its waited-for children)."""
    jiffies = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = (sum(jiffies) - jiffies[3] - jiffies[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
    return busy, sum(os.times()[:4])


def benchmark(root: Path, out: Path, runner: Path, threads: list[int], quick: bool, load: bool = True) -> dict:
    workspace, start, (busy0, own0) = Workspace(root), time.perf_counter(), cpu_seconds()
    loaders, x, y = load_variants(workspace)
    files = {name: v.path(workspace) for name, v in VARIANTS.items()}
    correct = {k: int((predict_logits(load(), x).argmax(1).numpy() == y).sum()) for k, load in loaders.items()}
    rounds, repeats = (1, 5) if quick else (7, 30)
    load_rounds_n, load_repeats = (1, 20) if quick else (3, 100)
    params_path = root / "params.yaml" if (root / "params.yaml").is_file() else REPO / "params.yaml"
    with tempfile.TemporaryDirectory() as work:
        ort = ort_comparison(workspace, params_path, Path(work), x, y)
        np.save(inputs := Path(work) / "inputs.npy", x.numpy())
        logits = {k: Path(work) / f"{k}.npy" for k in CPP}
        cpp = {k: (runner, files[f], inputs, logits[k]) for k, (f, _) in CPP.items()} if runner.is_file() else {}
        if not cpp:
            print(f"C++ runner not built: run `make cpp` ({runner} is missing); its figures are null")
        latency = time_rounds(root, cpp, threads, rounds, repeats, ort["files"])
        ort_latency = {k: latency.pop(k) for k in list(latency) if k.startswith(ORT_FILES)}
        correct |= {k: int((np.load(f).argmax(1) == y).sum()) for k, f in logits.items() if f.exists()}
    # Under load: os.cpu_count() busy loops, as many as the cores (the measurement had two).
    competitors = os.cpu_count() or 1
    loaded = load_rounds(root, threads, load_rounds_n, load_repeats, competitors) if load else None
    under_load = load_figures(loaded, threads) if loaded else {}
    ort |= ort_speed(ort_latency, threads)
    ort["latency_ms"] = ort_latency
    ort.pop("files")
    overhead = None if quick else train_overhead(workspace, root / "params.yaml")
    repro_s, repro_note = noop_repro(root)
    # Other jobs skew timings, multi-threaded ones most (threads wait on descheduled peers): say how much.
    busy, own = cpu_seconds()
    others = max(0.0, (busy - busy0) - (own - own0)) / ((time.perf_counter() - start) * os.cpu_count())

    def entry(key: str, label: str, file: Path) -> dict:
        return {"label": label, "file": str(file.relative_to(root)), "size_bytes": file.stat().st_size,
                "accuracy": round(correct[key] / len(y), 6) if key in correct else None, "latency_ms": latency[key]}

    variants = {k: entry(k, v.label, files[k]) for k, v in VARIANTS.items()}
    cpp_variants = {k: entry(k, label, files[f]) for k, (f, label) in CPP.items()} if CPP.keys() <= latency.keys() else None
    at = f"threads_{max(threads)}"  # ratios at the most threads benchmarked: 2 by default, as evaluate's
    speedup = {b: latency[BASELINE][at][f"batch_{b}"]["median_ms"] / latency[DEPLOYED][at][f"batch_{b}"]["median_ms"]
               for b in BATCH_SIZES}
    figures = {
        "int8_vs_fp32ts_bs1": round(speedup[1], 3), "int8_vs_fp32ts_bs64": round(speedup[64], 3),
        "size_ratio": round(variants[BASELINE]["size_bytes"] / variants[DEPLOYED]["size_bytes"], 3),
        # From counts, as evaluate does, so one test image is exactly 100/n pp.
        "accuracy_drop_pp": round(100 * (correct[REFERENCE] - correct[DEPLOYED]) / len(y), 4),
        "train_overhead": overhead and overhead["ratio"], "noop_repro_s": repro_s,
        "onnx_int8_vs_ort_static": ort["min_ratio"], "onnx_accuracy_vs_ort_static_pp": ort["accuracy_vs_static_pp"],
        "load_p50_vs_quiet_bs1": under_load.get("load_p50_vs_quiet_bs1"),
        "load_p50_vs_quiet_bs64": under_load.get("load_p50_vs_quiet_bs64"),
        "load_p99_vs_1thread": under_load.get("load_p99_vs_1thread"),
    }
    for prefix, (int8, fp32) in EDGE.items():
        figures[f"{prefix}_size_ratio"] = round(variants[fp32]["size_bytes"] / variants[int8]["size_bytes"], 3)
        figures[f"{prefix}_accuracy_drop_pp"] = round(100 * (correct[REFERENCE] - correct[int8]) / len(y), 4)
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
        "torch_version": torch.__version__, "threads": threads, "ratio_threads": max(threads),
        "other_jobs_cpu_share": round(others, 3), "quick": quick, "rounds": rounds, "repeats_per_round": repeats,
        "test_samples": len(y), **figures,
        "targets": {k: {"target": f"{'>=' if kind == 'min' else '<='} {t:g}", "value": figures[k],
                        "passed": None if figures[k] is None else (figures[k] >= t if kind == "min" else figures[k] <= t)}
                    for k, (t, kind) in TARGETS.items()},
        "variants": variants, "cpp": cpp_variants, "cpp_runner": str(runner) if cpp_variants else None,
        "train_overhead_detail": overhead, "noop_repro_note": repro_note,
        "ort_static": ort,
        "under_load": loaded and {"competitor": f"{competitors} busy-loop Python processes (`{COMPETITOR[-1]}`), "
                                                "started and killed by PID around each round's loaded pass",
                                  "competitors": competitors, "rounds": load_rounds_n, "repeats_per_round": load_repeats,
                                  "serving_env": SERVING_ENV, "by_policy": loaded, **under_load},
    }
    write_json(out / "results.json", results)
    plot(out / "results.png", {**variants, **(cpp_variants or {})}, max(threads))
    return results


def plot(path: Path, variants: dict, threads: int) -> None:
    # Python variants under the keys evaluate's tradeoff figure uses, so that they keep its colours.
    points = [{"name": k if k in VARIANTS else v["label"], "size_bytes": v["size_bytes"],
               "latency_ms": v["latency_ms"][f"threads_{threads}"]["batch_1"]["median_ms"],
               # No logits from the runner: it ran the same file, so Python's accuracy of it stands in.
               "accuracy": variants[CPP[k][0]]["accuracy"] if v["accuracy"] is None else v["accuracy"]}
              for k, v in variants.items()]
    fig = tradeoff_figure(points, 1)
    ax = fig.axes[0]
    for marker, point in zip([*ax.collections, *ax.get_legend().legend_handles], [*points, *points]):
        if point["name"] not in VARIANTS:  # figures.COLORS has colours for the Python variants only
            marker.set_facecolor("tab:gray" if "fp32" in point["name"] else "tab:brown")
    ax.set_title("")  # too long for the axes beside the legend: a figure title instead
    fig.suptitle(f"Accuracy vs latency at batch 1, {threads} threads (marker area ∝ file size)")
    write_with(path, lambda f: fig.savefig(f, format="png", dpi=110))


# What each target compares, as docs/benchmarks.md says it.
TARGET_NAMES = {
    "int8_vs_fp32ts_bs1": "int8 QAT vs optimized fp32 TorchScript, batch 1",
    "int8_vs_fp32ts_bs64": "same, batch 64",
    "size_ratio": "`fp32.pt` / `int8.pt`",
    "accuracy_drop_pp": "fp32 → int8 QAT",
    "train_overhead": "one epoch of the pipeline's `fit` (TensorBoard, progress bar, deterministic mode, "
                      "history) vs a bare loop doing the same training and validation",
    "noop_repro_s": "a no-op `dvc repro`",
    "onnx_int8_vs_ort_static": "ONNX Runtime: `quantize_static`'s int8 / our `int8.onnx` latency, slowest of "
                               "batch 1 and 64 at 1 and 2 threads, each at its best session options",
    "onnx_accuracy_vs_ort_static_pp": "test accuracy, our `int8.onnx` − `quantize_static`'s",
    "load_p50_vs_quiet_bs1": "deployed int8 paths as served, p50 beside a competing load / quiet, worst case, batch 1",
    "load_p50_vs_quiet_bs64": "same, batch 64 (CPU-bound for longer than a time slice: the fair share is at most half a core)",
    "load_p99_vs_1thread": "same, p99 at N threads / p99 at 1 thread, worst case",
    "onnx_size_ratio": "`fp32.onnx` / `int8.onnx`",
    "onnx_accuracy_drop_pp": "fp32 → int8 ONNX",
    "pte_size_ratio": "`fp32.pt2` / `int8.pte`",
    "pte_accuracy_drop_pp": "fp32 → int8 ExecuTorch",
}


SYMBOLS = {">=": "≥", "<=": "≤"}


def _unit(key: str, value: float) -> str:
    return f"{value:.1f} pp" if key.endswith("_pp") else f"{value:.2f} s" if key.endswith("_s") else f"{value:g}x"


def markdown(r: dict) -> str:
    """docs/benchmarks.md's latency table of bench/results.json (bench/tables.py)."""
    lines = ["| variant | threads | accuracy | size | batch 1 median / p90 | batch 64 median / p90 |",
             "|---|---|---|---|---|---|"]
    for n in sorted(r["threads"], reverse=True):
        for name, v in {**r["variants"], **(r["cpp"] or {})}.items():
            t = v["latency_ms"][f"threads_{n}"]
            cells = [v["label"], str(n), "-" if v["accuracy"] is None else f"{v['accuracy']:.2%}",
                     f"{v['size_bytes'] / 1024:,.0f} KiB",
                     *(f"{format_ms(t[f'batch_{b}']['median_ms'], '')} / {format_ms(t[f'batch_{b}']['p90_ms'])}"
                       for b in BATCH_SIZES)]
            if name == DEPLOYED and n == max(r["threads"]):
                cells = [f"**{c}**" for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{r['date'][:10]}, {r['cpu']}, torch {r['torch_version']}, {r['test_samples']} test images, "
              f"{r['rounds']} rounds of {r['repeats_per_round']} calls, other jobs using "
              f"{r['other_jobs_cpu_share']:.0%} of the CPU. fp32 TorchScript is timed after "
              "`torch.jit.optimize_for_inference`; the C++ runner runs `fp32.pt` as saved (no "
              "`optimize_for_inference`)." + ("" if r["cpp"] else " No C++ figures: the runner was not built.")]
    return "\n".join(lines)


def ort_rows(r: dict) -> tuple[list[str], list[list[str]]]:
    """The quantize_static comparison: per thread count and batch size, each file at its best."""
    head = ["threads", "batch", "our int8.onnx: median, best options", "quantize_static's: median, best options",
            "static / ours"]
    rows = [[cell.split("_")[1], cell.split("_")[3],
             *(f"{format_ms(c[k]['median_ms'])} ({c[k]['options'].replace('_pad', ', padded')})" for k in ORT_FILES),
             f"{c['ratio']:.2f}x"] for cell, c in r["ort_static"]["cells"].items()]
    return head, rows


def load_rows(r: dict) -> tuple[list[str], list[list[str]]]:
    """p50 / p99 quiet and beside the competing load: as asked with spinning waits (libgomp's and
    ONNX Runtime's default), and as served (passive waits, threads per batch size)."""
    u = r["under_load"]
    head = ["variant", "threads", "batch", "spinning: quiet", "spinning: loaded", "served: quiet", "served: loaded"]
    rows = []
    for name in LOADED:
        for n in r["threads"]:
            for b in BATCH_SIZES:
                def cell(t: dict) -> str:
                    t = t[name][f"threads_{n}"][f"batch_{b}"]
                    return f"{format_ms(t['p50_ms'], '')} / {format_ms(t['p99_ms'])}"
                spin = u["by_policy"]["spin"]
                rows.append([r["variants"][name]["label"], str(n), str(b), cell(spin["quiet"]), cell(spin["load"]),
                             cell(u["served"]["quiet"]), cell(u["served"]["load"])])
    return head, rows


def _markdown(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(row) + " |" for row in rows)]


def markdown_ort(r: dict) -> str:
    """docs/benchmarks.md's quantize_static comparison table (bench/tables.py)."""
    o = r["ort_static"]
    return "\n".join([*_markdown(*ort_rows(r)), "", f"Test accuracy: our `int8.onnx` {o['accuracy']['ours']:.2%}, "
                      f"`quantize_static`'s {o['accuracy']['static']:.2%} (calibrated on {o['calibration_samples']} "
                      "training samples, QDQ, per-channel int8 weights, uint8 activations). Options: graph "
                      "optimization `extended` or `all` (adds the NHWC transformer); `padded`: first convolution's "
                      "input padded to 4 channels with zero weights, which changes "
                      + ", ".join(f"{n} of {o['test_samples']} test predictions of {'ours' if k == 'ours' else 'quantize_static' + chr(39) + 's'}"
                                  for k, n in o["padding_changed_predictions"].items()) + "."])


def markdown_load(r: dict) -> str:
    """docs/benchmarks.md's under-load table (bench/tables.py)."""
    u = r["under_load"]
    if not u:
        return "Not measured (`--no-load`)."
    return "\n".join([*_markdown(*load_rows(r)), "", f"p50 / p99 in ms, medians over {u['rounds']} rounds of "
                      f"{u['repeats_per_round']} calls. Load: {u['competitor']}. Served: "
                      f"{', '.join(f'{k}={v}' for k, v in u['serving_env'].items())}, ONNX Runtime without "
                      "spinning, and a batch of one on one thread (tasks/serving.py)."])


def markdown_targets(r: dict) -> str:
    """docs/benchmarks.md's targets table of bench/results.json (bench/tables.py)."""
    lines = ["| figure | measured | target |", "|---|---|---|"]
    for key, t in r["targets"].items():
        what = TARGET_NAMES.get(key, "")
        if key in ("int8_vs_fp32ts_bs1", "int8_vs_fp32ts_bs64"):
            what += f", {r['ratio_threads']} threads"
        if t["value"] is None:
            measured = "not measured"
        else:
            measured = _unit(key, t["value"])
            if key == "train_overhead" and (d := r.get("train_overhead_detail")):
                measured += f" ({d['fit_epoch_s']:.2f} s vs {d['bare_epoch_s']:.2f} s, medians of {d['runs']})"
            if where := (r.get("under_load") or {}).get(f"{key}_at"):
                measured += f" ({where})"
            if not t["passed"]:
                measured = f"**{measured}: not met**"
        op, limit = t["target"].split()
        unit = " pp" if key.endswith("_pp") else " s" if key.endswith("_s") else "x"
        target = f"{SYMBOLS.get(op, op)} {float(limit):g}{unit}"
        lines.append(f"| `{key}`: {what} | {measured} | {target} |")
    if r.get("noop_repro_note"):
        lines += ["", f"`noop_repro_s`: {r['noop_repro_note']}."]
    return "\n".join(lines)


def print_table(r: dict) -> None:
    console = Console(width=max(Console().width, 100))  # a pipe's 80 columns would wrap every row
    stats = [(f"batch_{b}", s) for b in BATCH_SIZES for s in ("median_ms", "p90_ms")]
    table = Table("variant", *(Column(h, justify="right") for h in ["threads", "accuracy", "size", *(
                  f"b{b.split('_')[1]} {s.split('_')[0]}" for b, s in stats)]), box=box.SIMPLE_HEAD,
                  title=f"{r['date']}, {r['cpu']}, torch {r['torch_version']}, {r['test_samples']} test images, ms")
    for n in r["threads"]:
        for v in {**r["variants"], **(r["cpp"] or {})}.values():
            t = v["latency_ms"][f"threads_{n}"]
            table.add_row(v["label"], str(n), "-" if v["accuracy"] is None else f"{v['accuracy']:.2%}",
                          f"{v['size_bytes'] / 1024:.0f} KiB", *(f"{t[b][s]:.3f}" for b, s in stats))
        table.add_section()
    console.print(table, "fp32 TorchScript: frozen + torch.jit.optimize_for_inference, the best fp32. "
                  + ("C++ runs fp32.pt as saved (no optimize_for_inference)." if r["cpp"] else
                     "No C++ figures: runner not built (`make cpp`) or failed."))
    targets = Table("figure", "value", "target", "result", title="targets", box=box.SIMPLE_HEAD,
                    caption=f"speedups: fp32 TS + optimize / int8 QAT at "
                            f"{r['ratio_threads']} threads; onnx/pte size ratios against fp32.onnx/fp32.pt2")
    for k, t in r["targets"].items():
        result = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "not measured"}[t["passed"]]
        targets.add_row(k, "-" if t["value"] is None else f"{t['value']:g}", t["target"], result)
    console.print(targets)
    for title, (head, rows) in [("ONNX Runtime: our int8.onnx against quantize_static's", ort_rows(r)),
                                *([("p50 / p99 under load, ms", load_rows(r))] if r["under_load"] else [])]:
        extra = Table(*head, title=title, box=box.SIMPLE_HEAD)
        for row in rows:
            extra.add_row(*row)
        console.print(extra)
    if d := r["train_overhead_detail"]:
        console.print(f"one epoch: fit {d['fit_epoch_s']} s, bare loop {d['bare_epoch_s']} s (medians of {d['runs']})")
    busy = r["other_jobs_cpu_share"] > 0.1
    console.print(f"no-op dvc repro: {r['noop_repro_note']}\nother jobs used {r['other_jobs_cpu_share']:.0%} of "
                  "the CPU time during the run" + (": latency is unreliable, re-run on a quiet machine" if busy else ""),
                  style="yellow" if busy else None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO, help="project root with the pipeline's outputs")
    parser.add_argument("--out", type=Path, help="folder for results.json and results.png (default ROOT/bench)")
    parser.add_argument("--runner", type=Path, help="C++ runner (default ROOT/deploy/cpp/build/qatflow_runner)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="few repeats, no training overhead (tests)")
    parser.add_argument("--no-load", dest="load", action="store_false",
                        help="skip the latency under a competing CPU load")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    silence_torch_deprecations()
    try:
        results = benchmark(root, args.out or root / "bench", args.runner or root / "deploy/cpp/build/qatflow_runner",
                            [int(n) for n in args.threads.split(",")], args.quick, args.load)
    except QatflowError as exc:  # a missing model or params file: one line, not a traceback
        sys.exit(f"bench: error: {exc}")
    print_table(results)


if __name__ == "__main__":
    main()
