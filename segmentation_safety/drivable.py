"""The drivable corridor: where an anomaly matters for the frame-level hazard alarm.

An object lying on the road is, by definition, not classified as road: it appears as a
hole or a notch in the drivable mask. Counting only the pixels predicted drivable would
therefore miss exactly the hazards the alarm is for (measured with ESPNetv2 and energy
on the 10 Road Anomaly frames: the anomalous share of predicted road stayed under 2% on
7 of them). The corridor is the convex hull of the drivable pixels, which closes those
holes and notches; in perspective a road ahead is close to convex, so little else is
added.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

#: Areas the alarm can count over.
REGIONS = ("corridor", "drivable")


def drivable_mask(labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Boolean mask of the pixels whose label is in ``classes`` (same device)."""
    ids = list(dict.fromkeys(classes))
    mask = labels == ids[0]
    for c in ids[1:]:  # a few ids: compares beat torch.isin by 10x here
        mask |= labels == c
    return mask


def drivable_region(
    labels: torch.Tensor, classes: Sequence[int], region: str = "corridor", step: int = 4
) -> torch.Tensor:
    """Boolean H×W mask (on ``labels``' device) of the pixels the alarm counts.

    ``drivable``: pixels whose label is in ``classes``. ``corridor``: those plus their
    convex hull. The hull is found and filled on a grid of every ``step``-th pixel (a
    small copy to the host: cv2 has the hull), brought back at full size, and united
    with the drivable pixels themselves, so none is lost to the grid.
    """
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    drivable = drivable_mask(labels, classes)
    if region == "drivable":
        return drivable
    coarse = drivable[::step, ::step].to("cpu", torch.uint8).numpy()
    points = _row_ends(coarse)
    if points is None:
        return drivable
    hull = np.zeros_like(coarse)
    cv2.fillConvexPoly(hull, cv2.convexHull(points), 1)
    h, w = labels.shape[-2:]
    hc, wc = hull.shape
    coarse_hull = torch.from_numpy(hull).to(labels.device).bool()
    # Each grid cell back to its step×step block: one expanded copy, no interpolation.
    full = coarse_hull[:, None, :, None].expand(hc, step, wc, step).reshape(hc * step, -1)
    return full[:h, :w] | drivable


def _row_ends(mask: np.ndarray) -> np.ndarray | None:
    """N×1×2 int32 (x, y) points: the first and last set pixel of every row, None if no
    pixel is set. Every other set pixel lies between its row's two, so their convex hull
    is the mask's; hulling thousands of points instead took most of the corridor's time.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    width = mask.shape[1]
    inside = mask[rows].astype(bool)
    first = inside.argmax(axis=1)
    last = width - 1 - inside[:, ::-1].argmax(axis=1)
    xs = np.concatenate([first, last])
    ys = np.concatenate([rows, rows])
    return np.stack([xs, ys], axis=1).astype(np.int32).reshape(-1, 1, 2)
