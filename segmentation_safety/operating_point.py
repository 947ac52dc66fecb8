"""Default operating points: each detector's anomaly threshold, in its own units.

Anomaly scores have no common scale: 1 - MSP lies in [0, 1], energy in logit units
(about -25..-4 for ESPNetv2), DenseHybrid's score in log units, FlowEneDet's is a
probability. A threshold is therefore calibrated per detector and per segmenter, as the
score that flags a chosen fraction of inlier road pixels (``segsafe calibrate``), and
stored with the detector: in the bundle of its first trained part that depends on the
segmenter, or, for detectors without one (the softmax family), in the segmenter's
bundle. Every bundle keeps them under ``metadata["operating_points"][detector]``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: Where a detector without segmenter-dependent parts keeps its operating point.
SEGMENTER_PART = "segmenter"


@dataclass(frozen=True)
class OperatingPoint:
    """An anomaly threshold and what it was calibrated on."""

    threshold: float
    #: Fraction of inlier pixels of the calibration classes scoring above ``threshold``.
    inlier_fpr: float
    #: Train ids whose ground-truth pixels were the inliers (0 = road).
    classes: tuple[int, ...]
    #: Dataset and split, e.g. "cityscapes/val".
    data: str
    images: int
    pixels: int

    def to_metadata(self) -> dict[str, Any]:
        out = asdict(self)
        out["classes"] = list(self.classes)
        return out

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], detector: str) -> OperatingPoint | None:
        """The operating point of ``detector`` in a bundle's metadata, if it has one."""
        entry = (meta.get("operating_points") or {}).get(detector)
        if not isinstance(entry, dict):
            return None
        threshold = float(entry.get("threshold", math.nan))
        if not math.isfinite(threshold):
            return None
        return cls(
            threshold=threshold,
            inlier_fpr=float(entry.get("inlier_fpr", math.nan)),
            classes=tuple(int(c) for c in entry.get("classes", ())),
            data=str(entry.get("data", "")),
            images=int(entry.get("images", 0)),
            pixels=int(entry.get("pixels", 0)),
        )


def calibration_part(trained_parts: tuple[str, ...], segmenter_free: tuple[str, ...]) -> str:
    """The bundle kind that stores a detector's operating point (see the module doc)."""
    for kind in trained_parts:
        if kind not in segmenter_free:
            return kind
    return SEGMENTER_PART


def threshold_at_fpr(inlier_scores: np.ndarray, fpr: float) -> float:
    """The score above which a fraction ``fpr`` of ``inlier_scores`` lies.

    NaN scores count as anomalous in the node's alarm, so they are left out here rather
    than shifting the quantile.
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"inlier false-positive rate must be within (0, 1), got {fpr}")
    scores = np.asarray(inlier_scores, dtype=np.float64).ravel()
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        raise ValueError("no finite inlier scores to calibrate on")
    return float(np.quantile(scores, 1.0 - fpr, method="higher"))
