"""Running a model on many samples, and timing it: the one batched-inference helper and the one
latency timer that training, evaluate, predict and the benchmark share."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

BATCH_SIZE = 256
WARMUP_CALLS = 5  # TorchScript's profiling executor specializes the graph over the first calls

Model = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def predict_logits(model: Model, x: torch.Tensor, batch_size: int = BATCH_SIZE,
                   on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """The model's outputs for every sample of `x`, `batch_size` at a time. `on_batch(n)` is told
    how many samples each batch held (a progress bar)."""
    out = []
    for start in range(0, len(x), batch_size):
        out.append(model(x[start : start + batch_size]))
        if on_batch is not None:
            on_batch(len(out[-1]))
    return torch.cat(out)


def accuracy(model: Model, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy, rounded as metrics record it (6 digits). The caller sets eval mode: a
    converted PT2E program has no eval() of its own."""
    return round((predict_logits(model, x).argmax(1) == y).float().mean().item(), 6)


def probabilities(logits: torch.Tensor) -> np.ndarray:
    # float64: calibration bins and 6-digit reports should not move with float32 rounding.
    return torch.softmax(logits.double(), dim=1).numpy()


def time_calls(load: Callable[[], Model], x: torch.Tensor, batch_sizes: list[int], repeats: int,
               threads: Callable[[int], int] | None = None,
               percentiles: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """Median and p90 wall time of single calls, in ms, per batch size: {"batch_B": {...}}
    (`percentiles`: other statistics, name -> percentile). `threads(batch_size)`: the intra-op
    threads to load and run each batch size with (tasks/serving.py), else torch's now.

    `load` gives a fresh model for each batch size: TorchScript specializes its graph to the
    shapes of its first calls, and a module that ran batch 256 first stays about 2x slower at
    batch 1 however long it warms up (measured on int8.pt: 0.17 vs 0.09 ms).
    """
    result, before = {}, torch.get_num_threads()
    stats = percentiles or {"median_ms": 50, "p90_ms": 90}
    with torch.inference_mode():
        for batch_size in batch_sizes:
            if threads is not None:  # before loading: ONNX Runtime and ExecuTorch size their pools then
                torch.set_num_threads(threads(batch_size))
            model = load()
            batch = x[torch.arange(batch_size) % len(x)]  # the inputs repeated if there are fewer
            for _ in range(WARMUP_CALLS):
                model(batch)
            seconds = np.empty(repeats)
            for i in range(repeats):
                start = time.perf_counter()
                model(batch)
                seconds[i] = time.perf_counter() - start
            values = np.percentile(seconds * 1e3, list(stats.values()))
            result[f"batch_{batch_size}"] = {k: round(float(v), 4) for k, v in zip(stats, values)}
    torch.set_num_threads(before)
    return result
