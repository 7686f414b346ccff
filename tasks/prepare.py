"""Stage 1, prepare: load the source, split it stratified, standardize on the training split.

Writes data/prepared/{train,val,test}.npz (x float32 standardized, y int64; test also keeps x_raw,
the untouched source values, for the export parity check) and meta.json (source, layout, class
names, input shape, normalization, split sizes), published together as one folder.

Samples are never all in memory at once: the labels decide the split, then pass 1 reads x in row
chunks to validate it and gather the training split's per-channel statistics, and pass 2 reads it
again to write each split's standardized rows. Every check happens in pass 1, before any output
is written. Built-in, CSV and image sources take the same path, from memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.atomic import staged_outputs
from tasks.cli import run_stage
from tasks.contracts import (
    Normalization,
    PreparedMeta,
    channel_shape,
    prepared_meta_text,
    to_unit,
)
from tasks.errors import DataError
from tasks.layout import resolve_layout
from tasks.npyio import NpzWriter, Rows, RowWriter, chunk_rows
from tasks.params import DataParams, PrepareParams, SplitFractions, load_params
from tasks.sources import Source, load_source, sample_label
from tasks.workspace import Workspace, project_workspace


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


def split_fractions(split: SplitFractions, fixed_test: bool) -> dict[str, float]:
    """train/val/test, or train/val in the same proportion when the source has its own test set."""
    if fixed_test:
        pool = split.train + split.val
        return {"train": split.train / pool, "val": split.val / pool}
    return {"train": split.train, "val": split.val, "test": split.test}


def stratified_split(
    y: np.ndarray, fractions: dict[str, float], seed: int, class_names: list[str]
) -> dict[str, np.ndarray]:
    """Sorted index arrays per split; each class is divided in the given proportions (the first
    split takes what rounding leaves). Every split gets at least one sample of every class."""
    names = list(fractions)
    counts = np.bincount(y, minlength=len(class_names))
    sizes = {name: np.round(counts * fractions[name]).astype(np.int64) for name in names[1:]}
    sizes = {names[0]: counts - sum(sizes.values()), **sizes}
    for name in names:
        short = np.flatnonzero(sizes[name] < 1)
        if short.size:
            c = short[0]
            raise DataError(
                f"class {class_names[c]!r} has {counts[c]} samples: too few for a "
                f"{fractions[name]:.3g} {name} fraction; every split needs at least one sample "
                "of each class (prepare.split)"
            )
    order, ranks = _grouped_ranks(y, np.random.default_rng(seed))
    cls = y[order]
    # Within each class the last split takes the first ranks, then the one before it, and so on.
    which = np.full(len(y), -1)
    edge = np.zeros(len(y), np.int64)
    for i in reversed(range(len(names))):
        edge += sizes[names[i]][cls]
        which[(which < 0) & (ranks < edge)] = i
    return {name: np.sort(order[which == i]) for i, name in enumerate(names)}


class ChannelStats:
    """Per-channel (axis 1) mean and std over chunks, merged in float64 with Chan et al.'s
    pairwise update, which stays exact where a running sum of squares would cancel."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    def add(self, x: np.ndarray) -> None:
        axes = (0, *range(2, x.ndim))
        count = x.size // x.shape[1]
        mean = x.mean(axis=axes, dtype=np.float64)
        deviation = x - mean.reshape(channel_shape(x.ndim))
        m2 = np.square(deviation, out=deviation).sum(axis=axes)
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * count / total)
        self.count = total

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        std = np.sqrt(self.m2 / self.count)
        # A constant channel (e.g. an always-black border feature) must not divide by zero.
        std = np.where(std < 1e-8, 1.0, std)
        return self.mean.astype(np.float32), std.astype(np.float32)


@dataclass(frozen=True)
class Part:
    """One split: the rows it takes from one source array, in source order, and their labels."""

    name: str
    rows: Rows
    index: np.ndarray  # sorted row numbers in `rows`
    y: np.ndarray
    row_label: Callable[[int], str]


def plan_splits(source: Source, data: DataParams, params: PrepareParams) -> list[Part]:
    pool = np.arange(len(source.y))
    if data.max_samples is not None:
        pool = stratified_subset(source.y, data.max_samples, params.seed)
    fractions = split_fractions(params.split, fixed_test=source.test is not None)
    try:
        splits = stratified_split(source.y[pool], fractions, params.seed, source.class_names)
    except DataError as exc:
        raise DataError(f"{source.origin}: {exc}") from None
    parts = [Part(name, source.x, pool[idx], source.y[pool[idx]], source.row_label)
             for name, idx in splits.items()]
    if source.test is not None:
        x_test, y_test = source.test
        parts.append(Part("test", x_test, np.arange(len(y_test)), y_test, sample_label))
    return parts


def _canonical_chunks(rows: Rows, shape: tuple[int, ...]) -> Iterator[tuple[int, np.ndarray]]:
    start = 0
    for chunk in rows.chunks(chunk_rows(shape)):
        yield start, chunk.reshape(len(chunk), *shape)
        start += len(chunk)


def _local(index: np.ndarray, start: int, count: int) -> np.ndarray:
    """The chunk-relative positions of the sorted row numbers `index` in [start, start + count)."""
    lo, hi = np.searchsorted(index, [start, start + count])
    return index[lo:hi] - start


def _readers(parts: list[Part]) -> list[list[Part]]:
    """Parts grouped by the array they read from, so each array is read once per pass."""
    groups: dict[int, list[Part]] = {}
    for part in parts:
        groups.setdefault(id(part.rows), []).append(part)
    return list(groups.values())


def scan(parts: list[Part], shape: tuple[int, ...], scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1: every sample is finite; the training split's per-channel mean and std."""
    stats = ChannelStats(shape[0])
    for group in _readers(parts):
        rows, train = group[0].rows, next((p for p in group if p.name == "train"), None)
        for start, chunk in _canonical_chunks(rows, shape):
            if chunk.dtype.kind == "f":
                finite = np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
                if not finite.all():
                    bad = start + int(np.argmin(finite))
                    raise DataError(f"{rows.name}: {group[0].row_label(bad)} contains NaN or inf")
            if train is not None:
                local = _local(train.index, start, len(chunk))
                if local.size:
                    stats.add(to_unit(chunk[local], scale))
    return stats.result()


@contextmanager
def _split_file(folder: Path, part: Part, shape: tuple[int, ...],
                standardized: Callable[[np.ndarray], np.ndarray]) -> Iterator[Callable[[int, np.ndarray], None]]:
    """`<split>.npz` in `folder`, streamed: yields add(start, chunk), which keeps the part's rows.

    A zip file takes one member at a time, so the test split's raw rows go to a side file that
    becomes member x_raw once x is complete.
    """
    n, raw_dtype = len(part.index), part.rows.dtype.newbyteorder("=")
    side = folder / f".{part.name}.x_raw.npy"
    with open(folder / f"{part.name}.npz", "wb") as f:
        npz = NpzWriter(f)
        with ExitStack() as stack:
            x = stack.enter_context(npz.member("x", (n, *shape), np.float32))
            raw = None
            if part.name == "test":
                raw = RowWriter(stack.enter_context(open(side, "wb")), (n, *shape), raw_dtype, "x_raw.npy")

            def add(start: int, chunk: np.ndarray) -> None:
                local = _local(part.index, start, len(chunk))
                if local.size:
                    rows = chunk[local]
                    x.write(standardized(rows))
                    if raw is not None:
                        raw.write(rows.astype(raw_dtype, copy=False))

            yield add
            if raw is not None:
                raw.finish()
        npz.array("y", part.y.astype(np.int64))
        if raw is not None:
            npz.copy_npy("x_raw", side)
            side.unlink()
        npz.close()


def write_splits(folder: Path, parts: list[Part], shape: tuple[int, ...], norm: Normalization) -> None:
    """Pass 2: each split's standardized rows into its .npz, reading every source array once."""
    for group in _readers(parts):
        with ExitStack() as stack:
            adders = [stack.enter_context(_split_file(
                folder, part, shape, norm.apply))
                for part in group]
            for start, chunk in _canonical_chunks(group[0].rows, shape):
                for add in adders:
                    add(start, chunk)


def prepare(data: DataParams, params: PrepareParams, workspace: Workspace) -> PreparedMeta:
    source = load_source(data, workspace.root)
    choice = resolve_layout(data.layout, source.x)
    kind, shape, reason = choice.layout, choice.shape, choice.reason
    scale = source.scale or (255.0 if kind == "images" and source.x.dtype == np.uint8 else 1.0)
    parts = plan_splits(source, data, params)
    mean, std = scan(parts, shape, scale)
    meta = PreparedMeta(
        source=data.source,
        layout=kind,
        layout_reason=reason,
        class_names=source.class_names,
        input_shape=list(shape),
        normalization=Normalization(scale=float(scale), mean=mean.tolist(), std=std.tolist()),
        samples={part.name: int(len(part.index)) for part in parts},
    )
    with staged_outputs() as out:
        folder = out.path(workspace.prepared, directory=True)
        write_splits(folder, parts, shape, meta.normalization)
        # Publishing the staged folder fsyncs every file in it.
        (folder / "meta.json").write_text(prepared_meta_text(meta))
    return meta


def main(args) -> None:
    """Split and standardize the data source named in params.yaml."""
    params = load_params(args.params)
    meta = prepare(params.data, params.prepare, project_workspace())
    print(f"prepare: {meta.samples} samples of {meta.layout} {meta.input_shape} -> data/prepared "
          f"({meta.layout_reason})")


if __name__ == "__main__":
    run_stage("prepare", main)
