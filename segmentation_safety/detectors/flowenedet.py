"""FlowEneDet detectors (003; DESIGN §4): FED-U and FED-C.

Both read the shared forward pass's logits (and FED-C its pre-logit features), run
the flow at 1/4 of the input resolution and report P(segmentation wrong) as both the
failure and the anomaly map. Both variants load a bundle of kind ``flowenedet``; its
metadata names the variant, and loading the other variant's weights fails by name.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from segmentation_safety.detectors.base import Detector
from segmentation_safety.detectors.registry import register
from segmentation_safety.models.flowenedet import FlowEneDet
from segmentation_safety.models.segmenter import Segmenter
from segmentation_safety.types import DetectorOutput, SegmenterOutput

#: FED runs at this fraction of the input resolution (003 §1: "1/4× spatial dimensions").
FLOW_STRIDE = 4


def gaussian_smooth(maps: torch.Tensor, sigma: float, kernel_size: int = 7) -> torch.Tensor:
    """Normalised Gaussian blur of B×h×w maps (the official test-time post-processing,
    7×7, σ = 1). A convex combination, so probabilities stay in [0, 1]."""
    if sigma <= 0:
        return maps
    r = kernel_size // 2
    x = torch.arange(-r, r + 1, dtype=maps.dtype, device=maps.device)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    padded = F.pad(maps[:, None], (r, r, r, r), mode="replicate")
    # Separable: rows then columns.
    out = F.conv2d(padded, g.view(1, 1, 1, -1))
    out = F.conv2d(out, g.view(1, 1, -1, 1))
    return out[:, 0]


class _FlowEneDetDetector(Detector):
    """Shared body of FED-U and FED-C; subclasses set ``conditional``."""

    produces = frozenset({"anomaly", "failure"})
    trained_parts = ("flowenedet",)
    conditional: ClassVar[bool] = False

    def __init__(
        self,
        segmenter: Segmenter,
        blocks: int = 4,
        kernel_size: int = 7,
        cond_channels: int = 32,
        hidden: int = 32,
        smooth_sigma: float = 1.0,
    ) -> None:
        super().__init__(segmenter)
        self.model = FlowEneDet(
            num_classes=segmenter.num_classes,
            feature_channels=segmenter.feature_channels,
            conditional=self.conditional,
            blocks=blocks,
            kernel_size=kernel_size,
            cond_channels=cond_channels,
            hidden=hidden,
        )
        self.smooth_sigma = smooth_sigma
        self.architecture = {
            "variant": "FED-C" if self.conditional else "FED-U",
            "blocks": blocks,
            "kernel_size": kernel_size,
            "cond_channels": cond_channels,
            "hidden": hidden,
        }

    def flow_size(self, out: SegmenterOutput) -> tuple[int, int]:
        """1/4 of the input image's size; the logits' size when no image is attached."""
        if out.image is not None:
            h, w = out.image.shape[-2:]
            return max(1, h // FLOW_STRIDE), max(1, w // FLOW_STRIDE)
        return tuple(out.logits.shape[-2:])  # type: ignore[return-value]

    def forward(self, out: SegmenterOutput) -> DetectorOutput:
        size = self.flow_size(out)
        logits = out.logits
        features = out.features if self.conditional else None
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        p_wrong = gaussian_smooth(self.model.p_wrong(logits, features), self.smooth_sigma)
        return DetectorOutput(anomaly=p_wrong, failure=p_wrong)


@register
class FlowEneDetU(_FlowEneDetDetector):
    """FED-U: the unconditional flow over the energy input only."""

    name = "flowenedet_u"
    conditional = False


@register
class FlowEneDetC(_FlowEneDetDetector):
    """FED-C: couplings also conditioned on 32 channel-pooled decoder features."""

    name = "flowenedet_c"
    conditional = True
