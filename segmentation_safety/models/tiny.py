"""A small encoder-decoder segmenter, fast enough for tests and the demo on 2 CPU cores."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segmentation_safety.models.segmenter import Segmenter


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    # No ReLU here: taps are read pre-ReLU, as the flow-density paper does (Fishyscapes §4.2).
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout)
    )


class TinySegmenter(Segmenter):
    """Stride-8 encoder with a light decoder at stride 4.

    Taps (pre-ReLU): ``enc1`` (stride 2), ``enc2`` (stride 4), ``enc3`` (stride 8),
    ``dec`` (stride 4, pre-logit features before the final ReLU).
    """

    def __init__(
        self, num_classes: int = 19, width: int = 16, dropout: float = 0.1, **norm: object
    ) -> None:
        super().__init__(**norm)  # type: ignore[arg-type]
        w = width
        self.num_classes = num_classes
        self.enc1 = _conv_bn(3, w, 2)
        self.enc2 = _conv_bn(w, 2 * w, 2)
        self.enc3 = _conv_bn(2 * w, 4 * w, 2)
        self.enc3b = _conv_bn(4 * w, 4 * w)
        self.lateral = nn.Conv2d(2 * w, 2 * w, 1, bias=False)
        self.dec = _conv_bn(4 * w + 2 * w, 2 * w)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(2 * w, num_classes, 1)
        self.feature_channels = 2 * w
        self.embedding_channels = {"enc1": w, "enc2": 2 * w, "enc3": 4 * w, "dec": 2 * w}
        self.default_flow_layers = ("enc3",)

    def compute(
        self, x: torch.Tensor, taps: frozenset[str]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        seen: dict[str, torch.Tensor] = {}
        e1 = self.enc1(x)
        seen["enc1"] = e1
        e2 = self.enc2(F.relu(e1))
        seen["enc2"] = e2
        e3 = self.enc3(F.relu(e2))
        e3 = self.enc3b(F.relu(e3)) + e3
        seen["enc3"] = e3
        up = F.interpolate(F.relu(e3), size=e2.shape[-2:], mode="bilinear", align_corners=False)
        d = self.dec(torch.cat([up, self.lateral(F.relu(e2))], dim=1))
        seen["dec"] = d
        features = F.relu(d)
        logits = self.classifier(self.dropout(features))
        return logits, features, {k: seen[k] for k in taps}
