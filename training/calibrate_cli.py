"""`segsafe calibrate`: give each detector a default operating point on inlier images.

Anomaly scores are in each detector's own units (1 - MSP in [0, 1], energy in logit
units, DenseHybrid in log units, ...), so one threshold cannot serve them all. This
command runs the models on images with segmentation labels and no anomalies, takes the
scores of the ground-truth pixels of ``--classes`` (by default the dataset's road: train
id 0 in Cityscapes and the world, class 6 in StreetHazards, whose class 0 is building),
and stores in each detector's bundle the threshold that flags ``--inlier-fpr`` of them.
The node uses it whenever its ``anomaly_threshold`` parameter is left at NaN (the default).

Examples:
  segsafe calibrate --models models/demo --root out/world --dataset world
  segsafe calibrate --models models/espnetv2_city --root /data/cityscapes \\
      --dataset cityscapes --detectors max_softmax,entropy,max_logit,energy
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from segmentation_safety.commands.common import add_input_resize_arg, add_models_arg
from segmentation_safety.errors import InvalidArgumentError, report_user_errors

#: Datasets with a split that has segmentation labels.
DATASETS = ("world", "cityscapes", "streethazards")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="store each detector's default anomaly threshold (calibrated on inlier road)",
        description=__doc__.replace("``", "`"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--root", type=Path, required=True, help="dataset root directory")
    p.add_argument("--dataset", default="world", choices=DATASETS, help="layout of --root")
    add_models_arg(p)
    p.add_argument("--detectors", default="all", help="comma-separated names, or 'all'")
    p.add_argument(
        "--inlier-fpr",
        type=float,
        default=0.01,
        help="fraction of inlier pixels the threshold may flag (default 0.01)",
    )
    p.add_argument(
        "--classes",
        type=int,
        nargs="+",
        default=None,
        help="class ids of the dataset's labels whose pixels are the inliers (default: the "
        "dataset's road: 0 in world and cityscapes, 6 in streethazards)",
    )
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--pixels-per-image", type=int, default=20_000, help="inlier pixels kept")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    add_input_resize_arg(p)
    p.add_argument("--dry-run", action="store_true", help="print the thresholds, write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def inlier_classes(dataset: str, requested: Sequence[int] | None) -> list[tuple[int, str]]:
    """(id, name) of the classes to calibrate on: ``requested``, or the dataset's road.

    Ids are those of the dataset loader's labels, so they mean different classes in
    different datasets; each loader states its names and road ids.
    """
    from training.evaluate_cli import labelled_loader

    loader = labelled_loader(dataset)
    names = loader.CLASS_NAMES
    classes = list(loader.ROAD_CLASSES) if requested is None else list(requested)
    unknown = [c for c in classes if not 0 <= c < len(names)]
    if unknown:
        listed = ", ".join(f"{i} {name}" for i, name in enumerate(names))
        raise InvalidArgumentError(
            f"--classes {' '.join(map(str, unknown))}: {dataset} has no such class ({listed})"
        )
    return [(c, names[c]) for c in classes]


@report_user_errors("calibrate")
def run(args: argparse.Namespace) -> int:
    from itertools import islice

    from segmentation_safety.commands.common import parse_detectors
    from segmentation_safety.pipeline import DEMO_MODELS, Pipeline, PipelineConfig
    from training.calibrate import collect_inlier_scores, operating_points, store_operating_points
    from training.evaluate_cli import load_detectors, load_segmenter, open_dataset

    if not 0.0 < args.inlier_fpr < 1.0:
        raise InvalidArgumentError("--inlier-fpr must be within (0, 1)")
    if args.limit is not None and args.limit < 1:
        raise InvalidArgumentError("--limit must be at least 1")
    if args.pixels_per_image < 1:
        raise InvalidArgumentError("--pixels-per-image must be at least 1")
    inliers = inlier_classes(args.dataset, args.classes)
    classes = [c for c, _ in inliers]
    described = ", ".join(f"{name} ({c})" for c, name in inliers)
    models = args.models or DEMO_MODELS
    samples, total = open_dataset(args.dataset, args.root, "val")
    if args.limit is not None:
        samples, total = islice(samples, args.limit), min(total, args.limit)
    names = parse_detectors(args.detectors)
    segmenter, meta, description = load_segmenter(None, models)
    explicit = args.detectors.strip() != "all"
    detectors, skipped = load_detectors(segmenter, names, models, explicit, {})
    # Detectors without an anomaly map (failure-only) have no anomaly threshold.
    for name in [n for n, d in detectors.items() if "anomaly" not in d.produces]:
        skipped[name] = "produces no anomaly map"
        detectors.pop(name)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    if not detectors:
        raise InvalidArgumentError("no detector to calibrate")
    size = meta.get("input_size")
    config = PipelineConfig(
        anomaly=None,
        failure=None,
        device=args.device,
        input_size=tuple(size) if size else None,
        input_resize=args.input_resize,
    )
    pipeline = Pipeline(segmenter, detectors, config)
    scores, images = collect_inlier_scores(
        pipeline,
        samples,
        list(detectors),
        classes,
        per_image=args.pixels_per_image,
        total=total,
        progress=not args.quiet,
    )
    missing = sorted(set(detectors) - set(scores))
    if missing:
        raise InvalidArgumentError(
            f"no pixel of classes {described} in {images} images: nothing to calibrate "
            f"{', '.join(missing)} on"
        )
    points = operating_points(scores, args.inlier_fpr, classes, f"{args.dataset}/val", images)
    print(f"{description}: {images} images of {args.root}, classes {described}")
    print("| detector | threshold | inlier pixels | units |")
    print("| --- | ---: | ---: | --- |")
    for name, point in points.items():
        units = detectors[name].score_units
        print(f"| {name} | {point.threshold:.6g} | {point.pixels} | {units} |")
    if args.dry_run:
        return 0
    parts = {name: d.calibration_part() for name, d in detectors.items()}
    written = store_operating_points(models, points, parts)
    print("wrote operating points into " + ", ".join(str(p) for p in written))
    return 0
