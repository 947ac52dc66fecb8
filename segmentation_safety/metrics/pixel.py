"""Pixel-level anomaly and failure detection metrics, streamed over frames.

Both pooled accumulators pool every valid pixel of every frame (Fishyscapes protocol)
into a score counter and compute AP, AUROC and FPR95 from it at the end;
:class:`PerImageAnomalyMetrics` averages per-image values instead (StreetHazards).

Modes (``mode=``):
- ``"histogram"`` (default): fixed memory whatever the number of frames. Without
  ``score_range`` the bins follow the float32 bit pattern (``FloatBinCounter``):
  ``2 ** (9 + mantissa_bits)`` bins (1 Mi bins, 16 MiB of state at the default 11 bits),
  relative bin width ``2 ** -mantissa_bits`` ~ 5e-4 over all reals, no range needed.
  With ``score_range=(low, high)`` the bins are ``num_bins`` equal steps plus two
  overflow bins (``RangeBinCounter``); prefer it for probabilities packed near 1.
  Tolerance: scores sharing a bin count as ties, so AP/AUROC/FPR95 move by at most the
  mass of positive/negative pairs inside single bins; on random continuous scores the
  deviation from sklearn is below 1e-3 (tested in test/test_metrics.py), typically ~1e-5.
- ``"exact"``: per-frame sorted unique scores merged into the state; matches sklearn to
  rounding (1e-9 in tests) but memory grows with the number of distinct scores, so use
  it for tests and small sets, or for quantised scores (e.g. float16 maps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._arrays import VOID, check_allowed_values, check_finite_or_inf, check_same_shape, to_numpy
from .counters import ExactCounter, FloatBinCounter, RangeBinCounter, ScoreCounter
from .ranking import RankingCurves

TPR_TARGET = 0.95


def make_counter(
    mode: str = "histogram",
    mantissa_bits: int = 11,
    score_range: tuple[float, float] | None = None,
    num_bins: int = 2**20,
) -> ScoreCounter:
    """Build the score counter for ``mode`` ("histogram" or "exact"); see module doc."""
    if mode == "exact":
        return ExactCounter()
    if mode == "histogram":
        if score_range is not None:
            return RangeBinCounter(score_range[0], score_range[1], num_bins)
        return FloatBinCounter(mantissa_bits)
    raise ValueError(f"mode must be 'histogram' or 'exact', got {mode!r}")


@dataclass(frozen=True)
class AnomalyResult:
    """Pooled anomaly-detection scores (fractions) with thinned curves for plotting."""

    ap: float
    auroc: float
    fpr95: float
    threshold95: float  # scores >= this reach TPR 0.95 (histogram: lower bin edge)
    num_anomaly: int
    num_inlier: int
    recall: np.ndarray = field(repr=False)
    precision: np.ndarray = field(repr=False)
    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)

    def as_dict(self) -> dict[str, float]:
        """The ``anomaly`` block of the evaluate report (DESIGN.md 5.2)."""
        return {"ap": self.ap, "fpr95": self.fpr95, "auroc": self.auroc}


@dataclass(frozen=True)
class FailureResult:
    """Pooled pixel failure-detection scores (SynthCP Table 1 columns), fractions."""

    aupr_error: float
    aupr_success: float
    auroc: float
    fpr95: float
    threshold95: float  # failure scores >= this catch 95% of the errors
    num_error: int
    num_correct: int
    recall: np.ndarray = field(repr=False)
    precision: np.ndarray = field(repr=False)
    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)

    def as_dict(self) -> dict[str, float]:
        """The ``failure`` block of the evaluate report (DESIGN.md 5.2)."""
        return {
            "aupr_error": self.aupr_error,
            "aupr_success": self.aupr_success,
            "auroc": self.auroc,
            "fpr95": self.fpr95,
        }


class _PooledRanking:
    """Common part: owns the counter and validates scores."""

    def __init__(
        self,
        mode: str = "histogram",
        mantissa_bits: int = 11,
        score_range: tuple[float, float] | None = None,
        num_bins: int = 2**20,
        curve_points: int = 1000,
    ) -> None:
        self.counter = make_counter(mode, mantissa_bits, score_range, num_bins)
        self.curve_points = curve_points

    @property
    def state_nbytes(self) -> int:
        """Bytes of accumulated state (constant in histogram mode)."""
        return self.counter.nbytes

    def _add(self, scores: np.ndarray, positive: np.ndarray, what: str) -> None:
        scores = scores.astype(np.float64, copy=False)
        check_finite_or_inf(scores, what)
        self.counter.add(scores, positive)

    def _curves(self) -> tuple[RankingCurves, dict[str, Any]]:
        """The pooled curves and the result fields both metrics share: AUROC, FPR95 and
        its threshold, thinned PR and ROC curves."""
        curves = RankingCurves.from_counts(self.counter.counts())
        fpr95, threshold95 = curves.fpr_at_tpr(TPR_TARGET)
        recall, precision = curves.pr_curve(self.curve_points)
        fpr, tpr = curves.roc_curve(self.curve_points)
        shared = {
            "auroc": curves.auroc(),
            "fpr95": fpr95,
            "threshold95": threshold95,
            "recall": recall,
            "precision": precision,
            "fpr": fpr,
            "tpr": tpr,
        }
        return curves, shared


class AnomalyMetrics(_PooledRanking):
    """Fishyscapes pixel metrics: AP, AUROC, FPR95 over all valid pixels of all frames.

    ``update(scores, labels)``: scores of any shape (higher = more anomalous, any real
    values); labels of the same shape with 0 inlier, 1 anomaly, 255 void (excluded).
    NumPy arrays or torch tensors. Metrics are NaN while a class is missing.
    """

    def update(self, scores: Any, labels: Any) -> None:
        """Add one frame (or batch) of anomaly scores and 0/1/255 labels."""
        scores, labels = to_numpy(scores), to_numpy(labels)
        check_same_shape(scores, labels, ("scores", "labels"))
        check_allowed_values(labels, (0, 1, VOID), "anomaly labels")
        valid = labels != VOID
        self._add(scores[valid], labels[valid] == 1, "anomaly scores")

    def compute(self) -> AnomalyResult:
        """Metrics over everything seen so far (the state is kept)."""
        curves, shared = self._curves()
        return AnomalyResult(
            ap=curves.average_precision(),
            num_anomaly=curves.num_pos,
            num_inlier=curves.num_neg,
            **shared,
        )


@dataclass(frozen=True)
class MeanAnomalyResult:
    """Anomaly scores averaged over images (StreetHazards' protocol), fractions."""

    ap: float
    auroc: float
    fpr95: float
    images: int  # images scored: those with both anomaly and inlier pixels
    skipped: int  # images without one of the two, which the protocol leaves out

    def as_dict(self) -> dict[str, float]:
        """The ``anomaly`` block of the evaluate report (DESIGN.md 5.2)."""
        return {"ap": self.ap, "fpr95": self.fpr95, "auroc": self.auroc}


class PerImageAnomalyMetrics:
    """AP, AUROC and FPR95 of each image, averaged: the CAOS benchmark's ``eval_ood.py``
    for StreetHazards, against which its published numbers were computed.

    Each image is ranked exactly (its own sorted scores), so memory stays at three
    numbers per image. An image without anomaly or without inlier pixels is skipped, as
    there; FPR95 is taken at the threshold whose TPR is closest to 0.95
    (:meth:`RankingCurves.fpr_at_closest_tpr`), as there. ``update`` takes one image.
    """

    def __init__(self) -> None:
        self.values: list[tuple[float, float, float]] = []
        self.skipped = 0

    def update(self, scores: Any, labels: Any) -> None:
        """Add one image's anomaly scores and 0/1/255 labels (255 excluded)."""
        scores, labels = to_numpy(scores), to_numpy(labels)
        check_same_shape(scores, labels, ("scores", "labels"))
        check_allowed_values(labels, (0, 1, VOID), "anomaly labels")
        valid = labels != VOID
        scores = scores[valid].astype(np.float64, copy=False)
        check_finite_or_inf(scores, "anomaly scores")
        counter = ExactCounter()
        counter.add(scores, labels[valid] == 1)
        curves = RankingCurves.from_counts(counter.counts())
        if not curves.defined:
            self.skipped += 1
            return
        fpr95 = curves.fpr_at_closest_tpr(TPR_TARGET)
        self.values.append((curves.average_precision(), curves.auroc(), fpr95))

    def compute(self) -> MeanAnomalyResult:
        """Means over the images scored so far (NaN before the first one)."""
        if not self.values:
            nan = float("nan")
            return MeanAnomalyResult(nan, nan, nan, 0, self.skipped)
        ap, auroc, fpr95 = (float(v) for v in np.mean(self.values, axis=0))
        return MeanAnomalyResult(ap, auroc, fpr95, len(self.values), self.skipped)


class FailureMetrics(_PooledRanking):
    """Pixel failure detection (SynthCP §4, Table 1).

    ``update(scores, pred, label)``: ``scores`` is the failure score (higher = more
    likely wrong); a pixel is positive when ``pred != label``; ``label == 255`` is void.
    AUPR-Error is AP with errors positive on ``scores``; AUPR-Success is AP with correct
    pixels positive on ``-scores``; AUROC and FPR95 are for detecting errors.
    """

    def __init__(
        self,
        mode: str = "histogram",
        mantissa_bits: int = 11,
        score_range: tuple[float, float] | None = None,
        num_bins: int = 2**20,
        curve_points: int = 1000,
        ignore_index: int = VOID,
    ) -> None:
        super().__init__(mode, mantissa_bits, score_range, num_bins, curve_points)
        self.ignore_index = ignore_index

    def update(self, scores: Any, pred: Any, label: Any) -> None:
        """Add one frame (or batch) of failure scores, predicted and true class ids."""
        scores, pred, label = to_numpy(scores), to_numpy(pred), to_numpy(label)
        check_same_shape(scores, label, ("scores", "label"))
        check_same_shape(pred, label, ("pred", "label"))
        valid = label != self.ignore_index
        self._add(scores[valid], pred[valid] != label[valid], "failure scores")

    def compute(self) -> FailureResult:
        """Metrics over everything seen so far (the state is kept)."""
        curves, shared = self._curves()
        success = RankingCurves.from_counts(self.counter.counts().swapped())
        return FailureResult(
            aupr_error=curves.average_precision(),
            aupr_success=success.average_precision(),
            num_error=curves.num_pos,
            num_correct=curves.num_neg,
            **shared,
        )
