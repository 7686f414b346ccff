"""The layout samples take (`data.layout`), and how `auto` chooses it.

Layouts, with x of shape (N, ...):
  vectors   (N, F): any sample shape, flattened.
  sequences (N, C, L): (N, L) becomes (N, 1, L); (N, C, L) is kept.
  images    (N, C, H, W): (N, H, W) becomes (N, 1, H, W); (N, C, H, W) is kept.
  auto      by x's shape, and for 2-D x by its values:
            (N,)          vectors.
            (N, F)        sequences (N, 1, F) when the columns are an ordered signal, else vectors.
                          Fewer than MIN_SIGNAL_LENGTH columns are always vectors; otherwise
                          `column_order` measures, on the first rows, whether each column
                          correlates more with the next column than with the others.
            (N, A, B)     sequences of A channels when 4 * A <= B (few channels, a long signal),
                          else images (N, 1, A, B).
            (N, C, H, W)  images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tasks.errors import DataError
from tasks.npyio import Rows

# Sample ranks each explicit layout accepts; the lower one gains a channel axis of 1.
LAYOUT_RANKS = {"sequences": (1, 2), "images": (2, 3)}

# Below this many columns a sample is a handful of features, not a signal: a 1-D CNN has little to
# slide over, and `column_order` has too few columns to judge by (its spread when the order means
# nothing is about +-0.08 at 16 columns, see SIGNAL_RANK).
MIN_SIGNAL_LENGTH = 16
# `column_order` is 0.5 on average when the column order carries no information, whatever the
# columns' correlations are: the next column is then just one more column. Over 300 random tables of
# 16-64 columns (independent, or driven by 1-4 shared factors) it never passed 0.74, and tables whose
# makers put related columns side by side stay below that too (breast cancer, with radius, perimeter
# and area adjacent: 0.68). Signals score 0.95-1.0 over 2,000 rows even under white noise 2-3x
# their spread (a sine under noise of 3x its amplitude: 0.92); fewer rows make a weak correlation
# harder to see (a sine under noise of 1.5x its amplitude, over 100 rows: 0.88). Flattened images
# fall in between (MNIST as (N, 784): 0.85, 8x8 digits as (N, 64): 0.83); the bar sits above them,
# so they stay vectors, as before (as (N, H, W) arrays auto makes them images).
SIGNAL_RANK = 0.9
SAMPLE_ROWS = 2000  # rows read to judge column order: correlations to within ~0.02
SAMPLE_BYTES = 64 << 20  # and at most this much of them, as float64
MAX_PAIRS = 512  # long rows: this many (column, next column) pairs, against as many other columns


@dataclass(frozen=True)
class LayoutChoice:
    layout: str  # vectors | sequences | images
    shape: tuple[int, ...]  # the canonical per-sample shape
    reason: str  # one sentence: why (goes into meta.json as layout_reason)


@dataclass(frozen=True)
class ColumnOrder:
    rank: float  # mean share of the other columns that correlate less with a column than its next one
    neighbours: float  # mean correlation of a column with the next one
    distant: float  # mean |correlation| of columns at least a quarter of the row apart
    rows: int


def resolve_layout(requested: str, x: Rows) -> LayoutChoice:
    """The layout and canonical per-sample shape for x's samples (module docstring)."""
    sample_shape = tuple(x.shape[1:])
    if requested == "auto":
        layout, reason = _auto(x)
    else:
        layout, reason = requested, "set in params (data.layout)"
    if layout == "vectors":
        return LayoutChoice(layout, (int(np.prod(sample_shape)),), reason)
    rank = len(sample_shape)
    if rank not in LAYOUT_RANKS[layout]:
        wanted = "(L) or (C, L)" if layout == "sequences" else "(H, W) or (C, H, W)"
        raise DataError(f"{x.name}: data.layout {layout} needs samples of shape {wanted}, "
                        f"these are {sample_shape}")
    shape = (1, *sample_shape) if rank == LAYOUT_RANKS[layout][0] else sample_shape
    return LayoutChoice(layout, shape, reason)


def _auto(x: Rows) -> tuple[str, str]:
    sample_shape = tuple(x.shape[1:])
    if len(sample_shape) == 0:
        return "vectors", "auto: one value per sample: a single feature"
    if len(sample_shape) == 1:
        return _signal_or_features(x)
    if len(sample_shape) == 2:
        a, b = sample_shape
        if 4 * a <= b:
            return "sequences", f"auto: samples of shape {sample_shape}: {a} channels of length {b}"
        return "images", (f"auto: samples of shape {sample_shape}: one-channel {a}x{b} images (as a "
                          f"signal, {a} channels would need a length of at least {4 * a})")
    if len(sample_shape) == 3:
        c, h, w = sample_shape
        return "images", f"auto: samples of shape {sample_shape}: {h}x{w} images of {c} channels"
    raise DataError(f"{x.name}: data.layout auto cannot tell what samples of shape {sample_shape} "
                    "are; set data.layout (vectors flattens any shape)")


def _signal_or_features(x: Rows) -> tuple[str, str]:
    length = x.shape[1]
    if length < MIN_SIGNAL_LENGTH:
        return "vectors", (f"auto: tabular features: {length} values per sample are too few for a "
                           f"signal (fewer than {MIN_SIGNAL_LENGTH})")
    sample = first_rows(x)
    if len(sample) < 3:
        return "vectors", (f"auto: tabular features: {len(sample)} finite rows are too few to judge "
                           "the column order by")
    order = column_order(sample)
    # Rounded down, so a rank just short of SIGNAL_RANK never reads as reaching it.
    judged = (f"over {order.rows:,} rows a column correlates more with the next one than with "
              f"{math.floor(100 * order.rank)}% of the others ({SIGNAL_RANK:.0%} makes a signal)")
    if order.rank >= SIGNAL_RANK:
        return "sequences", (f"auto: an ordered signal: {judged}; neighbours correlate "
                             f"{order.neighbours:.2f}, distant columns {order.distant:.2f}")
    return "vectors", f"auto: tabular features: {judged}"


def first_rows(x: Rows) -> np.ndarray:
    """Up to SAMPLE_ROWS finite rows from the front of x, as float64: a bounded read, as a source
    may not fit in memory. The front is no random sample (an .npz is often sorted by class), but
    the question is about the columns, and neighbouring samples of a signal move together within
    one class as much as across classes."""
    width = int(np.prod(x.shape[1:]))
    rows = max(1, min(SAMPLE_ROWS, SAMPLE_BYTES // (8 * width)))
    first = next(iter(x.chunks(rows)), np.empty((0, width)))
    sample = np.asarray(first, np.float64).reshape(len(first), width)
    return sample[np.isfinite(sample).all(axis=1)]  # NaN/inf rows: prepare's scan names them


def column_order(sample: np.ndarray) -> ColumnOrder:
    """How much the column order of `sample` (rows, columns) says about its columns.

    For each column j, the share of the other columns that correlate less with j than column j+1
    does (ties count half), averaged over j: 1.0 when the next column is always the most related,
    as in a smooth signal; 0.5 on average when the order means nothing (see SIGNAL_RANK). A rank,
    not a correlation, so a table of strongly correlated features scores no higher than a table of
    independent ones. Long rows are judged on a seeded sample of MAX_PAIRS columns.
    """
    n, width = sample.shape
    centred = sample - sample.mean(axis=0)
    spread = np.sqrt(np.mean(centred * centred, axis=0))
    z = np.divide(centred, spread, out=np.zeros_like(centred), where=spread > 0)  # constant: 0

    rng = np.random.default_rng(0)
    first = np.arange(width - 1)
    if len(first) > MAX_PAIRS:
        first = np.sort(rng.choice(first, MAX_PAIRS, replace=False))
    others = np.arange(width)
    if len(others) > MAX_PAIRS:
        others = np.sort(rng.choice(others, MAX_PAIRS, replace=False))

    corr = z[:, first].T @ z[:, others] / n  # (pairs, others)
    nxt = np.einsum("ij,ij->j", z[:, first], z[:, first + 1]) / n
    offset = others[None, :] - first[:, None]
    compared = (offset != 0) & (offset != 1)  # neither column j nor j+1 itself
    below = ((corr < nxt[:, None]) + 0.5 * (corr == nxt[:, None])) * compared
    rank = below.sum(axis=1) / compared.sum(axis=1)
    distant = np.abs(offset) >= max(2, width // 4)
    return ColumnOrder(rank=float(rank.mean()), neighbours=float(nxt.mean()),
                       distant=float(np.abs(corr[distant]).mean()), rows=n)
