"""Matplotlib figures for the evaluate stage (and the confusion matrix train logs to TensorBoard).

Every function builds a `matplotlib.figure.Figure` directly and returns it: no pyplot state (no GUI
backend, no figure registry to leak) and no file I/O; the caller decides where the bytes go. Given
the same inputs the rendering is the same, which is what keeps the saved PNGs byte-stable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from tasks.variants import VARIANTS

# One colour per variant, shared by every figure so fp32 / int8 read the same everywhere.
COLORS = {name: variant.color for name, variant in VARIANTS.items()}


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def confusion_figure(matrix: np.ndarray, class_names: list[str], title: str) -> Figure:
    """Counts matrix (rows: actual, columns: predicted) with each count written in its cell."""
    k = len(class_names)
    side = min(12.0, max(4.0, 0.5 * k + 2))
    fig = _figure(side + 1, side)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="samples")
    ticks = np.arange(k)
    ax.set_xticks(ticks, class_names, rotation=45 if max(map(len, class_names)) > 3 else 0)
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("Actual")
    ax.set_title(title)
    if k <= 25:  # beyond that the numbers no longer fit in the cells
        dark = matrix > matrix.max() / 2
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=9 if k <= 12 else 6,
                    color="white" if dark[i, j] else "black")
    return fig


def training_curves_figure(train: Mapping[str, np.ndarray], qat: Mapping[str, np.ndarray]) -> Figure:
    """Loss and accuracy per epoch, the QAT epochs continuing where training stopped."""
    offset = train["epoch"].max() - qat["epoch"].min() + 1
    epochs = np.concatenate([train["epoch"], qat["epoch"] + offset])
    boundary = train["epoch"].max() + 0.5
    fig = _figure(11, 4.2)
    fig.suptitle("Training curves: float training, then quantization-aware fine-tuning")
    for ax, metric, label in zip(fig.subplots(1, 2), ("loss", "accuracy"), ("Loss", "Accuracy")):
        scale = 100.0 if metric == "accuracy" else 1.0
        for split, style in (("train", "-"), ("val", "--")):
            values = np.concatenate([train[f"{split}_{metric}"], qat[f"{split}_{metric}"]])
            ax.plot(epochs, values * scale, style, marker=".", label=split)
        ax.axvspan(boundary, epochs.max() + 0.5, color="tab:red", alpha=0.08, lw=0)
        ax.axvline(boundary, color="gray", ls=":", lw=1)
        ax.text(boundary, 0.98, " QAT", transform=ax.get_xaxis_transform(), va="top", color="tab:red")
        ax.set_xlabel("Epoch")
        ax.set_ylabel(label + (" (%)" if scale != 1 else ""))
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def per_class_figure(class_names: list[str], accuracy: Mapping[str, np.ndarray]) -> Figure:
    """Grouped bars of per-class accuracy (recall), one bar per variant and class."""
    k, n = len(class_names), len(accuracy)
    fig = _figure(max(6.0, 0.6 * k * n / 2 + 2), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / n
    x = np.arange(k)
    for i, (name, values) in enumerate(accuracy.items()):
        ax.bar(x + (i - (n - 1) / 2) * width, values * 100, width, label=name, color=COLORS.get(name))
    # Per-class accuracies of a usable model sit near 100%: a zero-based axis would hide the gaps.
    low = min(float(v.min()) for v in accuracy.values())
    ax.set_ylim(max(0.0, np.floor(low * 10) * 10 - 10), 100.5)
    ax.set_xticks(x, class_names)
    ax.yaxis.set_major_formatter(PercentFormatter())
    ax.set_xlabel("Class")
    ax.set_ylabel("Accuracy (recall) on test")
    ax.set_title("Per-class test accuracy, fp32 vs int8")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def tradeoff_figure(points: Sequence[Mapping], batch_size: int) -> Figure:
    """Accuracy vs latency at one batch size; marker area proportional to file size.

    Each point: {"name", "accuracy" (fraction), "latency_ms", "size_bytes"}.
    """
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    largest = max(p["size_bytes"] for p in points)
    for p in points:
        ax.scatter(p["latency_ms"], p["accuracy"] * 100, s=1500 * p["size_bytes"] / largest,
                   color=COLORS.get(p["name"]), alpha=0.6, edgecolors="black",
                   label=f"{p['name']}: {_size(p['size_bytes'])}, {p['latency_ms']:.3g} ms")
    # Named in a legend, not beside the markers: ptq and int8 often land on the same spot.
    legend = ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), title="variant: file, latency")
    for handle in legend.legend_handles:
        handle.set_sizes([80])
    ax.margins(0.25)
    ax.set_xlim(left=0)
    # Room for the largest marker above the best accuracy, but no ticks past 100%.
    low = min(p["accuracy"] for p in points) * 100
    ax.set_ylim(max(0.0, low - max(2.0, (100 - low) * 2)), 100.5)
    ax.yaxis.set_major_formatter(PercentFormatter())
    ax.set_xlabel(f"Latency at batch {batch_size}, median (ms)")
    ax.set_ylabel("Test accuracy")
    ax.set_title("Accuracy vs latency (marker area ∝ file size)")
    ax.grid(alpha=0.3)
    return fig


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.2f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 2**10:.1f} KiB"


def reliability_figure(bins: Mapping[str, Mapping[str, np.ndarray]], ece: Mapping[str, float],
                       n_bins: int) -> Figure:
    """Reliability diagram: accuracy against confidence per bin, and each bin's share of samples.

    bins[variant] has arrays "bin", "confidence", "accuracy", "count" for the non-empty bins.
    """
    fig = _figure(6, 6.4)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color="gray", ls=":", label="perfectly calibrated")
    width = 1 / n_bins / (len(bins) + 1)
    for i, (name, b) in enumerate(bins.items()):
        color = COLORS.get(name)
        top.plot(b["confidence"], b["accuracy"], marker="o", color=color,
                 label=f"{name} (ECE {ece[name] * 100:.2f}%)")
        left = b["bin"] / n_bins + (i + 0.5) * width
        bottom.bar(left, b["count"] / b["count"].sum(), width, align="edge", color=color, label=name)
    top.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="Accuracy", title="Reliability diagram (test set)")
    top.grid(alpha=0.3)
    top.legend(loc="best")  # under- or over-confident models leave different corners free
    bottom.set(xlabel="Confidence (max softmax probability)", ylabel="Share of samples")
    bottom.grid(axis="y", alpha=0.3)
    return fig


def misclassified_figure(samples: np.ndarray, titles: list[str], title: str, layout: str) -> Figure:
    """A grid of samples, each with its caption. `samples` is (N, *input_shape): images
    (N, C, H, W) with values in [0, 1] (C = 1 grey, C = 3 RGB), sequences (N, C, L) drawn as one
    line per channel, vectors (N, F) as one bar per feature. Signals and vectors share one value
    axis, so their amplitudes compare across panels."""
    if len(samples) == 0:
        fig = _figure(5, 2)
        fig.text(0.5, 0.5, "No misclassified test samples", ha="center", va="center", fontsize=14)
        fig.suptitle(title)
        return fig
    cols = min(5, len(samples))
    rows = -(-len(samples) // cols)
    fig = _figure(2.1 * cols, 2.3 * rows + 0.5)
    fig.suptitle(title)
    grid = fig.subplots(rows, cols, squeeze=False, sharey=layout != "images")
    for ax, sample, caption in zip(grid.flat, samples, titles):
        if layout == "images":
            image = sample[0] if sample.shape[0] == 1 else sample.transpose(1, 2, 0)
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_axis_off()
        elif layout == "sequences":
            for channel in sample:
                ax.plot(channel, lw=1)
        else:
            ax.bar(np.arange(len(sample)), sample, width=0.8, color="tab:blue")
            ax.axhline(0, color="gray", lw=0.5)
        if layout != "images":
            ax.set_xticks([])
            ax.tick_params(labelsize=7)
        ax.set_title(caption, fontsize=9)
    for ax in grid.flat[len(samples):]:
        ax.set_axis_off()
    return fig
