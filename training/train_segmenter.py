"""Train a segmenter on a Cityscapes-layout dataset (the synthetic world or Cityscapes).

The recipe of torchvision's segmentation reference: SGD with momentum, poly learning
rate, cross-entropy ignoring void (255), random rescale / crop / horizontal flip.
At the end the closed-set mIoU on the val split is measured and stored in the bundle.

    segsafe train segmenter --data DIR --out models/segmenter.safetensors
    torchrun --nproc-per-node 2 -m training.cli segmenter --data DIR --out ...
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segmentation_safety.labels import NUM_CLASSES, TRAIN_NAMES
from segmentation_safety.models.segmenter import Segmenter
from segmentation_safety.models.zoo import build_segmenter, segmenter_metadata
from training import engine
from training.engine.transforms import VOID


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the label's resolution, void ignored; 0 (not NaN) if all void."""
    logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear")
    if not bool((target != VOID).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=VOID)


class SegmenterTraining(nn.Module):
    """The segmenter plus its loss: ``forward(batch) -> (loss, logs)`` for the engine."""

    def __init__(self, segmenter: Segmenter, bn: str = "train") -> None:
        super().__init__()
        self.segmenter = segmenter
        self.bn = bn

    def train(self, mode: bool = True) -> SegmenterTraining:
        super().train(mode)
        engine.train_bn_mode(self.segmenter, mode, self.bn)
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = self.segmenter(self.segmenter.normalize(batch["image"])).logits
        return segmentation_loss(logits, batch["label"]), {}


def make_optimizer(
    params: list[nn.Parameter], config: dict[str, Any]
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD with momentum and the poly schedule over ``config["iterations"]``."""
    optimizer = torch.optim.SGD(
        params,
        lr=float(config["lr"]),
        momentum=float(config["momentum"]),
        weight_decay=float(config["weight_decay"]),
    )
    poly = engine.poly_lambda(int(config["iterations"]), float(config["poly_power"]))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, poly)


def train(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    with engine.open_run(config["device"], int(config["seed"]), bool(config["amp"])) as ctx:
        train_set = engine.open_split(args.data, "train")
        val_set = engine.open_split(args.data, "val")

        segmenter = build_segmenter(
            config["architecture"], num_classes=NUM_CLASSES, **config["architecture_options"]
        )
        segmenter = engine.apply_bn_mode(segmenter, config["bn"], ctx)
        module = SegmenterTraining(segmenter, config["bn"])
        optimizer, scheduler = make_optimizer(
            [p for p in module.parameters() if p.requires_grad], config
        )
        make_sample = engine.augmented_samples(train_set, config)
        if not engine.run_stage(
            ctx,
            module,
            optimizer,
            scheduler,
            make_sample,
            len(train_set),
            config,
            args,
            "segmenter",
        ):
            return {"stopped": True}

        metrics = engine.evaluate_segmentation(
            segmenter, val_set, ctx.device, config["eval_max_images"]
        )
        metadata = segmenter_metadata(segmenter)
        metadata.update(
            class_names=list(TRAIN_NAMES),
            input_size=list(val_set[0]["image"].shape[:2]),
            training=engine.training_metadata(config, args),
            metrics={f"val_{k}": v for k, v in metrics.items()},
        )
        engine.write_bundle(ctx, args.out, segmenter.state_dict(), metadata)
        return metrics
