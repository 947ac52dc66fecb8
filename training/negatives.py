"""Negative pasting for DenseHybrid fine-tuning (DenseHybrid §3.2 Fig. 4, §7.4; DESIGN §4).

A mixed-content sample is an inlier crop with part of a negative image pasted on it:
with probability ``p_rect`` a random rectangle of the negative, otherwise the union of
the negative's instance masks, at a uniform random position. Pasted pixels get the
ignore label for the segmentation loss and form the outlier mask for the head. The
caller resizes the negative beforehand (the paper resizes ADE20k images to 768 and
takes a jittered 384 crop for 768 inlier crops). All randomness comes from the given
``torch.Generator``, so a seeded generator reproduces a sample exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class PastedSample(NamedTuple):
    image: torch.Tensor  # C×H×W, same dtype as the inlier image
    target: torch.Tensor  # H×W, ignore label on pasted pixels
    outlier_mask: torch.Tensor  # H×W bool, True on pasted pixels


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def _random_rectangle(
    negative: torch.Tensor, max_h: int, max_w: int, min_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A rectangle of uniform random size and position inside ``negative``, full mask."""
    _, nh, nw = negative.shape
    hi_h, hi_w = min(nh, max_h), min(nw, max_w)
    ph = _randint(min(min_size, hi_h), hi_h, generator)
    pw = _randint(min(min_size, hi_w), hi_w, generator)
    top = _randint(0, nh - ph, generator)
    left = _randint(0, nw - pw, generator)
    patch = negative[:, top : top + ph, left : left + pw]
    return patch, torch.ones(ph, pw, dtype=torch.bool)


def _instance_union(
    negative: torch.Tensor,
    instances: torch.Tensor,
    max_h: int,
    max_w: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bounding box of all instances (ids > 0) with their union as mask.

    A box larger than the inlier image is cut to a random window of the image's size.
    """
    union = instances > 0
    rows = union.any(dim=1).nonzero().flatten()
    cols = union.any(dim=0).nonzero().flatten()
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    left, right = int(cols[0]), int(cols[-1]) + 1
    ph, pw = min(bottom - top, max_h), min(right - left, max_w)
    top = _randint(top, bottom - ph, generator)
    left = _randint(left, right - pw, generator)
    window = (slice(top, top + ph), slice(left, left + pw))
    return negative[:, window[0], window[1]], union[window]


def paste_negative(
    image: torch.Tensor,
    target: torch.Tensor,
    negative: torch.Tensor,
    generator: torch.Generator,
    instances: torch.Tensor | None = None,
    p_rect: float = 0.5,
    ignore_index: int = 255,
    min_size: int = 16,
) -> PastedSample:
    """Paste part of ``negative`` onto ``image`` at a uniform random position.

    Args:
        image: C×H×W inlier crop (uint8 or float).
        target: H×W train ids of the crop.
        negative: C×h×w negative image (same channels and value range as ``image``).
        generator: source of every random choice.
        instances: h×w instance ids of the negative (0 = no instance); without any
            instance the rectangle mode is used.
        p_rect: probability of the rectangle mode.
        ignore_index: label written on pasted pixels.
        min_size: smallest rectangle side (clipped to the available size).

    Returns:
        The new image, the new target and the outlier mask; the inputs are not modified.
    """
    if image.dim() != 3 or negative.dim() != 3 or image.shape[0] != negative.shape[0]:
        raise ValueError(
            f"image {tuple(image.shape)} and negative {tuple(negative.shape)} must be C×H×W "
            "with the same channels"
        )
    _, h, w = image.shape
    if target.shape != (h, w):
        raise ValueError(f"target {tuple(target.shape)} does not match image {(h, w)}")
    if instances is not None and instances.shape != negative.shape[1:]:
        raise ValueError(
            f"instances {tuple(instances.shape)} do not match negative {tuple(negative.shape)}"
        )
    # Draw the mode first, always, so the stream of draws does not depend on the data.
    use_rect = float(torch.rand((), generator=generator)) < p_rect
    if use_rect or instances is None or not bool((instances > 0).any()):
        patch, mask = _random_rectangle(negative, h, w, min_size, generator)
    else:
        patch, mask = _instance_union(negative, instances, h, w, generator)
    ph, pw = mask.shape
    top = _randint(0, h - ph, generator)
    left = _randint(0, w - pw, generator)

    mask = mask.to(image.device)
    outlier = torch.zeros(h, w, dtype=torch.bool, device=image.device)
    outlier[top : top + ph, left : left + pw] = mask
    new_image = image.clone()
    region = new_image[:, top : top + ph, left : left + pw]
    region[:, mask] = patch.to(image.device, image.dtype)[:, mask]
    new_target = target.clone()
    new_target[outlier.to(target.device)] = ignore_index
    return PastedSample(new_image, new_target, outlier)
