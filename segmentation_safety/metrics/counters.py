"""Streaming score/label counters: the bounded-memory state behind the ranking metrics.

A ranking metric (AP, AUROC, FPR95) only needs, for every distinct score, how many
positive and negative pixels carry it. Each counter below keeps exactly that, either
exactly (``ExactCounter``) or with scores merged into fine bins (``FloatBinCounter``,
``RangeBinCounter``), and hands it out as ``RankedCounts`` in descending score order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

_SIGN = np.uint32(0x80000000)


@dataclass(frozen=True)
class RankedCounts:
    """Positive and negative pixel counts per distinct score, highest score first.

    ``thresholds[i]`` is the score (exact mode) or the lower edge of a bin (histogram
    modes): predicting "positive" for every score >= ``thresholds[i]`` selects entries
    ``0..i``. Only non-empty entries are present.
    """

    thresholds: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray

    def swapped(self) -> RankedCounts:
        """The same pixels with the roles of positive and negative exchanged and the
        score negated (e.g. AUPR-Success from the counts kept for AUPR-Error)."""
        return RankedCounts(
            thresholds=-self.thresholds[::-1],
            positives=self.negatives[::-1],
            negatives=self.positives[::-1],
        )


class ScoreCounter(Protocol):
    """What a ranking metric needs from its state."""

    def add(self, scores: np.ndarray, positive: np.ndarray) -> None:
        """Count 1-D float ``scores`` with their boolean ``positive`` flags."""

    def counts(self) -> RankedCounts:
        """The accumulated counts, highest score first."""

    @property
    def nbytes(self) -> int:
        """Bytes held by the state arrays."""


def _split_counts(index: np.ndarray, positive: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
    total = np.bincount(index, minlength=size)
    pos = np.bincount(index[positive], minlength=size)
    return pos.astype(np.int64), (total - pos).astype(np.int64)


class ExactCounter:
    """Exact counts per distinct float64 score.

    Each frame is reduced to its sorted unique scores with counts and merged into the
    state, so memory grows with the number of distinct scores seen (not with pixels).
    Matches sklearn to rounding; meant for tests and small evaluation sets.
    """

    def __init__(self) -> None:
        self.values = np.empty(0, dtype=np.float64)
        self.positives = np.empty(0, dtype=np.int64)
        self.negatives = np.empty(0, dtype=np.int64)

    def add(self, scores: np.ndarray, positive: np.ndarray) -> None:
        """Merge one frame's scores into the state."""
        if scores.size == 0:
            return
        values, index = np.unique(scores.astype(np.float64), return_inverse=True)
        pos, neg = _split_counts(index.ravel(), positive, values.size)
        merged, where = np.unique(np.concatenate([self.values, values]), return_inverse=True)
        new_pos = np.zeros(merged.size, dtype=np.int64)
        new_neg = np.zeros(merged.size, dtype=np.int64)
        # Both inputs are unique, so each merged slot gets at most one entry from each.
        np.add.at(new_pos, where, np.concatenate([self.positives, pos]))
        np.add.at(new_neg, where, np.concatenate([self.negatives, neg]))
        self.values, self.positives, self.negatives = merged, new_pos, new_neg

    def counts(self) -> RankedCounts:
        """Counts per distinct score, highest first."""
        return RankedCounts(self.values[::-1], self.positives[::-1], self.negatives[::-1])

    @property
    def nbytes(self) -> int:
        """Bytes held by the state arrays (grows with distinct scores)."""
        return self.values.nbytes + self.positives.nbytes + self.negatives.nbytes


class _DenseBinCounter:
    """Shared state of the histogram counters: two fixed int64 arrays, one slot per bin."""

    def __init__(self, num_bins: int) -> None:
        self.positives = np.zeros(num_bins, dtype=np.int64)
        self.negatives = np.zeros(num_bins, dtype=np.int64)

    def bin_index(self, scores: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def lower_edges(self, bins: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def add(self, scores: np.ndarray, positive: np.ndarray) -> None:
        """Histogram one frame's scores into the fixed bins."""
        if scores.size == 0:
            return
        pos, neg = _split_counts(self.bin_index(scores), positive, self.positives.size)
        self.positives += pos
        self.negatives += neg

    def counts(self) -> RankedCounts:
        """Counts per non-empty bin, highest bin first; thresholds are lower bin edges."""
        bins = np.flatnonzero((self.positives + self.negatives) > 0)[::-1]
        return RankedCounts(self.lower_edges(bins), self.positives[bins], self.negatives[bins])

    @property
    def nbytes(self) -> int:
        """Bytes held by the state arrays (constant)."""
        return self.positives.nbytes + self.negatives.nbytes


class FloatBinCounter(_DenseBinCounter):
    """Histogram over the float32 bit pattern: range-free bins of constant relative width.

    A float32 score is mapped to a 32-bit key that increases with the score (sign flipped
    for positives, all bits inverted for negatives); dropping the low ``23 - mantissa_bits``
    bits leaves ``2 ** (9 + mantissa_bits)`` bins, each an interval of relative width
    ``2 ** -mantissa_bits``, covering every real value including +-inf. Nothing about the
    score range has to be known in advance, so logits, energies and probabilities all work.
    """

    def __init__(self, mantissa_bits: int = 11) -> None:
        if not 1 <= mantissa_bits <= 14:
            raise ValueError(f"mantissa_bits must be in [1, 14], got {mantissa_bits}")
        self.shift = np.uint32(23 - mantissa_bits)
        super().__init__(2 ** (9 + mantissa_bits))

    def bin_index(self, scores: np.ndarray) -> np.ndarray:
        """Bin of each score (monotone non-decreasing in the score)."""
        # Adding +0.0 turns -0.0 into +0.0 so both zeros share a key.
        bits = (scores.astype(np.float32) + np.float32(0.0)).view(np.uint32)
        keys = np.where(bits >= _SIGN, ~bits, bits | _SIGN)
        return (keys >> self.shift).astype(np.intp)

    def lower_edges(self, bins: np.ndarray) -> np.ndarray:
        """Smallest float32 value falling into each bin."""
        keys = bins.astype(np.uint32) << self.shift
        bits = np.where(keys >= _SIGN, keys & ~_SIGN, ~keys).astype(np.uint32)
        # The lowest negative bins start at NaN bit patterns; -inf is their real edge.
        is_nan = (bits & ~_SIGN) > np.uint32(0x7F800000)
        bits = np.where(is_nan, np.uint32(0xFF800000), bits).astype(np.uint32)
        return bits.view(np.float32).astype(np.float64)


class RangeBinCounter(_DenseBinCounter):
    """Histogram with ``num_bins`` equal bins on ``[low, high)`` plus two overflow bins.

    Scores below ``low`` (or at/above ``high``) share one bin each, so their order among
    themselves is lost: choose the range to cover the scores (e.g. [0, 1] for
    probabilities, where this beats ``FloatBinCounter`` close to 1).
    """

    def __init__(self, low: float, high: float, num_bins: int = 2**20) -> None:
        if not (np.isfinite(low) and np.isfinite(high) and high > low):
            raise ValueError(f"score_range must be finite with high > low, got ({low}, {high})")
        if num_bins < 1:
            raise ValueError(f"num_bins must be positive, got {num_bins}")
        self.low, self.high, self.num_inner = float(low), float(high), int(num_bins)
        super().__init__(num_bins + 2)

    def bin_index(self, scores: np.ndarray) -> np.ndarray:
        """Bin of each score: 0 below the range, ``num_bins + 1`` at or above it."""
        scale = self.num_inner / (self.high - self.low)
        # Clip before the cast so +-inf land in the overflow bins instead of overflowing.
        pos = np.clip(np.floor((scores.astype(np.float64) - self.low) * scale), -1, self.num_inner)
        return pos.astype(np.intp) + 1

    def lower_edges(self, bins: np.ndarray) -> np.ndarray:
        """Lower edge of each bin (-inf for the underflow bin)."""
        width = (self.high - self.low) / self.num_inner
        edges = self.low + (bins.astype(np.float64) - 1.0) * width
        return np.where(bins == 0, -np.inf, edges)
