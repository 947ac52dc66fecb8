"""Train the SynthCP comparison net: failure map and per-class IoU (SynthCP §3.2, §4.1).

The comparison net F(x, G(ŷ), ŷ) learns where a prediction ŷ is wrong, so it must be
trained on predictions that *are* wrong in the way the deployed segmenter's are on
images it has never seen. A segmenter's predictions on its own training images are
nearly perfect, hence the paper's cross-validation (``predictions: folds``):

1. The train split is cut into k folds (training/folds.py; k = 4 in the paper, 2 in the
   demo config). For each fold a segmenter with the deployed one's architecture and
   training recipe is trained on the other k-1 folds (train_segmenter's model, loss,
   optimizer and augmentation, run by the engine) and saved as
   ``<out>.folds/fold<i>.safetensors``, with its held-out mIoU.
2. Every train image is then predicted by the fold segmenter that did not see it. The
   predictions are made on the fly for each augmented batch, exactly as the detector
   makes them at run time: logits upsampled to the input, softmax probabilities p,
   ŷ = argmax p, x̂ = G(ŷ) in the segmenter's input space, then F(x, x̂, p).
3. Loss (eq. 8, ``comparison_loss``): smooth-L1 on the per-image class IoU of ŷ against
   the ground truth (classes present only) + BCE on "ŷ correct here" (void masked).
   Adam with the paper's betas, constant learning rate.

``predictions: given`` skips step 1: the deployed segmenter predicts ``given_split``
(the val split by default), which it did not train on. It costs no extra training and
the mistakes are those of the deployed network itself, but that split is then used up:
it is smaller than the train split, the bundle's metrics come from the held-out
``given_eval_fraction`` of it only, and nothing independent is left to evaluate on.
With folds the val split stays untouched, and the final metrics are measured on it
with the deployed segmenter, i.e. the run-time situation.

Resumable: finished fold segmenters are reused with ``--resume``, an unfinished one
continues from its ``.ckpt``, and so does the comparison net itself (``<out>.ckpt``).

    segsafe train comparison --data DIR --out models/comparison.safetensors
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from segmentation_safety.checkpoint import BundleError, load_bundle, load_state_strict
from segmentation_safety.detectors.resynthesis import (
    PRESETS,
    ResynthesisDetector,
    prediction_at,
    resynthesize,
)
from segmentation_safety.metrics import FailureMetrics, IoUPredictionMetrics, per_image_class_iou
from segmentation_safety.models.comparison import ComparisonNet
from segmentation_safety.models.generator import SpadeGenerator, build_generator
from segmentation_safety.models.segmenter import Segmenter
from segmentation_safety.models.zoo import build_segmenter, segmenter_metadata
from training import engine, train_segmenter
from training.config import ConfigError, default_config, merge
from training.engine.transforms import VOID
from training.folds import cross_validation_folds
from training.losses.synthcp import comparison_loss

PREDICTION_MODES = ("folds", "given")


# --------------------------------------------------------------------------- fold segmenters


def fold_segmenter_config(
    seg_bundle_metadata: dict[str, Any], config: dict[str, Any]
) -> dict[str, Any]:
    """The training config of the fold segmenters.

    Base: ``segmenter.yaml``, updated by the deployed segmenter's own training config
    (when its bundle records one) and its architecture, so the folds make the deployed
    network's kind of mistakes; then ``fold_segmenter_options`` (checked for typos).
    """
    base = default_config("segmenter")
    training = seg_bundle_metadata.get("training") or {}
    # Only a recipe written by `train segmenter` is one (a DenseHybrid fine-tune is not).
    recorded = (training.get("config") or {}) if training.get("model") == "segmenter" else {}
    base = merge(base, {k: v for k, v in recorded.items() if k in base}, "segmenter bundle")
    arch = dict(seg_bundle_metadata.get("architecture") or {})
    if "name" in arch:
        base["architecture"] = arch.pop("name")
        base["architecture_options"] = {k: v for k, v in arch.items() if k != "num_classes"}
    base["device"] = config["device"]
    base["amp"] = config["amp"]
    return merge(base, config["fold_segmenter_options"], "comparison config fold_segmenter_options")


def fold_path(out: str | os.PathLike[str], fold: int) -> Path:
    """Bundle of the segmenter of fold ``fold``: ``<out>.folds/fold<i>.safetensors``."""
    return Path(f"{out}.folds") / f"fold{fold}.safetensors"


def train_fold_segmenter(
    ctx: engine.RunContext,
    fold_config: dict[str, Any],
    dataset: Any,
    num_classes: int,
    out: Path,
    args: argparse.Namespace,
    desc: str,
) -> Segmenter | None:
    """Train one segmenter on ``dataset`` (a subset) with train_segmenter's recipe.

    Returns None when ``--stop-after`` cut the run short (its checkpoint is written).
    """
    # Seeded per stage: the initial weights must not depend on whether earlier stages
    # were trained in this process or reused from their bundles by --resume.
    engine.seed_everything(int(fold_config["seed"]))
    segmenter = build_segmenter(
        fold_config["architecture"], num_classes=num_classes, **fold_config["architecture_options"]
    )
    segmenter = engine.apply_bn_mode(segmenter, fold_config["bn"], ctx)
    module = train_segmenter.SegmenterTraining(segmenter, fold_config["bn"])
    optimizer, scheduler = train_segmenter.make_optimizer(
        [p for p in module.parameters() if p.requires_grad], fold_config
    )
    make_sample = engine.augmented_samples(dataset, fold_config)
    fold_args = argparse.Namespace(**{**vars(args), "out": out})
    # A fold that never started has no checkpoint: --resume starts it afresh.
    done = engine.run_stage(
        ctx, module, optimizer, scheduler, make_sample, len(dataset), fold_config, fold_args,
        desc, fresh_without_checkpoint=True,
    )  # fmt: skip
    return segmenter if done else None


def fold_segmenters(
    ctx: engine.RunContext,
    config: dict[str, Any],
    args: argparse.Namespace,
    train_set: Any,
    seg_bundle_metadata: dict[str, Any],
    num_classes: int,
) -> tuple[list[Segmenter], list[int], dict[str, float]] | None:
    """Train (or, with --resume, reuse) the k fold segmenters.

    Returns (segmenters, fold of every train image, held-out mIoU per fold), or None
    when ``--stop-after`` stopped a fold early.
    """
    k = int(config["folds"])
    if not 2 <= k <= len(train_set):
        raise engine.DataError(f"folds: need 2 <= k <= {len(train_set)} train images, got {k}")
    folds = cross_validation_folds(len(train_set), k, int(config["seed"]))
    fold_config = fold_segmenter_config(seg_bundle_metadata, config)
    segmenters: list[Segmenter] = []
    fold_of = [0] * len(train_set)
    metrics: dict[str, float] = {}
    for i, fold in enumerate(folds):
        for index in fold.holdout:
            fold_of[index] = i
        path = fold_path(args.out, i)
        if getattr(args, "resume", False) and path.is_file():
            segmenter, bundle = engine.load_segmenter(path)
            if bundle.metadata.get("holdout_indices") != list(fold.holdout):
                raise BundleError(path, "was trained for another fold split (folds or seed)")
            metrics[f"fold{i}_holdout_miou"] = float(bundle.metadata["metrics"]["holdout_miou"])
            segmenters.append(segmenter.to(ctx.device))
            continue
        # Each fold draws its own data order and initial weights.
        cfg = {**fold_config, "seed": int(fold_config["seed"]) + i}
        segmenter = train_fold_segmenter(
            ctx, cfg, Subset(train_set, list(fold.train)), num_classes, path, args, f"fold {i}"
        )
        if segmenter is None:
            return None
        held_out = engine.evaluate_segmentation(
            segmenter, train_set, ctx.device, cfg["eval_max_images"], indices=fold.holdout
        )
        metadata = segmenter_metadata(segmenter)
        training = {**engine.training_metadata(cfg, args), "model": "segmenter"}
        metadata.update(
            class_names=list(seg_bundle_metadata.get("class_names") or []),
            training={**training, "fold": i, "folds": len(folds)},
            train_indices=list(fold.train),
            holdout_indices=list(fold.holdout),
            metrics={f"holdout_{name}": value for name, value in held_out.items()},
        )
        engine.write_bundle(ctx, path, segmenter.state_dict(), metadata)
        metrics[f"fold{i}_holdout_miou"] = held_out["miou"]
        segmenters.append(segmenter)
    return segmenters, fold_of, metrics


# --------------------------------------------------------------------------- the model


def load_generator(path: str | os.PathLike[str], num_classes: int) -> SpadeGenerator:
    """The trained generator of a ``generator`` bundle, checked against the segmenter.

    Its ``synthesis_scale`` (the bundle's, as the detector reads it) rides along on the
    module so predictions here match the detector's at run time.
    """
    bundle = load_bundle(path, kind="generator")
    arch = bundle.metadata.get("architecture")
    if not isinstance(arch, dict):
        raise BundleError(path, "metadata has no 'architecture' dict")
    if arch.get("num_classes") != num_classes:
        raise BundleError(
            path, f"built for {arch.get('num_classes')} classes, segmenter has {num_classes}"
        )
    generator = build_generator(arch)
    load_state_strict(generator, bundle, path)
    generator.synthesis_scale = float(bundle.metadata.get("synthesis_scale", 1.0))
    return generator


class ComparisonTraining(nn.Module):
    """Frozen predictors and generator feeding the comparison net, plus its loss.

    Only the comparison net is a registered submodule: it alone trains and goes into the
    training checkpoint. The predictors (one per fold) and the generator are frozen,
    kept on the device by hand, and rebuilt from their bundles on resume.
    """

    def __init__(
        self,
        comparison: ComparisonNet,
        predictors: list[Segmenter],
        generator: SpadeGenerator,
        deployed: Segmenter,
        device: torch.device,
        bn: str = "train",
    ) -> None:
        super().__init__()
        self.comparison = comparison
        self.bn = bn
        self.predictors = tuple(engine.freeze(p).to(device) for p in predictors)
        self.generator = engine.freeze(generator).to(device)
        self.deployed = engine.freeze(deployed).to(device)  # its normalisation is the detector's

    def train(self, mode: bool = True) -> ComparisonTraining:
        super().train(mode)
        engine.train_bn_mode(self.comparison, mode, self.bn)
        for frozen in (*self.predictors, self.generator, self.deployed):
            frozen.eval()
        return self

    @torch.no_grad()
    def predict(
        self, image: torch.Tensor, fold: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalised x, x̂ = G(ŷ), softmax p, ŷ at the image size) as the detector and
        the pipeline compute them at run time (p at the logits' resolution)."""
        size = (int(image.shape[-2]), int(image.shape[-1]))
        logits = None
        for f, predictor in enumerate(self.predictors):
            chosen = fold == f
            if bool(chosen.any()):
                out = predictor(predictor.normalize(image[chosen])).logits.float()
                if logits is None:
                    logits = out.new_empty(image.shape[0], *out.shape[1:])
                logits[chosen] = out
        # The bundle's scale is relative to the data's full frames, so a crop keeps the
        # scale of the frame it came from (the detector derives the same 0.5 on them).
        scale = getattr(self.generator, "synthesis_scale", 1.0)
        synth = resynthesize(self.generator, logits, self.deployed, size, scale)
        probs = logits.softmax(dim=1)
        return self.deployed.normalize(image), synth.float(), probs, prediction_at(logits, size)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        image, synth, probs, pred = self.predict(batch["image"], batch["fold"])
        out = self.comparison(image, synth, probs)
        loss = comparison_loss(
            out.class_iou.float(), out.correct_logit.float(), pred, batch["label"]
        )
        wrong = (pred != batch["label"]) & (batch["label"] != VOID)
        return loss, {"error_rate": wrong.float().mean()}


def augmenter(dataset: Any, fold_of: list[int], config: dict[str, Any]) -> Any:
    """``make_sample(index, generator)``: crop / flip, and which predictor to use."""

    augmented = engine.augmented_samples(dataset, config)

    def make_sample(index: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {**augmented(index, generator), "fold": torch.tensor(fold_of[index])}

    return make_sample


@torch.no_grad()
def evaluate(
    detector: ResynthesisDetector,
    dataset: Any,
    indices: list[int],
    device: torch.device,
) -> dict[str, float]:
    """Failure-map and IoU-prediction metrics of the assembled detector (run-time path)."""
    segmenter = detector.segmenter
    failure = FailureMetrics()
    iou = IoUPredictionMetrics(segmenter.num_classes)
    for i in indices:
        image, label = engine.sample_tensors(dataset[i])
        out = segmenter(segmenter.normalize(image[None].to(device)))
        result = detector(out)
        logits = F.interpolate(out.logits, size=label.shape, mode="bilinear", align_corners=False)
        pred = logits.argmax(dim=1)[0].cpu()
        failure.update(result.failure[0].float().cpu(), pred, label)
        true_iou = per_image_class_iou(pred.numpy(), label.numpy(), segmenter.num_classes)
        iou.update(result.class_iou[0].float().cpu(), true_iou)
    f, c = failure.compute(), iou.compute()
    return {
        **{f"failure_{k}": v for k, v in f.as_dict().items()},
        **{f"iou_{k}": v for k, v in c.as_dict().items()},
    }


# --------------------------------------------------------------------------- training


def train(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    if config["predictions"] not in PREDICTION_MODES:
        raise ConfigError(f"predictions must be one of {PREDICTION_MODES}")
    if config["preset"] not in PRESETS:
        raise ConfigError(f"preset must be one of {sorted(PRESETS)}, got {config['preset']!r}")
    with engine.open_run(config["device"], int(config["seed"]), bool(config["amp"])) as ctx:
        seg_path = engine.segmenter_path(config, args.out)
        segmenter, seg_bundle = engine.load_segmenter(seg_path)
        segmenter.to(ctx.device)
        num_classes = segmenter.num_classes
        gen_path = Path(config["generator"] or Path(args.out).parent / "generator.safetensors")
        generator = load_generator(gen_path, num_classes)

        metrics: dict[str, float] = {}
        limit = config["eval_max_images"]
        if config["predictions"] == "folds":
            train_set = engine.open_split(args.data, "train")
            eval_set = engine.open_split(args.data, "val")
            trained = fold_segmenters(
                ctx, config, args, train_set, seg_bundle.metadata, num_classes
            )
            if trained is None:
                return {"stopped": True}
            predictors, fold_of, metrics = trained
            eval_indices = list(range(len(eval_set)))
        else:
            eval_set = engine.open_split(args.data, config["given_split"])
            kept, eval_indices = engine.holdout_split(
                len(eval_set), float(config["given_eval_fraction"]), int(config["seed"])
            )
            train_set = Subset(eval_set, kept)
            predictors, fold_of = [segmenter], [0] * len(kept)
        eval_indices = eval_indices if limit is None else eval_indices[: int(limit)]

        engine.seed_everything(int(config["seed"]))  # as in train_fold_segmenter
        cmp_options = {**PRESETS[config["preset"]]["comparison"], **config["comparison_options"]}
        try:
            comparison = ComparisonNet(num_classes, **cmp_options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"comparison_options: {e}") from None
        comparison = engine.apply_bn_mode(comparison, config["bn"], ctx)
        module = ComparisonTraining(
            comparison, predictors, generator, segmenter, ctx.device, config["bn"]
        )
        optimizer, scheduler = engine.constant_adam(comparison.parameters(), config)  # paper
        make_sample = augmenter(train_set, fold_of, config)
        # --resume after a stop among the folds: the comparison stage has not started yet.
        inputs = {
            "segmenter": engine.bundle_identity(seg_path),
            "generator": engine.bundle_identity(gen_path),
        }
        if not engine.run_stage(
            ctx, module, optimizer, scheduler, make_sample, len(train_set), config, args,
            "comparison", fresh_without_checkpoint=True, inputs=inputs,
        ):  # fmt: skip
            return {"stopped": True}

        # Assemble the detector as the pipeline will, and measure it on images nobody
        # trained on (val with folds; the held-out part of given_split otherwise).
        detector = ResynthesisDetector(segmenter, preset="tiny").to(ctx.device).eval()
        detector.generator = module.generator
        detector.synthesis_scale = module.generator.synthesis_scale
        detector.comparison = comparison.eval()
        metrics.update(
            {
                f"eval_{k}": v
                for k, v in evaluate(detector, eval_set, eval_indices, ctx.device).items()
            }
        )

        training = engine.training_metadata(config, args)
        training.update(segmenter=str(seg_path), generator=str(gen_path))
        tensors, metadata = detector.export_part("comparison")
        metadata.update(
            class_names=list(seg_bundle.metadata.get("class_names") or []),
            training=training,
            predictions=config["predictions"],
            metrics=metrics,
        )
        engine.write_bundle(ctx, args.out, tensors, metadata)
        return metrics
