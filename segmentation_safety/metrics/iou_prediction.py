"""Image-level failure detection: predicted vs true per-class IoU (SynthCP).

Following the official SynthCP evaluation, every (image, class) pair with a valid true
IoU is kept (a few floats per image); per class we take MAE, STD of the absolute error,
Pearson and Spearman correlation over the images, and report the mean over classes
(NaN classes skipped), which is what the paper's Table 1 lists. Pooled statistics over
all pairs are reported too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from ._arrays import to_numpy


@dataclass(frozen=True)
class IoUPredictionResult:
    """Class-averaged (paper) and pooled agreement between predicted and true IoU."""

    mae: float
    std: float
    pearson: float
    spearman: float
    pooled_mae: float
    pooled_std: float
    pooled_pearson: float
    pooled_spearman: float
    num_pairs: int
    per_class_mae: np.ndarray = field(repr=False)
    per_class_std: np.ndarray = field(repr=False)
    per_class_pearson: np.ndarray = field(repr=False)
    per_class_spearman: np.ndarray = field(repr=False)

    def as_dict(self) -> dict[str, float]:
        """The ``iou`` block of the evaluate report (DESIGN.md 5.2)."""
        return {"mae": self.mae, "pearson": self.pearson, "spearman": self.spearman}


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _correlations(true: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """(Pearson, Spearman); NaN when fewer than 2 pairs or either side is constant."""
    if true.size < 2 or np.ptp(true) == 0 or np.ptp(pred) == 0:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.pearsonr(true, pred)[0]), float(stats.spearmanr(true, pred)[0])


def _error_stats(true: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    if true.size == 0:
        return float("nan"), float("nan")
    err = np.abs(pred - true)
    return float(err.mean()), float(err.std())


class IoUPredictionMetrics:
    """Accumulates (predicted, true) per-class IoU of each image.

    ``update(predicted, true)``: arrays of shape (K,) or (B, K) in [0, 1]; entries where
    ``true`` is NaN (class not scored in that image, see ``per_image_class_iou``) are
    skipped.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._pred: list[np.ndarray] = []
        self._true: list[np.ndarray] = []
        self._cls: list[np.ndarray] = []

    def update(self, predicted: Any, true: Any) -> None:
        """Add the IoU prediction and the true IoU of one image (or a batch)."""
        predicted = np.atleast_2d(to_numpy(predicted)).astype(np.float64)
        true = np.atleast_2d(to_numpy(true)).astype(np.float64)
        if predicted.shape != true.shape or predicted.shape[1] != self.num_classes:
            raise ValueError(
                f"predicted {predicted.shape} and true {true.shape} IoU must both be "
                f"(K,) or (B, K) with K = {self.num_classes}"
            )
        valid = ~np.isnan(true)
        if np.isnan(predicted[valid]).any():
            raise ValueError("predicted IoU contains NaN where the true IoU is valid")
        outside = predicted[valid][(predicted[valid] < 0) | (predicted[valid] > 1)]
        if outside.size:  # the report clips metrics to [0, 1]: it would hide them
            raise ValueError(f"predicted IoU must lie in [0, 1], got {outside[:5].tolist()}")
        self._pred.append(predicted[valid])
        self._true.append(true[valid])
        self._cls.append(np.nonzero(valid)[1])

    def compute(self) -> IoUPredictionResult:
        """Statistics over all stored pairs."""
        pred = np.concatenate(self._pred) if self._pred else np.empty(0)
        true = np.concatenate(self._true) if self._true else np.empty(0)
        cls = np.concatenate(self._cls) if self._cls else np.empty(0, dtype=np.intp)
        per_class = np.full((4, self.num_classes), np.nan)
        for k in range(self.num_classes):
            sel = cls == k
            per_class[:2, k] = _error_stats(true[sel], pred[sel])
            per_class[2:, k] = _correlations(true[sel], pred[sel])
        pooled_mae, pooled_std = _error_stats(true, pred)
        pooled_pc, pooled_sc = _correlations(true, pred)
        return IoUPredictionResult(
            mae=_nanmean(per_class[0]),
            std=_nanmean(per_class[1]),
            pearson=_nanmean(per_class[2]),
            spearman=_nanmean(per_class[3]),
            pooled_mae=pooled_mae,
            pooled_std=pooled_std,
            pooled_pearson=pooled_pc,
            pooled_spearman=pooled_sc,
            num_pairs=int(true.size),
            per_class_mae=per_class[0],
            per_class_std=per_class[1],
            per_class_pearson=per_class[2],
            per_class_spearman=per_class[3],
        )
