"""DenseHybrid detector (DenseHybrid §3): hybrid score from the logits and a small head.

The head reads the shared pre-logit features; its cost is one BN-ReLU-Conv1x1 plus a
logsumexp over the logits (Table 5: +2.8 ms on 60.9 ms). The fine-tuned segmenter is a
separate ``segmenter`` bundle; the ``densehybrid`` bundle holds the head and the
open-set threshold calibrated on held-out data (``metadata["thresholds"]["open_set"]``)
and names that segmenter bundle, relative to itself (``metadata["segmenter_bundle"]``).
The head only fits the fine-tuned segmenter, so a models directory running DenseHybrid
has that one as its ``segmenter.safetensors`` (one segmenter serves every detector).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch

from segmentation_safety.checkpoint import Bundle, BundleError, load_state_strict
from segmentation_safety.detectors.base import Detector
from segmentation_safety.detectors.registry import register
from segmentation_safety.metrics.segmentation import fuse_open_set
from segmentation_safety.models.densehybrid_head import DenseHybridHead, hybrid_score
from segmentation_safety.models.segmenter import Segmenter
from segmentation_safety.types import DetectorOutput, SegmenterOutput

__all__ = ["DenseHybridDetector"]


@register
class DenseHybridDetector(Detector):
    """anomaly = ln P(d_out | x) - logsumexp(logits) (eq. 6); higher = more anomalous."""

    name: ClassVar[str] = "densehybrid"
    budget: ClassVar[float | None] = 0.03
    score_units: ClassVar[str] = "log p(outlier) - logsumexp(logits) (log units)"
    produces: ClassVar[frozenset[str]] = frozenset({"anomaly"})
    trained_parts: ClassVar[tuple[str, ...]] = ("densehybrid",)

    def __init__(self, segmenter: Segmenter, **options: Any) -> None:
        super().__init__(segmenter, **options)
        self.head = DenseHybridHead(segmenter.feature_channels)
        #: Calibrated thresholds from the bundle, e.g. ``{"open_set": t}`` (95% TPR).
        self.thresholds: dict[str, float] = {}

    def forward(self, out: SegmenterOutput) -> DetectorOutput:
        return DetectorOutput(anomaly=hybrid_score(out.logits, self.head.log_p_out(out.features)))

    def open_set_threshold(self) -> float | None:
        """95% TPR on held-out negatives, as the trainer calibrated it (DenseHybrid §4)."""
        t = self.thresholds.get("open_set")
        return None if t is None else float(t)

    def open_set_labels(self, labels: torch.Tensor, anomaly: torch.Tensor) -> torch.Tensor:
        """Fuse the thresholded anomaly map into ``labels`` as class K (needs a threshold)."""
        threshold = self.open_set_threshold()
        if threshold is None:
            raise KeyError("no 'open_set' threshold: calibrate one and store it in the bundle")
        return fuse_open_set(labels, anomaly, threshold, self.segmenter.num_classes)

    def _export_part(self, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and metadata for ``save_bundle`` (add training config and metrics)."""
        metadata: dict[str, Any] = {
            "kind": "densehybrid",
            "architecture": {"name": "densehybrid_head", "in_channels": self.head.in_channels},
            "num_classes": self.segmenter.num_classes,
            "thresholds": dict(self.thresholds),
        }
        return dict(self.head.state_dict()), metadata

    def _check_segmenter(self, bundle: Bundle, path: str | os.PathLike[str]) -> None:
        """The fingerprint check, with a refusal that names the fine-tuned segmenter file.

        Training writes the fine-tuned segmenter beside the head (by default
        ``densehybrid_segmenter.safetensors``) while the models directory still holds the
        base one; the generic "train it for this segmenter" would send the user to
        retrain, when the fix is to use the segmenter the head was trained with.
        """
        try:
            super()._check_segmenter(bundle, path)
        except BundleError as e:
            trained_with = bundle.metadata.get("segmenter_bundle")
            if not isinstance(trained_with, str) or not trained_with:
                raise  # written by another tool: the generic message is all we know
            in_place = Path(path).parent / "segmenter.safetensors"
            if (Path(path).parent / trained_with).resolve() == in_place.resolve():
                # Its directory is laid out already (the shipped demo): the head is loaded
                # on another directory's segmenter, which the generic message names.
                raise
            raise BundleError(path, self._mismatch(bundle, Path(path), trained_with)) from e

    def _mismatch(self, bundle: Bundle, path: Path, trained_with: str) -> str:
        """Why ``bundle`` does not fit this segmenter and what to do about it."""
        from segmentation_safety.models.zoo import describe_segmenter

        ours = describe_segmenter(self.segmenter)
        fine_tuned = path.parent / trained_with  # recorded relative to the bundle
        trained = bundle.metadata["segmenter"]["fingerprint"]
        base = bundle.metadata.get("fine_tuned_from")
        what = (
            "the base segmenter it was fine-tuned from"
            if isinstance(base, dict) and base.get("fingerprint") == ours["fingerprint"]
            else "the segmenter loaded here"
        )
        said = (
            f"was trained with the fine-tuned segmenter {fine_tuned} ({trained}), not with "
            f"{what}, {ours['name']} ({ours['fingerprint']})"
        )
        if not fine_tuned.is_file():
            return f"{said}, and {fine_tuned} is not there: retrain {path.name} for this segmenter"
        loaded = Path(ours["name"])
        if loaded.is_file() and loaded.samefile(fine_tuned):
            # Loaded from that very file, yet another fingerprint: it was replaced since.
            return f"{said}; {fine_tuned} was replaced since: retrain {path.name} for it"
        return (
            f"{said}; DenseHybrid fine-tunes the segmenter and all detectors share one, so "
            f"use {fine_tuned} as {path.parent / 'segmenter.safetensors'} (keep the base "
            f"one as {path.parent / 'segmenter_base.safetensors'}) and fit the other "
            "detectors on it"
        )

    def load_part(self, kind: str, bundle: Bundle, path: str | os.PathLike[str]) -> None:
        """Load the head (and thresholds) from a ``densehybrid`` bundle, refusing mismatches."""
        arch = self.check_part(kind, bundle, path)
        channels = arch.get("in_channels")
        if channels != self.head.in_channels:
            raise BundleError(
                path,
                f"head expects {channels} feature channels, the segmenter has "
                f"{self.head.in_channels}",
            )
        classes = bundle.metadata.get("num_classes")
        if classes is not None and classes != self.segmenter.num_classes:
            raise BundleError(
                path,
                f"trained for {classes} classes, the segmenter has {self.segmenter.num_classes}",
            )
        load_state_strict(self.head, bundle, path)
        self.thresholds = {k: float(v) for k, v in bundle.metadata.get("thresholds", {}).items()}
