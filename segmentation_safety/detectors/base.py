"""The detector interface. Every detector reads the one shared segmenter forward pass."""

from __future__ import annotations

import os
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from segmentation_safety.checkpoint import Bundle, BundleError
from segmentation_safety.models.segmenter import Segmenter
from segmentation_safety.operating_point import OperatingPoint, calibration_part
from segmentation_safety.types import DetectorOutput, SegmenterOutput


class Detector(nn.Module):
    """Base class for all detectors.

    Class attributes declare what a detector is, so the pipeline, the CLI and the
    trainers can reason about it without building it:

    - ``name``: registry key (``segsafe evaluate --detectors NAME``).
    - ``produces``: subset of ``{"anomaly", "failure", "class_iou"}``.
    - ``trained_parts``: bundle kinds it needs besides the segmenter (e.g.
      ``("densehybrid",)``); each is a file ``<models_dir>/<kind>.safetensors``.
    - ``embeddings``: segmenter taps it reads (instance attribute when it depends on
      options).
    """

    name: ClassVar[str] = ""
    produces: ClassVar[frozenset[str]] = frozenset()
    trained_parts: ClassVar[tuple[str, ...]] = ()
    #: Trained parts that never see the segmenter (resynthesis' label-to-image generator),
    #: so they carry no segmenter fingerprint.
    segmenter_free_parts: ClassVar[tuple[str, ...]] = ()
    #: What the anomaly score measures, in its own units (thresholds are in these units).
    score_units: ClassVar[str] = ""
    #: DESIGN §7's overhead budget over the segmentation pass at 512×1024 (what `segsafe
    #: bench` judges against); None where the design sets none (MC dropout).
    budget: ClassVar[float | None] = None
    #: True when every map is a function of the logits alone (the softmax family), so
    #: :meth:`score_logits` can score logits resized to any resolution. Benchmarks resize
    #: the logits to the label size before scoring; the node scores at the network's
    #: resolution and resizes the map, K times cheaper (``segsafe evaluate --score-at``).
    #: Detectors reading features or other passes leave it False.
    logits_only: ClassVar[bool] = False

    def __init__(self, segmenter: Segmenter, **options: Any) -> None:
        super().__init__()
        if options:
            raise TypeError(f"detector {self.name!r} got unknown options {sorted(options)}")
        # Kept outside the module tree so the segmenter's weights are not saved twice.
        self._segmenter = (segmenter,)
        self.embeddings: tuple[str, ...] = ()
        #: Calibrated default anomaly threshold, read from a bundle (see operating_point).
        self.operating_point: OperatingPoint | None = None

    def open_set_threshold(self) -> float | None:
        """The threshold calibrated for open-set recognition (the anomaly class K of the
        segmentation), where the detector's bundle has one; None for most detectors."""
        return None

    def cost_note(self) -> str:
        """What the detector's cost is made of, where it is more than one look at the
        pass (``segsafe bench`` prints it); empty for most detectors."""
        return ""

    @classmethod
    def calibration_part(cls) -> str:
        """The bundle kind holding this detector's operating point."""
        return calibration_part(cls.trained_parts, cls.segmenter_free_parts)

    @property
    def segmenter(self) -> Segmenter:
        return self._segmenter[0]

    def forward(self, out: SegmenterOutput) -> DetectorOutput:
        raise NotImplementedError

    def score_logits(self, logits: torch.Tensor) -> DetectorOutput:
        """Maps from B×K×h×w logits alone, at their resolution (``logits_only`` detectors).

        A ``logits_only`` detector's :meth:`forward` must equal this on ``out.logits``, so
        scoring at the network's resolution or at another one differs only in the order
        of resizing and scoring.
        """
        raise NotImplementedError(f"detector {self.name!r} needs more than the logits")

    def check_part(
        self,
        kind: str,
        bundle: Bundle | None = None,
        path: str | os.PathLike[str] = "<bundle>",
        needs_architecture: bool = False,
    ) -> dict[str, Any]:
        """The checks every ``load_part``/``export_part`` starts with.

        ``kind`` must be one of this detector's trained parts (``KeyError``); a ``bundle``
        must hold that kind, have been trained on this segmenter (its recorded fingerprint
        equals this segmenter's) and, with ``needs_architecture``, carry an
        ``architecture`` dict (``BundleError`` naming ``path``). Returns that dict (empty
        when not needed).
        """
        if kind not in self.trained_parts:
            raise KeyError(f"detector {self.name!r} has no trained part {kind!r}")
        if bundle is None:
            return {}
        if bundle.kind != kind:
            raise BundleError(path, f"holds a {bundle.kind!r} model, expected {kind!r}")
        if kind not in self.segmenter_free_parts:
            self._check_segmenter(bundle, path)
        arch = bundle.metadata.get("architecture")
        if needs_architecture and not isinstance(arch, dict):
            raise BundleError(path, "metadata has no 'architecture' dict")
        return arch if isinstance(arch, dict) else {}

    def _check_segmenter(self, bundle: Bundle, path: str | os.PathLike[str]) -> None:
        from segmentation_safety.models.zoo import describe_segmenter

        trained_on = bundle.metadata.get("segmenter")
        if not isinstance(trained_on, dict) or "fingerprint" not in trained_on:
            # Bundles from before fingerprints: loadable, but say the check was not made.
            warnings.warn(
                f"{path}: records no segmenter fingerprint, so it cannot be checked that it "
                "was trained on this segmenter (re-train it to record one)",
                stacklevel=3,
            )
            return
        ours = describe_segmenter(self.segmenter)
        if trained_on["fingerprint"] != ours["fingerprint"]:
            raise BundleError(
                path,
                f"was trained on segmenter {trained_on['fingerprint']} "
                f"({trained_on.get('name') or 'unnamed'}), not on the segmenter loaded here, "
                f"{ours['fingerprint']} ({ours['name']}); its {self.name} maps would be "
                "meaningless: train it for this segmenter",
            )

    def load_part(self, kind: str, bundle: Bundle, path: str | os.PathLike[str]) -> None:
        """Load the trained part ``kind`` from ``bundle`` (read from ``path``).

        Detectors with ``trained_parts`` override this; mismatches raise ``BundleError``
        naming ``path``.
        """
        self.check_part(kind)
        raise NotImplementedError(f"detector {self.name!r} declares {kind!r} but cannot load it")

    def export_part(
        self, kind: str | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and metadata of the trained part ``kind`` (default: the first), for
        ``save_bundle``, stamped with the fingerprint of the segmenter it belongs to."""
        from segmentation_safety.models.zoo import describe_segmenter

        kind = kind or (self.trained_parts[0] if self.trained_parts else "")
        self.check_part(kind)
        tensors, metadata = self._export_part(kind)
        if kind not in self.segmenter_free_parts:
            metadata["segmenter"] = describe_segmenter(self.segmenter)
        return tensors, metadata

    def _export_part(self, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What a detector with ``trained_parts`` saves of part ``kind`` (already checked)."""
        raise NotImplementedError(f"detector {self.name!r} declares {kind!r} but cannot export it")
