"""ESPNetv2 for semantic segmentation (Mehta et al., CVPR 2019), written for this project.

The encoder is built from EESP units (reduce with a grouped 1×1 conv, split into K
depth-wise dilated 3×3 branches, fuse them hierarchically, merge with a grouped 1×1
conv) and strided down-samplers that concatenate an average-pooled copy of their input
and add a projection of the (pooled) RGB image ("input reinforcement"). The decoder
climbs back to stride 2 with efficient pyramid pooling blocks and squeeze-weighted skip
projections of the encoder levels.

Module and attribute names follow the tensor names of the public Cityscapes checkpoints
(``base_net.level1`` ... ``bu_dec_l4``), so those state dicts load with strict matching.

The Cityscapes checkpoints predict 20 channels: train ids 0-18, then a background class.
:class:`ESPNetv2Segmenter` gives the detectors the first ``num_classes`` channels and
offers the rest as the ``background`` tap.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segmentation_safety.models.segmenter import IMAGENET_MEAN, IMAGENET_STD, Segmenter

#: Channels of level1 ... level4 for each width multiplier ``s`` (the paper's Table 1).
LEVEL_CHANNELS: dict[float, tuple[int, int, int, int]] = {
    0.5: (16, 32, 64, 128),
    1.0: (32, 64, 128, 256),
    1.25: (32, 80, 160, 320),
    1.5: (32, 96, 192, 384),
    2.0: (32, 128, 256, 512),
}
_LEVEL3_UNITS = 3
_LEVEL4_UNITS = 7
_BRANCHES = 4
# Largest effective kernel a branch may reach, per spatial level (level2 first).
_RECEPTIVE_LIMIT = (13, 11, 9, 7)
# Width of the RGB projection that input reinforcement adds at every down-sampler.
_REINFORCE_CHANNELS = 3
_PYRAMID_SCALES = (2.0, 1.5, 1.0, 0.5, 0.1)


class _ConvUnit(nn.Module):
    """Conv, then optional batch norm, then optional PReLU; can also return the pre-PReLU map."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        norm: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__()
        pad = (kernel - 1) // 2 * dilation
        self.conv = nn.Conv2d(
            cin, cout, kernel, stride, pad, dilation=dilation, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(cout) if norm else None
        self.act = nn.PReLU(cout) if act else None

    def pre_act(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.bn(x) if self.bn is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_act(x)
        return self.act(x) if self.act is not None else x


class _NormAct(nn.Module):
    """Batch norm then PReLU, as one unit (the checkpoints name it ``bn``/``act``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


def _branch_dilations(branches: int, receptive_limit: int) -> list[int]:
    """Dilation of each branch: kernels 3, 5, 7, ... capped at the limit, sorted ascending.

    A branch whose effective kernel would exceed the limit falls back to a plain 3×3.
    """
    sizes = sorted(3 + 2 * i if 3 + 2 * i <= receptive_limit else 3 for i in range(branches))
    return [(k - 1) // 2 for k in sizes]


class EESP(nn.Module):
    """Extremely efficient spatial pyramid unit (paper Fig. 1c / §3.2).

    With ``stride=2`` it returns the merged map before any residual or activation, since
    the :class:`DownSampler` adds the other branches before its own PReLU.
    """

    def __init__(
        self, cin: int, cout: int, stride: int = 1, branches: int = 4, receptive_limit: int = 7
    ) -> None:
        super().__init__()
        if cout % branches:
            raise ValueError(f"EESP output {cout} is not divisible by {branches} branches")
        width = cout // branches
        self.stride = stride
        self.proj_1x1 = _ConvUnit(cin, width, 1, groups=branches)
        self.spp_dw = nn.ModuleList(
            _ConvUnit(width, width, 3, stride, groups=width, dilation=d, norm=False, act=False)
            for d in _branch_dilations(branches, receptive_limit)
        )
        self.br_after_cat = _NormAct(cout)
        self.conv_1x1_exp = _ConvUnit(cout, cout, 1, groups=branches, act=False)
        # Unused when stride is 2, but part of every checkpoint.
        self.module_act = nn.PReLU(cout)

    def merged(self, x: torch.Tensor) -> torch.Tensor:
        """Reduce, split, transform, fuse hierarchically, merge; plus the residual if shapes fit."""
        reduced = self.proj_1x1(x)
        outs: list[torch.Tensor] = []
        for branch in self.spp_dw:
            y = branch(reduced)
            # Hierarchical feature fusion: adding the previous branch removes gridding.
            outs.append(y if not outs else y + outs[-1])
        y = self.conv_1x1_exp(self.br_after_cat(torch.cat(outs, dim=1)))
        if self.stride == 1 and y.shape == x.shape:
            y = y + x
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.merged(x)
        return y if self.stride == 2 else self.module_act(y)


class ImagePyramid:
    """The RGB image pooled with the downsamplers' 3×3/2 window, level after level.

    Each downsampler reads the image at its own size; sharing the levels pools the full
    image once a pass, not once per downsampler (three times; at 512×1024 on the CPU each
    full-size pool took 1.3 ms and each half-size one 0.3)."""

    def __init__(self, image: torch.Tensor) -> None:
        self.levels = [image]

    def down_to(self, height: int) -> torch.Tensor:
        """The first level no taller than ``height`` (pooling further as needed)."""
        while self.levels[-1].shape[-2] > height:
            self.levels.append(F.avg_pool2d(self.levels[-1], 3, 2, 1))
        return next(level for level in self.levels if level.shape[-2] <= height)


class DownSampler(nn.Module):
    """Strided EESP concatenated with an average-pooled input, plus input reinforcement."""

    def __init__(self, cin: int, cout: int, receptive_limit: int, branches: int = 4) -> None:
        super().__init__()
        self.eesp = EESP(cin, cout - cin, 2, branches, receptive_limit)
        self.inp_reinf = nn.Sequential(
            _ConvUnit(3, _REINFORCE_CHANNELS, 3),
            _ConvUnit(_REINFORCE_CHANNELS, cout, 1, act=False),
        )
        self.act = nn.PReLU(cout)

    def pre_act(self, x: torch.Tensor, image: ImagePyramid) -> torch.Tensor:
        pooled = F.avg_pool2d(x, 3, 2, 1)
        y = torch.cat([pooled, self.eesp(x)], dim=1)
        small = image.down_to(pooled.shape[-2])
        if small.shape[-2:] != pooled.shape[-2:]:
            small = F.adaptive_avg_pool2d(small, pooled.shape[-2:])
        return y + self.inp_reinf(small)

    def forward(self, x: torch.Tensor, image: ImagePyramid) -> torch.Tensor:
        return self.act(self.pre_act(x, image))


class ESPNetv2Encoder(nn.Module):
    """Levels 1-4 of the ESPNetv2 backbone (the classification level 5 is not used)."""

    def __init__(self, scale: float = 2.0) -> None:
        super().__init__()
        if scale not in LEVEL_CHANNELS:
            raise ValueError(f"ESPNetv2 scale {scale} not supported; use {sorted(LEVEL_CHANNELS)}")
        c1, c2, c3, c4 = LEVEL_CHANNELS[scale]
        lim = _RECEPTIVE_LIMIT
        self.channels = (c1, c2, c3, c4)
        self.level1 = _ConvUnit(3, c1, 3, stride=2)
        self.level2_0 = DownSampler(c1, c2, lim[0], _BRANCHES)
        self.level3_0 = DownSampler(c2, c3, lim[1], _BRANCHES)
        self.level3 = nn.ModuleList(
            EESP(c3, c3, 1, _BRANCHES, lim[2]) for _ in range(_LEVEL3_UNITS)
        )
        self.level4_0 = DownSampler(c3, c4, lim[2], _BRANCHES)
        self.level4 = nn.ModuleList(
            EESP(c4, c4, 1, _BRANCHES, lim[3]) for _ in range(_LEVEL4_UNITS)
        )

    def forward(self, image: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Return (outputs, pre-PReLU maps) of levels 1-4, strides 2, 4, 8 and 16."""
        pre1 = self.level1.pre_act(image)
        out1 = self.level1.act(pre1)
        pyramid = ImagePyramid(image)
        pre2 = self.level2_0.pre_act(out1, pyramid)
        out2 = self.level2_0.act(pre2)
        out3 = self.level3_0(out2, pyramid)
        pre3 = out3
        for unit in self.level3:
            pre3 = unit.merged(out3)
            out3 = unit.module_act(pre3)
        out4 = self.level4_0(out3, pyramid)
        pre4 = out4
        for unit in self.level4:
            pre4 = unit.merged(out4)
            out4 = unit.module_act(pre4)
        return [out1, out2, out3, out4], [pre1, pre2, pre3, pre4]


class _ChannelShuffle(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # Shuffled within each pixel's channels, and left channels-last: the
            # channels-first shuffle read a channels-last map with a stride per value and
            # wrote it channels-first, which the next conv then converted back (real
            # ESPNetv2 at 512×1024 on the CPU: 118-132 -> 106-109 ms a pass, same values).
            pixels = x.permute(0, 2, 3, 1).reshape(b, h, w, self.groups, c // self.groups)
            return pixels.transpose(3, 4).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class _SeqConvUnit(nn.Module):
    """Conv-BN-PReLU kept in a ``cbr`` sequential (the decoder's naming in the checkpoints)."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int = 1) -> None:
        super().__init__()
        self.cbr = nn.Sequential(
            nn.Conv2d(cin, cout, kernel, 1, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cbr(x)


class _SeqNormAct(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.br = nn.Sequential(nn.BatchNorm2d(channels), nn.PReLU(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.br(x)


class EfficientPyramidPool(nn.Module):
    """Project, run a shared-shape depth-wise 3×3 at several scales, shuffle, merge.

    Scales above 1 upsample before the conv and pool back; scales below 1 pool first and
    upsample back; every scale is at least 5 pixels on a side.
    The last block (``final=True``) ends in a biased 1×1 conv: the classifier.
    """

    def __init__(self, cin: int, proj: int, cout: int, final: bool = False) -> None:
        super().__init__()
        n = len(_PYRAMID_SCALES)
        self.scales = _PYRAMID_SCALES
        self.final = final
        self.projection_layer = _SeqConvUnit(cin, proj, 1)
        self.stages = nn.ModuleList(
            nn.Conv2d(proj, proj, 3, 1, 1, groups=proj, bias=False) for _ in range(n)
        )
        self.merge_layer = nn.Sequential(
            _SeqNormAct(proj * n),
            _ChannelShuffle(n),
            _SeqConvUnit(proj * n, proj, 3, groups=proj),
            nn.Conv2d(proj, cout, 1, bias=final),
        )
        if not final:
            self.br = _SeqNormAct(cout)

    def pyramid(self, x: torch.Tensor) -> torch.Tensor:
        """Everything up to (and including) the merge's 3×3: input of the last 1×1 conv."""
        x = self.projection_layer(x)
        h, w = x.shape[-2:]
        levels = []
        for scale, conv in zip(self.scales, self.stages):
            size = (max(5, math.ceil(h * scale)), max(5, math.ceil(w * scale)))
            if scale > 1.0:
                y = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
                y = F.adaptive_avg_pool2d(conv(y), (h, w))
            elif scale < 1.0:
                y = conv(F.adaptive_avg_pool2d(x, size))
                y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=True)
            else:
                y = conv(x)
            levels.append(y)
        y = torch.cat(levels, dim=1)
        for layer in list(self.merge_layer)[:-1]:
            y = layer(y)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.merge_layer[-1](self.pyramid(x))
        return y if self.final else self.br(y)


class SqueezeWeightedProjection(nn.Module):
    """Grouped 3×3 projection of an encoder level, scaled per channel by a global gate."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.wt_layer = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.Sigmoid()
        )
        self.expansion_layer = _SeqConvUnit(cin, cout, 3, groups=math.gcd(cin, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expansion_layer(x) * self.wt_layer(x)


class ESPNetv2Net(nn.Module):
    """The bare network; its ``state_dict`` keys equal those of the public checkpoints."""

    def __init__(
        self,
        scale: float = 2.0,
        out_channels: int = 20,
        decoder_base: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.base_net = ESPNetv2Encoder(scale)
        # No parameters, so the state dict keys stay those of the public checkpoints;
        # Identity when off, so that MC dropout refuses a network without any.
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        c1, c2, c3, c4 = self.base_net.channels
        d1, d2, d3 = 4 * decoder_base, 3 * decoder_base, 2 * decoder_base
        proj = min(out_channels // 2, decoder_base)
        self.proj_channels = proj
        self.decoder_channels = d3
        self.bu_dec_l1 = EfficientPyramidPool(c4, proj, d1)
        self.bu_dec_l2 = EfficientPyramidPool(d1, proj, d2)
        self.bu_dec_l3 = EfficientPyramidPool(d2, proj, d3)
        self.bu_dec_l4 = EfficientPyramidPool(d3, proj, out_channels, final=True)
        self.merge_enc_dec_l2 = SqueezeWeightedProjection(c3, d1)
        self.merge_enc_dec_l3 = SqueezeWeightedProjection(c2, d2)
        self.merge_enc_dec_l4 = SqueezeWeightedProjection(c1, d3)
        self.bu_br_l2 = nn.Sequential(nn.BatchNorm2d(d1), nn.PReLU(d1))
        self.bu_br_l3 = nn.Sequential(nn.BatchNorm2d(d2), nn.PReLU(d2))
        self.bu_br_l4 = nn.Sequential(nn.BatchNorm2d(d3), nn.PReLU(d3))

    @property
    def classifier(self) -> nn.Module:
        """The final biased 1×1 conv (a property: registering it twice would add keys)."""
        return self.bu_dec_l4.merge_layer[-1]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return logits (all channels, stride 2), their input features and the taps."""
        (e1, e2, e3, e4), pre = self.base_net(x)
        y = self.bu_dec_l1(e4)
        steps = (
            (e3, self.merge_enc_dec_l2, self.bu_br_l2, self.bu_dec_l2),
            (e2, self.merge_enc_dec_l3, self.bu_br_l3, self.bu_dec_l3),
        )
        for skip, merge, norm_act, block in steps:
            y = _up_to(y, skip) + merge(skip)
            y = block(norm_act(y))
        dec = self.bu_br_l4[0](_up_to(y, e1) + self.merge_enc_dec_l4(e1))
        features = self.bu_dec_l4.pyramid(self.bu_br_l4[1](dec))
        logits = self.classifier(self.dropout(features))
        return {
            "logits": logits,
            "features": features,
            "level1": pre[0],
            "level2": pre[1],
            "level3": pre[2],
            "level4": pre[3],
            "decoder": dec,
        }


def _up_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    # Upstream doubles the size; resizing to the skip's size is the same for even inputs
    # (align_corners=True ignores the scale factor) and also works for odd ones.
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=True)


class _FirstChannels(nn.Module):
    """``module`` keeping only its first ``count`` output channels (built on demand, so
    the wrapped conv is not registered twice in the segmenter's state dict)."""

    def __init__(self, module: nn.Module, count: int) -> None:
        super().__init__()
        self.module = module
        self.count = count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)[:, : self.count]


class ESPNetv2Segmenter(Segmenter):
    """ESPNetv2 behind the :class:`Segmenter` interface.

    ``logits`` are the first ``num_classes`` output channels at stride 2 (the network's
    own output resolution; upstream resizes them to the input with align_corners=True).
    Any further channels (the Cityscapes checkpoints' background class) come out as the
    ``background`` tap. ``features`` are the input of the final 1×1 classifier conv
    (post-PReLU, ``net.proj_channels`` wide). ``dropout`` > 0 puts a Dropout2d on them
    (upstream has none; it gives MC dropout the one layer it samples).

    Taps (all pre-PReLU): ``level1`` (stride 2), ``level2`` (stride 4), ``level3``
    (stride 8), ``level4`` (stride 16) are the encoder levels' last units; ``decoder`` is
    the stride-2 decoder map entering the classifier block.
    """

    def __init__(
        self,
        scale: float = 2.0,
        num_classes: int = 19,
        extra_channels: int = 1,
        dropout: float = 0.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(mean=mean, std=std)
        self.scale = float(scale)
        self.num_classes = num_classes
        self.extra_channels = extra_channels
        self.net = ESPNetv2Net(self.scale, num_classes + extra_channels, dropout=dropout)
        c1, c2, c3, c4 = self.net.base_net.channels
        self.feature_channels = self.net.proj_channels
        self.default_flow_layers = ("level4",)  # stride 16: within the CPU budget
        self.embedding_channels = {
            "level1": c1,
            "level2": c2,
            "level3": c3,
            "level4": c4,
            "decoder": self.net.decoder_channels,
        }
        if extra_channels:
            self.embedding_channels["background"] = extra_channels
        # Some layer drops the channels-last layout the node's frames arrive in, so the
        # weights carry it instead: the 512×1024 CPU pass went from about 550 to 370 ms
        # with outputs equal to 1e-6 (loaded weights keep this layout).
        self.net.to(memory_format=torch.channels_last)

    @property
    def dropout(self) -> nn.Module:
        """Dropout on the classifier's input (``dropout`` > 0; MC dropout samples it)."""
        return self.net.dropout

    @property
    def classifier(self) -> nn.Module:
        """features -> ``logits``: the final conv, without the extra (background) channels."""
        if not self.extra_channels:
            return self.net.classifier
        return _FirstChannels(self.net.classifier, self.num_classes)

    def compute(
        self, x: torch.Tensor, taps: frozenset[str]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        out = self.net(x)
        logits = out["logits"]
        out["background"] = logits[:, self.num_classes :]
        return logits[:, : self.num_classes], out["features"], {k: out[k] for k in taps}


def infer_scale(state: dict[str, torch.Tensor]) -> float:
    """Width multiplier of an ESPNetv2 state dict, read from the level2 output width."""
    key = "base_net.level2_0.inp_reinf.1.conv.weight"
    if key not in state:
        raise KeyError(f"not an ESPNetv2 segmentation state dict (no {key})")
    width = state[key].shape[0]
    for s, chans in LEVEL_CHANNELS.items():
        if chans[1] == width and chans[2] == state["base_net.level3_0.act.weight"].shape[0]:
            return s
    raise ValueError(f"no ESPNetv2 scale has level2 width {width}")


def load_espnetv2(
    path: str | os.PathLike[str], scale: float | None = None, num_classes: int = 19
) -> ESPNetv2Segmenter:
    """Build an :class:`ESPNetv2Segmenter` from an upstream ``.pth`` state dict (strict keys).

    The file is read with ``weights_only=True``, so no pickled code runs. ``scale`` is
    inferred from the tensor shapes when not given; the output width must equal
    ``num_classes`` plus the extra channels.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        return espnetv2_from_state(state, scale, num_classes)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def espnetv2_from_state(
    state: dict[str, torch.Tensor], scale: float | None = None, num_classes: int = 19
) -> ESPNetv2Segmenter:
    """An :class:`ESPNetv2Segmenter` holding an upstream state dict (strict keys)."""
    from segmentation_safety.models.zoo import build_segmenter

    if scale is None:
        scale = infer_scale(state)
    out_channels = state["bu_dec_l4.merge_layer.3.weight"].shape[0]
    if out_channels < num_classes:
        raise ValueError(f"{out_channels} output channels < num_classes={num_classes}")
    # build_segmenter records the architecture (defaults included), so it can be bundled.
    model = build_segmenter(
        "espnetv2", scale=scale, num_classes=num_classes, extra_channels=out_channels - num_classes
    )
    model.net.load_state_dict(state, strict=True)
    return model.eval()
