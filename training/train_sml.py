"""Fit standardized max-logit (SML) statistics: per class c, the mean and standard
deviation of the max logit over the train pixels the frozen segmenter predicts as c.

No optimisation, one pass over the train split. Statistics are taken at the logits'
own resolution, where the SML detector applies them; void pixels (label 255, resized
nearest) are left out when ``ignore_void`` is set. Every DDP rank runs the same pass
(it is cheap and deterministic); rank 0 writes the bundle.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from segmentation_safety.detectors import registry
from segmentation_safety.models.segmenter import Segmenter
from training import engine
from training.fit_statistics import MaxLogitStats


@torch.no_grad()
def max_logit_statistics(
    segmenter: Segmenter,
    dataset: Sequence[dict[str, Any]],
    device: torch.device,
    max_images: int | None = None,
    ignore_void: bool = True,
    show_progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, std, pixels used) of the max logit per predicted class."""
    segmenter.eval()
    stats = MaxLogitStats(segmenter.num_classes)
    count = min(max_images or len(dataset), len(dataset))
    for i in tqdm(range(count), desc="sml statistics", disable=not show_progress, unit="img"):
        image, label = engine.sample_tensors(dataset[i])
        logits = segmenter(segmenter.normalize(image[None].to(device))).logits.float()
        valid = None
        if ignore_void:
            small = F.interpolate(label[None, None].float(), size=logits.shape[-2:], mode="nearest")
            valid = small[:, 0] != 255
        stats.update(logits, valid)
    mean, std = stats.mean_std()
    return mean, std, int(stats.count.sum())


def train(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    with engine.open_run(config["device"], int(config["seed"]), amp=False) as ctx:
        train_set = engine.open_split(args.data, "train")
        path = engine.segmenter_path(config, args.out)
        segmenter, seg_bundle = engine.load_segmenter(path)
        segmenter.to(ctx.device)

        mean, std, pixels = max_logit_statistics(
            segmenter,
            train_set,
            ctx.device,
            config["max_images"],
            bool(config["ignore_void"]),
            show_progress=ctx.is_main,
        )
        detector = registry.build("sml", segmenter)
        detector.set_statistics(mean, std)
        metrics = {"pixels": pixels, "mean_of_class_means": float(mean.mean())}
        engine.write_part_bundle(
            ctx, args, config, detector, "sml", path, seg_bundle.metadata, metrics
        )
        return metrics
