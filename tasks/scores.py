"""Classification scores from predictions, in NumPy: shared by the training loop and evaluate."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2)
    return flat.reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # A class never predicted (or never present) scores 0, as scikit-learn's zero_division=0 does.
    return np.divide(num, den, out=np.zeros(num.shape), where=den > 0)


def class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall (= per-class accuracy) and F1 from a confusion matrix."""
    tp = np.diag(matrix).astype(np.float64)
    precision, recall = _ratio(tp, matrix.sum(axis=0)), _ratio(tp, matrix.sum(axis=1))
    return {"precision": precision, "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall)}


def calibration(proba: np.ndarray, y: np.ndarray, n_bins: int) -> tuple[dict[str, np.ndarray], float]:
    """Non-empty equal-width confidence bins (mean confidence, accuracy, count) and the ECE."""
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
