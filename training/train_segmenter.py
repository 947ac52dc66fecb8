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
        if mode and self.bn == "frozen":
            engine.freeze_batchnorm(self.segmenter)
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


def augmenter(dataset: Any, config: dict[str, Any]) -> Any:
    """``make_sample(index, generator)`` for the engine: load, then scale / crop / flip."""

    def make_sample(index: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        image, label = engine.sample_tensors(dataset[index])
        crop = config["crop_size"] or image.shape[-2:]
        image, label = engine.random_scale_crop_flip(
            image, label, generator, crop, config["scale_range"], float(config["flip"])
        )
        return {"image": image, "label": label}

    return make_sample


def train(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    ctx = engine.init_run(config["device"], int(config["seed"]), bool(config["amp"]))
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
    stream = engine.SampleStream(len(train_set), int(config["batch_size"]), int(config["seed"]))
    done = engine.fit(
        ctx,
        engine.Trainable(module, optimizer, scheduler),
        stream,
        augmenter(train_set, config),
        engine.loop_config(config, args),
        desc="segmenter",
    )
    if not done:
        engine.close_run(ctx)
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
    engine.close_run(ctx)
    return metrics
