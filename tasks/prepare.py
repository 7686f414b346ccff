"""Stage 1, prepare: load the source, split it stratified, standardize on the training split.

Writes data/prepared/{train,val,test}.npz (x float32 standardized, y int64; test also keeps x_raw,
the untouched source values, for the export parity check) and meta.json (class names, input shape,
normalization, split sizes).
"""

from __future__ import annotations

import numpy as np

from tasks.atomic import write_json, write_with
from tasks.cli import run_stage
from tasks.errors import DataError
from tasks.layout import Layout, project_layout
from tasks.params import DataParams, PrepareParams, Split, load_params
from tasks.sources import load_source, validate

SPLITS = ("train", "val", "test")


def _grouped_ranks(y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random order grouped by class, and each sample's rank within its class in that order."""
    order = rng.permutation(len(y))
    order = order[np.argsort(y[order], kind="stable")]
    counts = np.bincount(y)
    starts = np.cumsum(counts) - counts
    ranks = np.arange(len(y)) - np.repeat(starts, counts)
    return order, ranks


def stratified_subset(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of about `size` samples keeping each class's share (at least one per class)."""
    if size >= len(y):
        return np.arange(len(y))
    order, ranks = _grouped_ranks(y, np.random.default_rng(seed))
    quota = np.maximum(1, np.floor(np.bincount(y) * size / len(y))).astype(np.int64)
    return np.sort(order[ranks < quota[y[order]]])


def stratified_split(
    y: np.ndarray, split: Split, seed: int, class_names: list[str]
) -> dict[str, np.ndarray]:
    """Sorted index arrays per split; each class is divided in the split's proportions."""
    counts = np.bincount(y, minlength=len(class_names))
    n_test = np.round(counts * split.test).astype(np.int64)
    n_val = np.round(counts * split.val).astype(np.int64)
    n_train = counts - n_test - n_val
    for name, n in zip(SPLITS, (n_train, n_val, n_test)):
        short = np.flatnonzero((n < 1) & (counts > 0))
        if short.size:
            c = short[0]
            raise DataError(
                f"class {class_names[c]!r} has {counts[c]} samples: too few for a "
                f"{getattr(split, name):g} {name} fraction (each split needs at least one per class)"
            )
    order, ranks = _grouped_ranks(y, np.random.default_rng(seed))
    cls = y[order]
    which = np.where(ranks < n_test[cls], 2, np.where(ranks < n_test[cls] + n_val[cls], 1, 0))
    return {name: np.sort(order[which == i]) for i, name in enumerate(SPLITS)}


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (axis 1) mean and std, accumulated in float64 so large sets stay exact."""
    axes = (0, *range(2, x.ndim))
    mean = x.mean(axis=axes, dtype=np.float64)
    std = x.std(axis=axes, dtype=np.float64)
    # A constant channel (e.g. an always-black border feature) must not divide by zero.
    std = np.where(std < 1e-8, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)


def standardize(x: np.ndarray, scale: float, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    out = x.astype(np.float32) / np.float32(scale)
    out -= mean.reshape(shape)
    out /= std.reshape(shape)
    return out


def prepare(data: DataParams, params: PrepareParams, layout: Layout) -> dict:
    raw = load_source(data.source)
    validate(raw)
    x, y = raw.x, raw.y
    if data.max_samples is not None:
        keep = stratified_subset(y, data.max_samples, params.seed)
        x, y = x[keep], y[keep]
    splits = stratified_split(y, params.split, params.seed, raw.class_names)
    mean, std = channel_stats(x[splits["train"]].astype(np.float32) / np.float32(raw.scale))

    out = layout.prepared
    for name, idx in splits.items():
        arrays = {"x": standardize(x[idx], raw.scale, mean, std), "y": y[idx]}
        if name == "test":
            arrays["x_raw"] = x[idx]
        write_with(out / f"{name}.npz", lambda f, a=arrays: np.savez(f, **a))
    meta = {
        "source": data.source,
        "class_names": raw.class_names,
        "input_shape": list(x.shape[1:]),
        "normalization": {"scale": raw.scale, "mean": mean.tolist(), "std": std.tolist()},
        "samples": {name: int(len(idx)) for name, idx in splits.items()},
    }
    write_json(out / "meta.json", meta)
    return meta


def main(args) -> None:
    """Split and standardize the data source named in params.yaml."""
    params = load_params(args.params)
    meta = prepare(params.data, params.prepare, project_layout())
    print(f"prepare: {meta['samples']} samples of shape {meta['input_shape']} -> data/prepared")


if __name__ == "__main__":
    run_stage("prepare", main)
