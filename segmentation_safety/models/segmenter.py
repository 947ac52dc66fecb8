"""The segmenter interface every backend implements.

One forward pass returns the logits, the pre-logit features and any named
intermediate embeddings a detector asked for, so detectors never re-run the network.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segmentation_safety.types import SegmenterOutput

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Segmenter(nn.Module):
    """Base class. Subclasses implement :meth:`compute` and set the attributes below.

    Attributes:
        num_classes: number of logit channels the detectors see (K).
        feature_channels: channels of the pre-logit features.
        embedding_channels: name -> channels of every tap :meth:`compute` can return.
    """

    num_classes: int
    feature_channels: int
    embedding_channels: dict[str, int]
    #: Taps the flow-density detector models by default (a mid-level layer, as in Fishyscapes §4.2).
    default_flow_layers: tuple[str, ...] = ()

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 255] float B×3×H×W -> normalised float network input."""
        # (x / 255 - mean) / std as one fused multiply-add over the frame: three passes
        # took 2.9 ms at 512×1024 on the CPU, this one 1.4 (equal to 5e-7). uint8 pixels
        # go in as they are: the op reads them as floats, with no float copy made first;
        # on the CPU they take the same op's values from a table instead (cheaper still).
        scale = 1.0 / (255.0 * self.std)
        shift = -self.mean / self.std
        if images.dtype != torch.uint8:
            return torch.addcmul(shift, images.float(), scale)
        looked_up = _normalize_by_table(images, shift, scale)
        return torch.addcmul(shift, images, scale) if looked_up is None else looked_up

    def compute(
        self, x: torch.Tensor, taps: frozenset[str]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Run the network on normalised ``x``; return (logits, features, taps asked for)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, embeddings: Sequence[str] = ()) -> SegmenterOutput:
        unknown = set(embeddings) - set(self.embedding_channels)
        if unknown:
            raise KeyError(
                f"{type(self).__name__} has no embedding {sorted(unknown)}; "
                f"available: {sorted(self.embedding_channels)}"
            )
        logits, features, taps = self.compute(x, frozenset(embeddings))
        return SegmenterOutput(logits=logits, features=features, embeddings=taps, image=x)


_BYTE_VALUES = torch.arange(256, dtype=torch.uint8).view(1, 256)


def _normalize_by_table(
    images: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor | None:
    """uint8 B×3×H×W frames on the CPU, normalised through one 256-entry table per
    channel (OpenCV's LUT), returned channels-first whichever layout came in; None for a
    layout without such a path (or another device).

    Each entry is the multiply-add's own result for that byte, so the input is the one
    ``torch.addcmul`` gives (tests check every byte in both layouts); a lookup is cheaper
    than converting and blending each pixel: 0.34 against 0.82 ms at 512×1024.
    """
    if images.device.type != "cpu" or shift.device.type != "cpu" or images.ndim != 4:
        return None
    if images.numel() == 0:  # OpenCV refuses empty arrays; the multiply-add does not
        return None
    b, c, h, w = images.shape
    if c != 3:
        return None
    table = torch.addcmul(shift.view(3, 1), _BYTE_VALUES, scale.view(3, 1)).numpy()  # 3×256
    if table.dtype != np.float32:  # a segmenter cast to another precision
        return None
    if images.permute(0, 2, 3, 1).is_contiguous():  # channels-last, as frames arrive
        # Split into planes, then one single-channel table each: on one thread (the
        # node's OpenCV) 0.51 ms at 512×1024 against 0.68 for one three-channel lookup.
        pixels = images.permute(0, 2, 3, 1).numpy()
        frames = [cv2.split(pixels[i]) for i in range(b)]
    elif images.is_contiguous():
        frames = list(images.numpy())
    else:
        return None
    out = np.empty((b, 3, h, w), np.float32)
    for i, planes in enumerate(frames):
        for ch in range(3):
            cv2.LUT(planes[ch], table[ch].reshape(256, 1), dst=out[i, ch])
    return torch.from_numpy(out)


def resize_map(
    t: torch.Tensor, size: Sequence[int], into: torch.Tensor | None = None
) -> torch.Tensor:
    """B×C×h×w network-resolution maps (logits, scores) -> ``size``: bilinear,
    align_corners=False. Everything that brings a map to another size goes through this
    (the node, ``segsafe evaluate``, the detectors and their losses), so they agree.

    Finite float32 maps on the CPU with no gradient wanted are resized by OpenCV, plane
    by plane: the same half-pixel bilinear, 3-7× faster than PyTorch's CPU kernel on one
    channel (0.09 against 0.31 ms to 512×1024, 0.18 against 1.30 ms to 1024×2048), and
    the node resizes two score maps a frame. The values agree with PyTorch's to float
    rounding at integer scale factors and to within 2e-5 of the map's range otherwise
    (OpenCV derives its weights in another precision), far below what any threshold
    resolves. Maps with NaN, ±inf or values near float32's limit stay with PyTorch:
    OpenCV blends an infinite score into NaN around it where PyTorch keeps it infinite,
    and a hazard scored +inf would shrink to a speck. Gradients and other devices stay
    with PyTorch too. ``into``: a contiguous tensor of the result's shape to write it to
    (the node's message buffer), returned.
    """
    if tuple(t.shape[-2:]) == tuple(size):
        return t if into is None else into.copy_(t)
    if _opencv_resizes(t, size):
        return _resize_opencv(t, size, into)
    resized = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    return resized if into is None else into.copy_(resized)


#: Above this magnitude OpenCV's blend of two neighbours can overflow where PyTorch's
#: does not.
_OPENCV_MAX_MAGNITUDE = 1e30


def _opencv_resizes(t: torch.Tensor, size: Sequence[int]) -> bool:
    return (
        t.device.type == "cpu"
        and t.dtype == torch.float32
        and t.dim() == 4
        and t.numel() > 0
        and min(int(size[0]), int(size[1])) > 0
        and not (t.requires_grad and torch.is_grad_enabled())
        # One pass at the network's resolution: NaN compares false, ±inf exceeds.
        and bool(t.detach().abs().amax() < _OPENCV_MAX_MAGNITUDE)
    )


def _resize_opencv(
    t: torch.Tensor, size: Sequence[int], into: torch.Tensor | None = None
) -> torch.Tensor:
    height, width = int(size[0]), int(size[1])
    planes = t.detach().reshape(-1, *t.shape[-2:]).numpy()
    shape = (planes.shape[0], height, width)
    out = np.empty(shape, dtype=np.float32) if into is None else into.numpy().reshape(shape)
    for plane, dst in zip(planes, out, strict=True):
        cv2.resize(np.ascontiguousarray(plane), (width, height), dst=dst,
                   interpolation=cv2.INTER_LINEAR)  # fmt: skip
    return torch.from_numpy(out).view(*t.shape[:2], height, width) if into is None else into
