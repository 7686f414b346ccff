"""Classification scores from predictions, in NumPy: shared by the training loop and evaluate."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (int64), rows the true class, columns the predicted one; every class has its row and
    column, present or not. Inputs must not be empty (prepare gives every split every class)."""
    # Imported here: scikit-learn (and SciPy under it) adds about a second to every stage's start.
    from sklearn.metrics import confusion_matrix as counts

    return counts(y_true, y_pred, labels=np.arange(num_classes))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # A class never predicted (or never present) scores 0, as scikit-learn's zero_division=0 does.
    return np.divide(num, den, out=np.zeros(num.shape), where=den > 0)


def class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall (= per-class accuracy) and F1 from a confusion matrix.

    Not sklearn.metrics.precision_recall_fscore_support: it needs the predictions, not the matrix,
    and computes F1 as 2tp / (2tp + fp + fn), whose float64 differs from 2PR / (P + R) in the last
    bits for some classes, which would change the committed reference run's metrics."""
    tp = np.diag(matrix).astype(np.float64)
    precision, recall = _ratio(tp, matrix.sum(axis=0)), _ratio(tp, matrix.sum(axis=1))
    return {"precision": precision, "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall)}


def calibration(proba: np.ndarray, y: np.ndarray, n_bins: int) -> tuple[dict[str, np.ndarray], float]:
    """Non-empty equal-width confidence bins (mean confidence, accuracy, count) and the ECE.

    Kept by hand: sklearn.calibration.calibration_curve returns no counts (needed for the ECE and
    the reliability plot), takes one class's probability rather than the top one, and puts a
    confidence on a bin edge in another bin (np.searchsorted) than the floor here does."""
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y).astype(np.float64)
    bins = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    conf_sum = np.bincount(bins, confidence, n_bins)
    hits = np.bincount(bins, correct, n_bins)
    ece = float(np.abs(hits - conf_sum).sum() / len(y))
    used = count > 0
    return {"bin": np.flatnonzero(used), "confidence": conf_sum[used] / count[used],
            "accuracy": hits[used] / count[used], "count": count[used]}, ece
