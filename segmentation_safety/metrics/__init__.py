"""Streaming benchmark metrics: pure numpy, bounded memory, torch tensors accepted.

- ``AnomalyMetrics``: Fishyscapes AP / AUROC / FPR95 pooled over frames.
- ``PerImageAnomalyMetrics``: the same per image, averaged (StreetHazards' protocol).
- ``FailureMetrics``: SynthCP pixel failure detection (AUPR-Error/Success, AUROC, FPR95).
- ``IoUPredictionMetrics``: image-level IoU prediction (MAE, STD, Pearson, Spearman).
- ``ConfusionMatrix``: mIoU, per-class IoU, pixel accuracy and DenseHybrid open-mIoU.
- ``SegmentMetrics``: SMIYC component-level sIoU, PPV and mean F1.
"""

from .components import ComponentResult, SegmentMetrics
from .counters import ExactCounter, FloatBinCounter, RangeBinCounter, RankedCounts
from .iou_prediction import IoUPredictionMetrics, IoUPredictionResult
from .pixel import (
    AnomalyMetrics,
    AnomalyResult,
    FailureMetrics,
    FailureResult,
    MeanAnomalyResult,
    PerImageAnomalyMetrics,
    make_counter,
)
from .ranking import RankingCurves
from .segmentation import (
    ConfusionMatrix,
    SegmentationScores,
    confusion_counts,
    fuse_open_set,
    iou_from_confusion,
    open_miou,
    per_image_class_iou,
)

__all__ = [
    "AnomalyMetrics",
    "AnomalyResult",
    "ComponentResult",
    "ConfusionMatrix",
    "ExactCounter",
    "FailureMetrics",
    "FailureResult",
    "FloatBinCounter",
    "IoUPredictionMetrics",
    "IoUPredictionResult",
    "MeanAnomalyResult",
    "PerImageAnomalyMetrics",
    "RangeBinCounter",
    "RankedCounts",
    "RankingCurves",
    "SegmentMetrics",
    "SegmentationScores",
    "confusion_counts",
    "fuse_open_set",
    "iou_from_confusion",
    "make_counter",
    "open_miou",
    "per_image_class_iou",
]
