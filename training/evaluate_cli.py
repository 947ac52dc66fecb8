"""`segsafe evaluate`: score a segmenter and its detectors on a dataset split.

Writes R.json (DESIGN.md 5.2), R.md and PR/ROC plots (R_anomaly.png, R_failure.png)
beside it. One forward pass per batch serves every detector.

Examples:
  segsafe evaluate --root out/world --split val --out out/eval/world_val.json
  segsafe evaluate --root out/world --split anomaly --detectors densehybrid,sml \\
      --models models/demo --out out/eval/world_anomaly.json

The real ESPNetv2 Cityscapes weights (no bundle needed) on Road Anomaly, softmax family:
  segsafe evaluate --dataset roadanomaly --root ../shared/real/roadanomaly --split anomaly \\
      --segmenter-weights ../shared/real/espnetv2/espnetv2_s_2.0_city_1024x512.pth \\
      --detectors max_softmax,entropy,max_logit,energy \\
      --out out/eval/roadanomaly_espnetv2.json
(``--metrics exact`` agrees with the default histograms to 0.02 points, at ~4x the time).
Add ``--score-at label`` to follow the reference protocol of ../shared/real/README.md
(logits upsampled to the label size, then scored); the default scores at the network's
resolution and upsamples the map, as the node does (docs/real-data.md has both).

With ``--detectors all`` (the default) every detector that cannot run here is skipped
and listed, with the reason, in the output, R.json ("skipped") and R.md: a trained part
missing from --models, a part trained on another segmenter (its fingerprint differs),
or a segmenter the detector does not fit. A detector named explicitly must run, or the
command stops with that reason.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from segmentation_safety.commands.common import (
    add_input_resize_arg,
    add_models_arg,
    parse_detector_options,
)
from segmentation_safety.errors import (
    InvalidArgumentError,
    MissingFileError,
    UserError,
    check_writable,
    report_user_errors,
)

DATASETS = ("world", "cityscapes", "lostandfound", "fishyscapes", "streethazards", "roadanomaly")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score segmentation and detectors on a dataset (writes R.json, R.md, plots)",
        description=__doc__.replace("``", "`"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--root", type=Path, required=True, help="dataset root directory")
    p.add_argument(
        "--split",
        required=True,
        choices=("anomaly", "val"),
        help="anomaly: anomaly labels (world anomaly/, L&F, Fishyscapes, Road Anomaly, "
        "StreetHazards test); val: segmentation labels",
    )
    p.add_argument("--dataset", default="world", choices=DATASETS, help="layout of --root")
    add_models_arg(p)
    p.add_argument("--detectors", default="all", help="comma-separated names, or 'all'")
    p.add_argument("--out", type=Path, required=True, help="R.json to write")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="network input size (default: the bundle's input_size, else the image size; "
        "512 1024 for upstream ESPNetv2 Cityscapes weights)",
    )
    add_input_resize_arg(p)
    p.add_argument(
        "--laf-root",
        type=Path,
        default=None,
        help="Lost and Found root with the images, for --dataset fishyscapes given as the "
        "official label folder",
    )
    p.add_argument(
        "--cityscapes-root",
        type=Path,
        default=None,
        help="Cityscapes root with leftImg8bit/val, for --dataset fishyscapes given as the "
        "official FS Static zip (its overlays are added to those frames)",
    )
    p.add_argument(
        "--batch-size", type=int, default=1, help="images per forward pass (same-size runs)"
    )
    p.add_argument(
        "--segmenter-weights",
        type=Path,
        default=None,
        help="use this segmenter instead of --models/segmenter.safetensors: a segmenter "
        "bundle (.safetensors) or upstream weights that segsafe import-weights reads (.pth, "
        "e.g. ../shared/real/espnetv2/espnetv2_s_2.0_city_1024x512.pth)",
    )
    p.add_argument(
        "--metrics",
        default="histogram",
        choices=("histogram", "exact"),
        help="pixel-metric state: fixed-size fine histograms (default, any number of "
        "frames) or exact per-score counts (small sets; matches sklearn)",
    )
    p.add_argument(
        "--score-at",
        default="network",
        choices=("network", "label"),
        help="network (default): each map scored at the network's resolution, then "
        "upsampled to the label size, exactly what the node publishes; label: logits "
        "upsampled to the label size first, then scored, the benchmarks' reference protocol "
        "(softmax family only; detectors that need features keep the network order, and "
        "the report says which order each one used)",
    )
    p.add_argument(
        "--detector-options",
        default=None,
        help='JSON of per-detector options, e.g. \'{"resynthesis": {"preset": "tiny"}}\'',
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


class MissingPartError(UserError, FileNotFoundError):
    """A detector asked for by name whose trained part file is absent."""


@report_user_errors("evaluate")
def run(args: argparse.Namespace) -> int:
    import torch

    from segmentation_safety.commands.common import parse_detectors
    from segmentation_safety.pipeline import DEMO_MODELS, Pipeline, PipelineConfig
    from training.evaluate import evaluate, scoring_order
    from training.report import report_markdown, write_report

    check_writable(args.out)  # before the evaluation, not after it
    if args.limit is not None and args.limit < 1:
        raise InvalidArgumentError("--limit must be at least 1")
    if args.batch_size < 1:
        raise InvalidArgumentError("--batch-size must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise InvalidArgumentError("--threads must be at least 1")
    if args.input_size is not None and min(args.input_size) < 16:
        raise InvalidArgumentError("--input-size H W must both be at least 16")
    if args.threads:
        torch.set_num_threads(args.threads)
    options = parse_detector_options(args.detector_options)
    names = parse_detectors(args.detectors)
    explicit = args.detectors.strip() != "all"
    # Cheap checks first: a wrong root or split should not wait for models to load.
    samples, total = open_dataset(
        args.dataset, args.root, args.split, args.laf_root, args.cityscapes_root
    )

    segmenter, meta, description = load_segmenter(args.segmenter_weights, args.models)
    # Parts trained on another segmenter are refused by their fingerprint.
    parts_root = args.models or DEMO_MODELS
    detectors, skipped = load_detectors(segmenter, names, parts_root, explicit, options)
    for name, why in skipped.items():
        print(f"warning: skipping detector {name}: {why}", file=sys.stderr)
    if not detectors:
        raise UserError(f"no detector could be loaded (skipped: {', '.join(skipped)})")

    input_size = args.input_size or meta.get("input_size")
    config = PipelineConfig(
        anomaly=None,
        failure=None,
        class_iou=None,
        device=args.device,
        input_size=tuple(input_size) if input_size else None,
        input_resize=args.input_resize,
    )
    pipeline = Pipeline(segmenter, detectors, config, class_names_for(segmenter, meta))
    problem = label_set_problem(args.dataset, pipeline.class_names)
    if problem is not None:
        # Ids of another class list still fall within range: scored, they would give a
        # confident and meaningless mIoU, failure and IoU-prediction table.
        print(
            f"warning: {problem}: segmentation, failure and IoU-prediction metrics need the "
            "same classes and are left out; anomaly metrics do not depend on them",
            file=sys.stderr,
        )
        samples = without_labels(samples, args.dataset, args.split)
    if args.score_at == "label":
        kept = [n for n, o in scoring_order(detectors, "label").items() if o == "network"]
        if kept:
            print(
                f"note: --score-at label: {', '.join(kept)} cannot be scored from the logits "
                "alone, so "
                "they keep scoring at the network's resolution (map upsampled); the report "
                "lists the order of each detector under score_at",
                file=sys.stderr,
            )
    report = evaluate(
        pipeline,
        samples,
        list(detectors),
        dataset=args.dataset,
        split=args.split,
        batch_size=args.batch_size,
        limit=args.limit,
        total=total,
        metrics_mode=args.metrics,
        progress=not args.quiet,
        skipped=skipped,
        segmenter=description,
        score_at=args.score_at,
    )
    written = write_report(report, args.out)
    print(report_markdown(report))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def load_segmenter(weights: Path | None, models: Path | None) -> tuple[Any, dict[str, Any], str]:
    """(segmenter, bundle metadata, description) from --segmenter-weights or --models.

    Upstream ``.pth`` weights go through the same import as ``segsafe import-weights``,
    so they get the metadata (input size, class names) their bundle would carry.
    """
    from segmentation_safety.models.zoo import load_segmenter
    from segmentation_safety.pipeline import DEMO_MODELS, part_path

    if weights is not None and weights.suffix in (".pth", ".pt"):
        from segmentation_safety.models.importers import import_checkpoint

        imported = import_checkpoint(weights)
        for note in imported.notes:  # what import-weights would say (an assumed size, ...)
            print(f"note: {weights.name}: {note}", file=sys.stderr)
        return imported.model, imported.metadata(), imported.description
    path = weights if weights is not None else part_path(models or DEMO_MODELS, "segmenter")
    model, bundle = load_segmenter(path)
    arch = bundle.metadata.get("architecture", {}).get("name", "segmenter")
    return model, bundle.metadata, f"{arch} ({path})"


def load_detectors(
    segmenter: Any,
    names: list[str],
    parts_root: Path,
    explicit: bool,
    options: dict[str, dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, str]]:
    """Build detectors and load their trained parts from ``parts_root``.

    A detector named explicitly must load, or the command stops with the reason (a
    missing part raises :class:`MissingPartError` naming the file). With ``all``, every
    detector that cannot run here is skipped and its reason returned: a missing part, a
    part trained on another segmenter, or a segmenter it does not fit (MC dropout needs
    a dropout layer).
    """
    from segmentation_safety.checkpoint import BundleError
    from segmentation_safety.detectors import registry
    from segmentation_safety.pipeline import load_parts, part_path

    unknown = set(options) - set(names)
    if unknown:
        raise InvalidArgumentError(
            f"--detector-options names detectors not evaluated: {sorted(unknown)}"
        )
    detectors, skipped = {}, {}
    for name in names:
        cls = registry.detector_class(name)
        missing = [part_path(parts_root, k) for k in cls.trained_parts]
        missing = [p for p in missing if not p.is_file()]
        try:
            if missing:
                raise MissingPartError(f"detector {name!r}: trained part {missing[0]} not found")
            detector = registry.build(name, segmenter, **options.get(name, {}))
            detectors[name] = load_parts(detector, parts_root)
        except (MissingPartError, BundleError, ValueError) as e:
            if explicit:
                raise
            skipped[name] = str(e)
    return detectors, skipped


def class_names_for(segmenter: Any, meta: dict[str, Any]) -> list[str]:
    """The bundle's class names, the Cityscapes train ids for 19 classes, else numbers."""
    names = meta.get("class_names")
    if names:
        return list(names)
    if segmenter.num_classes == 19:
        from segmentation_safety.labels import TRAIN_NAMES

        return list(TRAIN_NAMES)
    return [str(i) for i in range(segmenter.num_classes)]


def labelled_loader(name: str) -> Any | None:
    """The loader class of ``name``'s segmentation labels (its ``CLASS_NAMES`` and
    ``ROAD_CLASSES``), or None for a dataset with anomaly labels only."""
    from training import datasets as ds

    loaders = {"world": ds.SyntheticWorld, "cityscapes": ds.Cityscapes,
               "streethazards": ds.StreetHazards}  # fmt: skip
    return loaders.get(name)


def dataset_classes(name: str) -> tuple[str, ...] | None:
    """The classes of ``name``'s segmentation labels, in id order (None: it has none)."""
    loader = labelled_loader(name)
    return None if loader is None else tuple(loader.CLASS_NAMES)


def label_set_problem(name: str, class_names: list[str]) -> str | None:
    """Why the segmenter's classes are not ``name``'s label classes, or None when they
    are (by name; by count where the bundle names none)."""
    expected = dataset_classes(name)
    if expected is None:
        return None
    unnamed = all(n == str(i) for i, n in enumerate(class_names))
    if unnamed and len(class_names) == len(expected):
        return None
    if [n.lower() for n in class_names] == [e.lower() for e in expected]:
        return None
    return (
        f"the segmenter's {len(class_names)} classes ({_first(class_names)}) are not "
        f"{name}'s {len(expected)} ({_first(expected)})"
    )


def _first(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def without_labels(
    samples: Iterable[dict[str, Any]], name: str, split: str
) -> Iterator[dict[str, Any]]:
    """The samples without their segmentation labels; a split with nothing else to
    score is refused by name."""
    for sample in samples:
        if sample.get("anomaly") is None:
            raise InvalidArgumentError(
                f"{name}/{split} has segmentation labels only, and they are not the "
                "segmenter's classes: nothing to score"
            )
        yield {**sample, "label": None}


def open_dataset(
    name: str,
    root: Path,
    split: str,
    laf_root: Path | None = None,
    cityscapes_root: Path | None = None,
) -> tuple[Iterable[dict[str, Any]], int]:
    """(lazy iterable of sample dicts, number of samples) for ``--dataset name --split``.

    ``anomaly`` reads the split with anomaly labels, ``val`` the one with segmentation
    labels; a dataset without such a split is refused with the splits it has.
    """
    from training import datasets as ds

    if not root.is_dir():
        raise MissingFileError(f"dataset root {root} is not a directory")
    if name == "fishyscapes" and split == "anomaly":
        if (root / "labels").is_dir():
            data = ds.FishyscapesProcessed(root)
        elif any(root.glob("*rgb.npz")):  # the Static zip: overlays on Cityscapes frames
            if cityscapes_root is None:
                raise InvalidArgumentError(
                    f"{root} is the official FS Static zip (overlays): pass --cityscapes-root "
                    "with the Cityscapes frames they are added to"
                )
            data = ds.FishyscapesStatic(root, cityscapes_root)
        elif laf_root is None:
            raise InvalidArgumentError(
                f"{root} has no labels/ folder (the preprocessed Fishyscapes layout); for the "
                "official label zip pass --laf-root with the Lost and Found images"
            )
        else:
            data = ds.FishyscapesLostAndFound(root, laf_root)
    else:
        openers: dict[tuple[str, str], Any] = {
            ("world", "val"): lambda: ds.SyntheticWorld(root, "val"),
            ("world", "anomaly"): lambda: ds.SyntheticAnomaly(root),
            ("cityscapes", "val"): lambda: ds.Cityscapes(root, "val"),
            ("lostandfound", "anomaly"): lambda: ds.LostAndFound(root, "test"),
            ("roadanomaly", "anomaly"): lambda: ds.RoadAnomaly(root),
            ("streethazards", "anomaly"): lambda: ds.StreetHazards(root, "test"),
            ("streethazards", "val"): lambda: ds.StreetHazards(root, "val"),
        }
        if (name, split) not in openers:
            has = [s for (n, s) in openers if n == name] or ["anomaly"]
            raise InvalidArgumentError(
                f"dataset {name!r} has no {split!r} split here; use --split {' or '.join(has)}"
            )
        try:
            data = openers[name, split]()
        except MissingFileError as e:
            if name != "world":
                raise
            raise MissingFileError(
                f"{e} (--dataset is 'world', the default: for a real dataset pass --dataset "
                "with its layout, see --help)"
            ) from None
    return (data[i] for i in range(len(data))), len(data)
