"""data.layout auto on 2-D x (N, F): ordered signals become sequences, tabular features vectors."""

from collections.abc import Iterator

import numpy as np
import pytest

from tasks.layout import (
    MIN_SIGNAL_LENGTH,
    SAMPLE_ROWS,
    LayoutChoice,
    column_order,
    resolve_layout,
)
from tasks.npyio import InMemory
from tasks.readers import array_stream

L = 128


def auto(x: np.ndarray) -> LayoutChoice:
    return resolve_layout("auto", InMemory(x, "x.npz"))


def _phase(rng: np.random.Generator, n: int) -> np.ndarray:
    """Position within the period, at a random frequency (2-6 cycles per row) and phase."""
    cycles = rng.uniform(2, 6, (n, 1)) * np.arange(L) / L + rng.uniform(0, 1, (n, 1))
    return cycles % 1


def sines(rng, n=2000, noise=0.3):
    return np.sin(2 * np.pi * _phase(rng, n)) + rng.normal(0, noise, (n, L))


def squares(rng, n=2000):
    return np.sign(np.sin(2 * np.pi * _phase(rng, n))) + rng.normal(0, 0.3, (n, L))


def chirps(rng, n=2000):
    t = np.arange(L) / L
    start, sweep = rng.uniform(1, 4, (n, 1)), rng.uniform(2, 8, (n, 1))
    return np.sin(2 * np.pi * (start * t + sweep * t * t / 2) + rng.uniform(0, 2 * np.pi, (n, 1))) \
        + rng.normal(0, 0.3, (n, L))


def random_walks(rng, n=2000, offset=0.0):
    """Every column correlates with every other (0.5 on average): only the order of it tells."""
    return np.cumsum(rng.normal(size=(n, L)), axis=1) + rng.normal(0, offset, (n, 1))


def smooth_under_noise(rng, n=2000, noise=2.0):
    """Gaussian-smoothed noise (unit variance) under white noise twice as strong: neighbours
    correlate only ~0.2."""
    kernel = np.exp(-0.5 * (np.arange(-16, 17) / 8) ** 2)
    white = rng.normal(size=(n, L + len(kernel) - 1))
    smooth = np.stack([np.convolve(row, kernel, "valid") for row in white])
    return smooth / smooth.std() + rng.normal(0, noise, (n, L))


def independent(rng, n=2000, columns=40):
    return rng.normal(3, 2, (n, columns))


def latent_factors(rng, n=2000, columns=40, factors=3):
    """Strongly correlated features (|r| ~0.45 on average) in an arbitrary column order."""
    x = rng.normal(size=(n, factors)) @ rng.normal(size=(factors, columns)) + 0.5 * rng.normal(size=(n, columns))
    return x[:, rng.permutation(columns)]


def one_hot(rng, n=2000, variables=5, levels=8):
    return np.hstack([np.eye(levels)[rng.integers(0, levels, n)] for _ in range(variables)])


def categorical_codes(rng, n=2000, columns=30):
    return rng.integers(0, 5, (n, columns)).astype(np.int64)


def sklearn_table(name: str):
    import sklearn.datasets

    return lambda rng: getattr(sklearn.datasets, f"load_{name}")().data  # files shipped in the package


@pytest.mark.parametrize("make", [
    sines, squares, chirps, random_walks, lambda rng: random_walks(rng, offset=10.0),
    smooth_under_noise, lambda rng: sines(rng, n=300, noise=1.0),  # noisy, and few rows
    lambda rng: sines(rng)[:, :MIN_SIGNAL_LENGTH],  # a fraction of a period to 1.5 periods
], ids=["sine", "square", "chirp", "random-walk", "random-walk-offset", "smooth-under-noise",
        "noisy-sine-300-rows", "short-sine"])
def test_ordered_signals_are_sequences(make):
    x = make(np.random.default_rng(0)).astype(np.float32)
    choice = auto(x)
    assert (choice.layout, choice.shape) == ("sequences", (1, x.shape[1])), choice.reason
    assert choice.reason.startswith("auto: an ordered signal: ")


@pytest.mark.parametrize("make", [
    independent, lambda rng: independent(rng, n=60, columns=16), latent_factors, one_hot,
    categorical_codes, sklearn_table("breast_cancer"),
], ids=["independent", "independent-60x16", "latent-factors", "one-hot", "categorical-codes",
        "breast-cancer"])
def test_tables_are_vectors(make):
    """breast cancer puts related columns side by side (radius, texture, perimeter, area, ...): its
    neighbours correlate 0.50 on average against 0.39 for distant columns, yet its order is not
    that of a signal."""
    x = make(np.random.default_rng(0))
    choice = auto(x)
    assert (choice.layout, choice.shape) == ("vectors", (x.shape[1],)), choice.reason
    assert choice.reason.startswith("auto: tabular features: over ")  # judged by the statistic


@pytest.mark.parametrize("make", [sklearn_table("wine"), sklearn_table("iris"),
                                  lambda rng: sines(rng)[:, :MIN_SIGNAL_LENGTH - 1]],
                         ids=["wine", "iris", "short-sine"])
def test_few_columns_are_vectors_whatever_their_order(make):
    x = make(np.random.default_rng(0))
    choice = auto(x)
    assert (choice.layout, choice.shape) == ("vectors", (x.shape[1],))
    assert choice.reason == (f"auto: tabular features: {x.shape[1]} values per sample are too few "
                             f"for a signal (fewer than {MIN_SIGNAL_LENGTH})")


def test_the_statistic_separates_signals_from_tables():
    rng = np.random.default_rng(0)
    assert column_order(sines(rng)).rank > 0.99
    assert column_order(random_walks(rng)).rank > 0.99
    assert 0.4 < column_order(independent(rng)).rank < 0.6  # the order means nothing: 0.5
    assert 0.4 < column_order(latent_factors(rng)).rank < 0.6  # however correlated the columns
    assert column_order(one_hot(rng)).rank < 0.3  # neighbours in a one-hot block exclude each other


def test_reasons_give_the_evidence():
    rng = np.random.default_rng(0)
    signal = auto(sines(rng)).reason
    assert signal.startswith("auto: an ordered signal: over 2,000 rows a column correlates more with "
                             "the next one than with 99% of the others (90% makes a signal); ")
    assert "neighbours correlate 0.8" in signal and "distant columns 0.0" in signal
    table = auto(sklearn_table("breast_cancer")(rng)).reason
    assert table == ("auto: tabular features: over 569 rows a column correlates more with the next "
                     "one than with 68% of the others (90% makes a signal)")


def test_explicit_layouts_are_kept_whatever_the_data():
    rng = np.random.default_rng(0)
    signal, table = InMemory(sines(rng), "x.npz"), InMemory(independent(rng), "x.npz")
    assert resolve_layout("vectors", signal) == LayoutChoice("vectors", (L,), "set in params (data.layout)")
    assert resolve_layout("sequences", table) == LayoutChoice("sequences", (1, 40), "set in params (data.layout)")


def test_same_data_same_decision():
    """Long rows are judged on a seeded sample of columns: same data, same words, every time."""
    x = np.cumsum(np.random.default_rng(1).normal(size=(300, 5000)), axis=1)  # 5,000-long walks
    first, second = auto(x), auto(x.copy())
    assert first == second and first.layout == "sequences"
    assert auto(latent_factors(np.random.default_rng(3))) == auto(latent_factors(np.random.default_rng(3)))


class FirstChunkOnly:
    """Rows that refuse to be read past their first chunk: the decision must not need the rest."""

    def __init__(self, x: np.ndarray) -> None:
        self.name, self.shape, self.dtype, self.x = "big.npz", (10**9, x.shape[1]), x.dtype, x
        self.asked: list[int] = []

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        self.asked.append(rows)
        yield self.x[:rows]
        raise AssertionError("read past the first chunk")


def test_reads_one_bounded_chunk_from_the_front():
    rows = FirstChunkOnly(sines(np.random.default_rng(0), n=3000))
    assert resolve_layout("auto", rows).layout == "sequences"
    assert rows.asked == [SAMPLE_ROWS]


def test_class_sorted_npz_streamed_from_disk(tmp_path):
    """The first 2,000 rows of a class-sorted file are one class: column order still shows."""
    rng = np.random.default_rng(0)
    x = np.concatenate([sines(rng, n=2500), squares(rng, n=2500)]).astype(np.float32)
    x[5] = np.nan  # rows with NaN are left out here; prepare's scan names them
    np.savez(tmp_path / "w.npz", x=x, y=np.repeat([0, 1], 2500))
    choice = resolve_layout("auto", array_stream(tmp_path / "w.npz", "x"))
    assert choice.layout == "sequences" and "over 1,999 rows" in choice.reason


def test_too_few_finite_rows_to_judge_are_vectors():
    x = sines(np.random.default_rng(0), n=10)
    x[2:] = np.nan
    assert auto(x) == LayoutChoice("vectors", (L,), "auto: tabular features: 2 finite rows are too few "
                                   "to judge the column order by")
