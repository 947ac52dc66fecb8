"""Comparison network for failure detection (SynthCP §3.2, eq. 5).

Two ResNet-18 encoders that do not share weights (as in the official code, although
the paper's text says "shared-weight") read (x, ŷ) and (G(ŷ), ŷ). The prediction
enters as one extra input channel: the softmax map projected to a single channel by a
learned 1×1 conv + BN + ReLU, shared by both branches (official-code fact). Two heads:

- IoU head: pooled features of both encoders, concatenated -> linear -> sigmoid -> K IoUs.
- Pixel head: per ResNet stage, both encoders' features concatenated -> 1×1 conv, BN,
  ReLU; the four fused maps are upsampled to the input size, concatenated and a 1×1 conv
  gives the "prediction correct here" logit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from segmentation_safety.models.pointwise import PointwiseConv2d, pointwise

RESNET18_LAYERS = (2, 2, 2, 2)


@dataclass
class ComparisonOutput:
    """What the comparison net predicts for a batch."""

    class_iou: torch.Tensor  # B×K in [0, 1]
    correct_logit: torch.Tensor  # B×1×H×W logit of "prediction correct", input size


def _init_conv(conv: nn.Conv2d) -> None:
    # Same init torchvision gives its ResNet convs, so a replaced stem matches the rest.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
        )
    layers = [BasicBlock(inplanes, planes, stride, downsample)]
    layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNetEncoder(nn.Module):
    """ResNet trunk (stem + four stages, no pooling or fc) returning every stage's output.

    ``width=64, layers=(2, 2, 2, 2)`` is torchvision's ResNet-18 (built by
    ``resnet18(weights=None)``, stem widened to ``in_channels``); other values give a
    reduced ResNet of the same shape for tests and the demo. Attribute names follow
    torchvision, so ImageNet weights could be loaded where they are available.
    """

    def __init__(
        self, in_channels: int = 4, width: int = 64, layers: Sequence[int] = RESNET18_LAYERS
    ) -> None:
        super().__init__()
        layers = tuple(layers)
        if len(layers) != 4:
            raise ValueError(f"layers needs 4 stage depths, got {layers}")
        self.channels = (width, 2 * width, 4 * width, 8 * width)
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        _init_conv(self.conv1)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        if width == 64 and layers == RESNET18_LAYERS:
            net = torchvision.models.resnet18(weights=None)
            self.bn1 = net.bn1
            self.layer1, self.layer2 = net.layer1, net.layer2
            self.layer3, self.layer4 = net.layer3, net.layer4
        else:
            self.bn1 = nn.BatchNorm2d(width)
            c = self.channels
            self.layer1 = _stage(width, c[0], layers[0], 1)
            self.layer2 = _stage(c[0], c[1], layers[1], 2)
            self.layer3 = _stage(c[1], c[2], layers[2], 2)
            self.layer4 = _stage(c[2], c[3], layers[3], 2)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    _init_conv(m)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            feats.append(x)
        return feats


class ComparisonNet(nn.Module):
    """F(x, x̂, ŷ; θ) of eq. 5: per-class IoU and per-pixel correctness of ŷ."""

    def __init__(
        self,
        num_classes: int,
        width: int = 64,
        layers: Sequence[int] = RESNET18_LAYERS,
        fuse_channels: int = 64,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self._arch = {"width": width, "layers": list(layers), "fuse_channels": fuse_channels}
        self.pred_proj = nn.Sequential(
            PointwiseConv2d(num_classes, 1), nn.BatchNorm2d(1), nn.ReLU(inplace=True)
        )
        self.encoder_image = ResNetEncoder(4, width, layers)
        self.encoder_synth = ResNetEncoder(4, width, layers)
        chans = self.encoder_image.channels
        self.fuse = nn.ModuleList(
            nn.Sequential(
                PointwiseConv2d(2 * c, fuse_channels, bias=False),
                nn.BatchNorm2d(fuse_channels),
                nn.ReLU(inplace=True),
            )
            for c in chans
        )
        self.pixel_head = PointwiseConv2d(len(chans) * fuse_channels, 1)
        self.iou_head = nn.Linear(2 * chans[-1], num_classes)

    def architecture(self) -> dict[str, Any]:
        """Builder kwargs for bundle metadata; :func:`build_comparison` inverts it."""
        return {"name": "synthcp_comparison", "num_classes": self.num_classes, **self._arch}

    def forward(
        self, image: torch.Tensor, synthesized: torch.Tensor, pred_probs: torch.Tensor
    ) -> ComparisonOutput:
        """``image``, ``synthesized``: B×3×H×W (same normalisation); ``pred_probs``:
        B×K×h×w softmax (or one-hot) of the prediction ŷ, at the image size or below.

        A smaller ``pred_probs`` stands for its bilinear upsampling to H×W. The 1×1
        projection and the (eval-mode) batch norm of ``pred_proj`` are affine per pixel
        and commute with that upsampling, so they run first and one channel is
        upsampled instead of K: the same result at a fraction of the cost.
        """
        if synthesized.shape != image.shape or pred_probs.shape[0] != image.shape[0]:
            raise ValueError("image, synthesized image and prediction must share B×H×W")
        if pred_probs.shape[-2] > image.shape[-2] or pred_probs.shape[-1] > image.shape[-1]:
            raise ValueError("the prediction must not be larger than the image")
        size = image.shape[-2:]
        if pred_probs.shape[-2:] == size:
            pred = self.pred_proj(pred_probs)
        else:
            proj, norm, act = self.pred_proj
            pred = F.interpolate(
                norm(proj(pred_probs)), size=size, mode="bilinear", align_corners=False
            )
            pred = act(pred)
        feats_x = self.encoder_image(torch.cat([image, pred], dim=1))
        feats_s = self.encoder_synth(torch.cat([synthesized, pred], dim=1))

        fw = self.pixel_head.weight
        c = fw.shape[1] // len(self.fuse)
        logit = self.pixel_head.bias.view(1, 1, 1, 1)
        for i, (fx, fs, fuse) in enumerate(zip(feats_x, feats_s, self.fuse, strict=True)):
            fused = fuse(torch.cat([fx, fs], dim=1))
            # Bilinear resizing and a 1×1 conv are both linear and commute, so applying
            # the head's slice for this stage first and upsampling one channel equals the
            # official upsample-concat-conv, without upsampling 4×C full-size maps.
            part = pointwise(fused, fw[:, i * c : (i + 1) * c, 0, 0])
            logit = logit + F.interpolate(part, size=size, mode="bilinear", align_corners=False)

        pooled = torch.cat([feats_x[-1].mean(dim=(2, 3)), feats_s[-1].mean(dim=(2, 3))], dim=1)
        class_iou = torch.sigmoid(self.iou_head(pooled))
        return ComparisonOutput(class_iou=class_iou, correct_logit=logit)


def build_comparison(architecture: dict[str, Any]) -> ComparisonNet:
    """Rebuild a comparison net from :meth:`ComparisonNet.architecture` (bundle metadata)."""
    arch = dict(architecture)
    name = arch.pop("name", "synthcp_comparison")
    if name != "synthcp_comparison":
        raise ValueError(f"unknown comparison architecture {name!r}")
    return ComparisonNet(**arch)
