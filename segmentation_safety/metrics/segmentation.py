"""Segmentation quality: streaming confusion matrix, mIoU, open-mIoU, per-image IoU.

Rows of the confusion matrix are ground truth, columns predictions. Void label pixels
(``ignore_index``) are excluded; IoU of a class with an empty union is NaN and left out
of the means (the Cityscapes convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._arrays import VOID, check_class_range, check_same_shape, to_numpy


def confusion_counts(
    pred: Any, label: Any, num_classes: int, ignore_index: int = VOID
) -> np.ndarray:
    """``num_classes`` x ``num_classes`` int64 counts (rows: label, columns: prediction).

    Raises ValueError for class ids outside ``[0, num_classes)`` other than a void label,
    and for a void value in ``pred`` (a prediction must name a class).
    """
    pred, label = to_numpy(pred), to_numpy(label)
    check_same_shape(pred, label, ("pred", "label"))
    for values, what in ((pred, "predictions"), (label, "labels")):
        if not np.issubdtype(values.dtype, np.integer):  # 0.5 or NaN would become class 0
            raise ValueError(f"{what} must be integer class ids, got {values.dtype}")
    check_class_range(label, num_classes, "labels", ignore_index)
    valid = label != ignore_index
    pred_valid = pred[valid].astype(np.int64)
    check_class_range(pred_valid, num_classes, "predictions", None)
    flat = label[valid].astype(np.int64) * num_classes + pred_valid
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_from_confusion(matrix: np.ndarray) -> np.ndarray:
    """Per-class IoU = TP / (TP + FP + FN); NaN where the class is in neither map."""
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def open_miou(matrix: np.ndarray) -> float:
    """Open-mIoU (DenseHybrid eq. 16) from a (K+1) x (K+1) confusion matrix.

    The last row/column is the anomaly class: label K marks true anomalies, prediction K
    marks pixels the thresholded anomaly detector took over. Open-IoU_k is the ordinary
    IoU of class k in this matrix, so anomalies predicted as k add to FP_k and k-pixels
    flagged as anomalous add to FN_k. The mean runs over the K inlier classes only, so a
    perfect detector gives back the closed-world mIoU.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise ValueError(f"need a square (K+1)x(K+1) matrix with K >= 1, got {matrix.shape}")
    return _nanmean(iou_from_confusion(matrix)[:-1])


def fuse_open_set(pred: Any, anomaly: Any, threshold: float, anomaly_class: int) -> Any:
    """Open-set prediction (DenseHybrid §3.2 and §4): ``pred`` with ``anomaly_class`` (K,
    the class after the K inliers) where ``anomaly >= threshold``.

    Torch tensors stay tensors on their device (the pipeline's path); anything else
    becomes a numpy array (evaluation). ``pred`` and ``anomaly`` must have one shape.
    """
    torch_pair = hasattr(pred, "masked_fill") and hasattr(anomaly, "masked_fill")
    if not torch_pair:
        pred, anomaly = to_numpy(pred), to_numpy(anomaly)
    check_same_shape(pred, anomaly, ("pred", "anomaly"))
    if torch_pair:
        return pred.masked_fill(anomaly >= threshold, anomaly_class)
    return np.where(anomaly >= threshold, anomaly_class, pred).astype(pred.dtype)


@dataclass(frozen=True)
class SegmentationScores:
    """Closed-set segmentation quality (fractions)."""

    miou: float
    pixel_accuracy: float
    iou: np.ndarray  # per class, NaN where the class never occurred
    matrix: np.ndarray = field(repr=False)


class ConfusionMatrix:
    """Streaming confusion matrix over frames: state is ``num_classes ** 2`` int64.

    For open-set evaluation build it with K+1 classes (anomaly = class K in both the
    fused prediction and the label) and call ``open_miou``.
    """

    def __init__(self, num_classes: int, ignore_index: int = VOID) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: Any, label: Any) -> None:
        """Add one frame (or batch) of predicted and true class ids."""
        self.matrix += confusion_counts(pred, label, self.num_classes, self.ignore_index)

    def compute(self) -> SegmentationScores:
        """mIoU, per-class IoU and pixel accuracy over everything seen so far."""
        iou = iou_from_confusion(self.matrix)
        total = self.matrix.sum()
        accuracy = float(np.trace(self.matrix) / total) if total else float("nan")
        return SegmentationScores(_nanmean(iou), accuracy, iou, self.matrix.copy())

    def open_miou(self) -> float:
        """Open-mIoU, taking the last class as the anomaly class (see ``open_miou``)."""
        return open_miou(self.matrix)


def per_image_class_iou(
    pred: Any,
    label: Any,
    num_classes: int,
    ignore_index: int = VOID,
    present: str = "label",
) -> np.ndarray:
    """True per-class IoU of one image (SynthCP eq. 6), NaN where the class is not scored.

    ``present="label"`` scores the classes present in the ground truth, as the official
    SynthCP evaluation does (a class is valid when it has labelled pixels); ``"union"``
    also scores classes that appear only in the prediction (their IoU is 0). Void pixels
    are excluded from both maps.
    """
    matrix = confusion_counts(pred, label, num_classes, ignore_index)
    iou = iou_from_confusion(matrix)
    if present == "label":
        return np.where(matrix.sum(axis=1) > 0, iou, np.nan)
    if present == "union":
        return iou
    raise ValueError(f"present must be 'label' or 'union', got {present!r}")
