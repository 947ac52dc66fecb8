"""Joint image/label augmentation for training, as in torchvision's segmentation references.

Every random choice comes from the generator passed in (the engine seeds one per
sample), so a sample is reproduced exactly whatever the rank or worker that loads it.
Images are uint8 3×H×W tensors, labels int64 H×W train ids with 255 for void.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

VOID = 255


def to_tensors(image: np.ndarray, label: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 H×W×3 image and uint8 H×W label (arrays) -> 3×H×W uint8, H×W int64 tensors."""
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
    if label is None:
        lab = torch.full(img.shape[1:], VOID, dtype=torch.int64)
    else:
        lab = torch.from_numpy(np.ascontiguousarray(label)).to(torch.int64)
    return img, lab


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def resize(
    image: torch.Tensor, label: torch.Tensor, size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear for the image, nearest for the label (never invents class ids)."""
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        return image, label
    img = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)
    img = img.round().clamp(0, 255).to(torch.uint8)[0]
    lab = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return img, lab


def random_scale_crop_flip(
    image: torch.Tensor,
    label: torch.Tensor,
    generator: torch.Generator,
    crop_size: Sequence[int],
    scale_range: Sequence[float] = (0.5, 2.0),
    flip: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rescale, pad (image 0, label void) to ``crop_size``, random crop, h-flip."""
    _, h, w = image.shape
    s = _uniform(float(scale_range[0]), float(scale_range[1]), generator)
    image, label = resize(image, label, (max(1, round(h * s)), max(1, round(w * s))))
    ch, cw = int(crop_size[0]), int(crop_size[1])
    _, h, w = image.shape
    pad_h, pad_w = max(0, ch - h), max(0, cw - w)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
        label = F.pad(label, (0, pad_w, 0, pad_h), value=VOID)
    _, h, w = image.shape
    top = int(torch.randint(0, h - ch + 1, (), generator=generator))
    left = int(torch.randint(0, w - cw + 1, (), generator=generator))
    image = image[:, top : top + ch, left : left + cw]
    label = label[top : top + ch, left : left + cw]
    # Draw always, so the number of draws per sample never depends on the outcome.
    if float(torch.rand((), generator=generator)) < flip:
        image, label = image.flip(-1), label.flip(-1)
    return image.contiguous(), label.contiguous()
