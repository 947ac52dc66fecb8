"""Softmax-family baselines: scores computed from the logits alone.

References: Fishyscapes §4.1 (max-softmax, entropy), DenseHybrid Table 4 (max-logit,
standardized max-logit, energy). Every anomaly map follows the project convention
"higher = more anomalous" and stays at the resolution of the logits it is given: the
pipeline scores the network's logits and resizes the map; ``segsafe evaluate --score-at
label`` resizes the logits to the label size first, as the benchmarks do.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch

from segmentation_safety.checkpoint import Bundle, BundleError
from segmentation_safety.detectors.base import Detector
from segmentation_safety.detectors.registry import register
from segmentation_safety.models.class_reductions import (
    entropy_classes,
    logsumexp_classes,
    max_softmax_classes,
)
from segmentation_safety.models.segmenter import Segmenter
from segmentation_safety.types import DetectorOutput, SegmenterOutput

#: Smallest per-class standard deviation SML divides by; a class whose max logit never
#: varied on the training pixels would otherwise blow the score up to infinity.
MIN_STD = 1e-6


def max_softmax_probability(logits: torch.Tensor) -> torch.Tensor:
    """B×K×h×w logits -> B×h×w maximum softmax probability (MSP) in [1/K, 1]."""
    return max_softmax_classes(logits.float())


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """B×K×h×w logits -> B×h×w entropy of the softmax in nats, in [0, ln K]."""
    return entropy_classes(logits.float())


def max_logit(logits: torch.Tensor) -> torch.Tensor:
    """B×K×h×w logits -> B×h×w maximum logit."""
    return logits.float().amax(dim=1)


def free_energy(logits: torch.Tensor) -> torch.Tensor:
    """B×K×h×w logits -> B×h×w energy E = -logsumexp(logits) (temperature 1).

    Inliers get low energy; the energy itself is therefore already an anomaly score.
    """
    return -logsumexp_classes(logits.float())


def standardized_max_logit(
    logits: torch.Tensor, class_mean: torch.Tensor, class_std: torch.Tensor
) -> torch.Tensor:
    """(max logit - mu_c) / sigma_c with c the predicted class, per pixel (B×h×w).

    ``class_mean`` and ``class_std`` are K-vectors of the max logit over the training
    pixels predicted as each class (:class:`training.fit_statistics.MaxLogitStats`).
    """
    logits = logits.float()
    top, predicted = logits.max(dim=1)
    mean = class_mean.to(logits)[predicted]
    std = class_std.to(logits).clamp_min(MIN_STD)[predicted]
    return (top - mean) / std


class _LogitScoreDetector(Detector):
    """Shared forward for detectors whose maps are a function of the logits alone.

    :meth:`forward` is :meth:`score_logits` on the network's logits, so the same code
    scores logits resized elsewhere (``segsafe evaluate --score-at label``).
    """

    budget: ClassVar[float | None] = 0.03

    produces: ClassVar[frozenset[str]] = frozenset({"anomaly"})
    logits_only: ClassVar[bool] = True

    def anomaly_score(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score_logits(self, logits: torch.Tensor) -> DetectorOutput:
        return DetectorOutput(anomaly=self.anomaly_score(logits))

    def forward(self, out: SegmenterOutput) -> DetectorOutput:
        return self.score_logits(out.logits)


@register
class MaxSoftmaxDetector(_LogitScoreDetector):
    """anomaly = failure = 1 - MSP (Hendrycks & Gimpel; Fishyscapes "max-probability").

    1 - MSP is also the standard misclassification baseline, so it doubles as the
    failure map (SynthCP Table 1 and Fishyscapes Table 3 compare against it).
    """

    name: ClassVar[str] = "max_softmax"
    score_units: ClassVar[str] = "1 - max softmax probability, in [0, 1]"
    produces: ClassVar[frozenset[str]] = frozenset({"anomaly", "failure"})

    def score_logits(self, logits: torch.Tensor) -> DetectorOutput:
        score = 1.0 - max_softmax_probability(logits)
        return DetectorOutput(anomaly=score, failure=score)

    def forward(self, out: SegmenterOutput) -> DetectorOutput:
        # The pass's shared maximum: the pipeline reuses its argmax for the labels.
        top = out.class_max()[0].float()
        score = 1.0 - max_softmax_classes(out.logits.float(), top=top)
        return DetectorOutput(anomaly=score, failure=score)


@register
class EntropyDetector(_LogitScoreDetector):
    """anomaly = entropy of the softmax (Fishyscapes "Softmax entropy")."""

    name: ClassVar[str] = "entropy"
    score_units: ClassVar[str] = "softmax entropy in nats, in [0, ln K]"

    def anomaly_score(self, logits: torch.Tensor) -> torch.Tensor:
        return softmax_entropy(logits)


@register
class MaxLogitDetector(_LogitScoreDetector):
    """anomaly = -max logit (Hendrycks et al., DenseHybrid Table 4 "Max-logit")."""

    name: ClassVar[str] = "max_logit"
    score_units: ClassVar[str] = "minus the largest logit (logit units)"

    def anomaly_score(self, logits: torch.Tensor) -> torch.Tensor:
        return -max_logit(logits)

    def forward(self, out: SegmenterOutput) -> DetectorOutput:
        return DetectorOutput(anomaly=-out.class_max()[0].float())  # shared with the labels


@register
class EnergyDetector(_LogitScoreDetector):
    """anomaly = energy = -logsumexp(logits) (Liu et al.; DenseHybrid Table 4 "Energy")."""

    name: ClassVar[str] = "energy"
    score_units: ClassVar[str] = "free energy -logsumexp(logits) (logit units)"

    def anomaly_score(self, logits: torch.Tensor) -> torch.Tensor:
        return free_energy(logits)


@register
class StandardizedMaxLogitDetector(_LogitScoreDetector):
    """anomaly = -(max logit - mu_c) / sigma_c (Jung et al., SML; DenseHybrid Table 4).

    Only the standardisation is implemented; SML's iterative boundary suppression and
    dilated smoothing are post-processing steps this baseline leaves out. Until a bundle
    of kind ``"sml"`` is loaded the statistics are mu = 0, sigma = 1 (plain max-logit).
    """

    name: ClassVar[str] = "sml"
    score_units: ClassVar[str] = "minus the class-standardised max logit (class std units)"
    trained_parts: ClassVar[tuple[str, ...]] = ("sml",)

    def __init__(self, segmenter: Segmenter, **options: Any) -> None:
        super().__init__(segmenter, **options)
        k = segmenter.num_classes
        self.register_buffer("class_mean", torch.zeros(k))
        self.register_buffer("class_std", torch.ones(k))

    def anomaly_score(self, logits: torch.Tensor) -> torch.Tensor:
        return -standardized_max_logit(logits, self.class_mean, self.class_std)

    def set_statistics(self, class_mean: torch.Tensor, class_std: torch.Tensor) -> None:
        """Install per-class statistics (K-vectors), e.g. from ``MaxLogitStats.mean_std()``."""
        k = self.class_mean.numel()
        if class_mean.shape != (k,) or class_std.shape != (k,):
            raise ValueError(
                f"SML statistics must be {k}-vectors, got {tuple(class_mean.shape)} "
                f"and {tuple(class_std.shape)}"
            )
        self.class_mean.copy_(class_mean)
        self.class_std.copy_(class_std)

    def _export_part(self, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and metadata for ``save_bundle`` of this detector's trained part."""
        tensors = {"class_mean": self.class_mean, "class_std": self.class_std}
        return tensors, {"kind": "sml", "num_classes": int(self.class_mean.numel())}

    def load_part(self, kind: str, bundle: Bundle, path: str | os.PathLike[str]) -> None:
        """Load the statistics from an ``"sml"`` bundle; refuse a mismatched one by name."""
        self.check_part(kind, bundle, path)
        missing = {"class_mean", "class_std"} - set(bundle.tensors)
        if missing:
            raise BundleError(path, f"missing tensors {sorted(missing)}")
        try:
            self.set_statistics(bundle.tensors["class_mean"], bundle.tensors["class_std"])
        except ValueError as e:
            raise BundleError(path, str(e)) from None
