"""Ranking metrics (AP, AUROC, FPR at a TPR) computed from ``RankedCounts``.

Definitions follow the Fishyscapes Benchmark paper and sklearn:
- AP is the step rule ``sum_i (R_i - R_{i-1}) * P_i`` over thresholds from high to low
  (sklearn ``average_precision_score``), not an interpolated area.
- AUROC is the trapezoid area under (FPR, TPR) starting at (0, 0).
- FPR at TPR t is the FPR at the first threshold, scanning from high scores down, whose
  TPR >= t (every point, no ``drop_intermediate`` thinning); StreetHazards' own rule
  (the threshold whose TPR is closest to t) is :meth:`RankingCurves.fpr_at_closest_tpr`.
Tied scores form one threshold, exactly as sklearn treats ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .counters import RankedCounts


@dataclass(frozen=True)
class RankingCurves:
    """Cumulative operating points, one per distinct threshold, highest first."""

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    num_pos: int
    num_neg: int

    @classmethod
    def from_counts(cls, counts: RankedCounts) -> RankingCurves:
        """Accumulate per-threshold counts into TP/FP at each threshold."""
        tp = np.cumsum(counts.positives)
        fp = np.cumsum(counts.negatives)
        num_pos = int(tp[-1]) if tp.size else 0
        num_neg = int(fp[-1]) if fp.size else 0
        return cls(counts.thresholds, tp, fp, num_pos, num_neg)

    @property
    def defined(self) -> bool:
        """True when both classes are present, so every metric is defined."""
        return self.num_pos > 0 and self.num_neg > 0

    def average_precision(self) -> float:
        """Step-rule AP (NaN without positives)."""
        if self.num_pos == 0:
            return float("nan")
        precision = self.tp / (self.tp + self.fp)
        recall_step = np.diff(self.tp, prepend=0) / self.num_pos
        return float(np.sum(recall_step * precision))

    def auroc(self) -> float:
        """Trapezoid AUROC (NaN unless both classes are present)."""
        if not self.defined:
            return float("nan")
        fpr = np.concatenate([[0.0], self.fp / self.num_neg])
        tpr = np.concatenate([[0.0], self.tp / self.num_pos])
        return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)

    def fpr_at_tpr(self, tpr_target: float = 0.95) -> tuple[float, float]:
        """(FPR, threshold) at the first threshold whose TPR >= ``tpr_target``.

        Predicting positive for ``score >= threshold`` reaches the target TPR. NaN for
        both when either class is missing.
        """
        if not self.defined:
            return float("nan"), float("nan")
        i = int(np.argmax(self.tp / self.num_pos >= tpr_target))
        return float(self.fp[i] / self.num_neg), float(self.thresholds[i])

    def fpr_at_closest_tpr(self, tpr_target: float = 0.95) -> float:
        """FPR at the threshold whose TPR is closest to ``tpr_target`` (StreetHazards' rule).

        The CAOS benchmark's ``eval_ood.py`` takes, among the thresholds down to the first
        one that reaches full recall, the one with the smallest |TPR - target|; of tied
        ones, the lowest threshold. NaN when either class is missing.
        """
        if not self.defined:
            return float("nan")
        full = int(np.searchsorted(self.tp, self.num_pos))  # first threshold at TPR 1
        # Scanned from that threshold upwards, so argmin's first pick is the lowest tied.
        tpr = self.tp[full::-1] / self.num_pos
        i = int(np.argmin(np.abs(tpr - tpr_target)))
        return float(self.fp[full - i] / self.num_neg)

    def pr_curve(self, max_points: int) -> tuple[np.ndarray, np.ndarray]:
        """(recall, precision), recall rising, thinned to at most ``max_points``."""
        if self.num_pos == 0:
            return np.empty(0), np.empty(0)
        keep = _thin(self.tp.size, max_points)
        tp, fp = self.tp[keep], self.fp[keep]
        return tp / self.num_pos, tp / (tp + fp)

    def roc_curve(self, max_points: int) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, tpr) from (0, 0), thinned to at most ``max_points`` + 1 points."""
        if not self.defined:
            return np.empty(0), np.empty(0)
        keep = _thin(self.tp.size, max_points)
        fpr = np.concatenate([[0.0], self.fp[keep] / self.num_neg])
        tpr = np.concatenate([[0.0], self.tp[keep] / self.num_pos])
        return fpr, tpr


def _thin(n: int, max_points: int) -> np.ndarray:
    """Evenly spaced indices into ``n`` points, first and last always kept."""
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max(max_points, 2)).round().astype(np.intp))
