"""FlowEneDet (003; DESIGN §4) on a frozen segmenter: SML statistics, then the flow.

1. The per-class max-logit statistics (as ``segsafe train sml``) go into the model's
   ``class_mean``/``class_std``, which standardise the logits before the energy.
2. The flow (FED-U, or FED-C conditioned on pooled decoder features) is trained with
   cross-entropy of its two component log-likelihoods against "segmentation wrong
   here" (argmax of the frozen segmenter differs from the label; void ignored), at
   1/4 of the input resolution as the detector runs. The segmenter is most wrong on
   images it was not trained on, so by default the flow learns from train *and* val.

ActNorm's data-dependent initialisation runs once, before the loop, on the first
global batch of the stream, so every DDP rank starts from the same weights.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segmentation_safety.detectors.flowenedet import FLOW_STRIDE, FlowEneDetC, FlowEneDetU
from segmentation_safety.models.flowenedet import (
    FlowEneDet,
    flowenedet_loss,
    flowenedet_targets,
)
from segmentation_safety.models.segmenter import Segmenter
from training import engine
from training.train_sml import max_logit_statistics

VARIANTS = {"FED-U": FlowEneDetU, "FED-C": FlowEneDetC}


class FlowEneDetTraining(nn.Module):
    """Frozen segmenter + FED flow: ``forward(batch) -> (loss, logs)``."""

    def __init__(self, segmenter: Segmenter, model: FlowEneDet) -> None:
        super().__init__()
        self.segmenter = engine.freeze(segmenter)
        self.model = model

    def train(self, mode: bool = True) -> FlowEneDetTraining:
        super().train(mode)
        self.segmenter.eval()
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        image, label = batch["image"], batch["label"]
        with torch.no_grad():
            out = self.segmenter(self.segmenter.normalize(image))
            wrong, ignore = flowenedet_targets(out.logits.float(), label)
        size = (max(1, image.shape[-2] // FLOW_STRIDE), max(1, image.shape[-1] // FLOW_STRIDE))
        logits = F.interpolate(out.logits.float(), size=size, mode="bilinear")
        features = out.features.float() if self.model.conditional else None
        loss = flowenedet_loss(self.model(logits, features), wrong, ignore)
        valid = ~ignore
        return loss, {"wrong_fraction": wrong[valid].float().mean() if valid.any() else 0.0}


class _Splits:
    """Several splits read as one sequence."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for part in self.parts:
            if index < len(part):
                return part[index]
            index -= len(part)
        raise IndexError(index)


def train(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    ctx = engine.init_run(config["device"], int(config["seed"]), bool(config["amp"]))
    if config["variant"] not in VARIANTS:
        from training.config import ConfigError

        raise ConfigError(f"variant must be one of {sorted(VARIANTS)}, got {config['variant']!r}")
    train_set = engine.open_split(args.data, "train")
    flow_set = _Splits([engine.open_split(args.data, s) for s in config["splits"]])
    path = engine.segmenter_path(config, args.out)
    segmenter, seg_bundle = engine.load_segmenter(path)
    segmenter.to(ctx.device)

    # 1. SML statistics on the train split (the same pass as `segsafe train sml`).
    mean, std, _ = max_logit_statistics(
        segmenter, train_set, ctx.device, config["stats_images"], show_progress=ctx.is_main
    )
    detector = VARIANTS[config["variant"]](
        segmenter,
        blocks=int(config["blocks"]),
        kernel_size=int(config["kernel_size"]),
        cond_channels=int(config["cond_channels"]),
        hidden=int(config["hidden"]),
        smooth_sigma=float(config["smooth_sigma"]),
    )
    detector.model.class_mean.copy_(mean)
    detector.model.class_std.copy_(std)

    # 2. The flow, trained against "segmentation wrong here".
    module = FlowEneDetTraining(segmenter, detector.model).to(ctx.device)
    optimizer, scheduler = engine.constant_adam(detector.model.parameters(), config)
    make_sample = engine.augmented_samples(flow_set, config)
    # ActNorm data init on the first *global* batch, identical on every rank.
    if not engine.run_stage(
        ctx, module, optimizer, scheduler, make_sample, len(flow_set), config, args,
        "flowenedet", data_init=True,
    ):  # fmt: skip
        return {"stopped": True}

    tensors, metadata = detector.export_part()
    training = engine.training_metadata(config, args)
    training["segmenter"] = str(path)
    metadata.update(
        training=training,
        metrics={},
        class_names=list(seg_bundle.metadata.get("class_names") or []),
    )
    engine.write_bundle(ctx, args.out, tensors, metadata)
    engine.close_run(ctx)
    return {"variant": config["variant"]}
