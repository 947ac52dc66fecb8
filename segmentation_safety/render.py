"""The node's pictures and alarm counts, computed on the pipeline's device.

The same arithmetic as :mod:`segmentation_safety.visualize` (which the reports use on
the host), in torch, so the node builds its colourised segmentation and hazard overlay
where the maps already are and copies only finished uint8 images to the host. Tests
check both agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from segmentation_safety import visualize
from segmentation_safety.device import on_host
from segmentation_safety.drivable import drivable_region
from segmentation_safety.metrics.segmentation import fuse_open_set


@dataclass(frozen=True)
class AlarmCounts:
    """Frame-level counts over the drivable area (``detector_node.alarm_message`` makes
    the HazardAlarm from them)."""

    area_pixels: int
    anomalous_pixels: int
    max_score: float  # highest finite score in the area; NaN when there is none
    mean_failure: float  # NaN-ignoring mean of the failure map; NaN without one


def palette_on(device: torch.device, palette: np.ndarray = visualize.PALETTE) -> torch.Tensor:
    return torch.tensor(np.array(palette), dtype=torch.uint8, device=device)


def colorize(
    labels: torch.Tensor, palette: torch.Tensor, into: torch.Tensor | None = None
) -> torch.Tensor:
    """H×W integer train ids -> H×W×3 uint8 RGB, as ``visualize.colorize_labels``
    (written to ``into``, a contiguous H×W×3 uint8 tensor, when given)."""
    if (
        labels.device.type == "cpu"
        and labels.dtype == torch.uint8
        and labels.dim() == 2
        and palette.shape == (256, 3)
    ):
        # OpenCV's colour map with the palette as its table (a user table is applied as
        # given, no BGR swap): 0.31 against 0.42 ms at 512×1024 and 1.2 against 3.2 at
        # 1024×2048 (alternating in one run) for one single-channel lookup per colour
        # then interleaved, which beat one three-channel lookup on the ids merged three
        # times and the gather below (the labels read as bytes, not as 8-byte indices).
        ids = np.ascontiguousarray(labels.numpy())
        table = np.ascontiguousarray(palette.numpy()).reshape(256, 1, 3)
        if into is not None:
            cv2.applyColorMap(ids, table, dst=into.numpy())
            return into
        return torch.from_numpy(cv2.applyColorMap(ids, table))
    # index_select: about 4× faster than advanced indexing on the CPU for the same gather.
    ids = labels.reshape(-1).long()
    if into is not None:
        torch.index_select(palette, 0, ids, out=into.view(-1, palette.shape[1]))
        return into
    return palette.index_select(0, ids).view(*labels.shape, palette.shape[1])


def map_range(values: torch.Tensor, percentiles: tuple[float, float] = (1.0, 99.0)) -> tuple:
    """(low, high) of the finite values at ``percentiles``, as ``visualize.map_range``.

    The node passes the network-resolution map: bilinear upsampling only interpolates
    between its values, and ranking 4× fewer of them is what keeps this cheap. On the
    CPU numpy's percentiles (partial selection) are several times faster than
    torch.quantile's full sort, which was the overlay's costliest step.
    """
    if values.device.type == "cpu":
        return visualize.map_range(values.detach().float().numpy(), percentiles=percentiles)
    finite = values[torch.isfinite(values)].float()
    if finite.numel() == 0:
        return 0.0, 1.0
    q = torch.tensor([p / 100.0 for p in percentiles], device=finite.device)
    if finite.numel() > 1 << 24:  # torch.quantile's input limit
        finite = finite[:: finite.numel() // (1 << 23) + 1]
    lo, hi = torch.quantile(finite, q).tolist()
    return lo, hi


def hazard_overlay(
    rgb: torch.Tensor,
    anomaly: torch.Tensor,
    threshold: float,
    value_range: tuple[float, float],
    alpha: float = 0.6,
    color: Sequence[int] = (255, 0, 0),
    into: torch.Tensor | None = None,
    flagged: torch.Tensor | None = None,
) -> torch.Tensor:
    """H×W×3 uint8 and an H×W map -> H×W×3 uint8: ``visualize.hazard_overlay`` with a
    threshold (pixels above it painted, opacity growing with the score over
    ``value_range``); written to ``into`` (contiguous, H×W×3 uint8) when given.
    ``flagged``: ``flat_above(anomaly, threshold)`` where already known."""
    lo, hi = value_range
    span = hi - lo if hi > lo else 1.0
    out = rgb.contiguous().clone() if into is None else into.copy_(rgb)
    # Pixels at or below the threshold keep their colour exactly (weight 0), so only the
    # flagged ones, usually few, are blended. NaN compares false: never painted.
    if flagged is None:
        flagged = flat_above(anomaly, threshold)
    if flagged.numel():
        score = anomaly.reshape(-1).index_select(0, flagged).float()
        strength = ((score - lo) / span).nan_to_num_(nan=0.0, posinf=1.0, neginf=0.0)
        weight = (alpha * (0.5 + 0.5 * strength.clamp_(0.0, 1.0))).unsqueeze(1)
        pixels = out.view(-1, 3).index_select(0, flagged).float()
        paint = torch.tensor(list(color), dtype=torch.float32, device=rgb.device)
        blended = pixels.add_(weight * (paint - pixels))  # (1 - w) * rgb + w * paint
        blended = blended.add_(0.5).clamp_(0.0, 255.0).to(torch.uint8)
        out.view(-1, 3).index_copy_(0, flagged, blended)
    return out


def open_set(
    labels: torch.Tensor,
    anomaly: torch.Tensor,
    threshold: float,
    anomaly_class: int,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """H×W uint8 open-set labels: ``fuse_open_set``'s (``anomaly_class`` where the score
    is at or above ``threshold``, NaN never), written to ``into`` (contiguous H×W uint8)
    when given. ``labels`` are an argmax's, every id below ``anomaly_class``.

    On the host the fused id is the larger of the label and flagged × class, which that
    precondition makes equal: a compare and two byte passes, 0.05 against 0.31 ms for
    torch's masked fill at 512×1024."""
    if on_host(labels) and on_host(anomaly) and labels.dtype == torch.uint8 and anomaly_class < 256:
        out = np.empty(tuple(labels.shape), np.uint8) if into is None else into.numpy()
        with np.errstate(invalid="ignore"):
            flagged = np.greater_equal(anomaly.detach().numpy(), threshold)
        np.multiply(flagged.view(np.uint8), np.uint8(anomaly_class), out=out)
        np.maximum(labels.numpy(), out, out=out)
        return torch.from_numpy(out) if into is None else into
    fused = fuse_open_set(labels, anomaly, threshold, anomaly_class).to(torch.uint8)
    return fused if into is None else into.copy_(fused)


def flat_above(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """Flat indices of the values above ``threshold`` (NaN never is). numpy's on the
    host: its test and flatnonzero beat torch's there (0.09 against 0.28 ms for the
    indices over 512×1024, and the test as in ``on_host``)."""
    if on_host(values):
        with np.errstate(invalid="ignore", over="ignore"):
            return torch.from_numpy(np.flatnonzero(values.detach().numpy() > threshold))
    return (values > threshold).reshape(-1).nonzero().squeeze(1)


def alarm_counts(
    labels: torch.Tensor,
    anomaly: torch.Tensor | None,
    failure: torch.Tensor | None,
    threshold: float,
    drivable: Sequence[int],
    region: str = "corridor",
    above: torch.Tensor | None = None,
) -> AlarmCounts:
    """Counts for the hazard alarm; ``labels`` and ``anomaly`` share their size.

    ``region``: the drivable corridor or the drivable pixels only (see
    :mod:`segmentation_safety.drivable`). A NaN score counts as anomalous: a map that
    cannot be trusted must not hide a hazard. ``above``: ``flat_above(anomaly,
    threshold)`` where already known (the overlay's), which spares the host a test of
    every pixel.
    """
    mean_failure = float("nan")
    if failure is not None and failure.numel():
        mean_failure = _nanmean(failure.float())
    if anomaly is None:
        return AlarmCounts(0, 0, float("nan"), mean_failure)
    area = drivable_region(labels, drivable, region)
    if on_host(anomaly) and on_host(area):
        scores = anomaly.detach().float().numpy()
        listed = None if above is None else above.numpy()
        return _host_counts(area.numpy(), scores, threshold, mean_failure, listed)
    # Whole-frame passes with the pixels outside the area at -inf, which is quiet and
    # never a maximum: gathering the area's scores first (boolean indexing) cost four
    # times as much on the CPU for the corridor (half a street frame).
    scores = torch.where(area, anomaly.float(), float("-inf"))
    n_area = torch.count_nonzero(area)
    # A NaN score compares false: anomalous. A NaN threshold would also turn the -inf
    # outside the area anomalous; it flags the whole area instead.
    bad = n_area if math.isnan(threshold) else torch.count_nonzero(~(scores <= threshold))
    # neginf too: left unset, nan_to_num turns -inf (the pixels outside the area) into the
    # lowest float32, which became the "maximum" of an area without a finite score.
    inf = float("-inf")
    top = scores.nan_to_num_(nan=inf, posinf=inf, neginf=inf).amax()
    n_area, bad, max_score = torch.stack([n_area.double(), bad.double(), top.double()]).tolist()
    if max_score == float("-inf"):
        max_score = float("nan")
    return AlarmCounts(int(n_area), int(bad), max_score, mean_failure)


def _host_counts(
    area: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    mean_failure: float,
    above: np.ndarray | None = None,
) -> AlarmCounts:
    """:func:`alarm_counts`' counts in numpy (see ``on_host``), with the same rules;
    ``above``: the flat indices of the scores above ``threshold``, where known."""
    n_area = int(np.count_nonzero(area))
    if above is not None and not math.isnan(threshold):
        # NaN or +inf in the area would be its maximum. Without them every score there is
        # finite or -inf, and anomalous exactly when above the threshold: counted from
        # the listed pixels, 0.12 against 0.21 ms for the whole-frame tests at 512×1024.
        top = float(scores.max(where=area, initial=-np.inf))
        if top < math.inf:
            bad = int(np.count_nonzero(area.reshape(-1)[above]))
            return AlarmCounts(n_area, bad, math.nan if top == -math.inf else top, mean_failure)
    bad = n_area
    if not math.isnan(threshold):
        with np.errstate(invalid="ignore", over="ignore"):
            quiet = scores <= threshold  # NaN compares false: anomalous
        bad = n_area - int(np.count_nonzero(quiet & area))
    top = float(scores.max(where=area & np.isfinite(scores), initial=-np.inf))
    return AlarmCounts(n_area, bad, math.nan if top == -math.inf else top, mean_failure)


def _nanmean(values: torch.Tensor) -> float:
    # A plain sum is finite only without NaN or inf, and then it is the mean's numerator:
    # one cheap pass where nanmean always takes several.
    total = float(values.sum())
    if math.isfinite(total):
        return total / values.numel()
    return float(values.nanmean())
