"""Evaluation loop: samples -> one shared forward pass per batch -> streaming metrics.

Pure apart from the progress bar: it takes an iterable of sample dicts and a
:class:`~segmentation_safety.pipeline.Pipeline` and returns an :class:`EvaluationReport`.
Loading datasets and models and writing the report are the caller's business
(``training/evaluate_cli.py``, ``training/report.py``).

A sample is a mapping with
- ``"image"``: H×W×3 uint8 RGB (required);
- ``"label"``: H×W train ids, 255 void (optional): segmentation mIoU, failure and IoU
  prediction metrics;
- ``"anomaly"``: H×W 0 inlier / 1 anomaly / 255 void (optional): anomaly metrics;
- ``"name"``: used in error messages (optional).
Every metric the labels of a sample allow is computed; a detector is scored on each kind of
map it produces for which the split has ground truth.

Maps and logits are upsampled to the label resolution (bilinear, align_corners=False)
before scoring; the segmentation is the argmax of the upsampled logits. In which order a
detector's map is made is ``score_at``: ``"network"`` (default) scores at the network's
resolution and upsamples the map, exactly what the node publishes; ``"label"`` upsamples
the logits to the label size first and scores every pixel there, the benchmarks'
reference protocol, for detectors whose maps come from the logits alone
(``Detector.logits_only``, the softmax family); the others keep the network order and
the report says so per detector. The two orders differ because the scores are not
linear in the logits (max-softmax AP on Road Anomaly moves by about half a point).

Anomaly metrics pool every valid pixel of every image (Fishyscapes' rules) unless the
dataset's own benchmark computes them otherwise: StreetHazards' ``eval_ood.py`` averages
each image's AP, AUROC and FPR95 (:data:`ANOMALY_RULES`). There the report's ``anomaly``
block is that mean, and ``anomaly_pooled`` holds the pooled values beside it.

The metric state is bounded: pixel metrics use the fixed-size histograms of
``segmentation_safety.metrics`` (``metrics_mode="histogram"``) unless ``"exact"`` is
asked for, and IoU prediction keeps a few floats per image; the label order holds one
image's upsampled logits at a time.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from segmentation_safety.detectors import Detector
from segmentation_safety.metrics import (
    AnomalyMetrics,
    AnomalyResult,
    ConfusionMatrix,
    FailureMetrics,
    FailureResult,
    IoUPredictionMetrics,
    IoUPredictionResult,
    MeanAnomalyResult,
    PerImageAnomalyMetrics,
    per_image_class_iou,
)
from segmentation_safety.metrics.segmentation import fuse_open_set
from segmentation_safety.pipeline import Pipeline, resize_map
from segmentation_safety.types import DetectorOutput

VOID = 255
#: Where a detector's map is made (see the module docstring): "network" resolution, then
#: the map upsampled (what the node publishes), or at the "label" size from upsampled logits.
SCORE_AT = ("network", "label")
#: How each dataset's benchmark computes its anomaly metrics, where it is not by pooling
#: every pixel (Fishyscapes): "per_image" averages each image's values (the CAOS
#: benchmark's eval_ood.py for StreetHazards, which its published numbers come from).
ANOMALY_RULES: dict[str, str] = {"streethazards": "per_image"}


@dataclass
class DetectorScores:
    """What one detector reached; ``None`` for a kind it does not produce or the split lacks."""

    anomaly: AnomalyResult | None = None  # pooled (its curves are the plots')
    failure: FailureResult | None = None
    iou: IoUPredictionResult | None = None
    #: Open-set segmentation with the anomaly map thresholded into class K (DenseHybrid
    #: eq. 16): {"open_miou"}, for detectors with an open-set threshold.
    open_set: dict[str, float] | None = None
    #: The per-image mean, where the dataset's benchmark computes it so (ANOMALY_RULES).
    anomaly_per_image: MeanAnomalyResult | None = None

    def blocks(self) -> dict[str, dict[str, float]]:
        """The detector's blocks of the evaluate report (DESIGN.md 5.2), NaN kept:
        ``anomaly`` is the benchmark's own rule, ``anomaly_pooled`` the pooled values
        where that rule is another."""
        out = {}
        for key in ("anomaly", "failure", "iou"):
            result = getattr(self, key)
            if result is not None:
                out[key] = result.as_dict()
        if self.anomaly_per_image is not None:
            if "anomaly" in out:
                out["anomaly_pooled"] = out["anomaly"]
            out["anomaly"] = self.anomaly_per_image.as_dict()
        if self.open_set is not None:
            out["open_set"] = dict(self.open_set)
        return out


@dataclass
class EvaluationReport:
    """Everything ``segsafe evaluate`` reports, as plain data (fractions, not percent)."""

    dataset: str
    split: str
    images: int
    miou: float | None  # None when the split has no segmentation labels
    pixel_accuracy: float | None
    class_iou: np.ndarray | None  # per class, NaN where a class never occurred
    class_names: list[str]
    detectors: dict[str, DetectorScores]
    skipped: dict[str, str] = field(default_factory=dict)  # detector -> why it has no scores
    seconds: float = 0.0
    segmenter: str = ""
    metrics_mode: str = "histogram"
    score_at: str = "network"  # the order asked for
    #: The order each scored detector used: "label" or "network" (a detector that needs
    #: more than the logits stays at "network" whatever was asked).
    scored_at: dict[str, str] = field(default_factory=dict)
    #: How images were resized to the network's input ("pil" or "fast").
    input_resize: str = "pil"
    #: How the anomaly block was computed: "pooled" or "per_image" (ANOMALY_RULES).
    anomaly_rule: str = "pooled"

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


class MetricAccumulators:
    """Streaming metric state for one evaluation: segmentation plus each detector's kinds.

    Accumulators are created on first use, so a split without segmentation labels never
    allocates failure histograms.
    """

    def __init__(
        self,
        num_classes: int,
        produces: Mapping[str, frozenset[str]],
        metrics_mode: str = "histogram",
        open_thresholds: Mapping[str, float] | None = None,
        anomaly_rule: str = "pooled",
    ) -> None:
        if anomaly_rule not in ("pooled", "per_image"):
            raise ValueError(f"anomaly_rule must be 'pooled' or 'per_image', got {anomaly_rule!r}")
        self.num_classes = num_classes
        self.produces = dict(produces)
        self.metrics_mode = metrics_mode
        self.open_thresholds = dict(open_thresholds or {})
        self.anomaly_rule = anomaly_rule
        self.open_set: dict[str, ConfusionMatrix] = {}
        self.confusion: ConfusionMatrix | None = None
        self.anomaly: dict[str, AnomalyMetrics] = {}
        self.anomaly_per_image: dict[str, PerImageAnomalyMetrics] = {}
        self.failure: dict[str, FailureMetrics] = {}
        self.iou: dict[str, IoUPredictionMetrics] = {}
        self.images = 0

    def update(
        self,
        logits: torch.Tensor,
        outputs: Mapping[str, DetectorOutput],
        label: np.ndarray | None,
        anomaly: np.ndarray | None,
    ) -> None:
        """Score one image: ``logits`` K×h×w and each detector's maps (h'×w', any size).

        ``label``/``anomaly`` are the image's ground truth (H×W, either may be None).
        """
        target = label if label is not None else anomaly
        if target is None:
            raise ValueError("an evaluated image needs a 'label' or an 'anomaly' map")
        size = tuple(target.shape)
        self.images += 1
        if label is not None and anomaly is not None:
            label = closed_set_label(label, anomaly, self.num_classes)
        if label is not None:
            pred = _upsample(logits.float(), size).argmax(0).cpu().numpy()
            if self.confusion is None:
                self.confusion = ConfusionMatrix(self.num_classes)
            self.confusion.update(pred, label)
        for name, out in outputs.items():
            kinds = self.produces.get(name, frozenset())
            if anomaly is not None and "anomaly" in kinds and out.anomaly is not None:
                score = _upsample(finite_scores(out.anomaly.float()), size).cpu().numpy()
                self._anomaly(name).update(score, anomaly)
                if self.anomaly_rule == "per_image":
                    self.anomaly_per_image.setdefault(name, PerImageAnomalyMetrics())
                    self.anomaly_per_image[name].update(score, anomaly)
                if label is not None and name in self.open_thresholds:
                    self._open_set(name, pred, score, label, anomaly)
            if label is None:
                continue
            if "failure" in kinds and out.failure is not None:
                score = _upsample(finite_scores(out.failure.float()), size).cpu().numpy()
                self._failure(name).update(score, pred, label)
            if "class_iou" in kinds and out.class_iou is not None:
                true = per_image_class_iou(pred, label, self.num_classes)
                self._iou(name).update(out.class_iou.float().cpu().numpy(), true)

    def _open_set(
        self, name: str, pred: np.ndarray, score: np.ndarray, label: np.ndarray, anomaly: np.ndarray
    ) -> None:
        """Add one image to ``name``'s (K+1)-class confusion: true anomalies are class K,
        and so is every pixel whose score reaches the detector's open-set threshold."""
        k = self.num_classes
        open_label = np.where(anomaly == 1, k, label)
        open_label = np.where(anomaly == VOID, VOID, open_label).astype(np.int64)
        fused = fuse_open_set(pred, score, self.open_thresholds[name], k)
        if name not in self.open_set:
            self.open_set[name] = ConfusionMatrix(k + 1)
        self.open_set[name].update(fused, open_label)

    def scores(self) -> dict[str, DetectorScores]:
        """Per-detector results over everything seen so far (detectors without any: empty)."""
        return {
            name: DetectorScores(
                anomaly=self.anomaly[name].compute() if name in self.anomaly else None,
                failure=self.failure[name].compute() if name in self.failure else None,
                iou=self.iou[name].compute() if name in self.iou else None,
                open_set={"open_miou": self.open_set[name].open_miou()}
                if name in self.open_set
                else None,
                anomaly_per_image=self.anomaly_per_image[name].compute()
                if name in self.anomaly_per_image
                else None,
            )
            for name in self.produces
        }

    def _anomaly(self, name: str) -> AnomalyMetrics:
        if name not in self.anomaly:
            self.anomaly[name] = AnomalyMetrics(mode=self.metrics_mode)
        return self.anomaly[name]

    def _failure(self, name: str) -> FailureMetrics:
        if name not in self.failure:
            self.failure[name] = FailureMetrics(mode=self.metrics_mode)
        return self.failure[name]

    def _iou(self, name: str) -> IoUPredictionMetrics:
        if name not in self.iou:
            self.iou[name] = IoUPredictionMetrics(self.num_classes)
        return self.iou[name]


def evaluate(
    pipeline: Pipeline,
    samples: Iterable[Mapping[str, Any]],
    detectors: Sequence[str] | None = None,
    *,
    dataset: str = "dataset",
    split: str = "",
    batch_size: int = 1,
    limit: int | None = None,
    total: int | None = None,
    metrics_mode: str = "histogram",
    progress: bool = True,
    skipped: Mapping[str, str] | None = None,
    segmenter: str = "",
    score_at: str = "network",
    anomaly_rule: str | None = None,
) -> EvaluationReport:
    """Run ``pipeline`` over ``samples`` and score its ``detectors`` (default: all it has).

    ``anomaly_rule``: "pooled" or "per_image"; default: the ``dataset``'s benchmark's
    (:data:`ANOMALY_RULES`, else pooled).

    Consecutive samples of equal image size are batched (up to ``batch_size``) through
    one :meth:`Pipeline.run`, which serves every detector. ``limit`` stops after that many
    images; ``total`` sizes the progress bar. ``skipped`` (name -> reason) is carried into
    the report for detectors the caller could not load. ``score_at`` is the order of
    resizing and scoring (:data:`SCORE_AT`, module docstring).
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    names = list(pipeline.detectors if detectors is None else detectors)
    unknown = [n for n in names if n not in pipeline.detectors]
    if unknown:
        raise ValueError(f"detectors {unknown} are not loaded in the pipeline")
    produces = {n: frozenset(pipeline.detectors[n].produces) for n in names}
    order = scoring_order({n: pipeline.detectors[n] for n in names}, score_at)
    at_label = {n: pipeline.detectors[n] for n in names if order[n] == "label"}
    at_network = [n for n in names if n not in at_label]
    # Detectors calibrated for open-set recognition (DenseHybrid: 95% TPR on held-out
    # negatives) also get open-mIoU, where the split has both kinds of labels.
    open_thresholds = {
        n: t for n in names if (t := pipeline.detectors[n].open_set_threshold()) is not None
    }
    rule = anomaly_rule or ANOMALY_RULES.get(dataset, "pooled")
    acc = MetricAccumulators(
        pipeline.segmenter.num_classes, produces, metrics_mode, open_thresholds, rule
    )
    if limit is not None:
        total = limit if total is None else min(total, limit)
    bar = tqdm(
        total=total,
        desc=f"evaluate {dataset}{'/' + split if split else ''}",
        unit="img",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    try:
        for batch in _batches(_checked(samples, limit), batch_size):
            images = np.stack([s["image"] for s in batch])
            seg, outs, _ = pipeline.run(pipeline.to_input(images), at_network)
            for b, sample in enumerate(batch):
                logits = seg.logits[b]
                outputs = {n: _pick(o, b) for n, o in outs.items()}
                if at_label:
                    # One image's logits at the label size at a time (19×720×1280 float32
                    # is 70 MB), freed with the next; update's own upsample is then a no-op.
                    logits = _upsample(logits.float(), label_size(sample))
                    outputs.update(score_logits(at_label, logits))
                try:
                    acc.update(logits, outputs, sample["label"], sample["anomaly"])
                except ValueError as e:
                    raise ValueError(f"{sample['name']}: {e}") from None
            bar.update(len(batch))
            # tqdm flips to s/img below 1 img/s; the throughput people compare is img/s.
            bar.set_postfix_str(f"{acc.images / (time.perf_counter() - t0):.2f} img/s")
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if acc.images == 0:
        raise ValueError(f"no images to evaluate in {dataset}{'/' + split if split else ''}")
    return _report(
        acc, pipeline, dataset, split, seconds, skipped, segmenter, metrics_mode, score_at, order
    )


def scoring_order(detectors: Mapping[str, Detector], score_at: str) -> dict[str, str]:
    """Where each detector is scored for ``score_at``: "label" only for detectors whose maps
    come from the logits alone (``logits_only``); every other one reads features or runs
    its own passes at the network's resolution, so it stays at "network"."""
    if score_at not in SCORE_AT:
        raise ValueError(f"score_at must be one of {SCORE_AT}, got {score_at!r}")
    return {
        n: "label" if score_at == "label" and d.logits_only else "network"
        for n, d in detectors.items()
    }


@torch.inference_mode()
def score_logits(
    detectors: Mapping[str, Detector], logits: torch.Tensor
) -> dict[str, DetectorOutput]:
    """Each logits-only detector's maps from one image's K×H×W ``logits``, at their size."""
    return {n: _pick(d.score_logits(logits[None]), 0) for n, d in detectors.items()}


def label_size(sample: Mapping[str, Any]) -> tuple[int, ...]:
    """The size maps are scored at: the label's, else the anomaly map's (checked equal)."""
    target = sample["label"] if sample["label"] is not None else sample["anomaly"]
    return tuple(target.shape)


def _pick(out: DetectorOutput, b: int) -> DetectorOutput:
    """Image ``b`` of a batched detector output."""
    return DetectorOutput(
        *(None if m is None else m[b] for m in (out.anomaly, out.failure, out.class_iou))
    )


def _report(
    acc: MetricAccumulators,
    pipeline: Pipeline,
    dataset: str,
    split: str,
    seconds: float,
    skipped: Mapping[str, str] | None,
    segmenter: str,
    metrics_mode: str,
    score_at: str,
    order: Mapping[str, str],
) -> EvaluationReport:
    scores = acc.scores()
    skipped = dict(skipped or {})
    for name, s in list(scores.items()):
        if not s.blocks():
            # Produces nothing this split has ground truth for (e.g. failure maps on an
            # anomaly-only split): say so instead of listing an empty entry.
            skipped[name] = (
                f"produces {sorted(acc.produces[name])}, none of which this split can score"
            )
            del scores[name]
    seg = acc.confusion.compute() if acc.confusion is not None else None
    return EvaluationReport(
        dataset=dataset,
        split=split,
        images=acc.images,
        miou=None if seg is None else seg.miou,
        pixel_accuracy=None if seg is None else seg.pixel_accuracy,
        class_iou=None if seg is None else seg.iou,
        class_names=list(pipeline.class_names),
        detectors=scores,
        skipped=skipped,
        seconds=seconds,
        segmenter=segmenter,
        metrics_mode=metrics_mode,
        score_at=score_at,
        scored_at={n: order[n] for n in scores},  # the scored ones only
        input_resize=pipeline.config.input_resize,
        anomaly_rule=acc.anomaly_rule,
    )


def closed_set_label(label: np.ndarray, anomaly: np.ndarray, num_classes: int) -> np.ndarray:
    """Void the anomaly pixels of a label map that encodes them as an extra class.

    StreetHazards labels its anomalies as class K (open-set style); closed-set mIoU and
    failure detection score the K known classes only, as the benchmark does. Other ids
    outside the segmenter's classes are left alone, so a mismatched label set still fails.
    """
    extra = (label >= num_classes) & (label != VOID) & (anomaly == 1)
    if not extra.any():
        return label
    return np.where(extra, np.uint8(VOID), label).astype(label.dtype)


def _checked(samples: Iterable[Mapping[str, Any]], limit: int | None) -> Iterator[dict]:
    """Validate each sample (clear errors naming it) and stop after ``limit``."""
    for i, sample in enumerate(samples):
        if limit is not None and i >= limit:
            return
        yield check_sample(sample, i)


def check_sample(sample: Mapping[str, Any], index: int = 0) -> dict[str, Any]:
    """Return the sample with numpy arrays, or raise ValueError naming what is wrong."""
    what = f"sample {sample.get('name', index)!s}"
    if "image" not in sample:
        raise ValueError(f"{what} has no 'image'")
    image = np.asarray(sample["image"])
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{what}: image must be H×W×3 uint8 RGB, got {image.dtype} {image.shape}")
    out: dict[str, Any] = {"image": image, "name": what}
    for key in ("label", "anomaly"):
        if sample.get(key) is None:
            out[key] = None
            continue
        arr = np.asarray(sample[key])
        if arr.ndim != 2:
            raise ValueError(f"{what}: {key} must be H×W, got shape {arr.shape}")
        out[key] = arr
    if out["label"] is None and out["anomaly"] is None:
        raise ValueError(f"{what} has neither a 'label' nor an 'anomaly' map")
    if (
        out["label"] is not None
        and out["anomaly"] is not None
        and out["label"].shape != out["anomaly"].shape
    ):
        raise ValueError(
            f"{what}: label {out['label'].shape} and anomaly {out['anomaly'].shape} differ in size"
        )
    return out


def _batches(samples: Iterable[dict], batch_size: int) -> Iterator[list[dict]]:
    """Group consecutive samples of one image size (a batch must stack)."""
    batch: list[dict] = []
    for s in samples:
        if batch and (len(batch) == batch_size or s["image"].shape != batch[0]["image"].shape):
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


#: Where non-finite scores go before a map is resized (see finite_scores).
SCORE_BOUND = 1e30


def finite_scores(t: torch.Tensor) -> torch.Tensor:
    """``t`` with NaN and +inf at +SCORE_BOUND, -inf at -SCORE_BOUND.

    Bilinear resizing gives a border neighbour weight 0, and 0·inf is NaN: one inf pixel
    (an fp16 overflow, a log-density of -inf) would spread NaN and stop the evaluation.
    NaN ranks as the most anomalous, as the node's alarm counts it (decisions.md); the
    bound stays far above any real score and below float32's overflow when interpolated.
    """
    return torch.nan_to_num(t, nan=SCORE_BOUND, posinf=SCORE_BOUND, neginf=-SCORE_BOUND)


def _upsample(t: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """C×h×w or h×w -> same at ``size`` (bilinear, align_corners=False)."""
    squeeze = t.ndim == 2
    x = resize_map(t[None, None] if squeeze else t[None], size)
    return x[0, 0] if squeeze else x[0]


def nan_to_none(value: float | None, low: float = 0.0, high: float = 1.0) -> float | None:
    """A metric for JSON: NaN (undefined, e.g. no anomaly pixel) -> None, clipped to its range.

    Clipping only removes summation rounding (an AP of 1.0000000000000002); the metrics
    themselves lie in [low, high] by construction.
    """
    if value is None or math.isnan(value):
        return None
    return min(max(float(value), low), high)
