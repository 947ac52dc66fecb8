"""Learned embedding density (Fishyscapes §4.2, B.6): Real-NVP flows over pre-ReLU
embeddings of chosen layers of a frozen segmenter, trained by maximum likelihood.

Each step draws ``pixels_per_image`` embedding vectors per image and layer and
minimises their mean negative log-likelihood (divided by the layer's dimension, so
layers of different width weigh the same). Afterwards the mean training NLL of each
layer, L(Z_l) of eq. 8, is measured on the train split and stored.

Combining layers: ``min`` needs nothing more. The paper fits its ``logreg`` weights on
the FS Lost & Found *validation* set, i.e. on benchmark anomalies. We do not: with
``combine: logreg`` the regression is fitted on val images (never used to train the
flows) with negatives from the world's ``negatives/`` pasted on them, the same family
DenseHybrid trains on, so the benchmark's anomaly kinds stay unseen.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from segmentation_safety.detectors.flow_density import (
    FlowDensityDetector,
    fit_logistic_combination,
)
from segmentation_safety.models.segmenter import Segmenter
from training import engine


class FlowTraining(nn.Module):
    """Frozen segmenter + trainable flows: ``forward(batch) -> (loss, per-layer NLL)``."""

    def __init__(self, segmenter: Segmenter, detector: FlowDensityDetector, pixels: int) -> None:
        super().__init__()
        self.segmenter = engine.freeze(segmenter)
        self.flows = detector.flows
        self.layers = detector.layers
        self.pixels = pixels

    def train(self, mode: bool = True) -> FlowTraining:
        super().train(mode)
        self.segmenter.eval()  # frozen: its BN statistics and dropout never change
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        with torch.no_grad():
            out = self.segmenter(self.segmenter.normalize(batch["image"]), self.layers)
        loss = torch.zeros((), device=batch["image"].device)
        logs = {}
        for name in self.layers:
            emb = out.embeddings[name].float()
            rows = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
            n = min(rows.shape[0], self.pixels * emb.shape[0])
            # The global RNG is checkpointed, so the draw is reproduced on --resume.
            rows = rows[torch.randperm(rows.shape[0], device=rows.device)[:n]]
            nll = -self.flows[name].log_prob(rows).mean()
            loss = loss + nll / emb.shape[1]
            logs[f"nll/{name}"] = nll.detach()
        return loss, logs


def augmenter(dataset: Any, config: dict[str, Any]) -> Any:
    """``make_sample`` for the engine: scale / crop / flip, the image alone."""
    augmented = engine.augmented_samples(dataset, config)

    def make_sample(index: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"image": augmented(index, generator)["image"]}

    return make_sample


@torch.no_grad()
def mean_nll(
    detector: FlowDensityDetector, dataset: Any, device: torch.device, max_images: int | None
) -> torch.Tensor:
    """Mean per-pixel NLL of every layer over whole images (eq. 8's L(Z_l))."""
    segmenter = detector.segmenter.eval()
    detector.eval()
    totals = torch.zeros(len(detector.layers), dtype=torch.float64)
    counts = torch.zeros(len(detector.layers), dtype=torch.float64)
    count = min(max_images or len(dataset), len(dataset))
    for i in tqdm(range(count), desc="train NLL", unit="img", leave=False):
        image, _ = engine.sample_tensors(dataset[i])
        out = segmenter(segmenter.normalize(image[None].to(device)), detector.layers)
        for j, name in enumerate(detector.layers):
            nll = -detector.flows[name].log_prob(out.embeddings[name].float())
            totals[j] += nll.double().sum().cpu()
            counts[j] += nll.numel()
    return (totals / counts).float()


@torch.no_grad()
def fit_combination(
    detector: FlowDensityDetector,
    val_set: Any,
    negatives: engine.NegativeImages,
    config: dict[str, Any],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic-regression weights on val images with pasted negatives (see module doc)."""
    from training.train_densehybrid import paste

    segmenter = detector.segmenter.eval()
    detector.eval()
    scores, labels = [], []
    count = min(config["logreg_images"] or len(val_set), len(val_set))
    for i in range(count):
        image, label = engine.sample_tensors(val_set[i])
        gen = engine.sample_generator(int(config["seed"]) + 7919, i)
        image, label, outlier = paste(image, label, negatives, gen, config_for_paste(config))
        out = segmenter(segmenter.normalize(image[None].to(device)), detector.layers)
        layer = detector.layer_scores(out)
        size = label.shape
        layer = [F.interpolate(s[:, None], size=size, mode="bilinear")[0, 0].cpu() for s in layer]
        target = torch.full_like(label, 255)
        target[label != 255] = 0
        target[outlier] = 1
        scores.append(torch.stack([s.flatten() for s in layer], dim=1))
        labels.append(target.flatten())
    return fit_logistic_combination(torch.cat(scores), torch.cat(labels))


def config_for_paste(config: dict[str, Any]) -> dict[str, Any]:
    """Pasting settings for calibration images (DenseHybrid's defaults)."""
    return {"negative_scale": 0.5, "p_rect": 0.5}


def train(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    with engine.open_run(config["device"], int(config["seed"]), bool(config["amp"])) as ctx:
        train_set = engine.open_split(args.data, "train")
        path = engine.segmenter_path(config, args.out)
        segmenter, seg_bundle = engine.load_segmenter(path)
        negatives = None
        if config["combine"] == "logreg":
            # Opened now: missing ones are refused before the training, not after it.
            negatives = engine.NegativeImages(args.data, getattr(args, "negatives", None))
        detector = FlowDensityDetector(
            segmenter,
            layers=config["layers"],
            combine=config["combine"],
            steps=int(config["steps"]),
            hidden=int(config["hidden"]),
            seed=int(config["flow_seed"]),
        )
        module = FlowTraining(segmenter, detector, int(config["pixels_per_image"]))
        optimizer, scheduler = engine.constant_adam(detector.flows.parameters(), config)
        make_sample = augmenter(train_set, config)
        if not engine.run_stage(
            ctx, module, optimizer, scheduler, make_sample, len(train_set), config, args, "flow",
            inputs={"segmenter": engine.bundle_identity(path)},
        ):  # fmt: skip
            return {"stopped": True}

        detector.to(ctx.device)
        detector.train_nll.copy_(mean_nll(detector, train_set, ctx.device, config["nll_images"]))
        metrics: dict[str, Any] = {"train_nll": detector.train_nll.tolist()}
        if config["combine"] == "logreg":
            val_set = engine.open_split(args.data, "val")
            weight, bias = fit_combination(detector, val_set, negatives, config, ctx.device)
            detector.logreg_weight.copy_(weight)
            detector.logreg_bias.copy_(bias)
            metrics["logreg_fitted_on"] = "val split with pasted negatives"

        engine.write_part_bundle(
            ctx, args, config, detector, "flow", path, seg_bundle.metadata, metrics,
        )  # fmt: skip
        return metrics
