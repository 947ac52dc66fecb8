"""Fine-tune a segmenter with the DenseHybrid head on mixed-content crops (DenseHybrid §3.2, §7.4).

Each inlier crop (rescale [0.5, 2], flip, crop) gets part of a negative image pasted on
it (training/negatives.py): a random rectangle or the union of the negative's instances,
at a random position. The negatives are the folder ``args.negatives``, or the world's
``<data>/negatives`` without one; it may be the ADE20k release with its instance
annotations, the paper's negatives (engine.NegativeImages reads both). With probability
``scene_probability`` the sample is instead a street with decoys (negative kinds drawn
in the scene, ``negatives/scenes/``, training.world.decoys), augmented the same way: the
decoys are the outliers and carry no seam, as lost cargo carries none (docs/decisions.md).
The loss is
``CE_seg + β·mean_neg logsumexp(logits) + head_weight·β·CE_head`` (densehybrid_loss).
Adam with a cosine decay to 1% of the learning rate, as §7.4 (1e-5 -> 1e-7).

Open-set threshold (eq. 16): the paper picks the threshold at 95% TPR on held-out data
with anomalies (StreetHazards: one test town, evaluated on the other). We never touch
the benchmark's anomalies in training: the held-out data is ``scene_holdout`` of the
streets with decoys, never trained on, or, without scene negatives, the **val split**
(not used for fine-tuning) with negatives pasted on it; either way the threshold reaches
95% TPR on unseen images of the training negatives' family. It is stored as
``thresholds.open_set`` together with the AP/FPR95 measured on those images.

Outputs: ``--out`` (kind ``densehybrid``: head + threshold) and the fine-tuned segmenter
(kind ``segmenter``) at ``segmenter_out`` (default ``<out stem>_segmenter.safetensors``
beside ``--out``, so the base segmenter is never overwritten). The head only runs on the
fine-tuned segmenter, and a models directory has one segmenter for all its detectors: use
the fine-tuned one as ``segmenter.safetensors`` (the base as ``segmenter_base.safetensors``)
and fit the other detectors on it, as scripts/train_demo_models.sh does with
``segmenter_out``. The trainer says so when it ends, and the head's bundle names the file
(``segmenter_bundle``, relative to the bundle) so a refusal can name it too.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from segmentation_safety.detectors.densehybrid import DenseHybridDetector
from segmentation_safety.metrics import AnomalyMetrics
from segmentation_safety.models.segmenter import Segmenter
from segmentation_safety.models.zoo import describe_segmenter, segmenter_metadata
from segmentation_safety.types import SegmenterOutput
from training import engine
from training.fit_statistics import threshold_at_tpr
from training.losses.densehybrid import densehybrid_loss
from training.negatives import paste_negative


class DenseHybridTraining(nn.Module):
    """Segmenter + head and the hybrid loss: ``forward(batch) -> (loss, parts)``."""

    def __init__(self, segmenter: Segmenter, head: nn.Module, config: dict[str, Any]) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.head = head
        self.beta = float(config["beta"])
        self.head_weight = float(config["head_weight"])
        self.bn = config["bn"]

    def train(self, mode: bool = True) -> DenseHybridTraining:
        super().train(mode)
        engine.train_bn_mode(self.segmenter, mode, self.bn)
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        out = self.segmenter(self.segmenter.normalize(batch["image"]))
        head_logits = self.head(out.features)
        return densehybrid_loss(
            out.logits.float(),
            head_logits.float(),
            batch["label"],
            batch["outlier"],
            beta=self.beta,
            head_weight=self.head_weight,
        )


def paste(
    image: torch.Tensor,
    label: torch.Tensor,
    negatives: engine.NegativeImages,
    generator: torch.Generator,
    config: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste a random negative on the crop, as §7.4: the negative is resized to the crop
    and a jittered crop of ``negative_scale`` of that size is what gets pasted."""
    index = int(torch.randint(len(negatives), (), generator=generator))
    neg, instances = negatives[index]
    h, w = image.shape[-2:]
    fake = torch.zeros(neg.shape[-2:], dtype=torch.long) if instances is None else instances
    neg, fake = engine.resize(neg, fake, (h, w))
    ph, pw = (
        max(1, round(h * config["negative_scale"])),
        max(1, round(w * config["negative_scale"])),
    )
    top = int(torch.randint(0, h - ph + 1, (), generator=generator))
    left = int(torch.randint(0, w - pw + 1, (), generator=generator))
    neg = neg[:, top : top + ph, left : left + pw]
    instances = None if instances is None else fake[top : top + ph, left : left + pw]
    sample = paste_negative(
        image, label, neg, generator, instances, p_rect=float(config["p_rect"]), min_size=4
    )
    return sample.image, sample.target, sample.outlier_mask


_DECOY = 254  # marks decoy pixels in the label through augmentation (never a train id)


def scene_sample(
    scenes: engine.NegativeScenes, generator: torch.Generator, config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """A random street with decoys, rescaled / cropped / flipped like the inlier crops."""
    image, label, decoys = scenes[int(torch.randint(len(scenes), (), generator=generator))]
    label = label.masked_fill(decoys, _DECOY)
    crop = config["crop_size"] or image.shape[-2:]
    image, label = engine.random_scale_crop_flip(
        image, label, generator, crop, config["scale_range"], float(config["flip"])
    )
    outlier = label == _DECOY
    return {"image": image, "label": label.masked_fill(outlier, 255), "outlier": outlier}


def augmenter(
    dataset: Any,
    negatives: engine.NegativeImages,
    config: dict[str, Any],
    scenes: engine.NegativeScenes | None = None,
) -> Any:
    augmented = engine.augmented_samples(dataset, config)
    p_scene = float(config.get("scene_probability", 0.0)) if scenes is not None else 0.0

    def make_sample(index: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        # Draw always, so the stream of draws does not depend on the configuration.
        if float(torch.rand((), generator=generator)) < p_scene:
            return scene_sample(scenes, generator, config)
        sample = augmented(index, generator)
        image, label = sample["image"], sample["label"]
        # Draw always, so the stream of draws is the same whatever the outcome.
        if float(torch.rand((), generator=generator)) < float(config["paste_probability"]):
            image, label, outlier = paste(image, label, negatives, generator, config)
        else:
            outlier = torch.zeros(label.shape, dtype=torch.bool)
        return {"image": image, "label": label, "outlier": outlier}

    return make_sample


def pasted_calibration(
    val_set: Any, negatives: engine.NegativeImages, config: dict[str, Any]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(image, target) pairs: val images with one pasted negative each (target 0 inlier,
    1 pasted, 255 void), from a generator seeded by the image's index, so the set is the
    same on every run."""
    count = config["calibration_images"] or len(val_set)
    for i in range(min(count, len(val_set))):
        image, label = engine.sample_tensors(val_set[i])
        gen = engine.sample_generator(int(config["seed"]) + 7919, i)  # 7919: apart from training
        image, label, outlier = paste(image, label, negatives, gen, config)
        target = torch.full_like(label, 255)
        target[label != 255] = 0
        target[outlier] = 1
        yield image, target


@torch.no_grad()
def calibrate(
    detector: DenseHybridDetector,
    samples: Iterable[tuple[torch.Tensor, torch.Tensor]],
    config: dict[str, Any],
    device: torch.device,
) -> dict[str, float]:
    """Threshold at ``threshold_tpr`` and AP/AUROC/FPR95 on held-out images with outliers."""
    detector.eval()
    metrics = AnomalyMetrics()
    scores, labels = [], []

    # The run-time map itself, so the threshold is set on exactly what the node scores.
    def anomaly(out: SegmenterOutput) -> torch.Tensor:
        return detector(out).anomaly

    for score, target in engine.scored_samples(detector.segmenter, anomaly, samples, device):
        metrics.update(score, target)
        scores.append(score.flatten())
        labels.append(target.flatten())
    threshold = threshold_at_tpr(
        torch.cat(scores), torch.cat(labels), float(config["threshold_tpr"])
    )
    result = metrics.compute()
    return {"open_set": threshold, "ap": result.ap, "auroc": result.auroc, "fpr95": result.fpr95}


def train(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    with engine.open_run(config["device"], int(config["seed"]), bool(config["amp"])) as ctx:
        train_set = engine.open_split(args.data, "train")
        val_set = engine.open_split(args.data, "val")
        # A caller without a ``negatives`` argument trains on the world's, as before.
        negatives = engine.NegativeImages(args.data, args.negatives)
        scenes = held_out = None
        if config.get("scene_probability", 0) > 0 and not engine.has_scene_negatives(args.data):
            # Real data (Cityscapes + ADE20k) has no streets with decoys: pasting alone,
            # as the paper trains. Set before the run's identity is taken, so a resume
            # on the same data agrees.
            print(
                f"densehybrid: no scene negatives in {args.data} (a synthetic world's "
                "negatives/scenes/): training on pasted negatives only (scene_probability 0)",
                file=sys.stderr,
            )
            config = {**config, "scene_probability": 0.0}
        if config.get("scene_probability", 0) > 0:
            scenes = engine.NegativeScenes(args.data)
            # Streets never trained on calibrate the open-set threshold.
            kept, out = engine.holdout_split(len(scenes), float(config["scene_holdout"]), 0)
            scenes, held_out = Subset(scenes, kept), Subset(scenes, out)
        base_path = engine.segmenter_path(config, args.out)
        segmenter, base_bundle = engine.load_segmenter(base_path)
        base = describe_segmenter(segmenter)  # lets a refusal say "that is the base one"
        segmenter = engine.apply_bn_mode(segmenter, config["bn"], ctx)
        detector = DenseHybridDetector(segmenter)
        module = DenseHybridTraining(segmenter, detector.head, config)

        lr, iterations = float(config["lr"]), int(config["iterations"])
        optimizer = torch.optim.Adam(
            [
                {"params": list(segmenter.parameters()), "lr": lr},
                {"params": list(detector.head.parameters()), "lr": lr * config["head_lr_factor"]},
            ],
            weight_decay=float(config["weight_decay"]),
        )
        floor = float(config["lr_min_factor"])

        def cosine(i: int) -> float:  # cosine decay from 1 to ``floor``
            return floor + (1 - floor) * 0.5 * (
                1 + math.cos(math.pi * min(i, iterations) / iterations)
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
        make_sample = augmenter(train_set, negatives, config, scenes)
        if not engine.run_stage(
            ctx,
            module,
            optimizer,
            scheduler,
            make_sample,
            len(train_set),
            config,
            args,
            "densehybrid",
            # The base segmenter and the negatives pasted make the run: a resume under
            # others (the default folder included) would mix two.
            inputs={
                "segmenter": engine.bundle_identity(base_path),
                "negatives": str(negatives.root.resolve()),
            },
        ):
            return {"stopped": True}

        detector.to(ctx.device)
        if held_out is not None and len(held_out):
            samples = engine.decoy_targets(held_out)
            calibrated_on = f"{len(held_out)} held-out streets with decoys (never trained on)"
        else:
            samples = pasted_calibration(val_set, negatives, config)
            calibrated_on = "val split with pasted negatives"
        calibration = calibrate(detector, samples, config, ctx.device)
        detector.thresholds = {"open_set": calibration["open_set"]}
        segmentation = engine.evaluate_segmentation(
            segmenter, val_set, ctx.device, config["calibration_images"]
        )
        training = engine.training_metadata(config, args)
        training["segmenter"] = str(base_path)
        training["negatives"] = {
            "folder": str(negatives.root.resolve()),
            "layout": negatives.layout,
        }

        seg_out = Path(
            config["segmenter_out"]
            or Path(args.out).with_name(f"{Path(args.out).stem}_segmenter.safetensors")
        )
        seg_meta = {**base_bundle.metadata, **segmenter_metadata(segmenter)}
        seg_meta.pop("format", None)
        seg_meta.update(
            training=training,
            metrics={f"val_{k}": v for k, v in segmentation.items()},
            fine_tuned_for="densehybrid",
        )
        engine.write_bundle(ctx, seg_out, segmenter.state_dict(), seg_meta)
        # The head belongs to the fine-tuned file: record its name, not the base's.
        segmenter.source = str(seg_out)

        tensors, metadata = detector.export_part("densehybrid")
        metadata.update(
            **engine.segmenter_context(seg_meta),
            training=training,
            # Relative to --out, so it still points at the file when the directory moves.
            segmenter_bundle=os.path.relpath(seg_out, Path(args.out).parent),
            fine_tuned_from=base,
            threshold_tpr=float(config["threshold_tpr"]),
            calibration=f"{calibrated_on}; never the benchmark's anomalies",
            metrics={
                "calibration_ap": calibration["ap"],
                "calibration_auroc": calibration["auroc"],
                "calibration_fpr95": calibration["fpr95"],
                **{f"val_{k}": v for k, v in segmentation.items()},
            },
        )
        engine.write_bundle(ctx, args.out, tensors, metadata)
        if ctx.is_main:
            print(next_step(Path(args.out), seg_out))
        return {**calibration, **segmentation, "segmenter_out": str(seg_out)}


def next_step(out: Path, seg_out: Path) -> str:
    """What to do with the fine-tuned segmenter so that ``out`` can be loaded."""
    models_segmenter = out.parent / "segmenter.safetensors"
    if seg_out.resolve() == models_segmenter.resolve():
        return (
            f"densehybrid: {seg_out} is now the fine-tuned segmenter {out} runs on; fit the "
            f"other detectors in {out.parent} on it"
        )
    return (
        f"densehybrid: {out} runs only on the fine-tuned segmenter {seg_out}: use it as "
        f"{models_segmenter} (keep the base one as {out.parent / 'segmenter_base.safetensors'})"
        " and fit the other detectors on it; with the base segmenter there, evaluate and "
        f"the node refuse {out.name}"
    )
