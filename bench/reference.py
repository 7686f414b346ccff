"""The reference run's table in README.md, from the metrics the pipeline committed (bench/tables.py).

metrics/evaluate.json and metrics/latency.json are evaluate's; the gate comes from
metrics/export.json and the training summary from metrics/train.json. The formatting lives here,
not in tasks/, because every stage lists its code as a DVC dependency: a change to a table's
layout must not make the reference run stale.
"""

from __future__ import annotations

from tasks.variants import DEPLOYED, VARIANTS

RUNTIME_NAMES = {"pytorch": "PyTorch", "torchscript": "TorchScript", "torch.export": "torch.export",
                 "onnxruntime": "ONNX Runtime", "executorch": "ExecuTorch"}


def format_ms(value: float, unit: str = " ms") -> str:
    """A latency for tables: three significant digits, trailing zeros kept (0.0950, 18.0, 205 ms)."""
    return (f"{value:,.0f}" if value >= 100 else f"{value:#.3g}") + unit


def markdown(metrics: dict, latency: dict, gate: dict | None = None, train: dict | None = None) -> str:
    """Per variant: accuracy, macro-F1, file size and the median latency per batch size, then a caption."""
    batches = list(latency[DEPLOYED])
    lines = ["| variant (`tasks/variants.py`) | runtime | test accuracy | macro-F1 | file size | "
             + " | ".join(f"latency {b.replace('_', ' ')}" for b in batches) + " |",
             "|---|---|---|---|---|" + "---|" * len(batches)]
    for name, variant in VARIANTS.items():
        m = metrics[name]
        size = f"{m['size_bytes'] / 1024:,.0f} KiB" + (" (state dict)" if variant.runtime == "pytorch" else "")
        cells = [f"{variant.label} (`{variant.file}`)", RUNTIME_NAMES.get(variant.runtime, variant.runtime),
                 f"{m['accuracy']:.2%}", f"{m['macro_f1']:.4f}", size,
                 *(format_ms(latency[name][b]["median_ms"]) for b in batches)]
        if name == DEPLOYED:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    n = metrics["test_samples"]
    speedups = latency["int8_speedup_vs_fp32_ts"]  # evaluate: BASELINE median / DEPLOYED median
    faster = " and ".join(f"{speedups[b]:g}x at {b.replace('_', ' ')}" for b in batches)
    limit = f" (gate ≤ {gate['max_accuracy_drop']:g} pp)" if gate else ""
    caption = (f"{latency['cpu']}, torch {latency['torch_version']}, {latency['threads']} threads; {n} test "
               f"images, so one image is {100 / n:.2g} pp. Latency: the median of {latency['repeats']} calls per "
               f"batch size, each on a freshly loaded model. int8 QAT against fp32: accuracy drop "
               f"{metrics['accuracy_drop']:g} pp{limit}, file {metrics['size_ratio']:g}x smaller, and faster than "
               f"the optimized fp32 TorchScript model {faster}.")
    if train:
        caption += (f" Training stopped after {train['epochs_run']} epochs (best epoch {train['best_epoch']}, "
                    f"validation accuracy {train['val_accuracy']:.1%}).")
    return "\n".join([*lines, "", caption])
