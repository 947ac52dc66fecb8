"""Timing of the segmentation pass and each detector's added cost, measured in one run.

What is timed is :class:`~segmentation_safety.pipeline.Pipeline` itself, the code the
node runs. Overheads are ratios taken in the same process, interleaved round by round,
so machine load affects numerator and denominator alike. Weights do not change timing, so a
detector whose trained parts are absent is timed with its untrained modules and marked.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from segmentation_safety.detectors import Detector
from segmentation_safety.models.segmenter import Segmenter
from segmentation_safety.pipeline import Pipeline, PipelineConfig


@dataclass
class DetectorTiming:
    ms: float  # median added time per frame
    overhead: float  # ms / segmentation_ms
    trained: bool = True
    note: str = ""
    budget: float | None = None  # DESIGN §7 overhead budget, where it names one

    @property
    def within_budget(self) -> bool | None:
        return None if self.budget is None else self.overhead <= self.budget


@dataclass
class BenchReport:
    device: str
    height: int
    width: int
    segmenter: str
    segmentation_ms: float
    repeats: int
    half: bool = False  # fp16 autocast (CUDA only, as the node runs there)
    detectors: dict[str, DetectorTiming] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it was not timed
    #: Freed host memory kept for reuse, as the node does (host_memory.retain_freed_memory).
    host_memory_retained: bool = False

    def to_json(self) -> dict:
        """The DESIGN.md §5.2 keys (plus a few extra fields)."""
        out = asdict(self)
        out["detectors"] = {
            n: {**asdict(t), "within_budget": t.within_budget} for n, t in self.detectors.items()
        }
        return out


def bench(
    segmenter: Segmenter,
    detectors: dict[str, Detector],
    height: int,
    width: int,
    device: torch.device,
    repeats: int = 10,
    warmup: int = 2,
    untrained: Sequence[str] = (),
    segmenter_name: str = "",
    progress: Callable[[int, int], None] | None = None,
    half: bool = True,
) -> BenchReport:
    """Median per-frame times at ``height``×``width`` on ``device`` (batch of one).

    Each round is one :meth:`Pipeline.run` with every detector, as the node calls it, so
    the detectors are interleaved with the segmentation pass they add to and time what
    is published. Its timings give both sides of the ratio: the segmentation pass is
    ``preprocess`` (normalisation) + ``segmenter`` (the network), a detector's time is
    its ``detector/NAME`` stage; the class max every segmentation needs is part of the
    pass (else the first of max_logit/max_softmax to run would pay for both). On CUDA
    the networks run under fp16 autocast unless ``half`` is false, as in the node.
    """
    half = half and device.type == "cuda"
    names = list(detectors)
    pipe = Pipeline(
        segmenter,
        detectors,
        PipelineConfig(anomaly=None, extra=tuple(names), device=str(device), half=half),
    )
    # A frame as the node hands it over: H×W×3 memory, which to_input shows the networks
    # as 3×H×W (channels-last, about 2× faster on CPU than a contiguous tensor).
    frame = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8)
    image = pipe.to_input(frame)
    seg_times: list[float] = []
    det_times: dict[str, list[float]] = {n: [] for n in names}
    total = warmup + repeats
    for i in range(total):
        _, _, timings = pipe.run(image, names, class_max_in_pass=True)
        if i >= warmup:
            seg_times.append(timings["preprocess"] + timings["segmenter"])
            for n in names:
                det_times[n].append(timings[f"detector/{n}"])
        if progress:
            progress(i + 1, total)
    seg_ms = statistics.median(seg_times)
    report = BenchReport(
        device=str(device),
        height=height,
        width=width,
        segmenter=segmenter_name or type(segmenter).__name__,
        segmentation_ms=seg_ms,
        repeats=repeats,
        half=half,
    )
    for n, ts in det_times.items():
        ms = statistics.median(ts)
        report.detectors[n] = DetectorTiming(
            ms=ms,
            overhead=ms / seg_ms,
            trained=n not in untrained,
            note=_note(detectors[n], n in untrained),
            budget=type(detectors[n]).budget,
        )
    return report


def _note(detector: Detector, untrained: bool) -> str:
    notes = ["untrained weights (timing only)"] if untrained else []
    if detector.cost_note():
        notes.append(detector.cost_note())
    return "; ".join(notes)
