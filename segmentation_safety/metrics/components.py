"""SegmentMeIfYouCan component-level metrics: sIoU, PPV and mean F1 over sIoU thresholds.

Per frame, the anomaly score is binarised (``score > threshold``) inside the valid region,
and ground-truth anomalies and predictions are split into 8-connected components. As in
the benchmark's own code: predicted components smaller than ``min_pred_size`` pixels are
dropped, ground-truth components smaller than ``min_gt_size`` become void, and
- sIoU of a ground-truth component k is its IoU with the union of the predicted components
  touching it, where pixels of *other* ground-truth components are left out of the union;
- the adjusted IoU of a predicted component is defined the same way with the roles swapped,
  and decides false positives (``< tau``), while PPV = |k_hat inside any GT anomaly| / |k_hat|
  is reported as the paper's component precision;
- TP/FN/FP are summed over frames for each tau in ``thresholds`` (default 0.25:0.05:0.75),
  F1(tau) = 2TP / (2TP + FN + FP) and mean F1 averages over tau.
The state is a handful of counters, independent of frame count and size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from ._arrays import VOID, check_allowed_values, check_finite_or_inf, check_same_shape, to_numpy

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class ComponentResult:
    """Component-level scores (fractions); NaN where no component was seen."""

    siou: float  # mean sIoU over ground-truth components
    siou_pred: float  # mean adjusted IoU over predicted components
    ppv: float  # mean PPV over predicted components
    mean_f1: float
    f1: np.ndarray  # per threshold
    thresholds: np.ndarray
    num_gt: int
    num_pred: int


def _adjusted_iou(overlap: np.ndarray, size_own: np.ndarray, size_other: np.ndarray) -> np.ndarray:
    """Adjusted IoU of each row component against the column components it touches.

    ``overlap[a, b]`` counts pixels shared by row component a and column component b.
    """
    touches = overlap > 0
    inter = overlap.sum(axis=1)
    touched_size = touches @ size_other
    # Pixels of the touched column components lying in *other* row components.
    other_rows = touches @ overlap.sum(axis=0) - inter
    union = touched_size + size_own - inter - other_rows
    # Vanished components (size 0) give 0/0 here; callers drop them.
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / union


class SegmentMetrics:
    """Streaming SMIYC component metrics at a fixed anomaly-score threshold.

    ``update(scores, labels)`` takes one H x W frame (0 inlier, 1 anomaly, 255 void).
    Defaults follow the benchmark's anomaly track (500 / 100 pixel size limits); pass
    ``threshold`` as chosen on the pixel PR curve (the benchmark uses the best-F1 point).
    """

    def __init__(
        self,
        threshold: float,
        thresholds: Any = None,
        min_pred_size: int = 500,
        min_gt_size: int = 100,
    ) -> None:
        self.threshold = float(threshold)
        taus = np.linspace(0.25, 0.75, 11) if thresholds is None else thresholds
        self.thresholds = np.asarray(taus, dtype=np.float64)
        self.min_pred_size = min_pred_size
        self.min_gt_size = min_gt_size
        self.tp = np.zeros(self.thresholds.size, dtype=np.int64)
        self.fn = np.zeros(self.thresholds.size, dtype=np.int64)
        self.fp = np.zeros(self.thresholds.size, dtype=np.int64)
        self.siou_sum = self.siou_pred_sum = self.ppv_sum = 0.0
        self.num_gt = self.num_pred = 0

    def update(self, scores: Any, labels: Any) -> None:
        """Add one frame."""
        scores, labels = to_numpy(scores), to_numpy(labels)
        check_same_shape(scores, labels, ("scores", "labels"))
        if labels.ndim != 2:
            raise ValueError(f"component metrics need one H x W frame, got shape {labels.shape}")
        check_allowed_values(labels, (0, 1, VOID), "anomaly labels")
        valid = labels != VOID
        check_finite_or_inf(scores[valid], "anomaly scores")

        gt, n_gt = ndimage.label(labels == 1, structure=_EIGHT_CONNECTED)
        pred, n_pred = ndimage.label((scores > self.threshold) & valid, structure=_EIGHT_CONNECTED)
        pred_small = np.bincount(pred.ravel(), minlength=n_pred + 1) < self.min_pred_size
        pred_small[0] = True
        pred[pred_small[pred]] = 0
        gt_small = np.bincount(gt.ravel(), minlength=n_gt + 1) < self.min_gt_size
        gt_small[0] = False
        valid &= ~gt_small[gt]

        g, p = gt[valid].astype(np.int64), pred[valid].astype(np.int64)
        overlap = np.bincount(g * (n_pred + 1) + p, minlength=(n_gt + 1) * (n_pred + 1))
        overlap = overlap.reshape(n_gt + 1, n_pred + 1)
        size_gt, size_pred = overlap[1:, :].sum(axis=1), overlap[:, 1:].sum(axis=0)
        inner = overlap[1:, 1:]
        # Components that vanished (too small, or all void) are not scored.
        keep_gt, keep_pred = size_gt > 0, size_pred > 0
        siou = _adjusted_iou(inner, size_gt, size_pred)[keep_gt]
        siou_pred = _adjusted_iou(inner.T, size_pred, size_gt)[keep_pred]
        ppv = inner.sum(axis=0)[keep_pred] / size_pred[keep_pred]

        self.tp += (siou[None, :] >= self.thresholds[:, None]).sum(axis=1)
        self.fn += (siou[None, :] < self.thresholds[:, None]).sum(axis=1)
        self.fp += (siou_pred[None, :] < self.thresholds[:, None]).sum(axis=1)
        self.siou_sum += float(siou.sum())
        self.siou_pred_sum += float(siou_pred.sum())
        self.ppv_sum += float(ppv.sum())
        self.num_gt += int(siou.size)
        self.num_pred += int(siou_pred.size)

    def compute(self) -> ComponentResult:
        """Scores over all frames seen so far."""
        denom = 2 * self.tp + self.fn + self.fp
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(denom > 0, 2 * self.tp / denom, np.nan)
        nan = float("nan")
        return ComponentResult(
            siou=self.siou_sum / self.num_gt if self.num_gt else nan,
            siou_pred=self.siou_pred_sum / self.num_pred if self.num_pred else nan,
            ppv=self.ppv_sum / self.num_pred if self.num_pred else nan,
            mean_f1=float(np.mean(f1)) if not np.isnan(f1).any() else nan,
            f1=f1,
            thresholds=self.thresholds.copy(),
            num_gt=self.num_gt,
            num_pred=self.num_pred,
        )
