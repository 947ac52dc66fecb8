"""torchvision segmentation networks behind the :class:`Segmenter` interface.

torchvision's own ``forward`` returns only upsampled logits, so each wrapper runs the
network's modules itself: one pass yields the logits at the network's output stride,
the exact input of the (linear) classifier and pre-activation taps. Weights are never
downloaded here (``weights=None``, ``weights_backbone=None``); trained weights come from
bundles.

The weights are kept channels-last, as ESPNetv2's: the frames reach the network
channels-first, and with channels-first weights the CPU pass stayed in that layout. On
real 720×1280 frames at 520×928 (2-core CPU) LR-ASPP's pass took 56-58 ms that way and
37 ms channels-last, DeepLabV3's 1.69-1.71 s and 1.29-1.31 s, with the same labels; the
logits then come out channels-last too, which the label map's gathers read as rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segmentation_safety.models.segmenter import IMAGENET_MEAN, IMAGENET_STD, Segmenter


class LRASPPMobileNetV3(Segmenter):
    """LR-ASPP on MobileNetV3-Large (Howard et al., 2019), output stride 8.

    The head adds two 1×1 classifiers, one on the stride-8 ``low`` block and one on the
    gated, upsampled ``high`` branch; ``features`` is their concatenation, so the logits
    are exactly a linear map of the features.

    Taps (pre-activation): ``stride4`` (24 ch, the last stride-4 block), ``low`` (40 ch,
    stride 8), ``mid`` (112 ch, stride 16), ``high`` (960 ch, the last backbone conv before
    hardswish), ``head`` (128 ch, the head's conv-BN before ReLU, stride 16).
    """

    def __init__(
        self,
        num_classes: int = 19,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        from torchvision.models.segmentation import lraspp_mobilenet_v3_large

        super().__init__(mean=mean, std=std)
        self.num_classes = num_classes
        self.net = lraspp_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=num_classes
        )
        self.net.to(memory_format=torch.channels_last)  # see the module's docstring
        blocks = list(self.net.backbone.values())
        # Blocks flagged _is_cn start a new stride; the tap before each start ends a stage.
        starts = [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)]
        low_pos = int(next(k for k, v in self.net.backbone.return_layers.items() if v == "low"))
        mid_pos = starts[-1] - 1
        self._taps_at = {low_pos - 1: "stride4", low_pos: "low", mid_pos: "mid"}
        head = self.net.classifier
        inter = head.cbr[0].out_channels
        low_ch = head.low_classifier.in_channels
        self.feature_channels = low_ch + inter
        self.default_flow_layers = ("mid",)
        self.embedding_channels = {
            "stride4": _out_channels(blocks[low_pos - 1]),
            "low": low_ch,
            "mid": _out_channels(blocks[mid_pos]),
            "high": head.cbr[0].in_channels,
            "head": inter,
        }

    def compute(
        self, x: torch.Tensor, taps: frozenset[str]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        seen: dict[str, torch.Tensor] = {}
        blocks = list(self.net.backbone.values())
        for i, block in enumerate(blocks[:-1]):
            x = block(x)
            if i in self._taps_at:
                seen[self._taps_at[i]] = x
        last = blocks[-1]
        high_pre = last[1](last[0](x))
        seen["high"] = high_pre
        # Out of place: the module's own activation is in-place and would overwrite the tap.
        high = F.hardswish(high_pre)
        head = self.net.classifier
        head_pre = head.cbr[1](head.cbr[0](high))
        seen["head"] = head_pre
        gated = F.relu(head_pre) * head.scale(high)
        low = seen["low"]
        gated = F.interpolate(gated, size=low.shape[-2:], mode="bilinear", align_corners=False)
        logits = head.low_classifier(low) + head.high_classifier(gated)
        features = torch.cat([low, gated], dim=1)
        return logits, features, {k: seen[k] for k in taps}


class DeepLabV3ResNet50(Segmenter):
    """DeepLabV3 (Chen et al., 2017) on a dilated ResNet-50, output stride 8.

    ``features`` are the 256-channel map after the head's 3×3 conv-BN-ReLU, the input of
    the final 1×1 classifier. Taps (pre-ReLU, the residual sum of each stage's last
    block): ``layer1`` (256, stride 4), ``layer2`` (512, stride 8), ``layer3`` (1024),
    ``layer4`` (2048); ``head`` (256, the head's conv-BN before ReLU).
    """

    def __init__(
        self,
        num_classes: int = 19,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        from torchvision.models.segmentation import deeplabv3_resnet50

        super().__init__(mean=mean, std=std)
        self.num_classes = num_classes
        self.net = deeplabv3_resnet50(
            weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False
        )
        self.net.to(memory_format=torch.channels_last)  # see the module's docstring
        self.feature_channels = self.net.classifier[4].in_channels
        self.default_flow_layers = ("layer2",)
        self.embedding_channels = {
            "layer1": 256,
            "layer2": 512,
            "layer3": 1024,
            "layer4": 2048,
            "head": self.feature_channels,
        }

    def compute(
        self, x: torch.Tensor, taps: frozenset[str]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        bb = self.net.backbone
        x = bb.maxpool(bb.relu(bb.bn1(bb.conv1(x))))
        seen: dict[str, torch.Tensor] = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            stage = getattr(bb, name)
            for block in list(stage)[:-1]:
                x = block(x)
            seen[name] = _bottleneck_pre_relu(stage[-1], x)
            x = F.relu(seen[name])
        head = self.net.classifier
        head_pre = head[2](head[1](head[0](x)))
        seen["head"] = head_pre
        features = F.relu(head_pre)
        logits = head[4](features)
        return logits, features, {k: seen[k] for k in taps}


def _bottleneck_pre_relu(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision ResNet Bottleneck's residual sum, before its final ReLU."""
    identity = x if block.downsample is None else block.downsample(x)
    y = block.relu(block.bn1(block.conv1(x)))
    y = block.relu(block.bn2(block.conv2(y)))
    return block.bn3(block.conv3(y)) + identity


def _out_channels(block: nn.Module) -> int:
    return int(block.out_channels)
