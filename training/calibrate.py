"""Operating points from inlier images: the score each detector gives to known road.

For every image with segmentation labels, each detector's anomaly map is resized to the
label size exactly as the node resizes it, and the scores of the ground-truth pixels of
the chosen classes (road) are kept, at most ``per_image`` of them drawn at random so
memory stays bounded on thousands of 2-megapixel frames. The threshold is the score that
a fraction ``inlier_fpr`` of those pixels exceed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segmentation_safety.checkpoint import load_bundle, save_bundle
from segmentation_safety.operating_point import (
    OperatingPoint,
    threshold_at_fpr,
)
from segmentation_safety.pipeline import Pipeline, part_path, resize_map


def collect_inlier_scores(
    pipeline: Pipeline,
    samples: Iterable[Mapping[str, Any]],
    names: Sequence[str],
    classes: Sequence[int],
    per_image: int = 20_000,
    seed: int = 0,
    total: int | None = None,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], int]:
    """({detector: inlier scores}, images used) over ``samples`` with a ``label``."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    kept: dict[str, list[np.ndarray]] = {n: [] for n in names}
    images = 0
    bar = tqdm(samples, total=total, desc="calibrate", unit="img", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)  # fmt: skip
    with torch.inference_mode():
        for sample in bar:
            label = sample.get("label")
            if label is None:
                raise ValueError(f"{sample.get('name', 'an image')}: no segmentation label")
            inlier = np.isin(label, classes)
            if "anomaly" in sample and sample["anomaly"] is not None:
                inlier &= sample["anomaly"] == 0
            images += 1
            where = np.flatnonzero(inlier)
            if where.size == 0:
                continue
            if where.size > per_image:
                where = rng.choice(where, per_image, replace=False)
            _, outs, _ = pipeline.run(pipeline.to_input(sample["image"]), names)
            picked = None  # the sampled pixels' indices, on the maps' device
            for name in names:
                anomaly = outs[name].anomaly
                if anomaly is None:
                    continue
                score = resize_map(anomaly.float()[:, None], label.shape)[0, 0]
                if picked is None:
                    picked = torch.from_numpy(where).to(score.device)
                # Only the sampled pixels leave the device, not the label-size map.
                kept[name].append(score.reshape(-1).index_select(0, picked).cpu().numpy())
    bar.close()
    return {n: np.concatenate(v) for n, v in kept.items() if v}, images


def operating_points(
    scores: Mapping[str, np.ndarray],
    inlier_fpr: float,
    classes: Sequence[int],
    data: str,
    images: int,
) -> dict[str, OperatingPoint]:
    """One operating point per detector from its inlier scores."""
    return {
        name: OperatingPoint(
            threshold=threshold_at_fpr(values, inlier_fpr),
            inlier_fpr=float(inlier_fpr),
            classes=tuple(int(c) for c in classes),
            data=data,
            images=images,
            pixels=int(values.size),
        )
        for name, values in scores.items()
    }


def store_operating_points(
    models_dir: Path, points: Mapping[str, OperatingPoint], parts: Mapping[str, str]
) -> list[Path]:
    """Write each point into its detector's bundle (``parts``: detector -> bundle kind).

    Only metadata changes; tensors, and so the segmenter's fingerprint, stay the same.
    Each bundle is rewritten once, atomically.
    """
    by_file: dict[Path, dict[str, OperatingPoint]] = {}
    for name, point in points.items():
        kind = parts[name]
        path = part_path(models_dir, kind)
        by_file.setdefault(path, {})[name] = point
    for path, entries in by_file.items():
        bundle = load_bundle(path)
        meta = {k: v for k, v in bundle.metadata.items() if k != "format"}
        stored = dict(meta.get("operating_points") or {})
        stored.update({name: p.to_metadata() for name, p in entries.items()})
        meta["operating_points"] = stored
        save_bundle(path, bundle.tensors, meta)
    return sorted(by_file)
