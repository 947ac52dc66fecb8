"""FlowEneDet (its supplementary; DESIGN §4) on a frozen segmenter: SML statistics, then the flow.

1. The per-class max-logit statistics (as ``segsafe train sml``) go into the model's
   ``class_mean``/``class_std``, which standardise the logits before the energy.
2. The flow (FED-U, or FED-C conditioned on pooled decoder features) is trained with
   cross-entropy of its two component log-likelihoods against "segmentation wrong
   here" (argmax of the frozen segmenter differs from the label; void ignored), at
   1/4 of the input resolution as the detector runs. The segmenter is most wrong on
   images it was not trained on, so by default the flow learns from train *and* val.

ActNorm's data-dependent initialisation runs once, before the loop, on the first
global batch of the stream, so every DDP rank starts from the same weights.

3. Where the data has streets with decoys (the world's ``negatives/scenes/``), the fit
   is measured on the held-out share of them (``scene_holdout``, the same streets
   DenseHybrid calibrates on with the defaults): anomaly AP / AUROC / FPR95 of the
   run-time map go into the bundle's metrics as ``decoy_*``. Training sees only
   in-distribution errors, and whether a fit ranks unknown objects above them depends
   on its seed (on the TinySegmenter demo of November, seeds 0 and 2 collapsed), so
   this is how fits are compared without touching a benchmark. ``select_seeds: [0, 1,
   2]`` trains one fit per seed (each with its own ``<out stem>.seed<k>.ckpt``, so
   ``--resume`` works per fit) and keeps the best by that AP; the bundle lists every
   candidate's AP (the shipped FED-U, seeds 0-2: 41.8 / 23.7 / 45.1 on the 80 streets,
   seed 2 kept; models/demo/REPORT.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from segmentation_safety.detectors.flowenedet import FLOW_STRIDE, FlowEneDetC, FlowEneDetU
from segmentation_safety.metrics import AnomalyMetrics
from segmentation_safety.models.flowenedet import FlowEneDet
from segmentation_safety.models.segmenter import Segmenter
from segmentation_safety.types import SegmenterOutput
from training import engine
from training.config import ConfigError
from training.losses.flowenedet import flowenedet_loss, flowenedet_targets
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


@torch.no_grad()
def held_out_metrics(
    detector: FlowEneDetU | FlowEneDetC,
    samples: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
) -> dict[str, float]:
    """Anomaly AP / AUROC / FPR95 of the detector's map on (image, 0/1/255 target) pairs."""
    detector.eval()
    metrics = AnomalyMetrics()

    def anomaly(out: SegmenterOutput) -> torch.Tensor:
        return detector(out).anomaly

    for score, target in engine.scored_samples(detector.segmenter, anomaly, samples, device):
        metrics.update(score, target)
    result = metrics.compute()
    return {"decoy_ap": result.ap, "decoy_auroc": result.auroc, "decoy_fpr95": result.fpr95}


def train(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    with engine.open_run(config["device"], int(config["seed"]), bool(config["amp"])) as ctx:
        if config["variant"] not in VARIANTS:
            raise ConfigError(
                f"variant must be one of {sorted(VARIANTS)}, got {config['variant']!r}"
            )
        seeds = [int(s) for s in config.get("select_seeds") or []]
        scenes_dir = Path(args.data) / "negatives" / "scenes" / "images"
        if len(seeds) == 1 or len(set(seeds)) != len(seeds):
            raise ConfigError(f"select_seeds needs two or more distinct seeds, got {seeds}")
        if seeds and not scenes_dir.is_dir():
            raise ConfigError(
                f"select_seeds chooses by the held-out streets with decoys, and {scenes_dir} "
                "has none: train one seed (select_seeds: null)"
            )
        train_set = engine.open_split(args.data, "train")
        flow_set = _Splits([engine.open_split(args.data, s) for s in config["splits"]])
        path = engine.segmenter_path(config, args.out)
        segmenter, seg_bundle = engine.load_segmenter(path)
        segmenter.to(ctx.device)

        # 1. SML statistics on the train split (the same pass as `segsafe train sml`).
        mean, std, _ = max_logit_statistics(
            segmenter, train_set, ctx.device, config["stats_images"], show_progress=ctx.is_main
        )
        held_out = None
        if scenes_dir.is_dir():
            scenes = engine.NegativeScenes(args.data)
            _, out = engine.holdout_split(len(scenes), float(config["scene_holdout"]), 0)
            held_out = Subset(scenes, out)

        # 2. The flow, trained against "segmentation wrong here"; with select_seeds, one fit
        # per seed, each with its own checkpoint, and the best on the held-out streets kept.
        best: tuple[FlowEneDetU | FlowEneDetC, dict[str, Any]] | None = None
        candidates: dict[str, float] = {}
        for seed in seeds or [int(config["seed"])]:
            run_config, run_args = config, args
            if len(seeds) > 1:
                # Seeded after the SML pass (whose data loader draws from the global RNG), so
                # candidate k is not the very fit a single run with `seed: k` makes.
                engine.seed_everything(seed)
                run_config = {**config, "seed": seed}
                run_args = argparse.Namespace(**vars(args))
                run_args.out = str(Path(args.out).with_name(f"{Path(args.out).stem}.seed{seed}"))
            desc = f"flowenedet seed {seed}" if len(seeds) > 1 else "flowenedet"
            # --resume continues each fit from its own checkpoint; a seed the killed run
            # never reached has none yet and starts afresh.
            detector = fit_flow(
                ctx, segmenter, mean, std, flow_set, run_config, run_args, desc,
                fresh_without_checkpoint=len(seeds) > 1,
                inputs={"segmenter": engine.bundle_identity(path)},
            )  # fmt: skip
            if detector is None:
                return {"stopped": True}
            metrics: dict[str, Any] = {}
            if held_out is not None:
                detector.to(ctx.device)
                metrics = held_out_metrics(detector, engine.decoy_targets(held_out), ctx.device)
                metrics["decoy_images"] = len(held_out)
                candidates[str(seed)] = metrics["decoy_ap"]
                if ctx.is_main:
                    print(
                        # Percent, marked as such: the bundle stores fractions.
                        f"seed {seed}: held-out streets with decoys ({len(held_out)}): AP "
                        f"{100 * metrics['decoy_ap']:.2f}%, "
                        f"FPR95 {100 * metrics['decoy_fpr95']:.2f}%"
                    )
            if best is None or metrics.get("decoy_ap", 0.0) > best[1].get("decoy_ap", 0.0):
                best = (detector, {**metrics, "seed": seed})
        assert best is not None
        detector, metrics = best
        if len(seeds) > 1:
            metrics["selected_from"] = candidates  # seed -> held-out decoy AP
        engine.write_part_bundle(
            ctx, args, config, detector, detector.trained_parts[0], path, seg_bundle.metadata,
            metrics,
        )  # fmt: skip
        return {"variant": config["variant"], **metrics}


def fit_flow(
    ctx: engine.RunContext,
    segmenter: Segmenter,
    mean: torch.Tensor,
    std: torch.Tensor,
    flow_set: _Splits,
    config: dict[str, Any],
    args: argparse.Namespace,
    desc: str,
    fresh_without_checkpoint: bool = False,
    inputs: dict[str, Any] | None = None,
) -> FlowEneDetU | FlowEneDetC | None:
    """One FED fit on the frozen segmenter (None when ``--stop-after`` cut it short);
    ``inputs``: the run's identity beyond its config (the segmenter bundle's)."""
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
    module = FlowEneDetTraining(segmenter, detector.model).to(ctx.device)
    optimizer, scheduler = engine.constant_adam(detector.model.parameters(), config)
    make_sample = engine.augmented_samples(flow_set, config)
    # ActNorm data init on the first *global* batch, identical on every rank.
    if not engine.run_stage(
        ctx, module, optimizer, scheduler, make_sample, len(flow_set), config, args,
        desc, data_init=True, fresh_without_checkpoint=fresh_without_checkpoint,
        inputs=inputs,
    ):  # fmt: skip
        return None
    return detector
